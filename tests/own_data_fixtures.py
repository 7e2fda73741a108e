"""Class folders built from the shared real images (Omniglot characters, the mini-ImageNet
sample) for the folder-import, predict and export tests: mixed sizes, formats and colour modes,
plus the broken files users have. Nothing is copied into the repository."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from tests.data_fixtures import MINI_FOLDERS, OMNIGLOT_DIR, needs_mini_sample, needs_omniglot

needs_images = [needs_omniglot, needs_mini_sample]


def omniglot_characters(n: int, start: int = 0) -> list[tuple[str, list[tuple[str, bytes]]]]:
    """n characters of images_background (every 7th, from `start`): (alphabet_character,
    [(file name, PNG bytes)] of its 20 drawings)."""
    with zipfile.ZipFile(OMNIGLOT_DIR / "images_background.zip") as z:
        names = sorted(x for x in z.namelist() if x.endswith(".png"))
        chars = sorted({x.rsplit("/", 1)[0] for x in names})[start::7][:n]
        out = []
        for c in chars:
            files = [x for x in names if x.startswith(c + "/")]
            label = c.split("/", 1)[1].replace("/", "_").replace("(", "").replace(")", "")
            out.append((label, [(x.rsplit("/", 1)[1], z.read(x)) for x in files]))
    return out


def mini_classes(n: int, split: str = "train") -> list[tuple[str, list[Path]]]:
    folders = sorted(p for p in (MINI_FOLDERS / split).iterdir() if p.is_dir())[:n]
    return [(p.name, sorted(p.glob("*.jpg"))) for p in folders]


def save(image: Image.Image, path: Path, fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt)
    return path


def corrupt_jpeg(path: Path, source: Path) -> Path:
    """The first 300 bytes of a real JPEG: a header that opens, then nothing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(source.read_bytes()[:300])
    return path


def mixed_rgb_folder(dest: Path) -> dict[str, str]:
    """One folder per class from the mini-ImageNet sample and Omniglot, in mixed sizes and
    formats. Returns {class: what is special about it}."""
    notes = {}
    minis = mini_classes(12)
    for i, (wnid, files) in enumerate(minis):
        d = dest / wnid
        d.mkdir(parents=True)
        for j, f in enumerate(files):
            im = Image.open(f).convert("RGB")
            if i == 1:
                save(im, d / f"{f.stem}.png")
            elif i == 2:
                save(im, d / f"{f.stem}.bmp")
            elif i == 3:
                save(im.resize((120, 90)), d / f"{f.stem}.jpg", "JPEG")
            elif i == 4:
                save(im.resize((50, 70)), d / f"{f.stem}.png")
            elif i == 5 and j == 0:
                save(im.convert("L"), d / f"{f.stem}.jpg", "JPEG")
            elif i == 6 and j == 0:
                rgba = im.convert("RGBA")
                alpha = np.full((84, 84), 255, np.uint8)
                alpha[:20] = 0
                rgba.putalpha(Image.fromarray(alpha))
                save(rgba, d / f"{f.stem}.png")
            elif i == 8 and j > 0:
                continue  # one image only: left out
            elif i == 9 and j > 3:
                continue  # 4 images
            else:
                (d / f.name).write_bytes(f.read_bytes())
        if i == 7:
            corrupt_jpeg(d / "broken.jpg", files[0])
            (d / "notes.txt").write_text("not an image\n")
        notes[wnid] = {1: "png", 2: "bmp", 3: "120x90", 4: "50x70", 5: "one grayscale",
                       6: "one rgba", 7: "broken files", 8: "single image",
                       9: "four images"}.get(i, "")
    for name, drawings in omniglot_characters(4):
        d = dest / name
        d.mkdir(parents=True)
        for fname, data in drawings:
            (d / fname).write_bytes(data)
        notes[name] = "omniglot grayscale 105x105"
    (dest / "empty_class").mkdir()
    notes["empty_class"] = "no files"
    return notes


def grey_characters_folder(dest: Path, n: int = 30) -> list[str]:
    """n Omniglot characters as class folders, mixed: some re-encoded as JPEG or BMP, some
    upscaled to non-square sizes, some colour; plus two mini-ImageNet classes (6 colour images
    each). Returns the class names."""
    names = []
    for k, (name, drawings) in enumerate(omniglot_characters(n, start=3)):
        d = dest / name
        d.mkdir(parents=True)
        for j, (fname, data) in enumerate(drawings):
            stem = fname.rsplit(".", 1)[0]
            if k % 5 == 1:
                im = Image.open(io.BytesIO(data)).convert("L")
                save(im, d / f"{stem}.jpg", "JPEG")
            elif k % 5 == 2 and j % 2:
                im = Image.open(io.BytesIO(data)).convert("L").resize((140, 105))
                save(im, d / f"{stem}.bmp")
            elif k % 5 == 3 and j == 0:
                im = Image.open(io.BytesIO(data)).convert("RGB")
                save(im, d / f"{stem}.png")
            else:
                (d / fname).write_bytes(data)
        names.append(name)
    for wnid, files in mini_classes(2, "val"):
        d = dest / wnid
        d.mkdir(parents=True)
        for f in files:
            (d / f.name).write_bytes(f.read_bytes())
        names.append(wnid)
    return names
