"""Decoding one image file a user gave us, with one clear error for anything unreadable."""

from __future__ import annotations

import io

from PIL import Image

from engine.errors import UserError


def decode_image(data: bytes, where: str, mode: str) -> Image.Image:
    """The encoded image `data` converted to PIL `mode` ("L", "RGB"); `where` names it in the
    error a truncated, corrupt or oversized file gets."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert(mode)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserError(f"Cannot read image {where}: {e}.") from None
