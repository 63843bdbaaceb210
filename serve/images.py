"""Image intake: data URLs and (when the operator allows them) remote http(s) URLs.

Safety rules, each a 4xx with the OpenAI error object:
- bytes over `max_image_bytes` → 413 (checked from the base64 length before decoding);
- width × height over `max_image_pixels`, a side over `max_image_side`, an aspect ratio over
  `max_aspect_ratio`, or decoded memory (native pixels + the RGB copy) over `max_decoded_bytes`
  → 413, all read from the header before `load()`. A decompression bomb (a tiny PNG declaring
  100k × 100k pixels) never allocates its pixels, and a 139-byte 60000 × 1 PNG — few pixels,
  but the CLIP preprocessor scales its short side to 336, i.e. a 20-million-pixel-wide image —
  is refused in about a millisecond instead of stalling the replica for seconds;
- not an image, a format outside PNG/JPEG/WebP/GIF/BMP, truncated or corrupt data → 400;
- remote URLs: off by default; when on, the host is resolved and EVERY address must be globally
  routable (no loopback, link-local such as 169.254.169.254 metadata services, private, shared,
  reserved or multicast), the connection goes to the address that was checked (so a second DNS
  answer cannot rebind it to an internal host), redirects are re-checked hop by hop, and the
  download is capped in bytes and wall time. A URL that does not parse (bad IPv6 literal, bad
  IDNA name, port outside 1..65535), a host that does not resolve and a connection that fails
  are all 400s: they are the request's fault or the remote host's, never the replica's.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import socket
from typing import Awaitable, Callable

import httpx
from PIL import Image, UnidentifiedImageError

from lvlm_hallu.serve.errors import BadRequest, PayloadTooLarge
from lvlm_hallu.serve.limits import Limits

FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})
ONE_BYTE_MODES = frozenset({"1", "L", "P"})  # Pillow stores these in 1 byte per pixel, "I;16*" in 2, others in 4
RGB_BYTES = 4  # Pillow's RGB is 32 bits per pixel
Resolver = Callable[[str, int], Awaitable[list[str]]]


def open_image(data: bytes, limits: Limits, param: str = "messages") -> Image.Image:
    """Decode image bytes into an RGB image within the limits."""
    if not data:
        raise BadRequest("image is empty (0 bytes)", param=param, code="invalid_image")
    if len(data) > limits.max_image_bytes:
        raise PayloadTooLarge(f"image of {len(data)} bytes exceeds the limit of {limits.max_image_bytes} bytes",
                              param=param)
    try:
        image = Image.open(io.BytesIO(data), formats=sorted(FORMATS))  # lazy: parses the header only
    except Image.DecompressionBombError as err:
        raise PayloadTooLarge(f"image dimensions are too large: {err}", param=param, code="image_too_large") from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise BadRequest("image data is not a decodable PNG, JPEG, WebP, GIF or BMP image",
                         param=param, code="invalid_image") from err
    width, height = image.size
    if width < 1 or height < 1:
        raise BadRequest(f"image has invalid dimensions {width}x{height}", param=param, code="invalid_image")
    check_dimensions(width, height, image.mode, limits, param)
    try:
        image.load()
        return image.convert("RGB")
    except Image.DecompressionBombError as err:
        raise PayloadTooLarge(f"image dimensions are too large: {err}", param=param, code="image_too_large") from err
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise BadRequest(f"image data is truncated or corrupt ({err})", param=param, code="invalid_image") from err


def decoded_bytes(width: int, height: int, mode: str) -> int:
    """Memory that decoding takes: the native pixels plus the RGB copy the model gets."""
    native = 1 if mode in ONE_BYTE_MODES else 2 if mode.startswith("I;16") else 4
    return width * height * (native + (0 if mode == "RGB" else RGB_BYTES))


def check_dimensions(width: int, height: int, mode: str, limits: Limits, param: str = "messages") -> None:
    """413 for a header whose pixels, sides, aspect ratio or decoded memory exceed the limits."""
    def refuse(why: str) -> PayloadTooLarge:
        return PayloadTooLarge(f"image of {width}x{height} pixels {why}", param=param, code="image_too_large")

    if width * height > limits.max_image_pixels:
        raise refuse(f"exceeds the limit of {limits.max_image_pixels} pixels")
    if max(width, height) > limits.max_image_side:
        raise refuse(f"has a side over the limit of {limits.max_image_side} pixels")
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise refuse(f"has an aspect ratio over the limit of {limits.max_aspect_ratio:g}:1")
    if decoded_bytes(width, height, mode) > limits.max_decoded_bytes:
        raise refuse(f"would take {decoded_bytes(width, height, mode)} bytes decoded, over the limit of "
                     f"{limits.max_decoded_bytes}")


def decode_data_url(url: str, limits: Limits, param: str = "messages") -> bytes:
    """The bytes of a `data:image/...;base64,...` URL."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise BadRequest("image data URLs must look like data:image/png;base64,<data>", param=param,
                         code="invalid_image_url")
    payload = "".join(payload.split())  # some encoders wrap lines; whitespace is not data
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise PayloadTooLarge(f"image exceeds the limit of {limits.max_image_bytes} bytes", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadRequest(f"image data URL is not valid base64 ({err})", param=param, code="invalid_image_url") from err


def is_public_address(address: str) -> bool:
    """True only for globally routable unicast addresses (IPv4-mapped IPv6 judged as IPv4)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def resolve_host(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({info[4][0] for info in infos})


async def fetch_remote(url: str, limits: Limits, *, param: str = "messages", resolve: Resolver = resolve_host,
                       transport: httpx.AsyncBaseTransport | None = None) -> bytes:
    """Download a remote image under the rules in the module docstring."""
    if not limits.allow_remote_images:
        raise BadRequest("remote image URLs are disabled on this server; send the image as a data URL",
                         param=param, code="remote_images_disabled")
    try:
        return await asyncio.wait_for(_fetch(url, limits, param, resolve, transport), limits.remote_timeout_s)
    except asyncio.TimeoutError as err:
        raise BadRequest(f"fetching the image took longer than {limits.remote_timeout_s:g}s", param=param,
                         code="remote_image_timeout") from err


def parse_remote_url(url: str, param: str, base: httpx.URL | None = None) -> httpx.URL:
    """The http(s) URL (or redirect `location`, relative to `base`) as httpx parses it; 400 if it
    does not parse, lacks a host, or names a port no socket can have."""
    try:
        target = base.join(url) if base is not None else httpx.URL(url)
        host = target.host  # decodes an "xn--" name only now: idna's IDNAError (a ValueError), not InvalidURL
    except (httpx.InvalidURL, ValueError) as err:
        raise BadRequest(f"image URL {url[:200]!r} is malformed ({err})", param=param,
                         code="invalid_image_url") from err
    if target.scheme not in ("http", "https") or not host:
        raise BadRequest("remote image URLs must be http(s) URLs with a host", param=param, code="invalid_image_url")
    # httpx accepts any port number; connecting to 99999 fails deep inside anyio as an ExceptionGroup.
    if target.port is not None and not 1 <= target.port <= 65535:
        raise BadRequest(f"image URL port {target.port} is outside 1..65535", param=param, code="invalid_image_url")
    return target


async def _fetch(url: str, limits: Limits, param: str, resolve: Resolver,
                 transport: httpx.AsyncBaseTransport | None) -> bytes:
    # trust_env=False: an HTTP(S)_PROXY from the environment would connect on our behalf and
    # bypass the address check.
    async with httpx.AsyncClient(transport=transport, timeout=limits.remote_timeout_s,
                                 follow_redirects=False, trust_env=False) as client:
        target = parse_remote_url(url, param)
        for _ in range(limits.remote_max_redirects + 1):
            port = target.port or (443 if target.scheme == "https" else 80)
            try:
                addresses = await resolve(target.host, port)
            except (OSError, UnicodeError) as err:  # UnicodeError: the idna codec refuses a label over 63 chars
                raise BadRequest(f"cannot resolve image host {target.host!r}", param=param,
                                 code="invalid_image_url") from err
            if not addresses or not all(is_public_address(a) for a in addresses):
                raise BadRequest(f"image host {target.host!r} resolves to a non-public address; loopback, "
                                 "link-local, private and reserved addresses are refused", param=param,
                                 code="forbidden_image_url")
            # Connect to the address we checked; Host header and TLS SNI keep the real name.
            pinned = target.copy_with(host=addresses[0])
            headers = {"Host": target.netloc.decode("ascii"), "Accept": "image/*"}
            extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
            try:
                data, location = await _download(client, pinned, headers, extensions, limits, param)
            except httpx.TimeoutException as err:
                raise BadRequest(f"fetching the image from {target.host!r} timed out", param=param,
                                 code="remote_image_timeout") from err
            # RequestError: refused, unreachable, reset, TLS failure, bad content-encoding. UnicodeError:
            # httpx parses a redirect's location even when not following it, and lets idna's
            # IDNAError for an "xn--" host there escape.
            except (httpx.RequestError, UnicodeError) as err:
                raise BadRequest(f"cannot fetch the image from {target.host!r} ({type(err).__name__})",
                                 param=param, code="remote_image_error") from err
            if location is None:
                return data
            target = parse_remote_url(location, param, base=target)
        raise BadRequest(f"too many redirects (more than {limits.remote_max_redirects})", param=param,
                         code="remote_image_error")


async def _download(client: httpx.AsyncClient, pinned: httpx.URL, headers: dict[str, str],
                    extensions: dict[str, str], limits: Limits, param: str) -> tuple[bytes, str | None]:
    """One GET: the body within the size limit, or the `location` of a redirect (body b"")."""
    async with client.stream("GET", pinned, headers=headers, extensions=extensions) as response:
        if response.is_redirect and "location" in response.headers:
            return b"", response.headers["location"]
        if response.status_code != 200:
            raise BadRequest(f"fetching the image failed with HTTP {response.status_code}", param=param,
                             code="remote_image_error")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limits.max_image_bytes:
            raise PayloadTooLarge(f"remote image exceeds the limit of {limits.max_image_bytes} bytes", param=param)
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > limits.max_image_bytes:
                raise PayloadTooLarge(f"remote image exceeds the limit of {limits.max_image_bytes} bytes",
                                      param=param)
        return bytes(data), None


async def load_image(url: str, limits: Limits, param: str = "messages", **fetch_kwargs) -> Image.Image:
    """An RGB image from a content part's URL (data: or, when allowed, http(s))."""
    if url.startswith("data:"):
        data = decode_data_url(url, limits, param)
    elif url.startswith(("http://", "https://")):
        data = await fetch_remote(url, limits, param=param, **fetch_kwargs)
    else:
        raise BadRequest("image_url.url must be a data: URL (or http(s) when enabled)", param=param,
                         code="invalid_image_url")
    # Decoding is CPU work; keep it off the event loop so other requests keep flowing.
    return await asyncio.to_thread(open_image, data, limits, param)
