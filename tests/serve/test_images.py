"""Image intake (serve/images.py) and request limits (serve/limits.py)."""

from __future__ import annotations

import asyncio
import io
import socket

import httpx
import pytest
from PIL import Image

from lvlm_hallu.serve.errors import BadRequest, Overloaded, PayloadTooLarge, Unauthorized
from lvlm_hallu.serve.images import decode_data_url, fetch_remote, is_public_address, load_image, open_image
from lvlm_hallu.serve.limits import Admission, Limits, check_api_key, read_body
from tests.serve.conftest import data_url, png_declaring


def png_bytes(size=(24, 16), color="red") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


LIMITS = Limits(max_image_bytes=200_000, max_image_pixels=1000 * 1000)


def test_open_image_decodes_png_and_jpeg_to_rgb():
    assert open_image(png_bytes((24, 16)), LIMITS).size == (24, 16)
    buf = io.BytesIO()
    Image.new("L", (10, 12), 128).save(buf, format="JPEG")
    image = open_image(buf.getvalue(), LIMITS)
    assert image.mode == "RGB" and image.size == (10, 12)


@pytest.mark.parametrize("data, error, code", [
    (b"", BadRequest, "invalid_image"),
    (b"this is not an image at all", BadRequest, "invalid_image"),
    (png_bytes((64, 64))[:60], BadRequest, "invalid_image"),  # truncated
    (png_declaring(5000, 5000), PayloadTooLarge, "image_too_large"),  # over our pixel limit
    (png_declaring(100_000, 100_000), PayloadTooLarge, "image_too_large"),  # over Pillow's bomb limit
    (b"\x00" * 200_001, PayloadTooLarge, "payload_too_large"),
])
def test_open_image_refuses_bad_data(data, error, code):
    with pytest.raises(error) as info:
        open_image(data, LIMITS)
    assert info.value.code == code


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    def no_load(self):
        raise AssertionError("load() must not run for an oversized image")

    bomb = png_declaring(2000, 2000)
    monkeypatch.setattr("PIL.PngImagePlugin.PngImageFile.load", no_load)
    with pytest.raises(PayloadTooLarge):
        open_image(bomb, LIMITS)


def test_data_urls():
    assert decode_data_url(data_url(b"abc"), LIMITS) == b"abc"
    wrapped = "data:image/png;base64," + "YW\nJj"
    assert decode_data_url(wrapped, LIMITS) == b"abc"
    for bad in ("data:image/png;base64,@@@notbase64", "data:image/png,rawtext", "image/png;base64,YWJj",
                "data:image/png;base64,YWJ"):
        with pytest.raises(BadRequest):
            decode_data_url(bad, LIMITS)
    with pytest.raises(PayloadTooLarge):
        decode_data_url("data:image/png;base64," + "A" * 300_000, LIMITS)


@pytest.mark.parametrize("address, public", [
    ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("169.254.169.254", False), ("10.0.0.1", False), ("192.168.1.1", False),
    ("172.16.0.1", False), ("100.64.0.1", False), ("0.0.0.0", False), ("::1", False), ("fe80::1", False),
    ("fd00::1", False), ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("224.0.0.1", False),
    ("240.0.0.1", False),
])
def test_public_address_check(address, public):
    assert is_public_address(address) is public


def fake_resolver(table):
    async def resolve(host, port):
        return table[host]

    return resolve


REMOTE = Limits(allow_remote_images=True, max_image_bytes=50_000, remote_timeout_s=2.0)


def test_remote_fetch_connects_to_the_checked_address_and_keeps_the_host_name():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers["host"]))
        return httpx.Response(200, content=png_bytes())

    data = asyncio.run(fetch_remote("http://images.example/cat.png", REMOTE,
                                    resolve=fake_resolver({"images.example": ["93.184.216.34"]}),
                                    transport=httpx.MockTransport(handler)))
    assert data == png_bytes() and seen == [("http://93.184.216.34/cat.png", "images.example")]


@pytest.mark.parametrize("url, table", [
    ("http://127.0.0.1/x.png", {"127.0.0.1": ["127.0.0.1"]}),
    ("http://169.254.169.254/latest/meta-data", {"169.254.169.254": ["169.254.169.254"]}),
    ("http://localhost:8000/x.png", {"localhost": ["127.0.0.1", "::1"]}),
    # one private address among public ones is enough to refuse (DNS answers can rotate)
    ("http://mixed.example/x.png", {"mixed.example": ["93.184.216.34", "10.1.2.3"]}),
])
def test_remote_fetch_refuses_internal_hosts(url, table):
    def handler(request):
        raise AssertionError("no connection may be made")

    with pytest.raises(BadRequest) as info:
        asyncio.run(fetch_remote(url, REMOTE, resolve=fake_resolver(table), transport=httpx.MockTransport(handler)))
    assert info.value.code == "forbidden_image_url"


