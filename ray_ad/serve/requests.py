"""Turning an HTTP request body into images, with a 4xx status and a clear message for every bad input.

``read_body`` reads a body within the byte limit; ``images_from_body`` decodes it. Accepted bodies for
``POST /v1/lines/{line}/detect``:

- one image as raw bytes (``image/*`` or ``application/octet-stream``);
- a JSON batch: ``{"images": [{"name": "a.png", "data": "<base64>"}, ...]}`` (or plain base64 strings);
- multipart form data (``multipart/form-data``): every part that carries a file is an image.
"""

from __future__ import annotations

import base64
import binascii
import email.parser
import email.policy
import io
import json
from collections.abc import AsyncIterable
from dataclasses import dataclass

from PIL import Image

from ray_ad.data.images import decode_image
from ray_ad.errors import DataError, ImageTooLarge, RayADError


class BadRequest(RayADError):
    """An input error the service answers with HTTP ``status`` (4xx) and this message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 4096 * 4096  # per image
    max_images: int = 64  # per request
    max_bytes: int = 64 * 1024 * 1024  # per request body
    # Decoded pixels per request, summed over its images, checked from the image headers before any
    # image is decoded: 16 images of 4096 x 4096 fit every other limit and would take 800 MB decoded.
    max_request_pixels: int = 32 * 1024 * 1024


async def read_body(content_length: str | None, chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """A request body of at most ``limit`` bytes: refused with 413 from its ``Content-Length`` before
    any of it is read, or as soon as a body without one grows past the limit."""
    if content_length is not None:
        if not content_length.isdigit():
            raise BadRequest(400, f"Content-Length {content_length!r} is not a byte count")
        if int(content_length) > limit:
            raise BadRequest(413, f"request body of {int(content_length)} bytes is over the limit of {limit}")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, f"request body is over the limit of {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


def decode_part(data: bytes, name: str, limits: Limits, size: int | None = None) -> Image.Image:
    """One image's bytes -> RGB image, or with ``size`` the image resized to ``size`` x ``size`` as the
    detectors resize it (bilinear), grey images kept one channel; 413 over the pixel limit, 422 when it
    is not a readable image."""
    if not data:
        raise BadRequest(400, f"{name}: empty image")
    try:
        image = decode_image(data, name, limits.max_pixels, keep_gray=size is not None)
    except ImageTooLarge as exc:
        raise BadRequest(413, str(exc)) from exc
    except DataError as exc:
        raise BadRequest(422, str(exc)) from exc
    return image if size is None else image.resize((size, size), Image.BILINEAR)


def images_from_body(
    body: bytes, content_type: str | None, limits: Limits, size: int | None = None,
) -> list[tuple[str, Image.Image]]:
    """(name, image) pairs from a raw-image, JSON or multipart body; with ``size``, each image is resized
    to the model's input as soon as it is decoded, so that at most one full-size image is held at a time
    and what travels on to the scorer is small, whatever the camera's resolution."""
    if not body:
        raise BadRequest(400, "empty request body: send an image, or JSON {\"images\": [...]}")
    if len(body) > limits.max_bytes:
        raise BadRequest(413, f"request body of {len(body)} bytes is over the limit of {limits.max_bytes}")
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind == "application/json":
        parts = _json_batch(body, limits)
    elif kind == "multipart/form-data":
        parts = _multipart(body, content_type or "", limits)
    elif kind.startswith("image/") or kind in ("application/octet-stream", ""):
        parts = [("image", body)]
    else:
        raise BadRequest(415, f"unsupported content type {kind!r}: use image/*, application/octet-stream, "
                              "application/json or multipart/form-data")
    _check_request_pixels(parts, limits)
    return [(name, decode_part(data, name, limits, size)) for name, data in parts]


def _check_request_pixels(parts: list[tuple[str, bytes]], limits: Limits) -> None:
    """413 when the images' headers add up to more than ``max_request_pixels`` (nothing decoded yet)."""
    total = 0
    for _, data in parts:
        try:
            with Image.open(io.BytesIO(data)) as image:  # reads the header only
                total += image.width * image.height
        except Exception:  # noqa: BLE001 - unreadable: decode_part names it with its 4xx
            continue
    if total > limits.max_request_pixels:
        raise BadRequest(413, f"the request's images hold {total} pixels in all, over the per-request limit "
                              f"of {limits.max_request_pixels}: send fewer or smaller images per request")


