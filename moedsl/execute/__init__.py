"""Execution of a hook plan: layer-by-layer loading, calibration forwards, GPTQ solves."""
