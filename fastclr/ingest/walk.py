"""The folder walk: which files are candidate images, and why every other entry is not used.

Nothing here opens a file; it only lists directories and stats entries, so a walk over a million
files costs a few seconds. Decoding (and the skip reasons that need the bytes) is in decode.py.

Symbolic links are followed, to files and to directories, because users link datasets together.
A link that leads back into a directory being walked is a loop; a link to a directory already
walked elsewhere is walked once. Both are reported, never fatal.
"""

from __future__ import annotations

import errno
import heapq
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

# Formats Pillow reads that hold photos and scans; any other extension is "not-an-image" without
# opening the file, so a folder with videos or archives in it is not read byte by byte.
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".tif", ".tiff", ".gif",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".jp2", ".j2k", ".avif",
})

NEEDS_PLUGIN = {".avif": ("avif", "AVIF", "pip install 'pillow>=11.3' (its wheels read AVIF)")}
"""Extensions whose Pillow reader is optional: (Pillow feature, format, how to get it)."""


def readable_here(ext: str) -> str:
    """"" when this Pillow reads files of extension `ext`, else how to make it (AVIF: Pillow 11.3's
    wheels carry libavif; earlier ones, and Pillow built without it, do not)."""
    if ext not in NEEDS_PLUGIN:
        return ""
    from PIL import features

    feature, name, fix = NEEDS_PLUGIN[ext]
    try:
        return "" if features.check(feature) else f"this Pillow cannot read {name}; {fix}"
    except ValueError:  # a Pillow that does not know the feature's name at all
        return f"this Pillow cannot read {name}; {fix}"

# Every reason a file or directory is not in a store; skipped.csv uses exactly these words.
REASONS = ("appledouble", "corrupt", "duplicate", "duplicate-directory", "fastclr-folder", "hidden-directory",
           "not-an-image", "out-of-memory", "outside-folder", "over-pixel-limit", "symlink-loop", "truncated",
           "unreadable", "unsupported-mode", "zero-bytes")


def fastclr_folder(path: str) -> str:
    """'store' or 'run' when the directory is one of fastclr's, else ''. A store or run inside the
    folder holds none of the user's images, only fastclr's files (a store's images.u8 and
    manifest.csv came out as not-an-image rows): passed over as one entry."""
    from fastclr.data.store import is_store
    from fastclr.runs import is_run_dir

    return "store" if is_store(Path(path)) else "run" if is_run_dir(Path(path)) else ""


@dataclass(frozen=True)
class FileEntry:
    """A candidate image: path relative to the folder (with `/`), size in bytes, mtime in ns."""

    rel: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Skip:
    """An entry that is not in the store, and why. Directories have a trailing `/` in `rel`."""

    rel: str
    reason: str
    detail: str
    size: int = -1
    mtime_ns: int = -1
    sha256: str = ""


@dataclass
class Walk:
    """The outcome of walking a folder: candidate files sorted by path, and the skipped entries."""

    files: list[FileEntry] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


def classify_file(name: str, size: int) -> tuple[str, str] | None:
    """(reason, detail) when a regular file is not a candidate image, else None."""
    if name.startswith("._"):
        return "appledouble", "macOS resource-fork file, not an image"
    ext = os.path.splitext(name)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        return "not-an-image", f"extension {ext or '(none)'} is not an image format"
    if unreadable := readable_here(ext):
        return "not-an-image", f"extension {ext}: {unreadable}"
    if size == 0:
        return "zero-bytes", "empty file"
    return None


def _stat_error(e: OSError, is_link: bool) -> tuple[str, str]:
    if e.errno == errno.ELOOP:
        return "symlink-loop", "symbolic link resolves to itself"
    if is_link and e.errno == errno.ENOENT:
        return "unreadable", "broken symbolic link"
    return "unreadable", e.strerror or str(e)


