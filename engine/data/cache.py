"""The dataset cache: one folder per dataset under `engine.paths.data_root()`.

```
<data root>/<name>/images.safetensors   uint8 tensors "train", "val", "test",
                                        each [n_classes, per_class, C, H, W], or, when the
                                        classes of a split have different numbers of images
                                        (folder imports), [images, C, H, W] class after class
                                        with the per-class `counts` in the manifest
<data root>/<name>/manifest.json        class names, counts, source, image shape, content hash
```

A cache is written by `CacheWriter` into a temporary folder next to its final place, the tensor
file first (images go in one at a time at their offset, so no importer holds a whole split in
memory), the manifest last, then the folder is renamed into place. A failed or interrupted import
therefore never leaves a folder that `load_cached` would use: a folder counts only when it has a
manifest, and the manifest's file size and tensor shapes are checked on load.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.errors import UserError
from engine.paths import data_root

FORMAT = "mamlpp-dataset/1"
SPLITS = ("train", "val", "test")
TENSOR_FILE = "images.safetensors"
MANIFEST_FILE = "manifest.json"
DATASET_NAMES = ("omniglot", "miniimagenet", "quickstart")

# How a user gets each dataset into the cache (used in every "missing" or "damaged" message).
GET_COMMANDS = {
    "omniglot": "mamlpp data fetch omniglot",
    "miniimagenet": "mamlpp data import miniimagenet PATH",
    "quickstart": "mamlpp data fetch quickstart",
}


def resolve_root(root: Path | None) -> Path:
    return Path(root) if root is not None else data_root()


def dataset_dir(name: str, root: Path | None = None) -> Path:
    return resolve_root(root) / name


@dataclass
class FewShotDataset:
    """A cached dataset in memory: per split a uint8 tensor [n_classes, per_class, C, H, W].

    Pixel value v stands for v / pixel_max in [0, 1] (Omniglot and quickstart store {0, 1} with
    ink = 1; mini-ImageNet stores 0..255). `normalize` is the per-channel (mean, std) applied
    after scaling, or None. `train_augment` is "rot90" where training classes are rotated.
    """

    name: str
    splits: dict[str, torch.Tensor]
    class_names: dict[str, list[str]]
    manifest: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    # split -> images per class, for splits stored as [images, C, H, W] (varying counts)
    class_counts: dict[str, list[int]] = field(default_factory=dict)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest["image_shape"])  # type: ignore[return-value]

    @property
    def pixel_max(self) -> int:
        return int(self.manifest.get("pixel_max", 255))

    @property
    def normalize(self) -> tuple[list[float], list[float]] | None:
        norm = self.manifest.get("normalize")
        return (norm["mean"], norm["std"]) if norm else None

    @property
    def train_augment(self) -> str | None:
        return self.manifest.get("train_augment")

    def images(self, split: str) -> torch.Tensor:
        if split not in self.splits:
            raise UserError(f"Dataset {self.name} has no split {split!r}; "
                            f"splits: {', '.join(self.splits)}.")
        return self.splits[split]

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for s, x in self.splits.items():
            n = self.class_counts.get(s)
            if n is None:
                out[s] = {"classes": int(x.shape[0]), "per_class": int(x.shape[1]),
                          "images": int(x.shape[0] * x.shape[1])}
            else:
                out[s] = {"classes": len(n), "per_class": min(n), "per_class_max": max(n),
                          "images": sum(n)}
        return out


def _damaged(name: str, where: Path, why: str) -> UserError:
    return UserError(f"The cached {name} dataset in {where} is damaged ({why}); "
                     f"re-create it with `{GET_COMMANDS.get(name, 'mamlpp data ...')}`.")


def read_manifest(name: str, root: Path | None = None) -> dict[str, Any] | None:
    """The manifest of a cached dataset, or None when it is not cached."""
    folder = dataset_dir(name, root)
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise _damaged(name, folder, f"unreadable manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _damaged(name, folder, "unknown manifest format")
    return manifest


def content_sha256(path: Path, offset: int) -> str:
    """sha256 of a file from `offset` on (the tensor bytes of a cache file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
    return 8 + n


def load_cached(name: str, root: Path | None = None, verify: bool = False) -> FewShotDataset | None:
    """Load a cached dataset (None when absent). `verify` also re-hashes the tensor bytes."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    manifest = read_manifest(name, root)
    if manifest is None:
        return None
    folder = dataset_dir(name, root)
    tpath = folder / manifest.get("tensor_file", TENSOR_FILE)
    try:
        size = tpath.stat().st_size
    except OSError:
        raise _damaged(name, folder, f"{tpath.name} is missing") from None
    if size != manifest.get("file_size"):
        raise _damaged(name, folder, f"{tpath.name} has {size} bytes, the manifest says "
                                     f"{manifest.get('file_size')}")
    try:
        tensors = load_file(tpath)
    except (SafetensorError, OSError, ValueError) as e:
        raise _damaged(name, folder, f"{tpath.name} cannot be read: {e}") from None
    shape = tuple(manifest["image_shape"])
    splits, names, class_counts = {}, {}, {}
    for split, info in manifest["splits"].items():
        x = tensors.get(split)
        want = (info["classes"], info["per_class"], *shape)
        if info.get("counts") is not None:  # varying images per class
            counts = [int(n) for n in info["counts"]]
            if len(counts) != info["classes"]:
                raise _damaged(name, folder, f"split {split} lists {len(counts)} class counts "
                                             f"for {info['classes']} classes")
            class_counts[split] = counts
            want = (sum(counts), *shape)
        if x is None or tuple(x.shape) != want or x.dtype != torch.uint8:
            got = None if x is None else (tuple(x.shape), str(x.dtype))
            raise _damaged(name, folder, f"split {split} is {got}, expected uint8 {want}")
        splits[split] = x
        names[split] = list(info.get("class_names") or [str(i) for i in range(info["classes"])])
    if verify and content_sha256(tpath, _data_offset(tpath)) != manifest.get("content_sha256"):
        raise _damaged(name, folder, "content hash mismatch")
    return FewShotDataset(name, splits, names, manifest, folder, class_counts)


def list_cached(root: Path | None = None) -> list[dict[str, Any]]:
    """Manifests of every cached dataset (damaged ones as {"name", "error"})."""
    base = resolve_root(root)
    out: list[dict[str, Any]] = []
    if not base.is_dir():
        return out
    for folder in sorted(base.iterdir()):
        if folder.name.startswith(".") or not (folder / MANIFEST_FILE).is_file():
            continue
        try:
            manifest = read_manifest(folder.name, base)
        except UserError as e:
            out.append({"name": folder.name, "path": str(folder), "error": str(e)})
            continue
        if manifest is not None:
            manifest = dict(manifest, path=str(folder))
            out.append(manifest)
    return out


def _space_error(root: Path, name: str) -> UserError:
    return UserError(f"The disk holding the data cache {root} is full, so the {name} cache "
                     "could not be written; free some space (or set MAMLPP_HOME to another disk) "
                     "and run the command again.")


class CacheWriter:
    """Write one dataset's cache atomically (see the module docstring).

    with CacheWriter("omniglot", {"train": (1150, 20), ...}, (1, 28, 28)) as w:
        w.write("train", class_index, image_index, pixels)   # uint8 [C,H,W] or [k,C,H,W]
        w.commit(manifest_fields)                             # returns the final folder
    Leaving the block without `commit` (an error) removes everything written.
    A split given as a list of per-class image counts instead of (classes, per_class) is
    stored as [images, C, H, W] with the counts in the manifest.
    """

    def __init__(self, name: str, splits: dict[str, tuple[int, int] | list[int]],
                 image_shape: tuple[int, int, int], root: Path | None = None) -> None:
        self.name = name
        self.root = resolve_root(root)
        self.shape = tuple(int(v) for v in image_shape)
        self.counts: dict[str, list[int]] = {}  # splits with varying images per class
        self.class_offsets: dict[str, list[int]] = {}
        for s, spec in splits.items():
            if isinstance(spec, list):
                self.counts[s] = [int(n) for n in spec]
                offsets = [0]
                for n in self.counts[s][:-1]:
                    offsets.append(offsets[-1] + n)
                self.class_offsets[s] = offsets
        self.splits = {s: ((len(spec), min(spec, default=0)) if isinstance(spec, list)
                           else (int(spec[0]), int(spec[1]))) for s, spec in splits.items()}
        self.image_bytes = int(np.prod(self.shape))
        self.tmp: Path | None = None
        self.fd: int | None = None
        self.committed = False
        header: dict[str, Any] = {}
        offset = 0
        self.offsets: dict[str, int] = {}
        for split, (classes, per_class) in self.splits.items():
            if classes < 1 or per_class < 1:
                raise UserError(f"The {split} split of {name} would be empty "
                                f"({classes} classes x {per_class} images).")
            images = sum(self.counts[split]) if split in self.counts else classes * per_class
            n = images * self.image_bytes
            shape = ([images, *self.shape] if split in self.counts
                     else [classes, per_class, *self.shape])
            header[split] = {"dtype": "U8", "shape": shape, "data_offsets": [offset, offset + n]}
            self.offsets[split] = offset
            offset += n
        header["__metadata__"] = {"format": FORMAT}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.header = len(raw).to_bytes(8, "little") + raw
        self.data_size = offset
        self.file_size = len(self.header) + offset

    # -- context management -------------------------------------------------------------------
    def __enter__(self) -> CacheWriter:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            _clean_stale_temps(self.root, self.name)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.name}-{os.getpid()}-",
                                             dir=self.root))
            os.chmod(self.tmp, 0o755)
            self.fd = os.open(self.tmp / TENSOR_FILE, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.posix_fallocate(self.fd, 0, self.file_size)  # a full disk fails here, early
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise
                os.ftruncate(self.fd, self.file_size)  # filesystem without fallocate
            os.pwrite(self.fd, self.header, 0)
        except BaseException as e:
            self._discard()
            if isinstance(e, OSError):
                raise self._os_error(e) from None
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed:
            self._discard()
        if isinstance(exc, OSError):
            raise self._os_error(exc) from None

    def _os_error(self, e: OSError) -> Exception:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            return _space_error(self.root, self.name)
        return UserError(f"Cannot write the data cache in {self.root}: {e.strerror or e}; "
                         "set MAMLPP_HOME to a writable folder.")

    def _discard(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    # -- writing ------------------------------------------------------------------------------
    def write(self, split: str, class_index: int, image_index: int, pixels: np.ndarray) -> None:
        """Put uint8 pixels [C,H,W] (or k consecutive images [k,C,H,W]) at their slot."""
        classes, per_class = self.splits[split]
        a = np.ascontiguousarray(pixels, dtype=np.uint8)
        k = 1 if a.ndim == len(self.shape) else a.shape[0]
        if split in self.counts and 0 <= class_index < classes:
            per_class = self.counts[split][class_index]
        if tuple(a.shape[-3:]) != self.shape or not (0 <= class_index < classes) \
                or not (0 <= image_index and image_index + k <= per_class):
            raise ValueError(f"bad write {split}[{class_index}, {image_index}] {a.shape}")
        if split in self.counts:
            index = self.class_offsets[split][class_index] + image_index
        else:
            index = class_index * per_class + image_index
        pos = len(self.header) + self.offsets[split] + index * self.image_bytes
        view = memoryview(a).cast("B")
        while view:
            n = os.pwrite(self.fd, view, pos)
            view, pos = view[n:], pos + n

    def commit(self, fields: dict[str, Any]) -> Path:
        """Finish: hash the tensors, write the manifest last, move the folder into place."""
        assert self.tmp is not None and self.fd is not None
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        tpath = self.tmp / TENSOR_FILE
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "name": self.name,
            "image_shape": list(self.shape),
            "dtype": "uint8",
            "tensor_file": TENSOR_FILE,
            "file_size": self.file_size,
            "content_sha256": content_sha256(tpath, len(self.header)),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        manifest.update(fields)
        splits = {}
        for split, (classes, per_class) in self.splits.items():
            names = list((fields.get("class_names") or {}).get(split) or [])
            splits[split] = {"classes": classes, "per_class": per_class,
                             "images": classes * per_class, "class_names": names}
            if split in self.counts:
                counts = self.counts[split]
                splits[split].update(per_class_max=max(counts), images=sum(counts),
                                     counts=counts)
        manifest.pop("class_names", None)
        manifest["splits"] = splits
        mpath = self.tmp / MANIFEST_FILE
        with open(mpath, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        final = self.root / self.name
        old = None
        if final.exists():
            old = self.root / f".old-{self.name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
        os.rename(self.tmp, final)
        self.tmp = None
        self.committed = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(self.root)
        return final


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _clean_stale_temps(root: Path, name: str) -> None:
    """Remove temp/old folders of `name` left by processes that no longer run."""
    import psutil

    pattern = re.compile(rf"\.tmp-{re.escape(name)}-(\d+)-")
    for p in root.glob(f".tmp-{name}-*"):
        m = pattern.match(p.name)
        pid = int(m.group(1)) if m else None
        if pid is not None and pid != os.getpid() and not psutil.pid_exists(pid):
            shutil.rmtree(p, ignore_errors=True)
    for p in root.glob(f".old-{name}-*"):
        shutil.rmtree(p, ignore_errors=True)
