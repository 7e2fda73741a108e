"""Helpers for the data tests: shared-data locations, layout builders, a faulty HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import shutil
import tarfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.data.cache import FewShotDataset

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
OMNIGLOT_DIR = SHARED / "omniglot"
MINI_SAMPLE = SHARED / "miniimagenet-sample"
MINI_FOLDERS = MINI_SAMPLE / "mini_imagenet_full_size"

needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT_DIR / "images_background.zip").is_file()
    or not (OMNIGLOT_DIR / "images_evaluation.zip").is_file(),
    reason="shared Omniglot zips not available")
needs_mini_sample = pytest.mark.skipif(not MINI_FOLDERS.is_dir(),
                                       reason="shared mini-ImageNet sample not available")


def md5(path: Path) -> str:
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


def tree_digest(path: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under `path` (or the file itself): size, mtime and sha256, to prove no change."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns,
                     hashlib.sha256(p.read_bytes()).hexdigest()) for p in files}


def leftovers(root: Path) -> list[str]:
    """Temp or half-written folders in a data root."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-")))


# -- synthetic in-memory datasets ---------------------------------------------------------------

def synthetic_dataset(name: str = "toy", classes: tuple[int, int, int] = (30, 10, 12),
                      per_class: int = 8, shape: tuple[int, int, int] = (1, 12, 12),
                      pixel_max: int = 1, normalize: dict | None = None,
                      train_augment: str | None = "rot90", seed: int = 0) -> FewShotDataset:
    """Random distinct images (no image equals another, or a rotation of another)."""
    g = torch.Generator().manual_seed(seed)
    high = 2 if pixel_max == 1 else 256
    splits, names = {}, {}
    for split, n in zip(("train", "val", "test"), classes, strict=True):
        splits[split] = torch.randint(0, high, (n, per_class, *shape), generator=g,
                                      dtype=torch.uint8)
        names[split] = [f"{split}{i}" for i in range(n)]
    manifest = {"image_shape": list(shape), "pixel_max": pixel_max, "normalize": normalize,
                "train_augment": train_augment}
    return FewShotDataset(name, splits, names, manifest, None)


# -- mini-ImageNet layouts built from the shared sample -----------------------------------------

def sample_files() -> dict[str, dict[str, list[Path]]]:
    """split -> wnid -> sorted jpg paths of the shared sample."""
    out: dict[str, dict[str, list[Path]]] = {}
    for split in ("train", "val", "test"):
        out[split] = {d.name: sorted(d.glob("*.jpg"))
                      for d in sorted((MINI_FOLDERS / split).iterdir()) if d.is_dir()}
    return out


def build_folder_copy(dest: Path) -> Path:
    """A writable copy of layout (a): dest/mini_imagenet_full_size/{train,val,test}/..."""
    shutil.copytree(MINI_FOLDERS, dest / "mini_imagenet_full_size")
    for p in dest.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dest


def build_csv_layout(dest: Path, convert=None) -> Path:  # noqa: ANN001
    """Layout (b): dest/images/<file> + train.csv, val.csv, test.csv (header filename,label).

    `convert(image) -> (PIL image, suffix)` re-encodes the images (e.g. other size or format).
    """
    (dest / "images").mkdir(parents=True)
    for split, classes in sample_files().items():
        lines = ["filename,label"]
        for wnid, files in classes.items():
            for f in files:
                name = f.name
                if convert is None:
                    shutil.copyfile(f, dest / "images" / name)
                else:
                    with Image.open(f) as im:
                        out, suffix = convert(im.convert("RGB"))
                    name = f.stem + suffix
                    out.save(dest / "images" / name)
                lines.append(f"{name},{wnid}")
        (dest / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return dest


def build_pickle_layout(dest: Path, protocol: int = 4, val_name: str = "val",
                        reverse_rows: bool = False) -> Path:
    """Layout (c): mini-imagenet-cache-{train,<val_name>,test}.pkl, rows in sorted-file order
    (or stored in reverse with class_dict pointing at them, to test row indirection)."""
    dest.mkdir(parents=True, exist_ok=True)
    for split, classes in sample_files().items():
        images, class_dict = [], {}
        for wnid, files in classes.items():
            class_dict[wnid] = []
            for f in files:
                with Image.open(f) as im:
                    images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
                class_dict[wnid].append(len(images) - 1)
        data = np.stack(images)
        if reverse_rows:
            n = len(data)
            data = data[::-1].copy()
            class_dict = {w: [n - 1 - r for r in rows] for w, rows in class_dict.items()}
        name = val_name if split == "val" else split
        with open(dest / f"mini-imagenet-cache-{name}.pkl", "wb") as fh:
            pickle.dump({"image_data": data, "class_dict": class_dict}, fh, protocol=protocol)
    return dest


def build_archive(dest: Path, kind: str) -> Path:
    """The folder layout packed as .zip, .tar or .tar.gz (with mini_imagenet_full_size/ inside)."""
    dest.mkdir(parents=True, exist_ok=True)
    if kind == "zip":
        path = dest / "mini.zip"
        with zipfile.ZipFile(path, "w") as z:
            for f in sorted(MINI_FOLDERS.rglob("*")):
                z.write(f, "mini_imagenet_full_size/" + str(f.relative_to(MINI_FOLDERS)))
        return path
    path = dest / ("mini.tar.gz" if kind == "tar.gz" else "mini.tar")
    with tarfile.open(path, "w:gz" if kind == "tar.gz" else "w") as t:
        t.add(MINI_FOLDERS, "mini_imagenet_full_size")
    return path


# -- a local HTTP server with faults -------------------------------------------------------------

class FaultyServer:
    """Serves files of a folder on 127.0.0.1 with HTTP Range support, and injected faults:

    cut[name] = (n_times, after_bytes): the next n_times responses for `name` announce the full
    length but close the connection after `after_bytes` bytes of the body.
    corrupt: names whose every byte 1000 is flipped. missing: names answered with 404.
    `requests` records (path, Range header or None) of every GET.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.cut: dict[str, tuple[int, int]] = {}
        self.corrupt: set[str] = set()
        self.requests: list[tuple[str, str | None]] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                name = self.path.rsplit("/", 1)[-1]
                range_header = self.headers.get("Range")
                with owner.lock:
                    owner.requests.append((self.path, range_header))
                    cut = owner.cut.get(name)
                    if cut and cut[0] > 0:
                        owner.cut[name] = (cut[0] - 1, cut[1])
                    else:
                        cut = None
                path = owner.folder / name
                if not path.is_file():
                    self.send_error(404, "Not Found")
                    return
                data = bytearray(path.read_bytes())
                if name in owner.corrupt:
                    for i in range(0, len(data), 1000):
                        data[i] ^= 0xFF
                start = 0
                if range_header and range_header.startswith("bytes="):
                    start = int(range_header[6:].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = bytes(data[start:])
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Content-Type", "application/zip")
                self.end_headers()
                if cut is not None:
                    self.wfile.write(body[: cut[1]])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                for i in range(0, len(body), 1 << 20):
                    self.wfile.write(body[i:i + (1 << 20)])

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/omniglot"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,),
                                       daemon=True)

    def __enter__(self) -> FaultyServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()
