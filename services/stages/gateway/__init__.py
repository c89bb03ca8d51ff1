"""`voicebus gateway`: the only process that talks to the Realtime API."""