def test_remote_redirect_to_internal_host_is_refused():
    def handler(request):
        return httpx.Response(302, headers={"location": "http://metadata.internal/latest"})

    table = {"images.example": ["93.184.216.34"], "metadata.internal": ["169.254.169.254"]}
    with pytest.raises(BadRequest) as info:
        asyncio.run(fetch_remote("http://images.example/a.png", REMOTE, resolve=fake_resolver(table),
                                 transport=httpx.MockTransport(handler)))
    assert info.value.code == "forbidden_image_url"


def test_remote_size_limit_and_disabled_by_default():
    def handler(request):
        return httpx.Response(200, content=b"\x89PNG" + b"0" * 60_000)

    with pytest.raises(PayloadTooLarge):
        asyncio.run(fetch_remote("http://images.example/big.png", REMOTE,
                                 resolve=fake_resolver({"images.example": ["93.184.216.34"]}),
                                 transport=httpx.MockTransport(handler)))
    with pytest.raises(BadRequest) as info:
        asyncio.run(load_image("http://images.example/a.png", Limits()))
    assert info.value.code == "remote_images_disabled"
    with pytest.raises(BadRequest):
        asyncio.run(load_image("file:///etc/passwd", REMOTE))


def test_remote_fetch_time_limit():
    async def slow_resolve(host, port):
        await asyncio.sleep(5)
        return ["93.184.216.34"]

    with pytest.raises(BadRequest) as info:
        asyncio.run(fetch_remote("http://slow.example/a.png", Limits(allow_remote_images=True, remote_timeout_s=0.2),
                                 resolve=slow_resolve))
    assert info.value.code == "remote_image_timeout"


async def no_resolving(host, port):
    raise AssertionError(f"{host!r} must be refused before it is resolved")


def no_connecting(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no connection may be made ({request.url})")


MALFORMED_URLS = [
    "http://[::1",  # unclosed IPv6 literal: httpx.InvalidURL
    "http://exa\u00a0mple.com/x",  # no-break space in the host: httpx.InvalidURL
    "http://xn--zz--/x",  # invalid A-label: idna.IDNAError (a ValueError, not InvalidURL)
    "http://host:99999/x.png",  # httpx parses it; connecting would raise an ExceptionGroup
]


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_malformed_remote_urls_are_400s_before_any_lookup(url):
    with pytest.raises(BadRequest) as info:
        asyncio.run(fetch_remote(url, REMOTE, resolve=no_resolving, transport=httpx.MockTransport(no_connecting)))
    assert (info.value.status, info.value.code) == (400, "invalid_image_url")


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_malformed_remote_urls_are_400s_over_http(url, fake_pipeline):
    from fastapi.testclient import TestClient

    from lvlm_hallu.serve.app import Service, build_app
    from lvlm_hallu.serve.config import ServeConfig

    service = Service(fake_pipeline, ServeConfig(model="fake", limits=REMOTE),
                      fetch_kwargs={"resolve": no_resolving, "transport": httpx.MockTransport(no_connecting)})
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
    with TestClient(build_app(service), raise_server_exceptions=False) as http:
        r = http.post("/v1/chat/completions",
                      json={"messages": [{"role": "user", "content": content}], "max_tokens": 4})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_image_url" and r.json()["error"]["type"] == "invalid_request_error"


def test_unresolvable_and_unreachable_hosts_are_400s():
    async def unknown_host(host, port):
        raise socket.gaierror(-2, "Name or service not known")

    async def idna_encoding(host, port):
        host.encode("idna")  # what getaddrinfo does first: UnicodeError for a label over 63 characters
        raise AssertionError("the name should not have encoded")

    for host, resolve in (("nowhere.example", unknown_host), ("x" * 64 + ".example", idna_encoding)):
        with pytest.raises(BadRequest) as info:
            asyncio.run(fetch_remote(f"http://{host}/a.png", REMOTE, resolve=resolve,
                                     transport=httpx.MockTransport(no_connecting)))
        assert (info.value.status, info.value.code) == (400, "invalid_image_url")

    def refused(request):
        raise httpx.ConnectError("All connection attempts failed", request=request)

    with pytest.raises(BadRequest) as info:
        asyncio.run(fetch_remote("http://images.example/a.png", REMOTE,
                                 resolve=fake_resolver({"images.example": ["93.184.216.34"]}),
                                 transport=httpx.MockTransport(refused)))
    assert (info.value.status, info.value.code) == (400, "remote_image_error")


@pytest.mark.parametrize("location", ["http://[::1/latest", "http://xn--zz--/x", "http://images.example:99999/x"])
def test_malformed_redirect_location_is_a_400(location):
    def handler(request):
        return httpx.Response(302, headers={"location": location})

    with pytest.raises(BadRequest) as info:
        asyncio.run(fetch_remote("http://images.example/a.png", REMOTE,
                                 resolve=fake_resolver({"images.example": ["93.184.216.34"]}),
                                 transport=httpx.MockTransport(handler)))
    # httpx itself refuses some locations (RemoteProtocolError: the remote host's fault), we the rest
    assert info.value.status == 400 and info.value.code in ("remote_image_error", "invalid_image_url")


def test_api_key_check():
    check_api_key(None, None)
    check_api_key("Bearer s3cret", "s3cret")
    for header in (None, "", "Bearer wrong", "Basic s3cret", "s3cret", "Bearer s3cret2"):
        with pytest.raises(Unauthorized):
            check_api_key(header, "s3cret")


def test_admission_limit():
    admission = Admission(2)
    admission.acquire()
    admission.acquire()
    with pytest.raises(Overloaded) as info:
        admission.acquire()
    assert info.value.status == 429 and info.value.headers() == {"Retry-After": "1"}
    admission.release()
    admission.acquire()
    assert admission.active == 2


class FakeBody:
    def __init__(self, chunks, declared=None):
        self.headers = {"content-type": "application/json"}
        if declared is not None:
            self.headers["content-length"] = str(declared)
        self.chunks = chunks

    async def stream(self):
        for chunk in self.chunks:
            yield chunk


def test_read_body_limit():
    assert asyncio.run(read_body(FakeBody([b"ab", b"cd"], 4), 4)) == b"abcd"
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(FakeBody([b"ab"], 10), 4))  # declared length is enough to refuse
    with pytest.raises(PayloadTooLarge):
        asyncio.run(read_body(FakeBody([b"abc", b"def"]), 4))  # chunked, no length header


