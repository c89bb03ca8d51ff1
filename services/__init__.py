"""One module (or small package) per voicebus process; none imports another."""
