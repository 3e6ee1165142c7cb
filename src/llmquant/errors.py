"""Errors meant for people: the CLI prints them as one line and exits non-zero."""


class LlmquantError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class InputError(LlmquantError):
    """A file or model the user gave us is missing, corrupt, truncated or unsupported."""
