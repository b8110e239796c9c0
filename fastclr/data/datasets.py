"""Built-in datasets by name: where their files are looked up, how they are fetched and read.

Every dataset is loaded once into uint8 arrays (N, H, W, C) with int64 labels. Files are looked
up, in order, in: the `root` argument, `$FASTCLR_DATA`, the user cache (`$XDG_CACHE_HOME/fastclr`,
default `~/.cache/fastclr`), and `/usr/share/datasets` (where the Debian package
`dataset-fashion-mnist` installs Fashion-MNIST).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fastclr.data import formats
from fastclr.data.decoded import decoded_once
from fastclr.data.download import DownloadWriteFailed, RemoteFile, fetch, file_md5, remove_leftovers
from fastclr.errors import FastclrError
from fastclr.scaleout.once import print_once_a_node

SYSTEM_ROOT = Path("/usr/share/datasets")


@dataclass
class ImageSet:
    """Images as stored (uint8, (N, H, W, C)) and their labels (int64 (N,), or None)."""

    images: np.ndarray
    labels: np.ndarray | None

    def __len__(self) -> int:
        return int(self.images.shape[0])


@dataclass
class Dataset:
    """The splits a SimCLR run uses: `pretrain` (its labels, -1 for an unlabelled image, read only
    by --supcon), and labelled `train`/`test`."""

    name: str
    pretrain: ImageSet
    train: ImageSet | None
    test: ImageSet | None
    classes: list[str]
    origin: str = ""
    """The folder (or store) every file was read from, for the run's first lines."""
    unlabelled: int = 0
    """How many images at the start of `pretrain` are in no labelled split (STL-10's unlabeled
    images, a store's unlabeled rows); when above 0 the rest of `pretrain` is the train split, so
    the unlabelled images are `pretrain.images[:unlabelled]` with no copy (distillation reads them)."""
    content: str = ""
    """A store's content identity (store.json's "content": its files and how they were prepared);
    '' for a built-in dataset, whose files are fixed, and a store prepared before 2026-12-05."""

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the stored images."""
        h, w, c = self.pretrain.images.shape[1:]
        return int(h), int(w), int(c)


@dataclass(frozen=True)
class DatasetSpec:
    """How to find, fetch and read one built-in dataset."""

    name: str
    folder: str
    """Sub-directory of a data root that holds the files."""
    files: tuple[str, ...]
    """Files that must exist in `folder` (IDX files may also be present without `.gz`)."""
    remote: tuple[RemoteFile, ...]
    read: Callable[[Path], Dataset]
    hint: str
    """What to do when the files are missing and cannot be downloaded."""
    side: int
    """The side of its images in pixels, as stored (what `embed` decodes a folder to for a run on it)."""
    decodes_once: bool = False
    """Whether reading it decodes its files once into a mapped file (decoded.py), which a node's
    first process does before the others read it."""


def user_cache() -> Path:
    """The per-user data directory where downloads go when $FASTCLR_DATA is not set: under
    $XDG_CACHE_HOME where that is an absolute path (the XDG spec has a relative one ignored: it
    would put the cache under whatever directory a command runs in), else ~/.cache; a one-line
    error where there is no home either."""
    found = known_user_cache()
    if found is None:
        raise FastclrError("no home directory is known here (HOME is unset and this user has no passwd entry, as in "
                           "a container run as an arbitrary user), so there is no user cache; set FASTCLR_DATA (or "
                           "XDG_CACHE_HOME, or HOME) to a writable folder")
    return found


def known_user_cache() -> Path | None:
    """`user_cache`, or None where no home directory is known (`Path.home()` raised RuntimeError in
    every command that looked for data, although Fashion-MNIST sat in /usr/share/datasets)."""
    base = Path(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "")))
    if base.is_absolute():
        return base / "fastclr"
    try:
        return Path.home() / ".cache" / "fastclr"
    except RuntimeError:
        return None


def data_env() -> Path | None:
    """$FASTCLR_DATA, `~` expanded (a value from a .env file, a systemd unit or a Dockerfile's ENV
    is not expanded by a shell: "~/data" made a folder named "~" under the current directory)."""
    value = os.environ.get("FASTCLR_DATA")
    return Path(os.path.expanduser(value)) if value else None


def root_of(name: str, folder: str) -> str:
    """The data root (absolute, `..` resolved) whose folder of built-in `name` is `folder`, else '':
    a run records where its data was found, as it records --data-root's, so that `evaluate`,
    `export` and the others read that copy whatever $FASTCLR_DATA says in their shell (they read
    another copy, without a word: the variable unset, or set to another folder)."""
    if name not in REGISTRY or not folder:
        return ""
    path = Path(os.path.normpath(Path(folder).absolute()))
    return str(path.parent) if path.name == REGISTRY[name].folder else ""


def search_roots(root: str | Path | None = None) -> list[Path]:
    """Directories searched for dataset files, in priority order."""
    roots: list[Path] = []
    if root:
        roots.append(Path(root))
    env = data_env()
    if env is not None:
        roots.append(env)
    roots += [r for r in (known_user_cache(), SYSTEM_ROOT) if r is not None]
    return roots


def _idx_file(folder: Path, name: str) -> Path:
    gz = folder / name
    return gz if gz.exists() else folder / name.removesuffix(".gz")


def holds_dataset(name: str, folder: Path) -> bool:
    """Whether `folder` holds files of the built-in `name` (it is its folder, or a root above it)."""
    s = spec(name)
    return any(_idx_file(d, f).exists() for d in (folder, folder / s.folder) for f in s.files)


def _has_files(folder: Path, files: tuple[str, ...]) -> bool:
    return all(_idx_file(folder, f).exists() for f in files)


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def read_idx_dataset(name: str, classes: list[str]) -> Callable[[Path], Dataset]:
    """A reader for the MNIST-style four-file IDX layout."""

    def read(folder: Path) -> Dataset:
        xtr = formats.read_idx_images(_idx_file(folder, IDX_FILES[0]))
        ytr = formats.read_idx_labels(_idx_file(folder, IDX_FILES[1]))
        xte = formats.read_idx_images(_idx_file(folder, IDX_FILES[2]))
        yte = formats.read_idx_labels(_idx_file(folder, IDX_FILES[3]))
        for x, y, split in ((xtr, ytr, "train"), (xte, yte, "t10k")):
            if len(x) != len(y):
                raise FastclrError(f"{folder}: {split} has {len(x)} images but {len(y)} labels; fetch the files again")
        train = ImageSet(xtr, ytr)
        return Dataset(name, train, train, ImageSet(xte, yte), classes)

    return read


def class_name(name: object) -> str:
    """A class name from a CIFAR meta pickle: bytes in the publisher's (Python 2) files, str in one
    pickled again by Python 3 tools."""
    return name.decode() if isinstance(name, bytes) else str(name)


def class_list(names: list[str], path: Path, key: str, name: str, count: int) -> list[str]:
    """`names` read from `path` under `key`, or a one-line error where they are not `count` (a list
    of another length gave that many classes, and its labels then meant other classes)."""
    if len(names) != count:
        raise FastclrError(f"{path} lists {len(names)} class names under {key}, not {name}'s {count}; it is not "
                           f"{name}'s file: delete it and fetch it again")
    return names


def _read_cifar10(folder: Path) -> Dataset:
    meta = formats.read_cifar_pickle(folder / "batches.meta")
    classes = class_list([class_name(c) for c in meta.get(b"label_names", [])], folder / "batches.meta",
                         "label_names", "cifar10", 10)
    xtr, ytr = formats.read_cifar_batches([folder / f"data_batch_{i}" for i in range(1, 6)], b"labels")
    xte, yte = formats.read_cifar_batches([folder / "test_batch"], b"labels")
    train = ImageSet(xtr, ytr)
    return Dataset("cifar10", train, train, ImageSet(xte, yte), classes)


def _read_cifar100(folder: Path) -> Dataset:
    meta = formats.read_cifar_pickle(folder / "meta")
    classes = class_list([class_name(c) for c in meta.get(b"fine_label_names", [])], folder / "meta",
                         "fine_label_names", "cifar100", 100)
    xtr, ytr = formats.read_cifar_batches([folder / "train"], b"fine_labels")
    xte, yte = formats.read_cifar_batches([folder / "test"], b"fine_labels")
    train = ImageSet(xtr, ytr)
    return Dataset("cifar100", train, train, ImageSet(xte, yte), classes)


STL10_COUNTS = {"train": 5000, "test": 8000, "unlabeled": 100000}
"""The image counts of STL-10's files (Coates et al. 2011)."""
STL10_DECODED = "fastclr-stl10-pretrain"
"""The decoded pretraining images' file name (`decoded.py`): unlabeled then train, (105000, 96, 96, 3)."""