def thin_png(width: int, height: int, mode: str = "L") -> bytes:
    """A real (fully decodable) image of width x height: a few hundred bytes for any thin strip."""
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size, why", [
    ((60000, 1), "side"),  # the 139-byte PNG: 60000 pixels, but 20M pixels wide after CLIP's resize
    ((1, 60000), "side"),
    ((2000, 50), "aspect ratio"),
    ((50, 1500), "aspect ratio"),
])
def test_thin_images_are_refused_from_the_header(size, why, monkeypatch):
    data = thin_png(*size)
    assert len(data) < 2000 and size[0] * size[1] <= LIMITS.max_image_pixels  # small and few pixels
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded an image that should be refused"))
    with pytest.raises(PayloadTooLarge) as info:
        open_image(data, Limits(max_image_bytes=200_000, max_image_side=2048, max_aspect_ratio=20))
    assert info.value.code == "image_too_large" and why in info.value.message


def test_limits_at_the_boundary_are_accepted():
    limits = Limits(max_image_pixels=1000 * 1000, max_image_side=1000, max_aspect_ratio=20)
    assert open_image(thin_png(1000, 50), limits).size == (1000, 50)  # exactly 20:1 and 1000 wide
    with pytest.raises(PayloadTooLarge):
        open_image(thin_png(1001, 51), limits)
    with pytest.raises(PayloadTooLarge):
        open_image(thin_png(1000, 49), limits)


def test_decoded_memory_limit_counts_the_mode_and_the_rgb_copy():
    from lvlm_hallu.serve.images import decoded_bytes

    assert decoded_bytes(10, 10, "RGB") == 10 * 10 * 4
    assert decoded_bytes(10, 10, "L") == 10 * 10 * (1 + 4)
    assert decoded_bytes(10, 10, "RGBA") == 10 * 10 * (4 + 4)
    assert decoded_bytes(10, 10, "I;16") == 10 * 10 * (2 + 4)
    limits = Limits(max_decoded_bytes=200 * 200 * 5)
    assert open_image(thin_png(200, 200, "L"), limits).size == (200, 200)
    with pytest.raises(PayloadTooLarge) as info:
        open_image(thin_png(200, 200, "RGBA"), limits)  # 8 bytes per pixel
    assert "decoded" in info.value.message
