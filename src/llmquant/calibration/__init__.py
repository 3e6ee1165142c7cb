"""Calibration text: the built-in default, user files and datasets."""

from llmquant.calibration.builtin import builtin_text, heldout_text

__all__ = ["builtin_text", "heldout_text"]
