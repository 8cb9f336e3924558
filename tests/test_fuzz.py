"""Fuzzing what gaussad reads from outside: encoded images and model folders.

The property: one `GaussADError` with a one-line message, or a valid result (uint8 (H, W, 3) pixels within
the pixel limit; a model that loads and scores an image); never another exception, a hang, or memory
beyond what the limit allows. `make test` tries a few fixed cases of each (profile "quick", seconds);
`make fuzz` (HYPOTHESIS_PROFILE=fuzz) runs each property again and again with fresh random cases for its
share of FUZZ_SECONDS and prints how many it tried.
"""

from __future__ import annotations

import faulthandler
import io
import json
import os
import resource
import shutil
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from conftest import texture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import gaussad.model
from gaussad import GaussAD
from gaussad.backbones import file_sha256
from gaussad.errors import GaussADError, ImageTooLargeError
from gaussad.images import image_size_from_header, load_pixels

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")  # Pillow's notes on corrupt files

PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "quick")
FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "300"))
N_PROPERTIES = 6  # the properties below share FUZZ_SECONDS
LIMIT = 1_000_000  # the pixel limit the images are read under
MEMORY_BOUND = 256 * 2**20  # what reading one image may add to the peak memory: a few copies at LIMIT
HANG_SECONDS = 60  # one case taking longer is a hang: the process stops with every thread's traceback

settings.register_profile(
    "quick",
    max_examples=15,
    deadline=None,  # a cold first case can be slow; hangs are caught by the watchdog
    derandomize=True,  # the same cases on every run of the suite
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=200,  # per round: rounds repeat, each with fresh randomness, until the time is up
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings.get_profile(PROFILE)
CASES: Counter[str] = Counter()


def fuzz(check: Callable[[], None], capsys) -> None:
    """Run a property once (quick), or round after round for its share of FUZZ_SECONDS (fuzz), printing
    the number of cases tried."""
    name = check.__name__
    started = time.monotonic()
    check()
    while PROFILE == "fuzz" and time.monotonic() - started < FUZZ_SECONDS / N_PROPERTIES:
        check()
    if PROFILE == "fuzz":
        with capsys.disabled():
            print(f"\n{name}: {CASES[name]} cases in {time.monotonic() - started:.0f} s, none failed")


def _peak_memory() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@contextmanager
def watched(name: str) -> Iterator[None]:
    """Count a case; end the process with tracebacks if it hangs; fail it if it raised the peak memory by
    more than MEMORY_BOUND."""
    CASES[name] += 1
    before = _peak_memory()
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True, file=sys.__stderr__)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
    grown = _peak_memory() - before
    assert grown < MEMORY_BOUND, f"peak memory grew by {grown / 2**20:.0f} MiB"


def one_line_error(error: GaussADError) -> None:
    message = str(error)
    assert message and "\n" not in message and "\r" not in message, repr(message)


# --- images ---


def encoded(image: Image.Image, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind, **options)
    return buffer.getvalue()


@cache
def seeds() -> dict[str, bytes]:
    """Small valid files of every format and many modes: what the mutations start from."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    palette = rgb.quantize(16)
    frames = [Image.new("RGB", (10, 12), color) for color in ((255, 0, 0), (0, 0, 255))]
    gray16 = Image.fromarray(rng.integers(0, 65536, (12, 10), dtype=np.uint16))
    found = {
        "png rgb": encoded(rgb, "PNG"),
        "png rgba": encoded(rgb.convert("RGBA"), "PNG"),
        "png L": encoded(rgb.convert("L"), "PNG"),
        "png LA": encoded(rgb.convert("LA"), "PNG"),
        "png 1-bit": encoded(rgb.convert("1"), "PNG"),
        "png P transparency": encoded(palette, "PNG", transparency=0),
        "png I;16": encoded(gray16, "PNG"),
        "png interlaced": encoded(rgb, "PNG", interlace=1),
        "apng": encoded(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "jpeg": encoded(rgb, "JPEG"),
        "jpeg progressive": encoded(rgb, "JPEG", progressive=True),
        "jpeg cmyk": encoded(rgb.convert("CMYK"), "JPEG"),
        "jpeg L": encoded(rgb.convert("L"), "JPEG"),
        "bmp": encoded(rgb, "BMP"),
        "bmp P": encoded(palette, "BMP"),
        "bmp 1-bit": encoded(rgb.convert("1"), "BMP"),
        "gif": encoded(palette, "GIF", transparency=0),
        "gif animated": encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=10),
        "tiff": encoded(rgb, "TIFF"),
        "tiff lzw": encoded(rgb, "TIFF", compression="tiff_lzw"),
        "tiff deflate": encoded(rgb, "TIFF", compression="tiff_adobe_deflate"),
        "tiff cmyk": encoded(rgb.convert("CMYK"), "TIFF"),
        "tiff I;16": encoded(gray16, "TIFF"),
        "tiff 1-bit": encoded(rgb.convert("1"), "TIFF", compression="group4"),
        "tiff pages": encoded(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
        "webp": encoded(rgb, "WEBP"),
        "webp lossless": encoded(rgb.convert("RGBA"), "WEBP", lossless=True),
        "webp animated": encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
    }
    exif = rgb.getexif()
    exif[0x0112] = 6
    found["jpeg exif"] = encoded(rgb, "JPEG", exif=exif)
    found["png exif"] = encoded(rgb, "PNG", exif=exif)
    return found


def fix_png_crcs(data: bytes) -> bytes:
    """A mutated PNG with each chunk's CRC made right again, so the mutation reaches the decoders rather
    than stopping at the first checksum."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return data
    out, position = bytearray(data[:8]), 8
    while position + 8 <= len(data):
        length = struct.unpack(">I", data[position : position + 4])[0]
        end = position + 8 + length
        if end + 4 > len(data):
            break
        body = data[position + 4 : end]
        out += data[position:end] + struct.pack(">I", zlib.crc32(body))
        position = end + 4
    return bytes(out + data[position:])


