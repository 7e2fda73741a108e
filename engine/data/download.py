"""HTTP downloads that resume (HTTP Range), retry with back-off and verify an md5."""

from __future__ import annotations

import errno
import hashlib
import http.client
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

from engine.data.progress import Reporter
from engine.errors import UserError

_CHUNK = 1 << 20


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class _Retry(Exception):
    """A transient failure: try again (resuming where possible)."""


def _transfer(url: str, part: Path, reporter: Reporter, timeout: float) -> None:
    """One HTTP request that appends to `part` (resuming with Range when it already has bytes)."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "mamlpp (+https://github.com/)"}
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # asked beyond the end: the part is complete (or junk)
            raise _Retry("complete") from None
        if e.code in (408, 429) or e.code >= 500:
            raise _Retry(f"HTTP {e.code}") from None
        raise UserError(f"Download of {url} failed: HTTP {e.code} {e.reason}.") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise _Retry(str(reason)) from None
    with response:
        status = response.status
        length = response.headers.get("Content-Length")
        if have and status == 206:
            match = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != have:
                have = 0  # the server answered another range: start again
        elif have:
            have = 0  # the server ignored Range (200): it sends the whole file again
        total = have + int(length) if length and length.isdigit() else None
        reporter.start(f"download {part.name[:-5]}", total, unit="bytes")
        if have:
            reporter.advance(have)
        written = have
        try:
            with open(part, "r+b" if have else "wb") as f:
                f.seek(have)
                f.truncate()
                while True:
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    written += len(chunk)
                    reporter.advance(len(chunk))
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise UserError(f"The disk is full while downloading {url} to {part.parent}; "
                                "free some space and run the command again.") from None
            raise _Retry(str(e)) from None
        except (http.client.HTTPException, TimeoutError) as e:
            raise _Retry(f"connection lost after {written} bytes ({type(e).__name__})") from None
        finally:
            reporter.done()
        if total is not None and written < total:
            raise _Retry(f"connection lost after {written} of {total} bytes")


def download_file(url: str, dest: Path, md5: str | None = None,
                  reporter: Reporter | None = None, retries: int = 5, timeout: float = 60.0,
                  backoff: float = 1.0) -> Path:
    """Download `url` to `dest` (via `dest.part`, resumed across failures and calls).

    Transient failures (connection lost, timeouts, HTTP 5xx) are retried up to `retries` times
    with exponential back-off, each retry resuming with an HTTP Range request. A finished file
    whose md5 differs from `md5` is deleted and downloaded once more from scratch; if it differs
    again the download fails with a UserError. Returns `dest`.
    """
    reporter = reporter or Reporter()
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"Cannot create {dest.parent}: {e.strerror}.") from None
    if dest.exists() and (md5 is None or md5_of(dest) == md5):
        return dest
    part = dest.with_name(dest.name + ".part")
    failures = 0
    bad_checksums = 0
    while True:
        try:
            _transfer(url, part, reporter, timeout)
        except _Retry as e:
            if str(e) != "complete":
                failures += 1
                if failures > retries:
                    raise UserError(f"Download of {url} failed after {retries} retries ({e}); "
                                    "check the connection and run the command again (it "
                                    "resumes), or use --from PATH with local files.") from None
                reporter.note(f"download interrupted ({e}); retrying ({failures}/{retries})")
                time.sleep(backoff * 2 ** (failures - 1))
                continue
        got = md5_of(part) if md5 is not None else None
        if md5 is None or got == md5:
            os.replace(part, dest)
            return dest
        part.unlink(missing_ok=True)
        bad_checksums += 1
        if bad_checksums >= 2:
            raise UserError(f"The file downloaded from {url} is corrupt (md5 {got}, expected "
                            f"{md5}) and was deleted; run the command again later, or use "
                            "--from PATH with local files.")
        reporter.note(f"{dest.name} failed its checksum (md5 {got}); downloading it again")
