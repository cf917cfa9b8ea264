"""Calibration data for GPTQ: token ids from files, text, or the built-in text."""

from moedsl.calib.data import CalibrationSet, builtin_text_path, load_calibration

__all__ = ["CalibrationSet", "builtin_text_path", "load_calibration"]