FIELD_VALUES = st.sampled_from([0, 1, 2, 255, 256, 30000, 65535, 2**16, 2**24, 2**31 - 1, 2**32 - 1])


@st.composite
def mutated(draw) -> bytes:
    """A seed file with a few random edits: bytes changed, inserted or removed, a header field set to an
    extreme value, or the file cut short."""
    name = draw(st.sampled_from(sorted(seeds())))
    data = bytearray(seeds()[name])
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        edit = draw(st.sampled_from(["byte", "insert", "delete", "field16", "field32", "cut"]))
        if edit == "byte":
            data[position : position + 1] = bytes([draw(st.integers(0, 255))])
        elif edit == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=64))
        elif edit == "delete":
            del data[position : position + draw(st.integers(1, 64))]
        elif edit == "cut":
            del data[position:]
        else:
            size, order = (
                (2, draw(st.sampled_from("<>"))) if edit == "field16" else (4, draw(st.sampled_from("<>")))
            )
            value = draw(FIELD_VALUES) % (2 ** (8 * size))
            data[position : position + size] = struct.pack(order + ("H" if size == 2 else "I"), value)
    return fix_png_crcs(bytes(data)) if draw(st.booleans()) else bytes(data)


def check_image(data: bytes, name: str) -> None:
    """The property for one encoded image: pixels within the limit, or one GaussADError."""
    with watched(name):
        try:
            pixels = load_pixels(data, max_pixels=LIMIT)
        except GaussADError as error:
            one_line_error(error)
            assert str(error).startswith("image data (")
            return
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
        assert 0 < pixels.shape[0] * pixels.shape[1] <= LIMIT


@FUZZ
@given(st.binary(max_size=4096))
def random_bytes(data: bytes) -> None:
    check_image(data, "random_bytes")


@FUZZ
@given(
    st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"GIF89a", b"II*\0", b"MM\0*", b"RIFF"]),
    st.binary(max_size=4096),
)
def random_bytes_after_a_signature(signature: bytes, data: bytes) -> None:
    check_image(signature + data, "random_bytes_after_a_signature")


@FUZZ
@given(mutated())
def mutated_files(data: bytes) -> None:
    check_image(data, "mutated_files")


@FUZZ
@given(st.sampled_from(sorted(seeds())), st.integers(1, 2**16 - 1), st.integers(1, 2**16 - 1))
def declared_sizes(name: str, width: int, height: int) -> None:
    """Seeds whose header (the first width and height it holds) declares another size."""
    data = seeds()[name]
    small = struct.pack(">II", 10, 12) if name.startswith("png") or name == "apng" else None
    if small is not None and small in data:
        data = data.replace(small, struct.pack(">II", width, height), 1)
        data = fix_png_crcs(data)
    elif name.startswith("gif"):
        data = data[:6] + struct.pack("<HH", width, height) + data[10:]
    elif name.startswith("bmp"):
        data = data[:18] + struct.pack("<ii", width, height) + data[26:]
    with watched("declared_sizes"):
        try:
            declared = image_size_from_header(data)
        except GaussADError as error:
            one_line_error(error)
            declared = None
        try:
            pixels = load_pixels(data, max_pixels=LIMIT)
        except ImageTooLargeError as error:
            one_line_error(error)
            assert declared is None or declared[0] * declared[1] > LIMIT
            return
        except GaussADError as error:
            one_line_error(error)
            return
        assert declared is not None and declared[0] * declared[1] <= LIMIT
        assert pixels.shape[0] * pixels.shape[1] <= LIMIT


