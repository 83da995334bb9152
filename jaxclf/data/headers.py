"""An image file's header and end marker, read without decoding it: the fast data check, ~50 us a file.

Pillow's lazy `Image.open` parses the header (format, mode, size) the way the `decode` op will,
so a file it cannot identify is one training cannot read. What a header cannot show, a file cut
short, shows at the other end: a JPEG ends with its EOI marker FFD9, a PNG with its IEND chunk, a
GIF with ';', and a WebP or BMP is as long as its header says. A file without that ending is only
*suspect* (cameras append data after a JPEG's EOI): the check decodes suspects to decide.
"""

from __future__ import annotations

import dataclasses
import os
import struct

from PIL import Image

# What Pillow's open raises for a file it cannot identify or whose header is corrupt (or that has
# more than twice Image.MAX_IMAGE_PIXELS, the decompression-bomb limit decoding keeps).
_HEADER_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)

_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_TAIL_BYTES = 64


@dataclasses.dataclass(frozen=True)
class Header:
    """What a file's first and last bytes say. `problem`: unreadable for certain (empty, not an image,
    corrupt header); `suspect`: it lacks its format's ending (truncated, or data after the image)."""

    num_bytes: int
    format: str | None = None
    mode: str | None = None
    width: int = 0
    height: int = 0
    problem: str | None = None
    suspect: str | None = None


def read_header(path: str) -> Header:
    """The header of the image file at `path`: format, mode and size, and whether it ends as its format must."""
    try:
        with open(path, "rb") as f:
            num_bytes = os.fstat(f.fileno()).st_size
            if num_bytes == 0:
                return Header(0, problem="empty file (0 bytes)")
            try:
                with Image.open(f) as img:
                    format_, mode, (width, height) = img.format, img.mode, img.size
            except _HEADER_ERRORS as e:
                return Header(num_bytes, problem=f"{type(e).__name__}: {e}")
            f.seek(0)
            head = f.read(16)
            f.seek(max(num_bytes - _TAIL_BYTES, 0))
            tail = f.read()
    except OSError as e:
        return Header(0, problem=f"cannot read the file ({e.strerror or e})")
    suspect = _missing_ending(format_, head, tail, num_bytes)
    return Header(num_bytes, format_, mode, width, height, suspect=suspect)


def _missing_ending(format_: str, head: bytes, tail: bytes, num_bytes: int) -> str | None:
    """Why the file does not end as `format_` requires, or None (also for formats with no fixed ending, e.g. TIFF)."""
    if format_ in ("JPEG", "MPO"):
        # Some writers pad after EOI with zeros or a newline; that is not damage.
        if not tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9"):
            return "no JPEG end marker (FFD9) at the end of the file"
    elif format_ == "PNG":
        if not tail.endswith(_PNG_IEND):
            return "no PNG IEND chunk at the end of the file"
    elif format_ == "GIF":
        if not tail.rstrip(b"\x00").endswith(b";"):
            return "no GIF trailer (';') at the end of the file"
    elif format_ == "WEBP":
        declared = struct.unpack("<I", head[4:8])[0] + 8
        if declared > num_bytes:
            return f"{num_bytes} bytes where the RIFF header declares {declared}"
    elif format_ == "BMP":
        declared = struct.unpack("<I", head[2:6])[0]
        if declared > num_bytes:
            return f"{num_bytes} bytes where the BMP header declares {declared}"
    return None
