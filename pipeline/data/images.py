"""Checking one image and re-encoding it to RGB JPEG only when it must be."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
KEEP_MODES = ("RGB", "L")
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")


class BadImage(Exception):
    """An input that cannot become a sample; ``reason`` is a short category, ``detail`` the specifics."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def is_image_name(name: str) -> bool:
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in IMAGE_EXTENSIONS


def decode(data: bytes) -> Image.Image:
    """Open and fully decode ``data`` (truncation shows only when every scanline is read)."""
    if not data:
        raise BadImage("empty file")
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except UnidentifiedImageError:
        kind = "corrupt image" if data.startswith(SIGNATURES) else "not an image"
        raise BadImage(kind, "cannot identify image file") from None
    except Image.DecompressionBombError as e:
        raise BadImage("image too large", str(e)) from None
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ... on bad data
        kind = "truncated image" if "truncated" in str(e).lower() else "corrupt image"
        raise BadImage(kind, f"{type(e).__name__}: {e}") from None
    return im


def to_rgb(im: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto white."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im if im.mode == "RGB" else im.convert("RGB")


def prepare(data: bytes, max_side: int = 0, quality: int = 95) -> tuple[bytes, bool]:
    """The JPEG bytes to store for ``data`` and whether they were re-encoded.

    The original bytes are kept when they are a JPEG in RGB or L mode within ``max_side`` (0 = no limit);
    anything else is converted to RGB, shrunk with Lanczos when over ``max_side``, and saved at ``quality``.
    Raises BadImage for what cannot be decoded completely.
    """
    im = decode(data)
    too_big = max_side > 0 and max(im.size) > max_side
    if im.format == "JPEG" and im.mode in KEEP_MODES and not too_big:
        return data, False
    im = to_rgb(im)
    if too_big:
        scale = max_side / max(im.size)
        size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality)
    return buf.getvalue(), True