def test_random_bytes_are_an_error_or_pixels(capsys) -> None:
    fuzz(random_bytes, capsys)


def test_random_bytes_after_a_signature_are_an_error_or_pixels(capsys) -> None:
    fuzz(random_bytes_after_a_signature, capsys)


def test_mutated_images_of_every_format_and_mode_are_an_error_or_pixels(capsys) -> None:
    fuzz(mutated_files, capsys)


def test_declared_sizes_over_the_limit_are_refused_before_decoding(capsys) -> None:
    fuzz(declared_sizes, capsys)


# --- model folders ---


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A model fitted once at 64 px without calibration on a few synthetic images."""
    rng = np.random.default_rng(0)
    images = [texture(rng, 64) for _ in range(3)]
    folder = tmp_path_factory.mktemp("fuzz") / "model"
    GaussAD(image_size=64, folds=0, device="cpu", map_levels=(2, 3)).fit(images).save(folder)
    return folder


@pytest.fixture(scope="module")
def shared_backbone():
    """Loading builds the backbone once for all cases: what is fuzzed is the model folder."""
    load = cache(gaussad.model.load_backbone)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gaussad.model, "load_backbone", load)
        yield


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


@st.composite
def json_edits(draw, document: dict) -> dict:
    """The document with a few values deleted or replaced, at any depth."""
    document = json.loads(json.dumps(document))
    for _ in range(draw(st.integers(1, 3))):
        node, key = document, None
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            key = draw(st.sampled_from(keys))
            if not isinstance(node[key], (dict, list)) or draw(st.booleans()):
                break
            node, key = node[key], None
        if key is None:  # an empty object or list: nothing to edit there
            continue
        if isinstance(node, dict) and draw(st.booleans()):
            del node[key]
        else:
            node[key] = draw(JSON_VALUES)
    return document


def check_model(folder: Path, name: str) -> None:
    """The property for one model folder: it loads and scores an image, or one GaussADError."""
    with watched(name):
        try:
            model = GaussAD.load(folder, device="cpu")
            score = model.score_samples([texture(np.random.default_rng(1), 64)])
        except GaussADError as error:
            one_line_error(error)
            return
        assert score.shape == (1,)


def copy_model(source: Path, target: Path) -> Path:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)
    return target


def test_mutated_model_descriptions_fail_clearly_or_load(
    tiny_model, shared_backbone, tmp_path, capsys
) -> None:
    document = json.loads((tiny_model / "model.json").read_text())

    @FUZZ
    @given(json_edits(document))
    def mutated_model_json(edited: dict) -> None:
        folder = copy_model(tiny_model, tmp_path / "model")
        (folder / "model.json").write_text(json.dumps(edited))
        check_model(folder, "mutated_model_json")

    fuzz(mutated_model_json, capsys)


def test_altered_tensors_fail_clearly_or_load(tiny_model, shared_backbone, tmp_path, capsys) -> None:
    tensors = (tiny_model / "gaussians.safetensors").read_bytes()
    header_end = 8 + struct.unpack("<Q", tensors[:8])[0]

    @FUZZ
    @given(
        st.integers(0, len(tensors) - 1),
        st.sampled_from(["byte", "cut", "header"]),
        st.integers(0, 255),
        st.booleans(),
    )
    def altered_tensors(position: int, edit: str, value: int, checksum: bool) -> None:
        data = bytearray(tensors)
        if edit == "byte":
            data[position] = value
        elif edit == "cut":
            del data[position:]
        else:  # within the JSON header: names, dtypes, shapes and offsets
            data[8 + position % (header_end - 8)] = value
        folder = copy_model(tiny_model, tmp_path / "model")
        (folder / "gaussians.safetensors").write_bytes(bytes(data))
        if checksum:  # the checksum made to match, so the alteration reaches the reader
            document = json.loads((folder / "model.json").read_text())
            document["tensors_sha256"] = file_sha256(folder / "gaussians.safetensors")
            (folder / "model.json").write_text(json.dumps(document))
        check_model(folder, "altered_tensors")

    fuzz(altered_tensors, capsys)
