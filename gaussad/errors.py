"""Errors a user can cause and fix: the CLI prints these as one line, without a traceback, and a service
answers them with a 4xx status."""


class GaussADError(Exception):
    """A problem with the user's input (a file, a folder, an option or a model directory).

    The message is always one line: control characters that came from a file or a request (a key with a
    newline in a damaged model.json, say) are escaped, so a log or a terminal shows one line per error."""

    def __init__(self, message: object = "") -> None:
        super().__init__("".join(_printable(character) for character in str(message)))


class UnreadableImageError(GaussADError):
    """An image file or buffer that cannot be decoded (not an image, truncated, an unsupported mode)."""


class ImageTooLargeError(UnreadableImageError):
    """An image whose header declares more pixels than the limit: refused before it is decoded."""


def _printable(character: str) -> str:
    return repr(character)[1:-1] if ord(character) < 32 or ord(character) == 127 else character
