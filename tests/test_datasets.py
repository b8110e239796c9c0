"""Dataset readers on small files written in each real format; lookup order; downloads."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from conftest import synthetic_images, write_cifar, write_idx, write_idx_dataset, write_stl10
from fastclr.data import formats
from fastclr.data.datasets import IDX_FILES, REGISTRY, ensure, load_builtin, locate, search_roots
from fastclr.data.download import RemoteFile, fetch
from fastclr.errors import FastclrError
from fastclr.cli import main as cli_main


def test_idx_gz_and_raw_round_trip(tmp_path: Path) -> None:
    x, _ = synthetic_images(5, 28)
    gz = write_idx(tmp_path / "a.gz", x[..., 0])
    raw = write_idx(tmp_path / "b", x[..., 0], gz=False)
    for p in (gz, raw):
        out = formats.read_idx_images(p)
        assert out.shape == (5, 28, 28, 1) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, x)


def test_idx_values_wider_than_a_byte_are_big_endian(tmp_path: Path) -> None:
    """The IDX format stores every multi-byte value most significant byte first (LeCun's MNIST
    page): int32 and int16 files written here with struct's '>' read back as those values."""
    p = tmp_path / "x.idx"
    p.write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 4) + struct.pack(">4i", 1, 256, -2, 70000))
    assert formats.read_idx(p).tolist() == [1, 256, -2, 70000]
    q = tmp_path / "y.idx"
    q.write_bytes(bytes([0, 0, 0x0B, 2]) + struct.pack(">2I", 1, 2) + struct.pack(">2h", 300, -300))
    assert formats.read_idx(q).tolist() == [[300, -300]]


def test_idx_bad_magic_and_truncation_are_clear_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x12\x34\x56\x78" + b"\x00" * 20)
    with pytest.raises(FastclrError, match="not an IDX file"):
        formats.read_idx(bad)
    p = write_idx(tmp_path / "t", np.zeros((4, 3, 3), np.uint8), gz=False)
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(FastclrError, match="truncated"):
        formats.read_idx(p)


def test_mnist_layout_loads_train_and_test_with_labels(data_root: Path) -> None:
    ds = load_builtin("fashion-mnist")
    xtr, ytr, xte, yte = write_idx_dataset(data_root / "fashion-mnist")
    np.testing.assert_array_equal(ds.pretrain.images, xtr)
    np.testing.assert_array_equal(ds.train.labels, ytr)
    np.testing.assert_array_equal(ds.test.images, xte)
    np.testing.assert_array_equal(ds.test.labels, yte)
    assert ds.image_shape == (28, 28, 1) and ds.classes[0] == "T-shirt/top"
    assert REGISTRY["fashion-mnist"].side == REGISTRY["mnist"].side == 28  # as the published files store them


