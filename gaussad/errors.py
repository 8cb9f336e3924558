"""Errors a user can cause and fix: the CLI prints these as one line, without a traceback, and a service
answers them with a 4xx status."""


class GaussADError(Exception):
    """A problem with the user's input (a file, a folder, an option or a model directory)."""


class UnreadableImageError(GaussADError):
    """An image file or buffer that cannot be decoded (not an image, truncated, an unsupported mode)."""


class ImageTooLargeError(UnreadableImageError):
    """An image whose header declares more pixels than the limit: refused before it is decoded."""
