"""Fetching dataset files from their official sources, with checksum verification.

A download streams into a temporary file in the target directory, its MD5 is compared with the
publisher's, and only then is it renamed into place (or its archive extracted): an interrupted
or corrupted download never leaves a file that looks valid.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import time
import zlib
import urllib.request
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; age alone decides what is left over
    fcntl = None  # type: ignore[assignment]

from fastclr.files import is_write_error, remove_empty, set_mode, write_failure_reason, write_way_out
from fastclr.errors import FastclrError
from fastclr.locks import HELD
from fastclr.signals import cleanup_on_sigterm

# A live download or unpack holds an flock on its part file or staging folder, which the kernel
# drops when its process dies: one no process holds was left by a process killed outright (SIGKILL,
# power loss) and is removed by the next download. Where the file system has no locks, age decides:
# a live download writes whatever each read brings (`read1`: not a full block, which a slow link
# takes minutes to fill) and a read waits at most its timeout (60 s), so it touches its part file
# at least that often.
STALE_PART_S = 600.0
HOLD_GRACE_S = 5.0
"""Age below which an unheld leftover is kept: its writer may be between creating and locking it."""


class DownloadWriteFailed(FastclrError):
    """The file system refused the download (full disk, quota, file-size limit): not the network."""


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
    Raises `FastclrError` on network failure or checksum mismatch (`DownloadWriteFailed` when the
    file system refuses it), leaving nothing behind, also when SIGTERM ends the process meanwhile.
    """
    made = [d for d in (dest_dir, *dest_dir.parents) if not d.exists()]
    final = dest_dir / remote.filename
    try:  # a folder that cannot be made or written (read-only, full) is the disk's, as the download's own write is
        dest_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(dest_dir)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{remote.filename}.", suffix=".part", dir=dest_dir)
    except OSError as e:
        remove_empty(made)
        if e.errno in (errno.EACCES, errno.EPERM):
            raise DownloadWriteFailed(f"cannot write {remote.filename} into {dest_dir} ({e.strerror}: "
                                      f"{e.filename}); choose another --root or $FASTCLR_DATA, or give this user "
                                      "write access there, and run the download again") from None
        if not is_write_error(e):
            raise
        raise DownloadWriteFailed(_write_refused(remote, dest_dir, final, e)) from None
    done = False
    with cleanup_on_sigterm():
        tmp = Path(tmp_name)
        hold = os.open(tmp, os.O_RDONLY)
        _hold(hold)  # through the unpack too: another download's sweep leaves it alone
        try:
            set_mode(fd)
            h = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(remote.url, timeout=timeout) as resp:
                received, length = 0, _content_length(resp.headers)
                while block := resp.read1(1 << 20):
                    h.update(block)
                    out.write(block)
                    out.flush()  # on disk (and the part file's time touched) as it arrives
                    received += len(block)
            if length is not None and received < length:  # urllib ends a body cut short without an error
                raise FastclrError(f"cannot download {remote.url} (the connection broke off after {received:,} of "
                                   f"{length:,} bytes); run the download again")
            if h.hexdigest() != remote.md5:
                raise FastclrError(
                    f"checksum mismatch for {remote.url}: got md5 {h.hexdigest()}, expected {remote.md5}; "
                    "the download is corrupted or the source changed, try again or fetch the file by hand"
                )
            if remote.extract:
                unpack(tmp, dest_dir, remote.filename)
                done = True
                return dest_dir
            os.replace(tmp, final)
            done = True
            return final
        except OSError as e:
            if is_write_error(e):
                raise DownloadWriteFailed(_write_refused(remote, dest_dir, final, e)) from None
            reason = getattr(e, "reason", e)
            raise FastclrError(f"cannot download {remote.url} ({reason})") from None
        except http.client.HTTPException as e:  # a reply cut off mid-body, or not HTTP at all (a proxy, a wrong port)
            raise FastclrError(f"cannot download {remote.url} (the connection broke off: {e!r}); "
                               "run the download again") from None
        finally:
            if tmp.exists():
                tmp.unlink()
            os.close(hold)
            if not done:
                remove_empty(made)


def _write_refused(remote: RemoteFile, dest_dir: Path, final: Path, e: OSError) -> str:
    return (f"cannot write {remote.filename} into {dest_dir} ({write_failure_reason(e, final)}); "
            f"{write_way_out(e, 'another --root or $FASTCLR_DATA')}, and run the download again")


