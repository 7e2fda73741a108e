"""How an image becomes the network's input: one definition for a folder import, training,
`mamlpp predict`, the Python API (`mamlpp.load`) and an export.

A `Preprocessing` is recorded with every dataset cache (derived from its manifest), with every
run (config.json `runtime.input`) and in every export (model.json), so a model always gets its
inputs exactly as it was trained on them:

1. decode (anything Pillow reads) and convert, by `method`:
   - "center_crop" (`mamlpp data import folder`): EXIF orientation applied, transparency laid
     on white, converted to grayscale (L) or RGB, the centred square cropped (the longer side's
     edges cut, (long - short) // 2 pixels before it), then resized to `size` x `size` with
     LANCZOS: the aspect ratio is kept. An image already `size` x `size` is unchanged.
   - "stretch" (mini-ImageNet, as its importer does): converted to RGB, resized to
     `size` x `size` with LANCZOS when another size (the aspect ratio is not kept).
   - "omniglot" (Omniglot and quickstart: ink = 1): grayscale, inverted, PIL BOX filter to
     `size` x `size`, ink where the mean is at least 128/255: pixels in {0, 1}.
2. the uint8 pixels become float32 as the task sampler makes them: x / pixel_max, then
   (x - mean) / std per channel when `normalize` is set (`engine.data.sampler.pixels_to_float`).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from engine.errors import UserError

METHODS = ("center_crop", "stretch", "omniglot")
_GREY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class ImageReadError(UserError):
    """One image could not be decoded (callers that skip bad files catch this)."""


@dataclass(frozen=True)
class Preprocessing:
    method: str
    size: int
    channels: int
    pixel_max: int
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None

    # -- records ------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        norm = None
        if self.normalize is not None:
            norm = {"mean": list(self.normalize[0]), "std": list(self.normalize[1])}
        return {"method": self.method, "size": self.size, "channels": self.channels,
                "pixel_max": self.pixel_max, "normalize": norm}

    @classmethod
    def from_dict(cls, d: Any, where: str = "the model") -> Preprocessing:
        """Validated: a UserError naming `where` when the record is not a preprocessing."""
        bad = UserError(f"The preprocessing recorded in {where} is not valid; re-create it.")
        if not isinstance(d, dict):
            raise bad
        method, size, channels = d.get("method"), d.get("size"), d.get("channels")
        pixel_max, norm = d.get("pixel_max"), d.get("normalize")
        if method not in METHODS or not _int_in(size, 1, 4096) or channels not in (1, 3) \
                or pixel_max not in (1, 255):
            raise bad
        normalize = None
        if norm is not None:
            if not isinstance(norm, dict):
                raise bad
            mean, std = norm.get("mean"), norm.get("std")
            if not _floats(mean, channels) or not _floats(std, channels) \
                    or any(s <= 0 for s in std):
                raise bad
            normalize = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
        return cls(method, int(size), int(channels), int(pixel_max), normalize)

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> Preprocessing:
        """What a dataset cache's images went through (its manifest's `preprocess`, or the
        built-in importers' definitions)."""
        recorded = manifest.get("preprocess")
        c, h, _ = manifest["image_shape"]
        norm = manifest.get("normalize")
        if recorded:
            return cls.from_dict(dict(recorded, normalize=norm,
                                      pixel_max=manifest.get("pixel_max", 255)),
                                 f"the {manifest.get('name')} dataset's manifest")
        pixel_max = int(manifest.get("pixel_max", 255))
        method = "omniglot" if pixel_max == 1 else "stretch"
        normalize = (tuple(norm["mean"]), tuple(norm["std"])) if norm else None
        return cls(method, int(h), int(c), pixel_max, normalize)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def describe(self) -> str:
        how = {"center_crop": "centred square cropped, resized to {s}x{s} (LANCZOS)",
               "stretch": "resized to {s}x{s} (LANCZOS, aspect not kept)",
               "omniglot": "grayscale, inverted, BOX-filtered to {s}x{s}, ink where >= 128"}
        colour = "RGB" if self.channels == 3 else "grayscale"
        text = f"{colour}, {how[self.method].format(s=self.size)}, pixels / {self.pixel_max}"
        if self.normalize:
            mean = ", ".join(f"{v:.4f}" for v in self.normalize[0])
            std = ", ".join(f"{v:.4f}" for v in self.normalize[1])
            text += f", then (x - mean) / std with mean ({mean}) and std ({std})"
        return text

    # -- images -------------------------------------------------------------------------------
    def prepare(self, image: Image.Image) -> tuple[np.ndarray, bool]:
        """A decoded image -> (uint8 [C, size, size], whether its colour had to be converted:
        a grayscale image for a colour model or the other way round)."""
        converted = _is_grey(image) != (self.channels == 1)
        mode = "L" if self.channels == 1 else "RGB"
        s = self.size
        if self.method == "omniglot":
            grey = image.convert("L")
            ink = Image.fromarray(255 - np.asarray(grey, dtype=np.uint8))
            small = np.asarray(ink.resize((s, s), Image.Resampling.BOX))
            return (small >= 128).astype(np.uint8)[None], converted
        if self.method == "stretch":
            out = image.convert(mode)
            if out.size != (s, s):
                out = out.resize((s, s), Image.Resampling.LANCZOS)
        else:
            out = ImageOps.exif_transpose(image)
            if "A" in out.getbands() or "transparency" in out.info:
                rgba = out.convert("RGBA")
                out = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)),
                                            rgba)
            out = out.convert(mode)
            w, h = out.size
            side = min(w, h)
            if (w, h) != (side, side):  # the centred square, whole pixels
                left, top = (w - side) // 2, (h - side) // 2
                out = out.crop((left, top, left + side, top + side))
            if out.size != (s, s):
                out = out.resize((s, s), Image.Resampling.LANCZOS)
        a = np.asarray(out, dtype=np.uint8)
        return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)).copy(), converted

    def pixels(self, images: list[Any], where: list[str] | None = None
               ) -> tuple[torch.Tensor, int]:
        """Images (paths, encoded bytes, PIL images or tensors) -> (uint8 [N, C, size, size],
        how many had their colour converted). An unreadable one raises ImageReadError."""
        out = np.empty((len(images), *self.image_shape), np.uint8)
        converted = 0
        for i, image in enumerate(images):
            label = where[i] if where else f"image {i}"
            out[i], conv = self.prepare(to_pil(image, label))
            converted += conv
        return torch.from_numpy(out), converted

    def to_float(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels -> the float32 input the network was trained on."""
        from engine.data.sampler import pixel_affine, pixels_to_float

        affine = pixel_affine(self.pixel_max, self.normalize, self.channels, pixels.device)
        return pixels_to_float(pixels, self.pixel_max, affine)


def _int_in(v: Any, low: int, high: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v <= high


def _floats(v: Any, n: int) -> bool:
    return (isinstance(v, list) and len(v) == n
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
                    for x in v))


def _is_grey(image: Image.Image) -> bool:
    if image.mode in _GREY_MODES:
        return True
    if image.mode == "P":  # a palette of greys only
        palette = image.getpalette() or []
        rgb = np.asarray(palette[: len(palette) // 3 * 3]).reshape(-1, 3)
        return bool(len(rgb) and (rgb == rgb[:, :1]).all())
    return False


def decode(data: bytes, where: str) -> Image.Image:
    """Encoded bytes -> a loaded PIL image; ImageReadError (one sentence) when not an image."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.copy()  # info (EXIF orientation, transparency) comes along
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        reason = str(e).split("\n")[0] or type(e).__name__
        raise ImageReadError(f"Cannot read image {where}: {reason}.") from None


def read_file(path: Path) -> Image.Image:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageReadError(f"Cannot read {path}: {e.strerror or e}.") from None
    return decode(data, str(path))


def to_pil(image: Any, where: str = "image") -> Image.Image:
    """A path, encoded bytes, a PIL image or an image tensor as a PIL image.

    Tensors are pixels as an image library gives them: [C, H, W] or [H, W] (C = 1 or 3),
    uint8 in 0..255 or float in [0, 1]; they then go through the same preprocessing as files.
    """
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        return read_file(Path(image))
    if isinstance(image, (bytes, bytearray)):
        return decode(bytes(image), where)
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if isinstance(image, torch.Tensor):
        x = image.detach().cpu()
        if x.dim() == 3 and x.shape[0] in (1, 3):
            x = x.permute(1, 2, 0)
        elif x.dim() != 2:
            raise UserError(f"{where} is a tensor of shape {tuple(image.shape)}; an image tensor "
                            "is [C, H, W] with C = 1 or 3, or [H, W].")
        if x.is_floating_point():
            x = (x.float().clamp(0, 1) * 255).round()
        a = x.to(torch.uint8).numpy()
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        return Image.fromarray(np.ascontiguousarray(a))
    raise UserError(f"{where} is a {type(image).__name__}; give a PIL image, an image tensor, "
                    "or a file path.")
