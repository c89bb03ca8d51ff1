"""What every voicebus stage shares: config, the envelope codec, bus sockets, the stage runner."""
