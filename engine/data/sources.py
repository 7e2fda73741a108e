"""Read-only views of a user's files: a folder, a .zip, or a .tar(.gz/.bz2/.xz) archive.

Importers list file names (posix paths relative to the folder or archive root) and read files
through these views, so the same layout detection works on all three, nothing is extracted to
disk, and the user's files are never modified.
"""

from __future__ import annotations

import os
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from engine.errors import UserError

_SMALL = 8 << 20  # tar members up to this size with these endings are kept from the listing pass
_KEEP_SUFFIXES = (".csv", ".txt", ".md")
_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def _skip(name: str) -> bool:
    """Hidden files, macOS resource forks and `__MACOSX/` folders are never data."""
    return any(part.startswith(".") or part == "__MACOSX" for part in name.split("/"))


def _clean(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(_ARCHIVE_SUFFIXES)


class Source:
    """A set of named files; `iter_read` may yield in any order (tar archives stream)."""

    label: str

    def names(self) -> list[str]:
        raise NotImplementedError

    def read(self, name: str) -> bytes:
        raise NotImplementedError

    def iter_read(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        for name in names:
            yield name, self.read(name)

    def close(self) -> None:
        pass

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FolderSource(Source):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.label = str(self.path)
        self._names: list[str] | None = None

    def names(self) -> list[str]:
        if self._names is None:
            out = []
            for dirpath, dirnames, filenames in os.walk(self.path, followlinks=True):
                dirnames[:] = sorted(d for d in dirnames if not _skip(d))
                rel = os.path.relpath(dirpath, self.path)
                prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                out.extend(prefix + f for f in sorted(filenames) if not _skip(f))
            self._names = out
        return self._names

    def file_path(self, name: str) -> Path:
        return self.path / name

    def read(self, name: str) -> bytes:
        try:
            return (self.path / name).read_bytes()
        except OSError as e:
            raise UserError(f"Cannot read {self.path / name}: {e.strerror or e}.") from None


class ZipSource(Source):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.label = str(self.path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise UserError(f"{self.path} is not a readable zip file ({e}).") from None
        self._names = [_clean(i.filename) for i in self._zip.infolist()
                       if not i.is_dir() and not _skip(_clean(i.filename))]
        self._raw = {_clean(i.filename): i.filename for i in self._zip.infolist()}

    def names(self) -> list[str]:
        return list(self._names)

    def read(self, name: str) -> bytes:
        try:
            return self._zip.read(self._raw[name])
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, KeyError) as e:
            raise UserError(f"{name} in {self.path} is damaged or unreadable ({e}).") from None

    def close(self) -> None:
        self._zip.close()


class TarSource(Source):
    """Tar archives are read as streams: one pass to list, one pass to read what is wanted."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.label = str(self.path)
        self._names: list[str] = []
        self._small: dict[str, bytes] = {}
        try:
            with tarfile.open(self.path, "r|*") as tar:
                for member in tar:
                    name = _clean(member.name)
                    if not member.isfile() or _skip(name):
                        continue
                    self._names.append(name)
                    if member.size <= _SMALL and name.lower().endswith(_KEEP_SUFFIXES):
                        f = tar.extractfile(member)
                        self._small[name] = f.read() if f else b""
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise UserError(f"{self.path} is not a readable tar archive ({e}).") from None

    def names(self) -> list[str]:
        return list(self._names)

    def read(self, name: str) -> bytes:
        if name in self._small:
            return self._small[name]
        for _, data in self.iter_read([name]):
            return data
        raise UserError(f"{name} is missing from {self.path}.")

    def iter_read(self, names: Iterable[str]) -> Iterator[tuple[str, bytes]]:
        wanted = set(names)
        try:
            with tarfile.open(self.path, "r|*") as tar:
                for member in tar:
                    name = _clean(member.name)
                    if name in wanted and member.isfile():
                        f = tar.extractfile(member)
                        wanted.discard(name)
                        yield name, (f.read() if f else b"")
                        if not wanted:
                            return
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise UserError(f"{self.path} is damaged or unreadable ({e}).") from None
        if wanted:
            raise UserError(f"{sorted(wanted)[0]} is missing from {self.path}.")


def open_source(path: Path) -> Source:
    """A folder, zip or tar archive as a Source, or a UserError that says what PATH must be."""
    path = Path(path).expanduser()
    if path.is_dir():
        return FolderSource(path)
    if not path.exists():
        raise UserError(f"{path} does not exist.")
    lower = path.name.lower()
    if lower.endswith(".zip"):
        return ZipSource(path)
    if is_archive(path):
        return TarSource(path)
    raise UserError(f"{path} is neither a folder nor a .zip/.tar/.tar.gz archive.")
