"""Errors a user can cause and fix: the CLI prints these as one line, without a traceback."""


class GaussADError(Exception):
    """A problem with the user's input (a file, a folder, an option or a model directory)."""
