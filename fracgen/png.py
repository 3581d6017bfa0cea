"""A minimal grayscale PNG encoder: no filtering, one IDAT, deflate by ISA-L.

Measured on our 2-core dev machine for a 512 px 1p-frac image (`make bench` prints the table):
Pillow's encoder at level 1 takes about 1.25 ms and gives ~5.4 KB; these raw rows (filter type 0)
deflated by ISA-L (python-isal) at level 1 take about 0.08 ms and give ~3.6 KB. The sparse 0/127
images gain nothing from PNG's row filters, and ISA-L's fast levels are an order of magnitude
faster than zlib's. The result is an ordinary 8-bit grayscale PNG that any decoder reads.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from isal import isal_zlib
from PIL import Image

from fracgen.errors import FracgenError

LEVELS = (0, 1, 2, 3)  # ISA-L's levels; 1 is the measured sweet spot for these images
SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def row_buffer(size: int) -> np.ndarray:
    """A (size, size + 1) canvas: column 0 holds each row's PNG filter byte (0, "none"), the rest the image.

    `render(..., out=row_buffer(size))` draws straight into it, so encoding needs no copy.
    """
    return np.zeros((size, size + 1), dtype=np.uint8)


def stored_bytes(raw: int) -> int:
    """zlib's stored (uncompressed) stream of `raw` bytes: its 2-byte header, 5 bytes a 65535-byte block, the
    adler32: the most a PNG's IDAT of fracgen takes (`fracgen.shards.max_sample_bytes` bounds samples by it)."""
    return raw + 5 * (raw // 65535 + 1) + 6


def encode_rows(rows: np.ndarray, level: int = 1) -> bytes:
    """PNG bytes of an 8-bit grayscale image given as a row buffer (see `row_buffer`)."""
    height, width = rows.shape[0], rows.shape[1] - 1
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8 bit, grayscale, deflate, no interlace
    data = memoryview(np.ascontiguousarray(rows))
    idat = isal_zlib.compress(data, level)
    if len(idat) > stored_bytes(data.nbytes):
        # Incompressible rows (noise): ISA-L's Huffman-only level 0 makes them 1.23x larger and level 1 a few
        # hundred bytes larger than stored deflate, past the bound every reader holds a shard to. Store them.
        # Compressible images (every render) never get here: their bytes are unchanged.
        idat = zlib.compress(data, 0)
    return SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def encode(image: np.ndarray, level: int = 1) -> bytes:
    """PNG bytes of an (H, W) uint8 grayscale image."""
    rows = np.zeros((image.shape[0], image.shape[1] + 1), dtype=np.uint8)
    rows[:, 1:] = image
    return encode_rows(rows, level)


class PNGError(FracgenError, ValueError):
    """Not a PNG this decoder takes: a one-line reason (a ValueError too, as decoders' errors usually are)."""


MAX_SIDE = 16384  # fracgen's largest canvas (render.MAX_SIZE); a larger header is not one of our images


def header(data: bytes) -> tuple[int, int, int, int, int]:
    """(width, height, bit depth, colour type, interlace) from a PNG's IHDR, read before anything is inflated; one
    PNGError line when `data` does not start as a PNG."""
    if data[:8] != SIGNATURE or data[12:16] != b"IHDR" or len(data) < 33:
        raise PNGError("not a PNG (no PNG signature and header)")
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    return width, height, depth, color, interlace


def decode(data: bytes, size: int | None = None) -> np.ndarray:
    """(H, W) uint8 pixels of an 8-bit grayscale PNG; with `size`, it must be size x size.

    The header is checked before anything is inflated, and inflating stops at the bytes the header's size needs:
    a small PNG whose data inflate to gigabytes (a deflate bomb) is refused after reading one byte too many.

    fracgen's own PNGs (unfiltered rows, see `encode_rows`) are inflated by ISA-L directly: 0.2 ms for a
    512 px image against Pillow's 0.63 ms, which is what a loader decoding FractalDB-sized shards spends its
    time on. Any other PNG (filtered rows, other modes, several IDATs) goes through Pillow, converted to L;
    Pillow inflates no more than the image's size either.
    """
    width, height, depth, color, interlace = header(data)
    if size is not None and (width, height) != (size, size):
        raise PNGError(f"a {width}x{height} px PNG, not {size}x{size}")
    if not (1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise PNGError(f"a {width}x{height} px PNG: each side must be 1..{MAX_SIDE}")
    n = struct.unpack(">I", data[33:37])[0] if len(data) >= 37 else -1
    if depth == 8 and color == 0 and interlace == 0 and data[37:41] == b"IDAT" and data[45 + n : 53 + n] == (
            b"\x00\x00\x00\x00IEND"):
        expected = height * (width + 1)  # a filter byte and the pixels of each row
        inflater = isal_zlib.decompressobj()
        try:
            raw = inflater.decompress(data[41 : 41 + n], expected + 1)
        except isal_zlib.error:
            raw = None
        if raw is not None and len(raw) > expected:
            raise PNGError(f"its image data inflate to more than the {expected:,} bytes its {width}x{height} header "
                           "needs (a deflate bomb, or damaged)")
        if raw is not None and len(raw) == expected:
            raw = np.frombuffer(raw, np.uint8).reshape(height, width + 1)
            if not raw[:, 0].any():  # every row unfiltered: the pixels are the rest
                return raw[:, 1:].copy()  # writable and contiguous, like Pillow's
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.size != (width, height):  # Pillow took a later IHDR than the one checked above
                raise PNGError(f"Pillow reads a {image.width}x{image.height} px image, its header says "
                               f"{width}x{height}")
            return np.asarray(image.convert("L"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise PNGError(f"does not decode: {e}") from None