def test_uncompressed_idx_files_load_as_the_gzipped_ones(data_root: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The four files without `.gz` (as some mirrors and packages ship MNIST) give the same dataset."""
    gz = load_builtin("mnist")
    raw_root = tmp_path / "raw"
    (raw_root / "mnist").mkdir(parents=True)
    for name in IDX_FILES:
        content = gzip.decompress((data_root / "mnist" / name).read_bytes())
        (raw_root / "mnist" / name.removesuffix(".gz")).write_bytes(content)
    monkeypatch.setenv("FASTCLR_DATA", str(raw_root))
    raw = load_builtin("mnist", download=False)
    assert raw.origin == str(raw_root / "mnist")
    for a, b in ((gz.pretrain.images, raw.pretrain.images), (gz.train.labels, raw.train.labels),
                 (gz.test.images, raw.test.images), (gz.test.labels, raw.test.labels)):
        np.testing.assert_array_equal(a, b)


def test_cifar10_and_cifar100_pickles(tmp_path: Path) -> None:
    x10, y10 = write_cifar(tmp_path / "cifar-10-batches-py")
    ds = load_builtin("cifar10", tmp_path, download=False)
    np.testing.assert_array_equal(ds.train.images, x10[:40])
    np.testing.assert_array_equal(ds.test.images, x10[40:])
    np.testing.assert_array_equal(ds.test.labels, y10[40:])
    assert ds.classes[3] == "class3" and ds.image_shape == (32, 32, 3) and REGISTRY["cifar10"].side == 32
    x100, y100 = write_cifar(tmp_path / "cifar-100-python", hundred=True)
    ds = load_builtin("cifar100", tmp_path, download=False)
    np.testing.assert_array_equal(ds.train.images, x100[:8])
    np.testing.assert_array_equal(ds.train.labels, y100[:8])
    assert len(ds.classes) == 100 and ds.image_shape[0] == REGISTRY["cifar100"].side


def test_cifar_reader_refuses_pickles_that_run_code(tmp_path: Path) -> None:
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (open, (str(marker), "w"))

    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": Evil(), b"labels": [1]}))
    with pytest.raises(FastclrError, match="not a CIFAR python batch"):
        formats.read_cifar_batches([p], b"labels")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_batches_pickled_by_python_3_are_read(protocol: int, tmp_path: Path) -> None:
    """The published batches are Python 2 pickles; one written again by Python 3 uses protocol 4, or
    5 (the default from Python 3.14: arrays rebuilt from their buffer), or 2 (bytes through codecs'
    encode). Each was refused as "not a CIFAR python batch"; the same images and labels come back."""
    import pickle

    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    p = tmp_path / "data_batch_1"
    p.write_bytes(pickle.dumps({b"data": x.transpose(0, 3, 1, 2).reshape(2, -1), b"labels": [1, 2],
                                b"filenames": [b"a.png", b"b.png"]}, protocol=protocol))
    images, labels = formats.read_cifar_batches([p], b"labels")
    np.testing.assert_array_equal(images, x)
    np.testing.assert_array_equal(labels, [1, 2])


def test_stl10_binary_is_column_major(tmp_path: Path) -> None:
    imgs = write_stl10(tmp_path)
    ds = load_builtin("stl10", tmp_path, download=False)
    np.testing.assert_array_equal(ds.train.images, imgs["train"])
    np.testing.assert_array_equal(ds.train.labels, [0, 9, 4])
    np.testing.assert_array_equal(ds.test.labels, [1, 2])
    np.testing.assert_array_equal(ds.pretrain.images, np.concatenate([imgs["unlabeled"], imgs["train"]]))
    assert ds.unlabelled == 4  # the unlabelled images, then the train split, with its labels (--supcon's)
    np.testing.assert_array_equal(ds.pretrain.labels, [-1, -1, -1, -1, 0, 9, 4])
    assert ds.image_shape[0] == REGISTRY["stl10"].side


def test_stl10_is_decoded_once_into_one_file_every_process_maps(tmp_path: Path) -> None:
    """The pretraining images (unlabelled, then train) are decoded once into a .npy beside the
    files and mapped read-only, so the processes of a node share one copy: the files' pixels; a
    second load maps it without writing it again (the same file); a source fetched again since
    (other pixels, a newer time) is decoded again, and so is one copied over with its old time kept
    (it served the old pixels)."""
    imgs = write_stl10(tmp_path)
    decoded = tmp_path / "stl10_binary" / "fastclr-stl10-pretrain.npy"
    ds = load_builtin("stl10", tmp_path, download=False)
    assert not isinstance(ds.pretrain.images, np.memmap) and Path(ds.pretrain.images.base.filename) == decoded
    np.testing.assert_array_equal(ds.pretrain.images, np.concatenate([imgs["unlabeled"], imgs["train"]]))
    made = decoded.stat()
    again = load_builtin("stl10", tmp_path, download=False)
    assert (decoded.stat().st_ino, decoded.stat().st_mtime_ns) == (made.st_ino, made.st_mtime_ns)
    np.testing.assert_array_equal(again.pretrain.images, ds.pretrain.images)
    fetched = write_stl10(tmp_path, seed=1)
    later = made.st_mtime_ns + 10**9  # a fetch is later than the decoding, whatever the clock's grain
    os.utime(tmp_path / "stl10_binary" / "unlabeled_X.bin", ns=(later, later))
    ds = load_builtin("stl10", tmp_path, download=False)
    np.testing.assert_array_equal(ds.pretrain.images, np.concatenate([fetched["unlabeled"], fetched["train"]]))
    assert sorted(p.name for p in decoded.parent.glob("fastclr-*")) == ["fastclr-stl10-pretrain.json",
                                                                         "fastclr-stl10-pretrain.npy"]
    np.asarray(ds.pretrain.images)[0, 0, 0, 0] ^= 255  # mapped copy-on-write: the file keeps its pixels
    np.testing.assert_array_equal(np.load(decoded)[0], fetched["unlabeled"][0])
    sources = sorted((tmp_path / "stl10_binary").glob("*.bin"))
    kept = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sources}
    copied = write_stl10(tmp_path, seed=2)  # copied over with the old times kept (cp -p, rsync -t, tar)
    for p, (_, t) in kept.items():
        os.utime(p, ns=(t, t))
    assert {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in sources} == kept  # only the pixels differ
    ds = load_builtin("stl10", tmp_path, download=False)
    np.testing.assert_array_equal(ds.pretrain.images, np.concatenate([copied["unlabeled"], copied["train"]]))


def test_stl10_decoded_where_nothing_can_be_written_is_read_into_memory_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder that cannot hold the decoded file sends it to the user cache, one file per folder;
    where neither can (a full disk), it costs memory, never the run: the same pixels, decoded into
    memory, one warning line naming both places and why, no file left behind, and no second try
    (nor warning) by the same process."""
    from fastclr.data import decoded
    from fastclr.files import WriteFailed

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(decoded, "_failed", set())
    imgs = write_stl10(tmp_path)
    want = np.concatenate([imgs["unlabeled"], imgs["train"]])
    real = decoded.atomic_write_all
    attempts: list[Path] = []

    def write(writes: list[tuple[Path, object]], fail_in: Path) -> None:
        attempts.append(writes[0][0])
        if writes[0][0].parent == fail_in:
            raise WriteFailed(writes[0][0], "No space left on device")
        real(writes)  # type: ignore[arg-type]

    folder = tmp_path / "stl10_binary"
    monkeypatch.setattr(decoded, "atomic_write_all", lambda w: write(w, folder))
    ds = load_builtin("stl10", tmp_path, download=False)
    cached = decoded.decoded_paths(folder, "fastclr-stl10-pretrain", tmp_path / "cache" / "fastclr" / "decoded")[1]
    assert Path(ds.pretrain.images.base.filename) == cached and cached.parent != folder
    np.testing.assert_array_equal(ds.pretrain.images, want)
    assert capsys.readouterr().err == "" and not list(folder.glob("*fastclr*"))

    cached.unlink()
    monkeypatch.setattr(decoded, "atomic_write_all", lambda w: write(w, fail_in=w[0][0].parent))  # both full
    attempts.clear()
    ds = load_builtin("stl10", tmp_path, download=False)
    assert not isinstance(ds.pretrain.images.base, np.memmap)
    np.testing.assert_array_equal(ds.pretrain.images, want)
    npy = folder / "fastclr-stl10-pretrain.npy"
    assert capsys.readouterr().err.splitlines() == [
        f"warning: cannot write {npy} (No space left on device) nor {cached} (No space left on device); decoding "
        "the images into memory instead (each process holds its own copy)"]
    assert attempts == [npy, cached] and not list(folder.glob("*fastclr*"))
    load_builtin("stl10", tmp_path, download=False)
    assert attempts == [npy, cached] and capsys.readouterr().err == ""  # not tried again


def test_stl10_images_read_a_block_at_a_time_are_the_files_pixels(tmp_path: Path) -> None:
    """1030 images of 4 x 4: two blocks of rows, the second partial. Pixel (i, y, x, c) is byte
    ((i * 3 + c) * 4 + x) * 4 + y of the file (planes column-major), into a given array too."""
    raw = np.random.default_rng(1).integers(0, 256, 1030 * 3 * 4 * 4, dtype=np.uint8)
    path = tmp_path / "unlabeled_X.bin"
    raw.tofile(path)
    i, y, x, c = np.meshgrid(*(np.arange(k) for k in (1030, 4, 4, 3)), indexing="ij")
    expected = raw[((i * 3 + c) * 4 + x) * 4 + y]
    np.testing.assert_array_equal(formats.read_stl10_images(path, size=4), expected)
    out = np.zeros((1031, 4, 4, 3), np.uint8)
    formats.read_stl10_images(path, size=4, out=out[1:])
    np.testing.assert_array_equal(out[1:], expected)
    assert not out[0].any()
    path.write_bytes(raw.tobytes()[:-5])
    with pytest.raises(FastclrError, match=r"unlabeled_X.bin holds 49435 bytes, not a multiple of 48; it is truncated"):
        formats.read_stl10_images(path, size=4)


def test_lookup_order_root_env_cache_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env, cache, system, explicit = (tmp_path / n for n in ("env", "cache", "system", "explicit"))
    monkeypatch.setenv("FASTCLR_DATA", str(env))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", system)
    assert search_roots(explicit) == [explicit, env, tmp_path / "fastclr", system]
    write_idx_dataset(system / "fashion-mnist")
    assert locate("fashion-mnist") == system / "fashion-mnist"
    write_idx_dataset(tmp_path / "fastclr" / "fashion-mnist")
    assert locate("fashion-mnist") == tmp_path / "fastclr" / "fashion-mnist"
    write_idx_dataset(env / "fashion-mnist")
    assert locate("fashion-mnist") == env / "fashion-mnist"


def test_a_fastclr_data_that_does_not_exist_or_a_cut_download_is_said_when_another_copy_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    system, typo = tmp_path / "system", tmp_path / "typo"
    monkeypatch.setenv("FASTCLR_DATA", str(typo))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", system)
    write_idx_dataset(system / "fashion-mnist")
    assert locate("fashion-mnist") == system / "fashion-mnist"  # still the search order: a download would make it
    assert capsys.readouterr().err == (f"note: FASTCLR_DATA={typo} does not exist; fashion-mnist is read from "
                                       f"{system / 'fashion-mnist'} (correct the variable, or unset it)\n")
    typo.mkdir()  # a folder that exists but lacks the dataset is one place searched, as documented: no note
    assert locate("fashion-mnist") == system / "fashion-mnist"
    assert capsys.readouterr().err == ""
    cut = tmp_path / "cache" / "fastclr" / "fashion-mnist"  # a download cut short in the user cache
    write_idx_dataset(cut)
    for name in IDX_FILES[2:]:
        (cut / name).unlink()
    assert locate("fashion-mnist") == system / "fashion-mnist"
    assert capsys.readouterr().err == (f"note: {cut} holds 2 of the 4 files of fashion-mnist; the whole copy in "
                                       f"{system / 'fashion-mnist'} is read (`fastclr download fashion-mnist --root "
                                       f"{cut.parent}` completes it, or delete it)\n")


def test_a_run_records_the_root_it_read_from_and_a_later_command_reads_that_copy_or_says_why_not(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A run that read the user cache recorded no root, so a later $FASTCLR_DATA changed what was
    measured without a word; a recorded or given root holding no copy was searched past silently."""
    from fastclr.data.datasets import recorded_root, root_of

    assert root_of("mnist", str(tmp_path / "a" / ".." / "b" / "mnist")) == str(tmp_path / "b")
    assert root_of("mnist", str(tmp_path / "b" / "other")) == root_of("stores/x", str(tmp_path)) == ""
    cache, other = tmp_path / "cache" / "fastclr", tmp_path / "other"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "none")
    write_idx_dataset(cache / "mnist")
    write_idx_dataset(other / "mnist", n_train=16, n_test=8)
    monkeypatch.setenv("FASTCLR_DATA", str(other))
    said: list[str] = []
    assert recorded_root("mnist", str(cache), "RUN", said.append) == str(cache)  # its own copy, and why
    assert said == [f"note: RUN reads the copy of mnist it was trained on, in {cache} (not $FASTCLR_DATA's, {other})"]
    monkeypatch.delenv("FASTCLR_DATA")
    assert recorded_root("mnist", str(cache), "RUN", said.append) == str(cache) and len(said) == 1  # nothing to say
    empty = tmp_path / "empty"
    empty.mkdir()
    assert locate("mnist", empty) == cache / "mnist"
    assert capsys.readouterr().err == f"note: {empty} holds no mnist/ folder; mnist is read from {cache / 'mnist'}\n"


def test_an_explicit_root_missing_a_file_is_refused_not_passed_over(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    explicit, system = tmp_path / "explicit", tmp_path / "system"
    monkeypatch.delenv("FASTCLR_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", system)
    write_idx_dataset(system / "fashion-mnist")
    write_idx_dataset(explicit / "fashion-mnist")
    (explicit / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    assert locate("fashion-mnist") == system / "fashion-mnist"  # not asked for: the first complete copy
    with pytest.raises(FastclrError) as e:
        locate("fashion-mnist", explicit)
    assert "holds 3 of the 4 files" in str(e.value) and "t10k-labels-idx1-ubyte.gz" in str(e.value)
    for name in IDX_FILES[:3]:  # an empty dataset folder: refused too, not passed over for the system copy
        (explicit / "fashion-mnist" / name).unlink()
    with pytest.raises(FastclrError, match="holds 0 of the 4 files"):  # (a download would complete it there)
        load_builtin("fashion-mnist", explicit, download=False)
    with pytest.raises(FastclrError) as typo:  # also where a download is allowed: a typo is not made a folder
        load_builtin("fashion-mnist", tmp_path / "typo")
    assert str(typo.value) == (f"the data root {tmp_path / 'typo'} is not a directory; give the folder that holds "
                               f"fashion-mnist/, make it (`fastclr download fashion-mnist --root {tmp_path / 'typo'}` "
                               "makes it and fetches fashion-mnist there), or drop the root (--data-root, --root) to "
                               "search the usual places")
    assert not (tmp_path / "typo").exists()
    (explicit / "fashion-mnist").rmdir()  # a root without the dataset's folder: the search goes on, as documented
    assert locate("fashion-mnist", explicit) == system / "fashion-mnist"
    assert load_builtin("fashion-mnist").origin == str(system / "fashion-mnist")


def test_missing_files_without_download_say_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTCLR_DATA", str(tmp_path))
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "none")
    with pytest.raises(FastclrError) as e:
        ensure("fashion-mnist", download=False)
    msg = str(e.value)
    assert "apt-get install -y dataset-fashion-mnist" in msg and "train-images-idx3-ubyte.gz" in msg
    assert "gzipped or not" in msg
    assert "\n" not in msg


def test_failed_download_names_the_url_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTCLR_DATA", str(tmp_path))
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "none")
    bad = RemoteFile("file:///nonexistent/dir/cifar-10-python.tar.gz", "0" * 32, True)
    monkeypatch.setitem(REGISTRY, "cifar10", dataclasses.replace(REGISTRY["cifar10"], remote=(bad,)))
    with pytest.raises(FastclrError, match=r"cannot download file:///nonexistent.*cs\.toronto\.edu"):
        ensure("cifar10")
    assert not any(tmp_path.rglob("*.part"))


def _serve(tmp_path: Path, name: str, payload: bytes) -> str:
    src = tmp_path / "server" / name
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(payload)
    return src.as_uri()


def test_fetch_verifies_md5_and_leaves_nothing_on_mismatch(tmp_path: Path) -> None:
    payload = b"hello idx"
    url = _serve(tmp_path, "f.gz", payload)
    dest = tmp_path / "dest"
    good = RemoteFile(url, hashlib.md5(payload).hexdigest())
    assert fetch(good, dest).read_bytes() == payload
    with pytest.raises(FastclrError, match="checksum mismatch"):
        fetch(RemoteFile(url, "0" * 32), tmp_path / "dest2")
    assert not (tmp_path / "dest2").exists()  # no part file, nor the folder made for it


def test_download_of_an_archive_extracts_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    staging = tmp_path / "staging"
    write_cifar(staging / "cifar-10-batches-py")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    url = _serve(tmp_path, "cifar-10-python.tar.gz", buf.getvalue())
    remote = RemoteFile(url, hashlib.md5(buf.getvalue()).hexdigest(), extract=True)
    monkeypatch.setitem(REGISTRY, "cifar10", dataclasses.replace(REGISTRY["cifar10"], remote=(remote,)))
    monkeypatch.setenv("FASTCLR_DATA", str(tmp_path / "data"))
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "none")
    ds = load_builtin("cifar10")
    assert len(ds.train) == 40 and (tmp_path / "data" / "cifar-10-batches-py" / "test_batch").exists()


def test_download_reads_what_is_present_and_names_a_damaged_file(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    write_idx_dataset(tmp_path / "fashion-mnist", n_train=40, n_test=10)
    assert cli_main(["download", "fashion-mnist", "--no-download", "--root", str(tmp_path)]) == 0
    assert "40 images for pretraining; 40 train, 10 test; read, sizes and labels consistent" in capsys.readouterr().out
    (tmp_path / "fashion-mnist" / IDX_FILES[2]).write_bytes(b"")  # present, but empty
    for flags in (["--no-download"], []):  # and never "present" because its name exists
        assert cli_main(["download", "fashion-mnist", "--root", str(tmp_path), *flags]) == 2
        err = capsys.readouterr().err
        assert IDX_FILES[2] in err and "is damaged: delete or replace it" in err and err.count("\n") == 1
    # an unknown name: what can be downloaded, not "(or give the path of a prepared store)"
    assert cli_main(["download", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unknown dataset 'imagenet'; fastclr downloads: fashion-mnist, mnist, cifar10, cifar100, stl10\n"


def test_download_into_a_root_not_yet_made_makes_it_and_failures_name_that_root(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`fastclr download cifar10 --root DIR` said DIR "is not a directory" (its help: the directory to
    download into), and a failed download told the user to unpack the archive in $FASTCLR_DATA."""
    staging = tmp_path / "staging"
    write_cifar(staging / "cifar-10-batches-py")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    good = RemoteFile(_serve(tmp_path, "cifar-10-python.tar.gz", buf.getvalue()), hashlib.md5(buf.getvalue()).hexdigest(),
                      extract=True)
    monkeypatch.setitem(REGISTRY, "cifar10", dataclasses.replace(REGISTRY["cifar10"], remote=(good,)))
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "none")
    root = tmp_path / "new" / "data"
    assert cli_main(["download", "cifar10", "--root", str(root)]) == 0
    assert (root / "cifar-10-batches-py" / "test_batch").exists() and "40 train" in capsys.readouterr().out
    bad = RemoteFile("file:///nonexistent/cifar-10-python.tar.gz", "0" * 32, True)
    monkeypatch.setitem(REGISTRY, "cifar10", dataclasses.replace(REGISTRY["cifar10"], remote=(bad,)))
    other = tmp_path / "other"
    assert cli_main(["download", "cifar10", "--root", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"in {other} (it creates cifar-10-batches-py/)" in err and "$FASTCLR_DATA" not in err, err
    # without --root: where downloads go, $FASTCLR_DATA's value or, with it unset, the user cache
    for data in (str(tmp_path / "env"), None):
        if data:
            monkeypatch.setenv("FASTCLR_DATA", data)
        else:
            monkeypatch.delenv("FASTCLR_DATA", raising=False)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
        assert cli_main(["download", "cifar10"]) == 2
        err = capsys.readouterr().err
        assert f"in {data or tmp_path / 'cache' / 'fastclr'} (it creates cifar-10-batches-py/)" in err, err
        assert "$FASTCLR_DATA" not in err
    assert cli_main(["download", "cifar10", "--no-download", "--root", str(tmp_path / "typo")]) == 2
    assert "is not a directory" in capsys.readouterr().err and not (tmp_path / "typo").exists()  # only to download into


def test_an_archive_that_fails_to_unpack_leaves_no_file_of_it(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    write_cifar(staging / "cifar-10-batches-py")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    cut = buf.getvalue()[: len(buf.getvalue()) * 2 // 3]  # verified bytes whose end is missing
    url = _serve(tmp_path, "cifar-10-python.tar.gz", cut)
    dest = tmp_path / "data"
    (dest / "cifar-10-batches-py").mkdir(parents=True)
    (dest / "cifar-10-batches-py" / "notes.txt").write_text("mine")
    with pytest.raises(FastclrError, match=r"cannot unpack cifar-10-python.tar.gz into .*nothing of it was kept"):
        fetch(RemoteFile(url, hashlib.md5(cut).hexdigest(), extract=True), dest)
    assert sorted(p.name for p in dest.rglob("*")) == ["cifar-10-batches-py", "notes.txt"]  # the first batches too


def test_the_published_stl10_must_hold_all_its_unlabelled_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    for name, n in (("train", 3), ("test", 2), ("unlabeled", 3)):
        np.zeros((n, 3, 96, 96), np.uint8).tofile(folder / f"{name}_X.bin")
    np.array([1, 2, 3], np.uint8).tofile(folder / "train_y.bin")
    np.array([1, 2], np.uint8).tofile(folder / "test_y.bin")
    assert load_builtin("stl10", tmp_path, download=False).unlabelled == 3  # a small copy of the format: as it is
    monkeypatch.setattr("fastclr.data.datasets.STL10_COUNTS", {"train": 3, "test": 2, "unlabeled": 4})
    with pytest.raises(FastclrError, match=r"unlabeled_X.bin holds 3 images, not STL-10's 4; it is truncated"):
        load_builtin("stl10", tmp_path, download=False)


def test_official_checksums_are_recorded_for_every_dataset() -> None:
    for spec in REGISTRY.values():
        assert spec.remote and all(len(r.md5) == 32 and r.url.startswith("http") for r in spec.remote)


def test_hostile_or_inconsistent_files_are_named_before_any_training(data_root: Path, tmp_path: Path) -> None:
    folder = data_root / "fashion-mnist"
    # an IDX header declaring 255 dimensions (its shape would run past the file)
    (tmp_path / "bad.idx").write_bytes(bytes([0, 0, 0x08, 255]) + b"\x00" * 12)
    with pytest.raises(FastclrError, match=r"bad.idx is not an IDX file of images or labels \(header declares 255"):
        formats.read_idx(tmp_path / "bad.idx")
    # labels outside 0..9: counted and named
    ok = load_builtin("fashion-mnist")
    assert ok.train is not None and ok.train.labels is not None
    y = ok.train.labels.copy()
    y[:3] = [10, 200, 12]
    write_idx(folder / "train-labels-idx1-ubyte.gz", y.astype(np.uint8))
    with pytest.raises(FastclrError, match=r"3 train labels are outside 0..9 \(10 classes of fashion-mnist\)"):
        load_builtin("fashion-mnist")
    write_idx(folder / "train-labels-idx1-ubyte.gz", ok.train.labels.astype(np.uint8))
    # test images of another size than the training images
    x, _ = synthetic_images(64, 32)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", x[..., 0])
    with pytest.raises(FastclrError, match=r"test images are \(32, 32, 1\) but the training images are \(28, 28, 1\)"):
        load_builtin("fashion-mnist")


def test_a_cifar_batch_with_fewer_labels_than_images_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    batch = pickle.loads((folder / "test_batch").read_bytes())
    batch[b"labels"] = batch[b"labels"][:-2]
    (folder / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(FastclrError, match=r"test_batch holds 8 images and 6 labels; it is damaged"):
        load_builtin("cifar10", tmp_path, download=False)


def test_cifar_label_counts_are_checked_per_batch(tmp_path: Path) -> None:
    """One batch a label short and the next one long add up, but every label after the first
    would belong to the image before it: each batch's count must match its own images."""
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    one, two = (pickle.loads((folder / f"data_batch_{i}").read_bytes()) for i in (1, 2))
    two[b"labels"] = [one[b"labels"][-1], *two[b"labels"]]
    one[b"labels"] = one[b"labels"][:-1]
    for i, batch in ((1, one), (2, two)):
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(batch))
    with pytest.raises(FastclrError, match=r"data_batch_1 holds 8 images and 7 labels; it is damaged"):
        load_builtin("cifar10", tmp_path, download=False)


def test_a_damaged_gzip_file_is_a_one_line_error(tmp_path: Path) -> None:
    """A corrupt deflate stream (zlib.error, not OSError) is named like a cut-short one."""
    x, _ = synthetic_images(64, 28)
    p = write_idx(tmp_path / "train-images-idx3-ubyte.gz", x[..., 0])
    raw = bytearray(p.read_bytes())
    raw[20:60] = bytes(range(40))  # inside the deflate stream, past the gzip header
    p.write_bytes(bytes(raw))
    with pytest.raises(FastclrError, match=r"is a damaged gzip file .*; delete it and fetch it again"):
        formats.read_idx(p)


def test_cifar100_test_split_and_fine_class_names_come_from_their_own_files(tmp_path: Path) -> None:
    """CIFAR-100's test split is its `test` file (not the `train` one again), and its 100 class
    names are meta's fine_label_names, in order (not their indices)."""
    x100, y100 = write_cifar(tmp_path / "cifar-100-python", hundred=True)
    ds = load_builtin("cifar100", tmp_path, download=False)
    assert ds.test is not None and ds.test.labels is not None
    np.testing.assert_array_equal(ds.test.images, x100[8:])
    np.testing.assert_array_equal(ds.test.labels, y100[8:])
    assert ds.classes == [f"class{i}" for i in range(100)]  # as write_cifar's meta names them


def test_cifar_class_names_pickled_again_as_text_are_read(tmp_path: Path) -> None:
    """The publisher's meta holds bytes; one pickled again by Python 3 tools holds str, which
    raised AttributeError ('str' object has no attribute 'decode') in a traceback."""
    import pickle

    write_cifar(tmp_path / "cifar-10-batches-py")
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"kind{i}" for i in range(10)]}, f)
    assert load_builtin("cifar10", tmp_path, download=False).classes == [f"kind{i}" for i in range(10)]


def test_stl10_class_names_come_from_class_names_txt(tmp_path: Path) -> None:
    """The published stl10_binary/ carries class_names.txt, one name a line: those are the classes."""
    write_stl10(tmp_path)
    names = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (tmp_path / "stl10_binary" / "class_names.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    assert load_builtin("stl10", tmp_path, download=False).classes == names


def test_stl10_labels_fewer_than_its_images_are_refused(tmp_path: Path) -> None:
    """STL-10's labels are a file apart from its images: 3 train images with 2 labels would pair
    each label with the wrong image, and are named before any training."""
    write_stl10(tmp_path)
    np.array([1, 10], np.uint8).tofile(tmp_path / "stl10_binary" / "train_y.bin")
    with pytest.raises(FastclrError, match=r"train has 3 images but 2 labels"):
        load_builtin("stl10", tmp_path, download=False)


def test_download_counts_stl10s_unlabelled_images_as_pretraining_images(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fastclr download stl10` reports the images SimCLR pretrains on: unlabelled plus train
    (4 + 3 in write_stl10's copy), apart from the 3 train and 2 test ones."""
    write_stl10(tmp_path)
    assert cli_main(["download", "stl10", "--no-download", "--root", str(tmp_path)]) == 0
    assert "(7 images for pretraining; 3 train, 2 test; read, sizes and labels consistent)" in capsys.readouterr().out


def test_stl10_class_names_are_one_a_line_and_must_be_ten(tmp_path: Path) -> None:
    """A name with a space ("sports car") was split in two, shifting every later class by one; a
    list of 11 gave 11 classes; a file that is not UTF-8 was a traceback."""
    write_stl10(tmp_path)
    listed = tmp_path / "stl10_binary" / "class_names.txt"
    names = ["airplane", "bird", "sports car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    listed.write_text("\n".join(names) + "\n\n", encoding="utf-8")
    assert load_builtin("stl10", tmp_path, download=False).classes == names
    listed.write_text("\n".join([*names, "extra"]), encoding="utf-8")
    with pytest.raises(FastclrError, match=r"class_names.txt lists 11 class names under its lines, not stl10's 10"):
        load_builtin("stl10", tmp_path, download=False)
    listed.write_bytes(b"caf\xe9\n" * 10)
    with pytest.raises(FastclrError, match=r"class_names.txt is not UTF-8 text"):
        load_builtin("stl10", tmp_path, download=False)


@pytest.mark.parametrize("hundred", [False, True])
def test_a_cifar_meta_of_another_class_count_is_refused(tmp_path: Path, hundred: bool) -> None:
    """CIFAR-100 with CIFAR-10's meta (or a meta without the names) was given classes '0'..'99'
    without a word; a CIFAR-10 meta of 12 names gave 12 classes."""
    import pickle

    folder = tmp_path / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    write_cifar(folder, hundred=hundred)
    meta, key = (folder / "meta", b"fine_label_names") if hundred else (folder / "batches.meta", b"label_names")
    for names in ([f"c{i}".encode() for i in range(10 if hundred else 12)], None):
        with open(meta, "wb") as f:
            pickle.dump({} if names is None else {key: names}, f)
        count = 0 if names is None else len(names)
        with pytest.raises(FastclrError, match=rf"lists {count} class names under {key.decode()}, not "
                                              rf"{'cifar100' if hundred else 'cifar10'}'s {100 if hundred else 10}"):
            load_builtin("cifar100" if hundred else "cifar10", tmp_path, download=False)


def test_a_cifar_batch_of_other_pixels_than_uint8_is_refused(tmp_path: Path) -> None:
    """Pixels stored as floats in [0, 1] were cast to uint8: every pixel 0 or 1, trained on silently."""
    import pickle

    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    batch = folder / "data_batch_3"
    with open(batch, "rb") as f:
        d = pickle.load(f)
    d[b"data"] = d[b"data"].astype(np.float32) / 255
    with open(batch, "wb") as f:
        pickle.dump(d, f)
    with pytest.raises(FastclrError, match=r"data_batch_3: data is float32, not CIFAR's uint8 pixels"):
        load_builtin("cifar10", tmp_path, download=False)


def test_a_directory_in_place_of_an_stl10_file_is_named_so(tmp_path: Path) -> None:
    """It was "holds 4096 bytes, not a multiple of 27648; it is truncated"."""
    write_stl10(tmp_path)
    bad = tmp_path / "stl10_binary" / "train_X.bin"
    bad.unlink()
    bad.mkdir()
    with pytest.raises(FastclrError, match=r"train_X.bin is a directory, not STL-10's file"):
        load_builtin("stl10", tmp_path, download=False)
