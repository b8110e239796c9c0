"""Fetching dataset files from their official sources, with checksum verification.

A download streams into a temporary file in the target directory, its MD5 is compared with the
publisher's, and only then is it renamed into place (or its archive extracted): an interrupted
or corrupted download never leaves a file that looks valid.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fastclr.files import FILE_MODE
from fastclr.errors import FastclrError


@dataclass(frozen=True)
class RemoteFile:
    """One file published by a dataset's authors."""

    url: str
    md5: str
    extract: bool = False
    """A .tar.gz to unpack into the data root (then deleted)."""

    @property
    def filename(self) -> str:
        """The last component of the URL."""
        return self.url.rsplit("/", 1)[-1]


def file_md5(path: Path, chunk: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks (the publishers give MD5s, so that is what we check)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fetch(remote: RemoteFile, dest_dir: Path, timeout: float = 60.0) -> Path:
    """Download `remote` into `dest_dir`, verify its MD5, extract it if it is an archive.

    Returns the path of the verified file (or of `dest_dir` for an extracted archive).
    Raises `FastclrError` on network failure or checksum mismatch, leaving nothing behind.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / remote.filename
    fd, tmp_name = tempfile.mkstemp(prefix=f".{remote.filename}.", suffix=".part", dir=dest_dir)
    os.fchmod(fd, FILE_MODE)
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(remote.url, timeout=timeout) as resp:
            while block := resp.read(1 << 20):
                h.update(block)
                out.write(block)
        if h.hexdigest() != remote.md5:
            raise FastclrError(
                f"checksum mismatch for {remote.url}: got md5 {h.hexdigest()}, expected {remote.md5}; "
                "the download is corrupted or the source changed, try again or fetch the file by hand"
            )
        if remote.extract:
            unpack(tmp, dest_dir, remote.filename)
            return dest_dir
        os.replace(tmp, final)
        return final
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise FastclrError(f"cannot download {remote.url} ({reason})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def unpack(archive: Path, dest_dir: Path, name: str) -> None:
    """Extract a verified .tar.gz into `dest_dir` through a temporary folder beside it: each file
    is moved into place (replacing its namesake, leaving other files) only once the whole archive
    is out, so a full disk or a damaged archive leaves no truncated file that looks valid."""
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest_dir))
    try:
        with tarfile.open(archive, "r:gz") as tar:
            # filter="data" refuses absolute paths, '..' and device files (PEP 706).
            tar.extractall(staging, filter="data")
        for path in sorted(staging.rglob("*")):
            if path.is_file():
                target = dest_dir / path.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, target)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise FastclrError(f"cannot unpack {name} into {dest_dir} ({e}); nothing of it was kept: make room there "
                           "(or choose another --root / $FASTCLR_DATA) and run the download again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