def walk_folder(root: Path, exclude: Path | None = None) -> Walk:
    """Every entry below `root`: candidate image files, and a Skip for everything else.

    `exclude` (e.g. the store being written inside the folder) is passed over silently.
    """
    out = Walk()
    root_st = os.stat(root)
    real_root = os.path.realpath(root)
    excluded = _identity(exclude) if exclude is not None else None
    # Depth-first; each entry carries the identities of its ancestor directories for loop detection.
    stack: list[tuple[str, Path, frozenset[tuple[int, int]]]] = [("", root, frozenset({_key(root, root_st)}))]
    walked: dict[tuple[int, int], str] = {_key(root, root_st): "./"}
    # Links to directories wait until every real directory is walked: a directory reached both
    # ways keeps its own path (and class), and the link is the one reported as the duplicate. Of
    # several links to one directory, the first by path is walked (a heap keyed by it: the order
    # found depends on depth and on the order of listing), as duplicate files keep their first path.
    links: list[tuple[str, Path, frozenset[tuple[int, int]], tuple[int, int]]] = []
    while stack or links:
        if not stack:
            rel_dir, path, ancestors, key = heapq.heappop(links)
            if key in walked:
                out.skipped.append(Skip(rel_dir, "duplicate-directory", f"same directory as {walked[key]}, walked once"))
                continue
            walked[key] = rel_dir
            stack.append((rel_dir, path, ancestors))
        rel_dir, path, ancestors = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            out.skipped.append(Skip(rel_dir or "./", "unreadable", f"directory cannot be listed: {e.strerror or e}"))
            continue
        for entry in reversed(entries):  # reversed: the stack pops them in name order
            rel = rel_dir + entry.name
            if not _utf8(rel):
                # The manifest, the skip report and embedding indexes are UTF-8 text.
                shown = rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                out.skipped.append(Skip(shown, "unreadable", "name is not valid UTF-8; rename it"))
                continue
            is_link = entry.is_symlink()
            try:
                st = entry.stat(follow_symlinks=True)
                # Windows: a scandir entry's stat has no file ID (Python's docs), os.stat's has
                if st.st_ino == 0 and stat.S_ISDIR(st.st_mode):
                    st = os.stat(entry.path)
            except OSError as e:
                out.skipped.append(Skip(rel, *_stat_error(e, is_link)))
                continue
            if is_link and not _inside(entry.path, real_root):
                # The folder given is what is read: a link must not pull in files from elsewhere.
                out.skipped.append(Skip(rel + ("/" if stat.S_ISDIR(st.st_mode) else ""), "outside-folder",
                                        "symbolic link to a path outside the folder; copy the file in instead"))
                continue
            key = _key(entry.path, st)
            if stat.S_ISDIR(st.st_mode):
                if key == excluded:
                    continue
                if entry.name.startswith("."):
                    out.skipped.append(Skip(rel + "/", "hidden-directory", "directories starting with . are not searched"))
                elif kind := fastclr_folder(entry.path):
                    out.skipped.append(Skip(rel + "/", "fastclr-folder", f"a fastclr {kind}, not images: not searched"))
                elif key in ancestors:
                    out.skipped.append(Skip(rel + "/", "symlink-loop", "leads back to a directory that contains it"))
                elif is_link:
                    heapq.heappush(links, (rel + "/", Path(entry.path), ancestors | {key}, key))
                elif key in walked:
                    same = f"same directory as {walked[key]}, walked once"
                    out.skipped.append(Skip(rel + "/", "duplicate-directory", same))
                else:
                    walked[key] = rel + "/"
                    stack.append((rel + "/", Path(entry.path), ancestors | {key}))
            elif stat.S_ISREG(st.st_mode):
                why = classify_file(entry.name, st.st_size)
                if why is None:
                    out.files.append(FileEntry(rel, st.st_size, st.st_mtime_ns))
                else:
                    out.skipped.append(Skip(rel, *why, size=st.st_size, mtime_ns=st.st_mtime_ns))
            else:
                # A FIFO named x.jpg would block a reader forever; never open special files.
                out.skipped.append(Skip(rel, "not-an-image", "not a regular file (FIFO, socket or device)"))
    out.files.sort(key=lambda f: f.rel)
    out.skipped.sort(key=lambda s: s.rel)
    return out


def _inside(path: str, real_root: str) -> bool:
    target = os.path.realpath(path)
    return target == real_root or target.startswith(real_root.rstrip(os.sep) + os.sep)


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in a file name come back as lone surrogates
        return False
    return True


def _key(path: str | Path, st: os.stat_result) -> tuple[int, int]:
    """A directory's identity: its device and file ID, or where the file system gives no file ID even
    to os.stat, its real, case-normalised path (-1 marks such a key; hash() is stable within this
    process)."""
    return (st.st_dev, st.st_ino) if st.st_ino else (-1, hash(os.path.normcase(os.path.realpath(path))))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _key(path, st)
