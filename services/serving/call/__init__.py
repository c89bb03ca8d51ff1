"""`voicebus call`: a caller that is not a browser (aiortc), for smoke tests, tests and benchmarks."""