def _read_stl10(folder: Path) -> Dataset:
    listed = folder / "class_names.txt"
    names = [str(i) for i in range(10)]
    if listed.exists():  # one name a line ("sports car" is one name, not two)
        try:
            lines = listed.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise FastclrError(f"{listed} is not UTF-8 text, so not STL-10's list of class names; delete it (the "
                               "classes are then numbered) or fetch STL-10 again") from None
        names = class_list([n.strip() for n in lines if n.strip()], listed, "its lines", "stl10", 10)
    train = ImageSet(formats.read_stl10_images(folder / "train_X.bin"), formats.read_stl10_labels(folder / "train_y.bin"))
    test = ImageSet(formats.read_stl10_images(folder / "test_X.bin"), formats.read_stl10_labels(folder / "test_y.bin"))
    unlabelled = formats.stl10_count(folder / "unlabeled_X.bin")
    if (len(train), len(test)) == (STL10_COUNTS["train"], STL10_COUNTS["test"]) and unlabelled != STL10_COUNTS["unlabeled"]:
        # The published copy: its unlabelled file has no labels to count against, so its size is checked.
        raise FastclrError(f"{folder / 'unlabeled_X.bin'} holds {unlabelled} images, not STL-10's "
                           f"{STL10_COUNTS['unlabeled']}; it is truncated: delete {folder} and run `fastclr download stl10 --root {folder.parent}`")
    # SimCLR on STL-10 pretrains on unlabeled + train (105k images), as in the literature: decoded
    # once into one mapped file that every process of a node shares (decoded.py), else read
    # straight into the array that holds both (no concatenated copy).
    shape = (unlabelled + len(train), *train.images.shape[1:])

    def blocks() -> Iterator[np.ndarray]:
        yield from formats.stl10_blocks(folder / "unlabeled_X.bin")
        yield train.images

    images = decoded_once([folder / "unlabeled_X.bin", folder / "train_X.bin"], STL10_DECODED, shape, blocks,
                          (known_user_cache() or folder) / "decoded")
    if images is not None:
        # A plain array over the file's pages, as the other built-ins: ImageSource gathers from it on
        # the CPU without a copy and copies it to a GPU whole (a np.memmap would be read as a store).
        images = images.view(np.ndarray)
    else:
        images = np.empty(shape, np.uint8)
        formats.read_stl10_images(folder / "unlabeled_X.bin", out=images[:unlabelled])
        images[unlabelled:] = train.images
    labels = np.concatenate([np.full(unlabelled, -1, np.int64), np.asarray(train.labels, np.int64)])  # --supcon's
    return Dataset("stl10", ImageSet(images, labels), train, test, names,
                   unlabelled=unlabelled)


FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"

REGISTRY: dict[str, DatasetSpec] = {
    "fashion-mnist": DatasetSpec(
        "fashion-mnist",
        "fashion-mnist",
        IDX_FILES,
        (
            RemoteFile(FASHION_URL + IDX_FILES[0], "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            RemoteFile(FASHION_URL + IDX_FILES[1], "25c81989df183df01b3e8a0aad5dffbe"),
            RemoteFile(FASHION_URL + IDX_FILES[2], "bef4ecab320f06d8554ea6380940ec79"),
            RemoteFile(FASHION_URL + IDX_FILES[3], "bb300cfdad3c16e7a12a480ee83cd310"),
        ),
        read_idx_dataset("fashion-mnist", FASHION_CLASSES),
        "install them with `apt-get install -y dataset-fashion-mnist`, or put the four IDX files "
        "({files}; gzipped or not) in $FASTCLR_DATA/fashion-mnist/",
        side=28,
    ),
    "mnist": DatasetSpec(
        "mnist",
        "mnist",
        IDX_FILES,
        (
            RemoteFile(MNIST_URL + IDX_FILES[0], "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            RemoteFile(MNIST_URL + IDX_FILES[1], "d53e105ee54ea40749a09fcbcd1e9432"),
            RemoteFile(MNIST_URL + IDX_FILES[2], "9fb629c4189551a2d022fa330f9573f3"),
            RemoteFile(MNIST_URL + IDX_FILES[3], "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
        read_idx_dataset("mnist", [str(i) for i in range(10)]),
        "put the four IDX files ({files}; gzipped or not) from " + MNIST_URL + " in $FASTCLR_DATA/mnist/",
        side=28,
    ),
    "cifar10": DatasetSpec(
        "cifar10",
        "cifar-10-batches-py",
        ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"),
        (RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a", True),),
        _read_cifar10,
        "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it "
        "in $FASTCLR_DATA (it creates cifar-10-batches-py/)",
        side=32,
    ),
    "cifar100": DatasetSpec(
        "cifar100",
        "cifar-100-python",
        ("meta", "train", "test"),
        (RemoteFile("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", True),),
        _read_cifar100,
        "download cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack it "
        "in $FASTCLR_DATA (it creates cifar-100-python/)",
        side=32,
    ),
    "stl10": DatasetSpec(
        "stl10",
        "stl10_binary",
        ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin"),
        (RemoteFile("http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz", "91f7769df0f17e558f3565bffb0c7dfb", True),),
        _read_stl10,
        "download stl10_binary.tar.gz from https://cs.stanford.edu/~acoates/stl10/ and unpack it "
        "in $FASTCLR_DATA (it creates stl10_binary/)",
        side=96,
        decodes_once=True,
    ),
}


def spec(name: str) -> DatasetSpec:
    """The spec of a built-in dataset, or a one-line error listing the valid names."""
    if name not in REGISTRY:
        raise FastclrError(
            f"unknown dataset {name!r}; choose one of: {', '.join(REGISTRY)} (or give the path of a prepared store)"
        )
    return REGISTRY[name]


def locate(name: str, root: str | Path | None = None, partial_ok: bool = False, only_root: bool = False,
           note: bool = True) -> Path | None:
    """The first folder in the search order that holds all files of `name`, or None. An explicit
    `root` (and $FASTCLR_DATA where no root is given) must exist, and its folder of `name`, where
    it has one, must be complete; with `partial_ok` (a download will complete it) an incomplete one
    gives None, never another copy. `only_root`: `root` alone is searched. `note`: say where a
    $FASTCLR_DATA that does not exist is passed over for another copy."""
    s = spec(name)
    if root:  # asked for by name: used whole or refused, never quietly passed over for another folder
        if not Path(root).is_dir():
            # Not made here, even where a download is allowed: a mistyped root would get a download of its own.
            raise FastclrError(f"the data root {root} is not a directory; give the folder that holds {s.folder}/, "
                               f"make it (`fastclr download {name} --root {root}` makes it and fetches {name} there), "
                               "or drop the root (--data-root, --root) to search the usual places")
        if _partial(name, Path(root), partial_ok, f"`fastclr download {name} --root {root}` fetches them",
                    "drop the root (--data-root, --root)"):
            return None
    env = data_env()
    if not root and env is not None:  # chosen as much as a root is; a missing one is made by a download
        if env.exists() and not env.is_dir():
            raise FastclrError(f"FASTCLR_DATA={env} is not a directory; set it to the folder that holds (or is to "
                               f"hold) {s.folder}/, or unset it to use the user cache")
        # (an empty folder there, as a failed download leaves, holds nothing to pass over)
        if _partial(name, env, partial_ok, f"`fastclr download {name}` fetches them", "unset FASTCLR_DATA", empty=False):
            return None
    partial: list[tuple[Path, int]] = []  # the user cache's, say, of a download cut short: passed over, not in silence
    for r in [Path(root)] if root and only_root else search_roots(root):
        folder = r / s.folder
        if _has_files(folder, s.files):
            if note and root and r != Path(root):  # a root asked for, or a run's, that holds no copy
                print_once_a_node(f"note: {root} holds no {s.folder}/ folder; {name} is read from {folder}",
                                  file=sys.stderr)
            if note and not root and env is not None and not env.exists():  # a mistyped variable
                print_once_a_node(f"note: FASTCLR_DATA={env} does not exist; {name} is read from {folder} (correct "
                                  "the variable, or unset it)", file=sys.stderr)
            if note and partial:
                cut, held = partial[0]
                cache = known_user_cache()  # the folder downloads go to: a fix there; another's is its owner's
                fix = (f" (`fastclr download {name} --root {cache}` completes it, or delete it)"
                       if cache is not None and cut.parent == cache else "")
                print_once_a_node(f"note: {cut} holds {held} of the {len(s.files)} files of {name}; the whole copy in "
                                  f"{folder} is read{fix}", file=sys.stderr)
            return folder
        if folder.is_dir() and (present := _present(name, folder)):
            partial.append((folder, len(present)))
    return None


def _partial(name: str, root: Path, partial_ok: bool, fetch_them: str, other_copy: str, empty: bool = True) -> bool:
    """True where `root`'s folder of `name` holds some of its files (none, with `empty`) but not all (a
    download completes it, with `partial_ok`); a one-line error naming the missing ones without
    `partial_ok`."""
    s = spec(name)
    folder = root / s.folder
    present = _present(name, folder)
    if not folder.is_dir() or len(present) == len(s.files) or (not present and not empty):
        return False
    if partial_ok:
        return True
    missing = [f for f in s.files if f not in present]
    whole = _whole_copy(name, root)
    other = f"give --data-root {whole.parent} to use the whole copy in {whole}" if whole else \
        f"{other_copy} to use another copy"
    raise FastclrError(f"{folder} holds {len(present)} of the {len(s.files)} files of {name} but not "
                       f"{', '.join(missing)}; add them there ({fetch_them}), or {other} (files are never mixed from "
                       "two folders)")


def _present(name: str, folder: Path) -> list[str]:
    """The files of built-in `name` that `folder` holds (gzipped or not)."""
    return [f for f in spec(name).files if _idx_file(folder, f).exists()]


def _whole_copy(name: str, besides: Path) -> Path | None:
    """A folder of the usual places other than `besides` that holds all of `name`, else None."""
    s = spec(name)
    return next((r / s.folder for r in search_roots() if r != besides and _has_files(r / s.folder, s.files)), None)


def _held_part(name: str, root: str | Path | None) -> tuple[Path, int] | None:
    """(folder, files it holds) where the folder chosen for `name` (`root`'s, else $FASTCLR_DATA's)
    holds some of its files but not all."""
    s, chosen = spec(name), Path(root) if root else data_env()
    if chosen is None:
        return None
    folder = chosen / s.folder
    held = len(_present(name, folder))
    return (folder, held) if 0 < held < len(s.files) else None


def download_root(root: str | Path | None = None) -> Path:
    """Where downloads go: `root`, else $FASTCLR_DATA, else the user cache."""
    if root:
        return Path(root)
    return data_env() or user_cache()


def _to_fetch(remotes: tuple[RemoteFile, ...], target: Path) -> list[RemoteFile]:
    """The files a download fetches: the missing ones first, then the ones present whose MD5 is not the
    publisher's (a copy repacked by a distribution holds the same images), so that a failure offline
    names a missing file first. A file fetched whole by an interrupted download before, or present
    unpacked, is kept."""
    missing, replaced = [], []
    for remote in remotes:
        packed = target / remote.filename
        if remote.extract:
            missing.append(remote)
        elif packed.is_file():
            if file_md5(packed) != remote.md5:
                replaced.append(remote)
        elif not (remote.filename.endswith(".gz") and (target / remote.filename.removesuffix(".gz")).is_file()):
            missing.append(remote)
    return missing + replaced


def ensure(name: str, root: str | Path | None = None, download: bool = True, only_root: bool = False) -> Path:
    """The folder holding dataset `name`, downloading it when allowed; a clear error otherwise.
    `only_root`: the copy in `root` (`fastclr download --root R` puts it there even where another
    folder holds one)."""
    s = spec(name)
    found = locate(name, root, partial_ok=download, only_root=only_root)
    if found is not None:
        if download:  # a complete copy is never fetched again, so what a killed download left would stay
            _sweep(name, root)
        return found
    where = ", ".join(str(r / s.folder) for r in ([Path(root)] if root and only_root else search_roots(root)))
    hint = s.hint.format(files=", ".join(s.files))
    # The folder downloads go to (asked for, $FASTCLR_DATA's value, or the user cache), never a variable left unset.
    hint = hint.replace("$FASTCLR_DATA", str(download_root(root)))
    if not download:
        raise FastclrError(f"{name} files not found (looked in {where}); {hint}")
    dest = download_root(root)
    target = dest / s.folder
    try:
        for remote in _to_fetch(s.remote, target):
            fetch(remote, dest if remote.extract else target)
    except DownloadWriteFailed:  # the disk, not the network: downloading by hand would fail alike
        raise
    except FastclrError as e:
        held = _held_part(name, root)
        if held is not None:  # not "not found": the folder chosen holds part of it
            folder, count = held
            whole = _whole_copy(name, folder.parent)
            raise FastclrError(f"{folder} holds {count} of the {len(s.files)} files of {name}, and the rest could not "
                               f"be fetched ({e}); {hint}" + (f"; or give --data-root {whole.parent} to use the whole "
                                                              f"copy in {whole}" if whole else "")) from None
        whole = _whole_copy(name, Path(root)) if root else None
        if whole is not None:  # the root chosen gets the download: not "not found" of a copy it had looked in
            raise FastclrError(f"{name} could not be fetched into {target} ({e}); a whole copy is in {whole}: give "
                               f"--data-root {whole.parent} to use it there, or {hint}") from None
        raise FastclrError(f"{name} files not found (looked in {where}) and {e}; {hint}") from None
    found = locate(name, root, only_root=only_root)
    if found is None:
        raise FastclrError(f"{name}: downloaded archive did not contain {', '.join(s.files)}; {hint}")
    return found


def _sweep(name: str, root: str | Path | None) -> None:
    """`remove_leftovers` of `name`'s downloads where they go (the data root and the dataset's folder)."""
    try:
        dest = download_root(root)
    except FastclrError:  # no home: no user cache, so nothing was ever downloaded into one
        return
    s = spec(name)
    for folder in (dest, dest / s.folder):
        if folder.is_dir():
            remove_leftovers(folder, tuple(r.filename for r in s.remote))


def recorded_root(name: str, root: str, run: str, log: Callable[[str], None]) -> str:
    """`root`, the data root run `run` recorded (`root_of` the folder it read its data from), where
    that is still a folder here, said where $FASTCLR_DATA holds another copy; else '' with a note,
    and the usual places are searched. A run copied to another machine, or whose folder was a job's
    scratch, was refused by every command that reads it ("the data root ... is not a directory",
    naming flags `evaluate` does not have)."""
    if not root or name not in REGISTRY:
        return root
    if Path(root).is_dir():
        env, folder = data_env(), REGISTRY[name].folder
        if env is not None and os.path.normpath(env.absolute()) != os.path.normpath(root) and \
                _has_files(env / folder, REGISTRY[name].files):
            log(f"note: {run} reads the copy of {name} it was trained on, in {root} (not $FASTCLR_DATA's, {env})")
        return root
    log(f"note: {run} recorded its data in {root}, which is not a folder here; {name} is looked up in the usual "
        "places ($FASTCLR_DATA, the user cache, /usr/share/datasets)")
    return ""


def load_builtin(name: str, root: str | Path | None = None, download: bool = True) -> Dataset:
    """Load a built-in dataset into memory (uint8 (N, H, W, C) plus labels), checked for consistency."""
    return read_checked(name, ensure(name, root, download))


def read_checked(name: str, folder: Path) -> Dataset:
    """Dataset `name` read from `folder` and checked for consistency (`check_consistent`)."""
    ds = spec(name).read(folder)
    check_consistent(ds, folder)
    ds.origin = str(folder)
    return ds


def check_consistent(ds: Dataset, where: Path | str) -> None:
    """One-line errors, before any training, for data that would train or evaluate wrongly: a label
    count unlike the image count, labels outside the class list, splits of different image shapes."""
    shape = ds.pretrain.images.shape[1:]
    for split, s in (("pretraining", ds.pretrain), ("train", ds.train), ("test", ds.test)):
        if s is not None and len(s.images) == 0:
            raise FastclrError(f"{where}: the {split} split holds no images; the files are empty or damaged, "
                               "fetch them again")
    for split, s in (("train", ds.train), ("test", ds.test)):
        if s is None:
            continue
        if s.images.shape[1:] != shape:
            raise FastclrError(f"{where}: {split} images are {tuple(s.images.shape[1:])} but the training images are "
                               f"{tuple(shape)}; the files come from different datasets, fetch them again")
        if s.labels is None:
            continue
        if len(s.labels) != len(s.images):
            raise FastclrError(f"{where}: {split} has {len(s.images)} images but {len(s.labels)} labels; "
                               "fetch the files again")
        bad = int(((s.labels < 0) | (s.labels >= len(ds.classes))).sum()) if ds.classes else 0
        if bad:
            raise FastclrError(f"{where}: {bad} {split} labels are outside 0..{len(ds.classes) - 1} ({len(ds.classes)} "
                               f"classes of {ds.name}); the label file is not {ds.name}'s, fetch it again")
