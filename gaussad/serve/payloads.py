"""Request bodies: read within a size limit, and the image taken out of them (raw bytes, a multipart
field, or a KServe v2 BYTES input). Everything stays in memory: no request writes a temporary file."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header

from gaussad.serve.errors import ServiceError

FORM_FIELD = "file"
RAW_TYPES = ("image/", "application/octet-stream")


async def read_body(stream: AsyncIterator[bytes], declared: str | None, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it (or its Content-Length) passes `limit` bytes."""
    too_large = ServiceError(413, f"request body over the limit of {limit:,} bytes")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in stream:
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def image_bytes(body: bytes, content_type: str | None) -> bytes:
    """The encoded image of an inspect request: the body itself (any image/* type or
    application/octet-stream) or the multipart field `file`."""
    kind, options = parse_options_header(content_type or "")
    kind = kind.decode("latin-1").lower()
    if kind.startswith(RAW_TYPES):
        return body
    if kind == "multipart/form-data":
        return _form_field(body, options.get(b"boundary"))
    raise ServiceError(
        415,
        f"content type {kind or 'missing'}: send the encoded image as the body (image/* or "
        f"application/octet-stream) or as the multipart field '{FORM_FIELD}'",
    )


def _form_field(body: bytes, boundary: bytes | None) -> bytes:
    if not boundary:
        raise ServiceError(422, "multipart body without a boundary in its content type")
    parts: list[tuple[dict[str, str], bytearray]] = []
    header = {"field": b"", "value": b""}

    def begin() -> None:
        parts.append(({}, bytearray()))

    def field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def header_end() -> None:
        parts[-1][0][header["field"].decode("latin-1").lower()] = header["value"].decode("latin-1")
        header["field"] = header["value"] = b""

    def data(chunk: bytes, start: int, end: int) -> None:
        parts[-1][1].extend(chunk[start:end])

    callbacks = {
        "on_part_begin": begin,
        "on_header_field": field,
        "on_header_value": value,
        "on_header_end": header_end,
        "on_part_data": data,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except ValueError as error:  # python-multipart's parse errors
        raise ServiceError(422, f"malformed multipart body ({error})") from None
    for headers, content in parts:
        _, options = parse_options_header(headers.get("content-disposition", ""))
        if options.get(b"name") == FORM_FIELD.encode():
            return bytes(content)
    raise ServiceError(422, f"multipart body without a field named '{FORM_FIELD}'")


def infer_images(body: bytes) -> tuple[list[bytes], dict[str, Any]]:
    """The encoded images of a KServe v2 infer request, and the request: one BYTES input whose data are
    base64 strings (as KServe's JSON carries binary data), any number of images."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ServiceError(422, f"infer request: not JSON ({error})") from None
    inputs = request.get("inputs") if isinstance(request, dict) else None
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ServiceError(
            422, "infer request: expected 'inputs' with one BYTES input holding the encoded images"
        )
    tensor = inputs[0]
    if tensor.get("datatype") != "BYTES":
        raise ServiceError(422, f"infer input datatype {tensor.get('datatype')!r}: expected BYTES")
    data = tensor.get("data")
    while (
        isinstance(data, list) and len(data) == 1 and isinstance(data[0], list)
    ):  # [[...]] as some clients send
        data = data[0]
    if not isinstance(data, list) or not data or not all(isinstance(item, str) for item in data):
        raise ServiceError(422, "infer input data: expected a list of base64 strings, one per image")
    try:
        images = [base64.b64decode(item, validate=True) for item in data]
    except (binascii.Error, ValueError) as error:
        raise ServiceError(422, f"infer input data: not base64 ({error})") from None
    return images, request