def _json_batch(body: bytes, limits: Limits) -> list[tuple[str, bytes]]:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"malformed JSON body: {exc}") from exc
    except RecursionError as exc:  # e.g. 100k nested lists: Python's parser gives up, the body is bad
        raise BadRequest(400, "malformed JSON body: nested too deeply") from exc
    items = document.get("images") if isinstance(document, dict) else None
    if not isinstance(items, list) or not items:
        raise BadRequest(400, 'the JSON body must be {"images": [...]} with at least one image')
    if len(items) > limits.max_images:
        raise BadRequest(413, f"{len(items)} images in one request; the limit is {limits.max_images}")
    out = []
    for i, item in enumerate(items):
        name, data = (item.get("name", f"images[{i}]"), item.get("data")) if isinstance(item, dict) else (
            f"images[{i}]", item)
        if not isinstance(data, str) or not isinstance(name, str):
            raise BadRequest(400, f"images[{i}]: expected a base64 string (or {{'name', 'data'}})")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(400, f"{name}: malformed base64 ({exc})") from exc
        if not raw:
            raise BadRequest(400, f"{name}: empty image")
        out.append((name, raw))
    return out


def _multipart(body: bytes, content_type: str, limits: Limits) -> list[tuple[str, bytes]]:
    """Every file part of a ``multipart/form-data`` body (what ``curl -F file=@a.png`` sends).

    Parsed with the standard library's MIME parser: the body is a MIME message whose header is the
    request's Content-Type (with its boundary).
    """
    if "boundary=" not in content_type:
        raise BadRequest(400, "multipart/form-data without a boundary parameter in Content-Type")
    header = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    parts = [part for part in message.iter_parts() if part.get_filename() is not None] \
        if message.is_multipart() else []
    if not parts:
        raise BadRequest(400, "the multipart body has no file part: send the image as a file field "
                              "(e.g. curl -F image=@cell.png)")
    if len(parts) > limits.max_images:
        raise BadRequest(413, f"{len(parts)} images in one request; the limit is {limits.max_images}")
    return [(part.get_filename() or f"part[{i}]", part.get_payload(decode=True) or b"") for i, part in enumerate(parts)]


Reference = tuple[str, Image.Image]
AbnormalReference = tuple[str, Image.Image, Image.Image | None]


def references_from_body(body: bytes, limits: Limits) -> tuple[str | None, list[Reference], list[AbnormalReference]]:
    """A reference upload for ``POST /v1/lines/{line}/references``: (model line or None, normal images,
    abnormal (name, image, mask) triples) from the JSON body::

        {"model_line": LINE,                                  optional: whose nagl model to use
         "normal": [{"name": "n1.png", "data": "<base64>"}, ...],
         "abnormal": [{"name": "a1.png", "data": "<base64>", "mask": "<base64>"}, ...]}

    Images keep their own size here: a mask is checked against its image before anything is resized.
    """
    try:
        document = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(400, f"malformed JSON body: {exc}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("normal", []), list) \
            or not isinstance(document.get("abnormal", []), list):
        raise BadRequest(400, 'the body must be JSON {"normal": [...], "abnormal": [...]} (and "model_line")')
    model_line = document.get("model_line")
    if model_line is not None and not isinstance(model_line, str):
        raise BadRequest(400, f"model_line must be a line name, got {model_line!r}")
    normal_items, abnormal_items = document.get("normal", []), document.get("abnormal", [])
    if not normal_items:
        raise BadRequest(422, "no normal reference: a reference set needs at least one normal image")
    if len(normal_items) + len(abnormal_items) > limits.max_images:
        raise BadRequest(413, f"{len(normal_items) + len(abnormal_items)} reference images; the limit is "
                              f"{limits.max_images}")

    def decoded(item: object, where: str, key: str = "data") -> tuple[str, Image.Image | None]:
        if not isinstance(item, dict):
            raise BadRequest(400, f"{where}: expected {{'name', 'data'}}")
        name = item.get("name", where)
        data = item.get(key)
        if data is None and key == "mask":
            return str(name), None
        if not isinstance(data, str) or not isinstance(name, str):
            raise BadRequest(400, f"{where}: {key!r} must be a base64 string")
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise BadRequest(400, f"{name}: malformed base64 in {key!r} ({exc})") from exc
        label = name if key == "data" else f"{name} (mask)"
        return name, decode_part(raw, label, limits)

    normal = [decoded(item, f"normal[{i}]") for i, item in enumerate(normal_items)]
    abnormal = []
    for i, item in enumerate(abnormal_items):
        name, image = decoded(item, f"abnormal[{i}]")
        _, mask = decoded(item, f"abnormal[{i}]", "mask")
        abnormal.append((name, image, mask))
    return model_line, normal, abnormal  # type: ignore[return-value]
