"""The built-in calibration text ships with Python and needs no download."""

from llmquant.calibration import builtin_text


def test_builtin_text_is_large_and_deterministic():
    text = builtin_text()
    assert len(text) > 300_000  # ~100k tokens: hundreds of 512-token chunks
    assert text == builtin_text()
    assert "def " in text and "class" in text  # it is the language reference
