"""Access tokens and request decoding for the service (Ray-free)."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image

from ray_ad.errors import ConfigError
from ray_ad.serve.auth import AccessDenied, Tokens
from ray_ad.serve.requests import BadRequest, Limits, images_from_body

A, B, ADMIN = "a" * 20, "b" * 20, "z" * 24


def png(size: tuple[int, int] = (32, 24), mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, size[::-1], dtype=np.uint8)).convert(mode).save(
        buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def tokens() -> Tokens:
    return Tokens.from_mapping({"admin": ADMIN, "lines": {"line-a": A, "line-b": B}}, "test")


def test_a_line_token_opens_its_line_only(tokens):
    tokens.check_line("line-a", f"Bearer {A}")
    tokens.check_line("line-a", f"Bearer {ADMIN}")  # the admin reads every line
    with pytest.raises(AccessDenied) as denied:
        tokens.check_line("line-b", f"Bearer {A}")
    assert denied.value.status == 403 and "line-b" in str(denied.value)
    with pytest.raises(AccessDenied) as missing:
        tokens.check_line("line-a", None)
    assert missing.value.status == 401
    with pytest.raises(AccessDenied) as malformed:
        tokens.check_line("line-a", A)  # no "Bearer"
    assert malformed.value.status == 401
    with pytest.raises(AccessDenied) as not_admin:
        tokens.check_admin(f"Bearer {A}")
    assert not_admin.value.status == 403
    tokens.check_admin(f"bearer {ADMIN}")


def test_tokens_load_from_a_file_or_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "tokens.yaml"
    path.write_text(f"admin: {ADMIN}\nlines:\n  line-a: {A}\n")
    assert Tokens.load(str(path)).lines == {"line-a": A}
    monkeypatch.setenv("RAY_AD_TOKENS", json.dumps({"lines": {"line-b": B}}))
    assert Tokens.load().lines == {"line-b": B} and Tokens.load().admin is None
    monkeypatch.delenv("RAY_AD_TOKENS")
    with pytest.raises(ConfigError, match="RAY_AD_TOKENS"):
        Tokens.load()


@pytest.mark.parametrize(("data", "named"), [
    ({"lines": {"Line/../b": A}}, "Line/../b"),
    ({"lines": {"line-a": "short"}}, "line 'line-a'"),
    ({"admin": "has space in it......"}, "admin token"),
    ({"users": {}}, "expected a mapping"),
])
def test_bad_token_files_name_the_bad_entry(data, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        Tokens.from_mapping(data, "tokens.yaml")


def test_raw_and_json_bodies_decode_to_rgb_images():
    [(name, image)] = images_from_body(png(), "image/png", Limits())
    assert name == "image" and image.mode == "RGB" and image.size == (32, 24)
    body = json.dumps({"images": [{"name": "x.png", "data": base64.b64encode(png()).decode()},
                                  base64.b64encode(png((16, 16), "RGB")).decode()]}).encode()
    decoded = images_from_body(body, "application/json; charset=utf-8", Limits())
    assert [n for n, _ in decoded] == ["x.png", "images[1]"] and decoded[1][1].size == (16, 16)


def multipart(*files: tuple[str, bytes], boundary: str = "b0undary-42", fields: int = 1) -> tuple[bytes, str]:
    """A multipart/form-data body as curl -F sends it: form fields, then one part per file."""
    out = b"".join(f'--{boundary}\r\nContent-Disposition: form-data; name="note{i}"\r\n\r\ntext\r\n'.encode()
                   for i in range(fields))
    for name, data in files:
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                f"Content-Type: image/png\r\n\r\n").encode() + data + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_file_parts_decode_byte_for_byte():
    noise = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)  # every byte value
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    body, content_type = multipart(("noise.png", buffer.getvalue()), ("grey.png", png()))
    decoded = images_from_body(body, content_type, Limits())
    assert [name for name, _ in decoded] == ["noise.png", "grey.png"]
    np.testing.assert_array_equal(np.asarray(decoded[0][1]), noise)
    assert decoded[1][1].mode == "RGB" and decoded[1][1].size == (32, 24)


@pytest.mark.parametrize(("body_and_type", "status", "named"), [
    ((multipart(("a.png", png()))[0], "multipart/form-data"), 400, "boundary"),
    (multipart(fields=2), 400, "no file part"),
    (multipart(("a.png", b"not a png")), 422, "a.png: not a readable image"),
    (multipart(("a.png", png()), ("b.png", png()), ("c.png", png())), 413, "limit is 2"),
])
def test_bad_multipart_bodies_get_their_4xx(body_and_type, status, named):
    body, content_type = body_and_type
    with pytest.raises(BadRequest, match=named) as error:
        images_from_body(body, content_type, Limits(max_images=2))
    assert error.value.status == status


@pytest.mark.parametrize(("body", "content_type", "status", "named"), [
    (b"", "image/png", 400, "empty request body"),
    (b"hello, not an image", "image/png", 422, "not a readable image"),
    (png()[:60], "image/png", 422, "not a readable image"),  # truncated PNG
    (png((300, 300)), "image/png", 413, "over the limit"),
    (b"{not json", "application/json", 400, "malformed JSON"),
    (b'{"images": []}', "application/json", 400, "at least one image"),
    (b'{"images": ["%%%not-base64"]}', "application/json", 400, "malformed base64"),
    (b'{"images": [42]}', "application/json", 400, "images[0]"),
    (png(), "text/plain", 415, "text/plain"),
])
def test_every_bad_body_gets_its_4xx_and_a_message(body, content_type, status, named):
    with pytest.raises(BadRequest) as error:
        images_from_body(body, content_type, Limits(max_pixels=200 * 200))
    assert error.value.status == status
    assert named in str(error.value)


def test_batch_and_body_size_limits():
    one = base64.b64encode(png()).decode()
    with pytest.raises(BadRequest, match="limit is 2") as error:
        images_from_body(json.dumps({"images": [one] * 3}).encode(), "application/json", Limits(max_images=2))
    assert error.value.status == 413
    with pytest.raises(BadRequest, match="over the limit of 10") as error:
        images_from_body(png(), "image/png", Limits(max_bytes=10))
    assert error.value.status == 413


def test_the_pixels_of_a_whole_request_are_capped_from_the_headers(monkeypatch):
    import ray_ad.serve.requests as requests

    decoded = []
    monkeypatch.setattr(requests, "decode_image", lambda *args, **kwargs: decoded.append(args) or None)
    one = base64.b64encode(png()).decode()  # 32 x 24 = 768 pixels
    body = json.dumps({"images": [one, one]}).encode()
    with pytest.raises(BadRequest, match="1536 pixels in all, over the per-request limit of 1000") as error:
        images_from_body(body, "application/json", Limits(max_request_pixels=1000))
    assert error.value.status == 413 and decoded == []  # refused before any image was decoded


def test_images_are_resized_to_the_model_input_as_they_are_decoded():
    [(_, grey)] = images_from_body(png((300, 200)), "image/png", Limits(), size=64)
    assert grey.size == (64, 64) and grey.mode == "L"  # one channel stays one channel
    [(_, colour)] = images_from_body(png((300, 200), "RGB"), "image/png", Limits(), size=64)
    assert colour.size == (64, 64) and colour.mode == "RGB"
    # What the detectors' own preprocessing makes of the full image.
    full = Image.open(io.BytesIO(png((300, 200)))).resize((64, 64), Image.BILINEAR)
    np.testing.assert_array_equal(np.asarray(grey), np.asarray(full))


def test_deeply_nested_json_is_a_bad_request():
    with pytest.raises(BadRequest, match="nested too deeply") as error:
        images_from_body(b"[" * 100_000 + b"]" * 100_000, "application/json", Limits())
    assert error.value.status == 400


def test_an_image_over_the_pixel_limit_is_413_by_its_class_not_its_message(monkeypatch):
    import ray_ad.serve.requests as requests
    from ray_ad.errors import DataError, ImageTooLarge

    for error, status in ((ImageTooLarge("a.png: too many"), 413), (DataError("a.png: over the limit"), 422)):
        def fail(*args, error=error, **kwargs):
            raise error
        monkeypatch.setattr(requests, "decode_image", fail)
        with pytest.raises(BadRequest) as raised:
            images_from_body(png(), "image/png", Limits())
        assert raised.value.status == status and str(raised.value) == str(error)


def test_a_body_is_read_within_its_byte_limit():
    import asyncio

    from ray_ad.serve.requests import read_body

    async def stream(*chunks: bytes):
        for chunk in chunks:
            yield chunk

    def read(length: str | None, *chunks: bytes) -> bytes:
        return asyncio.run(read_body(length, stream(*chunks), limit=10))

    assert read("6", b"abc", b"def") == b"abcdef" and read(None, b"0123456789") == b"0123456789"
    for length, chunks, status, named in (("11", [b"x"], 413, "of 11 bytes is over the limit of 10"),
                                          ("ten", [b"x"], 400, "'ten' is not a byte count"),
                                          (None, [b"012345", b"6789a"], 413, "over the limit of 10 bytes")):
        with pytest.raises(BadRequest, match=named) as raised:
            read(length, *chunks)
        assert raised.value.status == status
