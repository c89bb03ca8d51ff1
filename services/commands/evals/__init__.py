"""`voicebus eval`: spoken regression tests for a voice agent, through the real pipeline."""
