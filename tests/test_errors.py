"""Errors print as one line, whatever a damaged file or a request put into them."""

from gaussad.errors import GaussADError, ImageTooLargeError, UnreadableImageError


def test_messages_are_one_line_with_control_characters_escaped() -> None:
    assert str(GaussADError("key 'a\nb\r' in model.json\x7f")) == "key 'a\\nb\\r' in model.json\\x7f"
    assert str(GaussADError("é, tabs\tand all")) == "é, tabs\\tand all"
    assert issubclass(ImageTooLargeError, UnreadableImageError) and issubclass(
        UnreadableImageError, GaussADError
    )
