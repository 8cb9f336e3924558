"""Images kept for review (`--keep-images DIR`): stored under their SHA-256, never under a name a request
chose, so no request can write anywhere but this folder. Written to a temporary file in the folder and
renamed, so a crash leaves no half image under a real name (leftovers are removed at start-up)."""

from __future__ import annotations

import io
import re
from pathlib import Path

from PIL import Image

from gaussad.fileio import write_bytes_atomic
from gaussad.serve.decode import decode

SHA256 = re.compile(r"[0-9a-f]{64}")
INCOMING = ".incoming-"
THUMBNAIL_SIDE = 160


class KeptImages:
    """A folder of kept images, named by the SHA-256 of their bytes."""

    def __init__(self, folder: Path, max_pixels: int) -> None:
        self.folder = Path(folder)
        self.max_pixels = max_pixels  # the service's: every kept image was decoded within it
        self.folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.folder.glob(INCOMING + "*"):
            leftover.unlink(missing_ok=True)

    def _path(self, sha256: str) -> Path | None:
        return self.folder / sha256 if SHA256.fullmatch(sha256) else None

    def keep(self, sha256: str, data: bytes) -> None:
        """Store an image's bytes once (the same bytes give the same name)."""
        target = self._path(sha256)
        if target is None or target.exists():
            return
        write_bytes_atomic(target, data, prefix=INCOMING)

    def thumbnail(self, sha256: str) -> bytes | None:
        """A PNG at most THUMBNAIL_SIDE pixels across of a kept image; None when it is not kept."""
        path = self._path(sha256)
        if path is None or not path.is_file():
            return None
        image = Image.fromarray(decode(path.read_bytes(), self.max_pixels))
        image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()
