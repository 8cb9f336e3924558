"""The service's options, validated in one place: `gaussad serve` builds them from its flags."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from gaussad.config import DEFAULT_WORKERS
from gaussad.errors import GaussADError
from gaussad.serve import defaults

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
EXPORTED_SUFFIX = ".onnx"


def is_exported(path: Path) -> bool:
    """Whether a path names a file written by `gaussad export` (by its suffix, as `gaussad predict` tells
    them) rather than a model folder."""
    return path.suffix.lower() == EXPORTED_SUFFIX


def check_model_path(path: Path) -> None:
    """That a served path is what it names: an exported file that exists, or a model folder."""
    if is_exported(path):
        if not path.is_file():
            raise GaussADError(f"{path}: no such exported model file")
    elif not path.is_dir():
        raise GaussADError(f"{path}: no such model folder")


def served_name(path: Path) -> str:
    """The name a model is served under: its folder's name, or an exported file's name without `.onnx`."""
    return path.stem if is_exported(path) else path.resolve().name


@dataclass(frozen=True)
class ServeSettings:
    """What `gaussad serve` runs with. Models are served under their names (`served_name`)."""

    model_dirs: tuple[Path, ...]  # model folders and exported .onnx files
    audit: str = defaults.DEFAULT_AUDIT  # a SQLite file path or a URL (`gaussad.serve.audit.audit_url`)
    max_batch_size: int = defaults.MAX_BATCH_SIZE
    max_queue_delay_ms: float = defaults.MAX_QUEUE_DELAY_MS
    max_queue: int = defaults.MAX_QUEUE  # images in the service at once; more are answered 503
    api_keys: tuple[bytes, ...] = ()  # empty: no authentication
    keep_images: Path | None = None
    workers: int = DEFAULT_WORKERS  # threads decoding images and drawing maps
    device: str = "auto"
    max_body_bytes: int = defaults.MAX_BODY_BYTES
    max_pixels: int = defaults.MAX_PIXELS
    drift_window: int = defaults.DRIFT_WINDOW
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        dirs = tuple(Path(folder) for folder in self.model_dirs)
        if not dirs:
            raise GaussADError("give at least one model folder or exported .onnx file to serve")
        names = tuple(served_name(path) for path in dirs)
        for name, path in zip(names, dirs, strict=True):
            if not MODEL_NAME.fullmatch(name):
                raise GaussADError(
                    f"{path}: a served model's name (its folder's, or its file's without .onnx) must be "
                    "letters, digits, '.', '_' or '-'"
                )
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise GaussADError(f"two models named {', '.join(repeated)}: each model is served under its name")
        for option, value, low in (
            ("--max-batch-size", self.max_batch_size, 1),
            ("--max-queue", self.max_queue, 1),
            ("--workers", self.workers, 1),
            ("--max-body-bytes", self.max_body_bytes, 1),
            ("--max-pixels", self.max_pixels, 1),
            ("--drift-window", self.drift_window, 10),
        ):
            if value < low:
                raise GaussADError(f"{option} {value}: expected at least {low}")
        if not 0 <= self.max_queue_delay_ms <= 1000:
            raise GaussADError(f"--max-queue-delay-ms {self.max_queue_delay_ms}: expected 0 to 1000")
        object.__setattr__(self, "model_dirs", dirs)
        object.__setattr__(self, "names", names)


def read_api_keys(path: str | Path) -> tuple[bytes, ...]:
    """The accepted API keys: one per line of the file (several allow rotating a key without downtime)."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise GaussADError(f"--api-key-file {path}: cannot read it ({error})") from None
    keys = tuple(line.strip().encode() for line in lines if line.strip())
    if not keys:
        raise GaussADError(f"--api-key-file {path}: no key in it")
    if any(len(key) < 16 for key in keys):
        raise GaussADError(f"--api-key-file {path}: every key needs 16 characters or more")
    return keys
