"""What tests and benchmarks use and no stage does: the PulseAudio rig, the Chromium DevTools driver,
the loopback Weave trace server. Importable by scripts/ too (from the repository root)."""