def _content_length(headers: Message) -> int | None:
    """The body's length the server announced, if it did (and sent it unencoded, byte for byte)."""
    length = headers.get("Content-Length", "")
    return int(length) if length.isdigit() and headers.get("Content-Encoding", "identity") == "identity" else None


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove the part files (`.NAME.*.part`) and unpack folders (`.unpack-*`) in `folder` that no live
    download or unpack holds: a process killed outright left them, and for STL-10 each is 2.6 GB.
    What cannot be removed (another user's folder) is left."""
    removed = []
    for path in sorted([*folder.glob(".*.part"), *folder.glob(".unpack-*")]):
        try:
            if not _unheld(path):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:  # gone meanwhile (its download finished), or not ours to remove
            pass
    return removed


def _hold(fd: int) -> None:
    """An exclusive flock on `fd` for as long as it is open (none where the file system has no locks)."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)


def _unheld(path: Path) -> bool:
    """Whether no live process holds `path` (`_hold`) and it is older than HOLD_GRACE_S; on a file
    system without locks, whether it is untouched for STALE_PART_S."""
    age = time.time() - path.lstat().st_mtime
    if fcntl is None:
        return age > STALE_PART_S
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno not in HELD and age > STALE_PART_S
    finally:
        os.close(fd)  # (our own lock goes with it)
    return age > HOLD_GRACE_S


def extract_data(tar: tarfile.TarFile, folder: Path) -> None:
    """Extract `tar` into `folder`, refusing what a dataset's archive has no need of: names with
    '..', links and device files (an absolute name is taken inside the folder). PEP 706's "data" filter where this Python has it (3.11.4 on);
    before that (Debian 12's python3 is 3.11.2), the same made here, members checked
    before anything is written, as regular files and folders only, modes without setuid bits or
    others' write."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(folder, filter="data")
        return
    members = tar.getmembers()
    for m in members:
        m.name = m.name.lstrip("/" + os.sep)  # as the filter: an absolute name is taken inside the folder
        parts = Path(m.name).parts
        if ".." in parts or not parts or Path(m.name).drive or Path(m.name).anchor:  # C:x, C:/x on Windows
            raise tarfile.TarError(f"member {m.name!r} would be written outside the folder")
        if not (m.isfile() or m.isdir()):
            raise tarfile.TarError(f"member {m.name!r} is a link or a special file")
        m.mode = (m.mode & 0o755) | (0o700 if m.isdir() else 0o600)  # as the data filter: no setuid, no others' write
        m.uid, m.gid, m.uname, m.gname = os.getuid(), os.getgid(), "", ""  # root would give the archive's owners
    tar.extractall(folder, members=members)


def unpack(archive: Path, dest_dir: Path, name: str) -> None:
    """Extract a verified .tar.gz into `dest_dir` through a temporary folder beside it: each file
    is moved into place (replacing its namesake, leaving other files) only once the whole archive
    is out and every target is known to take a file, so a full disk or a damaged archive leaves
    no truncated file that looks valid."""
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest_dir))
    held = os.open(staging, os.O_RDONLY)
    _hold(held)  # until the folder is removed: the next download's sweep leaves a live unpack alone
    moved = 0
    try:
        with tarfile.open(archive, "r:gz") as tar:
            extract_data(tar, staging)
        files = [(path, dest_dir / path.relative_to(staging)) for path in sorted(staging.rglob("*")) if path.is_file()]
        for _, target in files:
            if target.is_dir():
                raise FastclrError(f"cannot unpack {name} into {dest_dir}: {target} is a folder where the archive "
                                   "has a file; move it away and run the download again (nothing was replaced)")
            for parent in target.relative_to(dest_dir).parents:
                if (dest_dir / parent).exists() and not (dest_dir / parent).is_dir():
                    raise FastclrError(f"cannot unpack {name} into {dest_dir}: {dest_dir / parent} is a file where the "
                                       "archive has a folder; move it away and run the download again (nothing was "
                                       "replaced)")
        for path, target in files:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
            moved += 1
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        done = (f"{moved} of its files were already in place and are kept" if moved else "nothing of it was kept")
        why = (f"{write_failure_reason(e, dest_dir / name)}; make room there (or choose another --root / "
               "$FASTCLR_DATA)" if is_write_error(e) else f"{e}; the archive is damaged or the folder cannot take it")
        raise FastclrError(f"cannot unpack {name} into {dest_dir} ({why}); {done}: run the download again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        os.close(held)
