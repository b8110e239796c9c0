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
import re
import shutil
import tarfile
import tempfile
import time
import zlib
import urllib.request
from collections.abc import Iterator
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

# A part file or unpack folder untouched this long and held by no live process (the flock its
# download or unpack holds, which the kernel drops when the process dies) was left by a process
# killed outright (SIGKILL, power loss), and is removed by the next download or data load. A free
# lock alone is no proof: where flock is node-local (NFS with local_lock, Lustre's localflock) another
# node's live download looks unheld. A live download writes whatever each read brings (`read1`: not a
# full block, which a slow link takes minutes to fill) and a read waits at most its timeout (60 s),
# and an unpack touches its folder at every member, so each touches its leftover at least that often.
STALE_PART_S = 600.0


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
        remove_leftovers(dest_dir, (remote.filename,))
        fd, tmp_name = tempfile.mkstemp(prefix=f".{remote.filename}.", suffix=".part", dir=dest_dir)
    except OSError as e:
        remove_empty(made)
        if e.errno in (errno.EACCES, errno.EPERM):
            raise DownloadWriteFailed(f"cannot write {remote.filename} into {dest_dir} ({e.strerror}); choose "
                                      "another --root or $FASTCLR_DATA, or give this user write access there, and run "
                                      "the download again") from None
        if not is_write_error(e):
            raise
        raise DownloadWriteFailed(_write_refused(remote, dest_dir, final, e)) from None
    done = False
    with cleanup_on_sigterm():
        tmp = Path(tmp_name)
        hold = -1
        try:
            set_mode(fd)
            h = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(remote.url, timeout=timeout) as resp:
                hold = _hold(tmp)  # through the unpack too: another download's sweep leaves it alone
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
            _release(hold)  # before the unlink: a file held open cannot be removed on some systems
            if tmp.exists():
                tmp.unlink()
            if not done:
                remove_empty(made)


def _write_refused(remote: RemoteFile, dest_dir: Path, final: Path, e: OSError) -> str:
    return (f"cannot write {remote.filename} into {dest_dir} ({write_failure_reason(e, final)}); "
            f"{write_way_out(e, 'another --root or $FASTCLR_DATA')}, and run the download again")


def _content_length(headers: Message) -> int | None:
    """The body's length the server announced, if it did (and sent it unencoded, byte for byte)."""
    length = headers.get("Content-Length", "")
    return int(length) if length.isdigit() and headers.get("Content-Encoding", "identity") == "identity" else None


def remove_leftovers(folder: Path, filenames: tuple[str, ...]) -> list[Path]:
    """Remove the part files of `filenames` (`.NAME.XXXXXXXX.part`, as `fetch` names them) and the
    unpack folders (`.unpack-XXXXXXXX`) in `folder` that a process killed outright left (STALE_PART_S):
    for STL-10 each is 2.6 GB. Names of that shape alone: another program's files there are not
    fastclr's to remove; nor is what this user cannot remove (another user's folder)."""
    names = "|".join(re.escape(f) for f in filenames)
    ours = re.compile(rf"\.(?:{names})\.[a-z0-9_]{{8}}\.part|\.unpack-[a-z0-9_]{{8}}" if names else
                      r"\.unpack-[a-z0-9_]{8}")
    removed = []
    for path in sorted(p for p in folder.glob(".*") if ours.fullmatch(p.name)):
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


def _hold(path: Path) -> int:
    """A descriptor of `path` holding an exclusive flock on it for as long as it is open (`_release`);
    -1 where there are no locks (Windows, where a file held open could not be renamed or removed)."""
    if fcntl is None:
        return -1
    fd = os.open(path, os.O_RDONLY if path.is_dir() else os.O_RDWR)  # (NFS grants a write lock to a writer only)
    with contextlib.suppress(OSError):  # a file system without locks: age alone then speaks for it
        fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _release(fd: int) -> None:
    if fd >= 0:
        os.close(fd)


def _unheld(path: Path) -> bool:
    """Whether `path` is untouched for STALE_PART_S and no live process holds it (`_hold`)."""
    if time.time() - path.lstat().st_mtime <= STALE_PART_S:
        return False
    if fcntl is None:
        return True
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        return e.errno not in HELD  # held; or a file system without locks, where age has spoken
    finally:
        os.close(fd)  # (our own lock goes with it)
    return True


def extract_data(tar: tarfile.TarFile, folder: Path, touching: tuple[Path, ...] = ()) -> None:
    """Extract `tar` into `folder`, refusing what a dataset's archive has no need of: names with
    '..', links and device files (an absolute name is taken inside the folder). PEP 706's "data" filter where this Python has it (3.11.4 on);
    before that (Debian 12's python3 is 3.11.2), the same made here, members checked
    before anything is written, as regular files and folders only, modes without setuid bits or
    others' write. `touching`: paths whose time is set to now at every member, so that a sweep of
    leftovers (`remove_leftovers`) sees them alive through a long unpack."""
    if hasattr(tarfile, "data_filter"):
        tar.extractall(folder, members=_touched(tar.getmembers(), touching), filter="data")
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
    tar.extractall(folder, members=_touched(members, touching))


def _touched(members: list[tarfile.TarInfo], paths: tuple[Path, ...]) -> Iterator[tarfile.TarInfo]:
    for m in members:
        for p in paths:
            with contextlib.suppress(OSError):
                os.utime(p)
        yield m


def unpack(archive: Path, dest_dir: Path, name: str) -> None:
    """Extract a verified .tar.gz into `dest_dir` through a temporary folder beside it: each file
    is moved into place (replacing its namesake, leaving other files) only once the whole archive
    is out and every target is known to take a file, so a full disk or a damaged archive leaves
    no truncated file that looks valid."""
    staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest_dir))
    held, moved = -1, 0
    try:
        held = _hold(staging)  # until the folder is removed: the next download's sweep leaves a live unpack alone
        with tarfile.open(archive, "r:gz") as tar:
            extract_data(tar, staging, touching=(staging, archive))
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
        _release(held)
        shutil.rmtree(staging, ignore_errors=True)
