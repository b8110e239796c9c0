"""Training from a store: the same path, the same numbers as the in-memory datasets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fastclr.checkpoint import list_checkpoints, load_checkpoint
from fastclr.cli import main
from fastclr.config import Config, DataConfig
from fastclr.data import absolute_name, load_builtin, load_data, open_store
from fastclr.data.loader import ImageSource
from fastclr.errors import FastclrError
from fastclr.ingest import DecodeOptions, prepare_store
from fastclr.pretrained import load_run
from fastclr.pretraining.loop import pretrain
from ingest_fixtures import bar_images
from tiny import tiny_config

QUIET = dict(progress=False, log=lambda s: None)


def tiny(run_dir: Path, data: str, **over: object) -> Config:
    """The tiny run (tests/tiny.py) on `data`, one epoch, fp32."""
    settings = {"data__name": data, "train__epochs": 1.0, "train__log_every": 1, "train__precision": "fp32", **over}
    return tiny_config(run_dir, **settings)


def encoder_state(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "encoder.safetensors"))


def test_builtin_store_trains_bit_identically_to_the_in_memory_dataset(data_root: Path, tmp_path: Path) -> None:
    ds = load_builtin("fashion-mnist")
    store = tmp_path / "fm"
    assert main(["prepare", "--builtin", "fashion-mnist", "--out", str(store)]) == 0
    sd = open_store(store)
    assert isinstance(sd.pretrain.images, np.memmap) and sd.classes == ds.classes
    assert np.array_equal(sd.pretrain.images, ds.pretrain.images)
    assert np.array_equal(sd.test.images, ds.test.images) and np.array_equal(sd.test.labels, ds.test.labels)  # type: ignore[union-attr]
    idx = torch.tensor([5, 0, 5, 255, 17])  # repeats and any order: gather keeps idx order
    assert torch.equal(ImageSource(sd.pretrain.images, torch.device("cpu")).gather(idx), torch.from_numpy(ds.pretrain.images)[idx])

    mem = tiny(tmp_path / "mem", "fashion-mnist", train__epochs=0.25)
    # The same settings from the store: its own preset (the ImageNet recipe) would train differently.
    on_store = dataclasses.replace(mem, data=dataclasses.replace(mem.data, name=str(store), preset="store"),
                                   train=dataclasses.replace(mem.train, run_dir=str(tmp_path / "store")))
    a = pretrain(mem, **QUIET)
    b = pretrain(on_store, **QUIET)
    assert a.steps == b.steps == 4
    sa, sb = encoder_state(a.run_dir), encoder_state(b.run_dir)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_builtin_store_keeps_each_split_with_its_images_labels_and_classes(tmp_path: Path) -> None:
    """STL-10's pretraining images are its unlabelled images followed by its train split: as a
    store, the unlabelled ones are the unlabeled split (no label, no class), then train and test,
    each row with its own image, label and class name."""
    from conftest import write_stl10
    from fastclr.data.store import read_csv, read_store
    from fastclr.ingest.builtin import write_builtin_store

    imgs = write_stl10(tmp_path / "data")
    store = write_builtin_store("stl10", tmp_path / "s", str(tmp_path / "data"), download=False, log=lambda s: None)
    s, classes = read_store(store), load_builtin("stl10", tmp_path / "data", download=False).classes
    for split in ("unlabeled", "train", "test"):
        a, b = s.split_range(split)
        assert np.array_equal(s.images[a:b], imgs[split]), split
    labels = [-1] * 4 + [0, 9, 4] + [1, 2]  # the files' 1-based labels, from 0
    assert s.labels.tolist() == labels
    rows = read_csv(store / "manifest.csv")
    assert [r["class"] for r in rows] == [classes[y] if y >= 0 else "" for y in labels]
    assert [r["path"] for r in rows] == [f"{split}/{i:06d}" for split, n in (("unlabeled", 4), ("train", 3), ("test", 2))
                                         for i in range(n)]


def test_pretrain_from_a_prepared_labelled_folder(tmp_path: Path) -> None:
    bar_images(tmp_path / "bars", n_per_class=24, size=32)
    store = prepare_store(tmp_path / "bars", tmp_path / "store", DecodeOptions(28), workers=1, **QUIET).store
    ds = load_data(DataConfig(name=str(store)))
    assert ds.train is not None and ds.test is not None
    # pretrain = unlabeled + train rows (none unlabeled here); the test rows are held out of it.
    assert len(ds.pretrain) == len(ds.train) and len(ds.train) + len(ds.test) == 48 and len(ds.test) > 0
    assert set(ds.train.labels.tolist()) == {0, 1}  # type: ignore[union-attr]
    res = pretrain(tiny(tmp_path / "run", str(store), eval__monitor_every=1, eval__probe=True), **QUIET)
    assert res.steps == len(ds.train) // 16
    assert res.model is not None and (res.model.spec.in_channels, res.model.spec.image_size) == (3, 28)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    assert any("knn_acc" in r for r in records) and res.probe_accuracy is not None


def test_pretrain_from_an_unlabeled_store_skips_the_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bar_images(tmp_path / "bars", n_per_class=16, size=32, labelled=False)
    store = prepare_store(tmp_path / "bars", tmp_path / "store", DecodeOptions(28), workers=1, **QUIET).store
    res = pretrain(tiny(tmp_path / "run", str(store), eval__probe=True, eval__monitor_every=1), **QUIET)
    assert res.steps == 2 and res.probe_accuracy is None and not (tmp_path / "run" / "probe.json").exists()
    # The same through the command line: `fastclr pretrain --data STORE`, the store given relative
    # to the current directory: the run records it absolute, and finds it again from anywhere.
    monkeypatch.chdir(tmp_path)
    args = ["pretrain", "--data", "store", "--epochs", "1", "--run-dir", str(tmp_path / "cli"), "--batch-size", "16",
            "--width", "0.125", "--head-hidden", "32", "--proj-dim", "16", "--quiet", "--blur-p", "0"]
    assert main(args) == 0 and (tmp_path / "cli" / "encoder.safetensors").exists()
    assert f'name = "{store.resolve()}"' in (tmp_path / "cli" / "config.toml").read_text()
    monkeypatch.chdir(tmp_path / "bars")
    assert len(load_data(load_run(tmp_path / "cli").config.data).pretrain) == 32
    # Resumed from where it started, naming the store as it did then (relative): the same store.
    monkeypatch.chdir(tmp_path)
    assert main(["pretrain", "--resume", str(tmp_path / "cli"), "--data", "store", "--epochs", "2", "--quiet"]) == 0
    assert load_checkpoint(list_checkpoints(tmp_path / "cli")[-1])["step"] == 4  # 2 epochs of 2 steps


def test_load_data_names_and_paths(data_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FastclrError, match="unknown dataset 'imagenet'"):
        load_data(DataConfig(name="imagenet"))
    with pytest.raises(FastclrError) as e:  # it was "is not a store directory", of a path that is not there
        load_data(DataConfig(name=str(tmp_path / "missing")))
    assert str(e.value) == (f"{tmp_path / 'missing'} does not exist; give a store, or make one with `fastclr prepare "
                            f"FOLDER --size S --out {tmp_path / 'missing'}`")
    (tmp_path / "afile").write_text("")
    with pytest.raises(FastclrError) as e:  # `--out afile`, as it said, could not work
        load_data(DataConfig(name=str(tmp_path / "afile")))
    assert str(e.value) == f"{tmp_path / 'afile'} is a file, not a store directory; give the folder `fastclr prepare` wrote"
    assert load_data(DataConfig(name="mnist")).name == "mnist"
    # what a run records: a store's path absolute, a name (built-in, or a typo of one) as it is
    assert absolute_name("fashion-mnsit") == "fashion-mnsit" and absolute_name("mnist") == "mnist"
    assert absolute_name("stores/x") == str(Path.cwd() / "stores" / "x")


def test_a_store_prepared_again_with_other_images_is_not_the_data_a_run_resumes_on(tmp_path: Path) -> None:
    """A store is named by its path, but a run is trained on its content: the same folder prepared
    again into another store gives the same content identity (an mtime is not content, nor options
    that give the same pixels), an added image or another size another one. A run stopped on the store refuses to resume once the store
    was prepared again with one more image (it resumed silently on 32 px images after training on
    40), unless told to go on."""
    import os

    bar_images(tmp_path / "bars", n_per_class=24, size=32)
    first = prepare_store(tmp_path / "bars", tmp_path / "store", DecodeOptions(28), workers=1, **QUIET).store
    content = open_store(first).content
    os.utime(tmp_path / "bars" / "class0" / "img000.png", ns=(10**18, 10**18))
    again = prepare_store(tmp_path / "bars", tmp_path / "again", DecodeOptions(28), workers=1, **QUIET).store
    other = prepare_store(tmp_path / "bars", tmp_path / "other", DecodeOptions(24), workers=1, **QUIET).store
    rgb = prepare_store(tmp_path / "bars", tmp_path / "rgb", DecodeOptions(28, channels="3"), workers=1, **QUIET).store
    assert len(content) == 64 and open_store(again).content == content != open_store(other).content
    # the same pixels from other options (these are colour images: --channels 3 as auto) are the same data
    assert (rgb / "images.u8").read_bytes() == (first / "images.u8").read_bytes()
    assert open_store(rgb).content == content

    cfg = tiny(tmp_path / "run", str(first), train__epochs=2.0)
    assert pretrain(cfg, stop=lambda step: step == 2, **QUIET).stopped
    assert load_checkpoint(list_checkpoints(tmp_path / "run")[-1])["data_content"] == content
    bar_images(tmp_path / "more", n_per_class=1, size=32)
    (tmp_path / "more" / "class1" / "img000.png").replace(tmp_path / "bars" / "class1" / "img999.png")
    prepare_store(tmp_path / "bars", tmp_path / "store", DecodeOptions(28), workers=1, **QUIET)
    assert open_store(first).content != content
    with pytest.raises(FastclrError, match=f"cannot resume: {first} is not the data this run trained on [(]it was "
                                           "prepared again since, with other images, classes or options[)]"):
        pretrain(cfg, resume=tmp_path / "run", **QUIET)
    notes: list[str] = []
    res = pretrain(cfg, resume=tmp_path / "run", allow_config_change=True, progress=False, log=notes.append)
    assert not res.stopped and any(n.startswith(f"note: {first} was prepared again since the checkpoint") for n in notes)


def test_a_run_whose_store_moved_is_told_so_by_every_command_that_reads_its_data(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """evaluate, report, finetune, the ONNX export and a resume read the run's data from the store
    path it recorded; moved away, they said "... is not a store directory; create one with `fastclr
    prepare`" as if there never was one."""
    bar_images(tmp_path / "bars", n_per_class=24, size=32)
    store = prepare_store(tmp_path / "bars", tmp_path / "store", DecodeOptions(28), workers=1, **QUIET).store
    pretrain(tiny(tmp_path / "run", str(store)), **QUIET)
    store.rename(tmp_path / "moved")
    said = (f"error: {tmp_path / 'run'} was trained on the store {store}, which is no longer there (moved or deleted); "
            f"put it back at that path, or prepare it again with `fastclr prepare FOLDER --size S --out {store}` "
            "from the same folder")
    run = str(tmp_path / "run")
    for argv in (["evaluate", run, "--device", "cpu"], ["report", run, "--device", "cpu"],
                 ["finetune", run, "--labels-per-class", "2", "--device", "cpu"], ["pretrain", "--resume", run, "--quiet"]):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.strip() == said, argv


def test_a_store_goes_to_a_gpu_with_room_for_it_once_and_stays_mapped_on_the_cpu(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a batch's rows from the map needs its indices on the host, a wait for the GPU at
    every step; a store with room on the GPU is copied there once, a few rows at a time."""
    from fastclr.data import loader

    x = np.random.default_rng(0).integers(0, 256, (37, 5, 5, 3), dtype=np.uint8)
    x.tofile(tmp_path / "images.u8")
    mapped = np.memmap(tmp_path / "images.u8", np.uint8, "r", shape=x.shape)
    for chunk in (1, 4 * 75, 10**9):  # a row at a time, four rows, all at once
        assert torch.equal(loader.copy_to_device(mapped, torch.device("cpu"), chunk_bytes=chunk), torch.from_numpy(x))
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (4 * x.nbytes, 80 << 30))
    assert loader.fits_on_gpu(x.nbytes, gpu) and not loader.fits_on_gpu(x.nbytes + 1, gpu)
    assert not loader.fits_on_gpu(1, torch.device("cpu"))
    idx = torch.tensor([36, 0, 5, 5])
    on_cpu = ImageSource(mapped, torch.device("cpu"))
    assert on_cpu._mmap is mapped and torch.equal(on_cpu.gather(idx), torch.from_numpy(x)[idx])
    monkeypatch.setattr(loader, "fits_on_gpu", lambda nbytes, device: True)  # as a GPU with room would answer
    resident = ImageSource(mapped, torch.device("cpu"))
    assert resident._mmap is None and torch.equal(resident.gather(idx), torch.from_numpy(x)[idx])


def test_a_read_only_array_is_read_whole_without_torchs_not_writable_warning() -> None:
    """`extract_features` on `open_store(...).pretrain.images` (read-only rows held whole) printed
    torch's "The given NumPy array is not writable" warning with a source line."""
    import warnings

    x = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4, 1)
    x.flags.writeable = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = ImageSource(x, torch.device("cpu"))
    assert [str(w.message) for w in caught] == []
    assert torch.equal(source.gather(torch.tensor([1, 0])), torch.from_numpy(x.copy())[[1, 0]])


def test_pretraining_images_carry_their_labels_for_supcon_and_none_is_refused(tmp_path: Path) -> None:
    """A store's and STL-10's pretraining images had no labels at all: --supcon on them trained
    plain NT-Xent without a word. The labelled rows keep their labels now (-1 for the unlabelled),
    and --supcon where no pretraining image has one is refused before the run directory exists."""
    from conftest import write_stl10
    from fastclr.data.store import read_store
    from fastclr.ingest.builtin import write_builtin_store

    write_stl10(tmp_path / "data")
    stl = load_builtin("stl10", tmp_path / "data", download=False)
    assert stl.pretrain.labels is not None and stl.train is not None and stl.train.labels is not None
    assert stl.pretrain.labels.tolist() == [-1] * stl.unlabelled + stl.train.labels.tolist()
    store = write_builtin_store("stl10", tmp_path / "s", str(tmp_path / "data"), download=False, log=lambda s: None)
    s, on_store = read_store(store), open_store(store)
    a, b = s.split_range("unlabeled")[0], s.split_range("train")[1]
    assert on_store.pretrain.labels is not None and on_store.pretrain.labels.tolist() == s.labels[a:b].tolist()
    assert on_store.pretrain.labels.tolist() == stl.pretrain.labels.tolist()

    bar_images(tmp_path / "bars", n_per_class=8, size=32)
    unlabelled = prepare_store(tmp_path / "bars", tmp_path / "u", DecodeOptions(28), workers=1, labels="none",
                               **QUIET).store
    with pytest.raises(FastclrError) as e:
        pretrain(tiny(tmp_path / "run", str(unlabelled), train__supcon=True), **QUIET)
    assert str(e.value) == (f"--supcon takes its positives from the labels of the pretraining images, and {unlabelled} "
                            "labels none of them; drop --supcon, or prepare the images with a folder per class")
    assert not (tmp_path / "run").exists()


def test_an_odd_side_for_the_cnn_is_one_line_before_the_run_directory(tmp_path: Path) -> None:
    """The cnn folds 2 x 2 pixels into channels first: a 27 px view was a pixel_unshuffle traceback
    at the first step, after config.toml was written."""
    from tiny import tiny_dataset

    with pytest.raises(FastclrError) as e:
        pretrain(tiny_config(tmp_path / "run", augment__crop_size=27), dataset=tiny_dataset(), **QUIET)
    assert str(e.value) == ("the cnn encoder reads images of an even side (its first layer folds 2 x 2 pixels into "
                            "channels), and these views are 27 px; pass --crop-size 26, or --encoder resnet18")
    assert not (tmp_path / "run").exists()


def test_a_builtin_store_and_a_folders_store_do_not_replace_each_other(
        data_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`prepare --builtin fashion-mnist --out S` over the store of a folder still there replaced it
    with exit 0 and no word (only a second folder was refused), and a folder over a built-in's store
    replaced it with an "options changed" note: both refused in one line, the store as it was."""
    bar_images(tmp_path / "photos", n_per_class=3, size=16)
    folder_store, builtin_store = tmp_path / "folder-store", tmp_path / "fm"
    assert main(["prepare", str(tmp_path / "photos"), "--size", "16", "--out", str(folder_store), "--quiet"]) == 0
    assert main(["prepare", "--builtin", "fashion-mnist", "--out", str(builtin_store)]) == 0
    before = {s: {p.name: p.read_bytes() for p in s.iterdir()} for s in (folder_store, builtin_store)}
    capsys.readouterr()
    assert main(["prepare", "--builtin", "fashion-mnist", "--out", str(folder_store)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {folder_store} holds the store of {(tmp_path / 'photos').resolve()}, not of the built-in "
        f"fashion-mnist: give another --out, or remove {folder_store} first to replace it")
    assert main(["prepare", str(tmp_path / "photos"), "--size", "16", "--out", str(builtin_store), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {builtin_store} holds the store of the built-in fashion-mnist, not of {(tmp_path / 'photos').resolve()}"
        f": give another --out, or remove {builtin_store} first to replace it")
    assert {s: {p.name: p.read_bytes() for p in s.iterdir()} for s in (folder_store, builtin_store)} == before
    assert main(["prepare", "--builtin", "fashion-mnist", "--out", str(builtin_store)]) == 0  # the same again: rewritten


def test_a_store_of_a_builtin_dataset_trains_with_that_datasets_recipe(tmp_path: Path) -> None:
    """`prepare --builtin mnist` then `pretrain --data STORE` trained the ImageNet recipe (crops from
    8%, blur, mirrored digits, 100 epochs) on the same images `--data mnist` trains with MNIST's own;
    a folder's store keeps the store recipe, and a run saved with the store recipe on such a store
    still passes the recipe check (it resumes as it was)."""
    from conftest import write_idx_dataset
    from fastclr.ingest.builtin import write_builtin_store
    from fastclr.presets import STORE, check_preset, config_for

    write_idx_dataset(tmp_path / "data" / "mnist", n_train=16, n_test=8)
    store = write_builtin_store("mnist", tmp_path / "s", str(tmp_path / "data"), download=False, log=lambda s: None)
    cfg, builtin = config_for(str(store)), config_for("mnist")
    assert cfg.data.preset == "mnist"
    assert (dataclasses.replace(cfg, data=builtin.data)) == builtin  # every setting MNIST's
    bar_images(tmp_path / "bars", n_per_class=4, size=28)
    folder_store = prepare_store(tmp_path / "bars", tmp_path / "fs", DecodeOptions(28), workers=1, **QUIET).store
    assert config_for(str(folder_store)).data.preset == STORE
    assert config_for(str(folder_store)).augment.scale_min == 0.08  # the ImageNet recipe's crops
    check_preset(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, preset=STORE)))
    with pytest.raises(FastclrError, match=r"holds the fashion-mnist recipe but trains on"):
        check_preset(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, preset="fashion-mnist")))


def test_a_resume_naming_its_store_another_way_keeps_its_recipe_and_the_first_line_names_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run saved with the store recipe on a `prepare --builtin` store, resumed with `--data s`
    (relative, where it recorded the absolute path), was taken for another dataset: its preset
    relabelled to mnist, and its first line said "the mnist recipe" while it trained the saved
    ImageNet settings."""
    from conftest import write_idx_dataset
    from fastclr.cli import parse_args, resume_config
    from fastclr.ingest.builtin import write_builtin_store
    from fastclr.pretraining.loop import _recipe_text
    from fastclr.presets import config_for

    write_idx_dataset(tmp_path / "data" / "mnist", n_train=16, n_test=8)
    store = write_builtin_store("mnist", tmp_path / "s", str(tmp_path / "data"), download=False, log=lambda s: None)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text(f'[data]\nname = "{store.resolve()}"\npreset = "store"\n[augment]\nscale_min = 0.08\n',
                                     encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    cfg = resume_config(run, parse_args(["pretrain", "--resume", str(run), "--data", "s"]))
    assert (cfg.data.preset, cfg.augment.scale_min) == ("store", 0.08)
    assert _recipe_text(cfg) == "; the store (ImageNet) recipe"
    assert _recipe_text(config_for(str(store))) == "; the mnist recipe"
    assert _recipe_text(config_for("mnist")) == ""


def test_a_project_moved_with_its_store_is_evaluated_and_resumed_from_the_stores_new_place(tmp_path: Path) -> None:
    """A run records its store's absolute path: after `mv projA projB` (or a copy to another
    machine or home) evaluate, report and resume said only to put the store back at the old path.
    The recorded path's last names are tried above the run, and a store there with the run's
    content identity is used, said in a note; a store of other images there is not."""
    import shutil

    proj = tmp_path / "projA"
    bar_images(proj / "bars", n_per_class=24, size=32)
    store = prepare_store(proj / "bars", proj / "stores" / "s", DecodeOptions(28), workers=1, **QUIET).store
    pretrain(tiny(proj / "runs" / "r", str(store), train__checkpoint_every=1), **QUIET)
    moved = tmp_path / "projB"
    shutil.move(proj, moved)
    notes: list[str] = []
    run = load_run(moved / "runs" / "r", "cpu", "fp32", log=notes.append)
    assert run.config.data.name == str(moved / "stores" / "s")
    assert notes[-1] == (f"note: {moved / 'runs' / 'r'} was trained on the store {store.resolve()}, which is no longer "
                         f"there; using {moved / 'stores' / 's'}, which holds the same images, labels and splits "
                         "(moved with the run)")
    r = main(["pretrain", "--resume", str(moved / "runs" / "r"), "--epochs", "2", "--quiet"])
    assert r == 0 and list_checkpoints(moved / "runs" / "r")
    assert load_checkpoint(list_checkpoints(moved / "runs" / "r")[-1])["config"]["data"]["name"] == str(moved / "stores" / "s")
    shutil.rmtree(moved / "stores" / "s")
    bar_images(tmp_path / "other", n_per_class=20, size=32)  # another store at that place: not the run's
    prepare_store(tmp_path / "other", moved / "stores" / "s", DecodeOptions(28), workers=1, **QUIET)
    from fastclr.pretrained import moved_store

    assert moved_store(moved / "runs" / "r", str(store.resolve()), run.data_content) is None


def test_a_moved_project_of_a_builtin_store_resumes_and_a_named_recipe_gives_its_values(tmp_path: Path,
                                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Moved with its run, a `prepare --builtin` store was refused on resume ("this config holds the
    mnist recipe but trains on OLD": at the old path it looked like any store), and a moved folder
    store's resume noted a change of data.name that was none. And `data.preset = "store"` on such a
    store trained MNIST's values while the first line named the store recipe."""
    import shutil

    from conftest import write_idx_dataset
    from fastclr.ingest.builtin import write_builtin_store
    from fastclr.presets import IMAGENET, config_for

    write_idx_dataset(tmp_path / "data" / "mnist", n_train=64, n_test=16)
    proj = tmp_path / "projA"
    store = write_builtin_store("mnist", proj / "store", str(tmp_path / "data"), download=False, log=lambda s: None)
    pretrain(tiny(proj / "run", str(store), train__checkpoint_every=1), **QUIET)
    shutil.move(proj, tmp_path / "projB")
    capsys.readouterr()
    assert main(["pretrain", "--resume", str(tmp_path / "projB" / "run"), "--epochs", "2"]) == 0
    out = capsys.readouterr()
    assert "which is no longer there; using" in out.out + out.err and "data.name" not in out.out + out.err
    labelled = config_for(str(tmp_path / "projB" / "store"), {"data.preset": "store"})
    assert (labelled.augment.scale_min, labelled.augment.blur_p) == (IMAGENET["augment.scale_min"],
                                                                     IMAGENET["augment.blur_p"])
