"""`fastclr export --format torch-export`: a program that runs where fastclr is not installed and
computes the encoder's h."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import call_main, cli_env, installs
from tiny import TINY_FLAGS, tiny_dataset, tiny_run
from fastclr.errors import FastclrError
from fastclr.export import export_encoder, load_encoder
from fastclr.models import build_encoder
from fastclr.models.spec import EncoderSpec

# Run by a fresh interpreter in which `import fastclr` fails: the programs must not need it.
# Arguments: (program, input, output) triples; one interpreter for all (torch's import is most of it).
_LOAD_WITHOUT_FASTCLR = """
import sys, torch
sys.modules["fastclr"] = None  # any import of fastclr now raises ImportError
args = sys.argv[1:]
for program, x, h in zip(args[0::3], args[1::3], args[2::3]):
    torch.save(torch.export.load(program).module()(torch.load(x)), h)
"""

SHAPES = [("cnn", 1, 28, "auto"), ("resnet18", 3, 32, "on"), ("resnet18", 3, 64, "off")]


def test_the_program_runs_without_fastclr_and_equals_the_encoder(tmp_path: Path) -> None:
    """For the small CNN and a ResNet with either stem: the program computes the encoder's h in
    eval mode (BatchNorm statistics that are not the initial ones) for a batch size the export
    never saw, in an interpreter without fastclr, and carries the metadata."""
    cases, args = [], []
    for arch, channels, size, stem in SHAPES:
        torch.manual_seed(0)
        enc = build_encoder(arch, channels, size, 0.25 if arch.startswith("resnet") else 1.0, stem, "32|256|fc512")
        enc.train()  # as a run leaves it: export must evaluate in eval mode without changing the module
        for m in enc.modules():  # BatchNorm statistics that are not the initial ones
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        spec = EncoderSpec(arch, channels, size, 1.0, stem, 0, (0.5,) * channels, (0.25,) * channels)
        name = f"{arch}-{size}-{stem}"
        out = export_encoder(enc, spec, "[model]\n", "torch-export", tmp_path / f"{name}.pt2")[0]
        assert enc.training
        x = torch.randn(7, channels, size, size)  # a batch size the export never saw
        torch.save(x, tmp_path / f"{name}-x.pt")
        args += [str(out), str(tmp_path / f"{name}-x.pt"), str(tmp_path / f"{name}-h.pt")]
        cases.append((name, arch, channels, size, enc, x, out))
    r = subprocess.run([sys.executable, "-c", _LOAD_WITHOUT_FASTCLR, *args], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for name, arch, channels, size, enc, x, out in cases:
        with torch.no_grad():
            expected = enc.eval()(x)
        got = torch.load(tmp_path / f"{name}-h.pt")
        assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-4, rtol=1e-4), name
        with zipfile.ZipFile(out) as z:
            meta = json.loads(z.read(next(n for n in z.namelist() if n.endswith("fastclr.json"))))
        assert meta["architecture"] == arch and meta["image_size"] == str(size)
        assert json.loads(meta["mean"]) == [0.5] * channels


@pytest.mark.parametrize("arch, channels, size, stem, stages", [
    ("cnn", 1, 28, "auto", "32|256|fc512"), ("cnn", 1, 28, "auto", "32p|256p|fc512"),  # pools before BatchNorm
    ("resnet18", 3, 32, "on", ""), ("resnet18", 3, 64, "off", "")])
def test_onnx_in_onnxruntime_equals_the_encoder_and_carries_the_metadata(arch: str, channels: int, size: int,
                                                                        stem: str, stages: str, tmp_path: Path) -> None:
    import onnx
    import onnxruntime

    torch.manual_seed(0)
    enc = build_encoder(arch, channels, size, 0.25 if arch.startswith("resnet") else 1.0, stem, stages)
    spec = EncoderSpec(arch, channels, size, 1.0, stem, 0, (0.5,) * channels, (0.25,) * channels)
    out = export_encoder(enc, spec, "[model]\n", "onnx", tmp_path / "enc.onnx")[0]
    x = torch.randn(9, channels, size, size)  # a batch size the export never saw
    runtime = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(runtime.run(["h"], {"x": x.numpy()})[0])
    with torch.no_grad():
        expected = enc.eval()(x)
    assert got.shape == expected.shape and float((got - expected).abs().max()) <= 1e-4
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["architecture"] == arch and props["cifar_stem"] == stem and props["in_channels"] == str(channels)


def test_an_onnx_model_that_disagrees_is_refused_and_an_earlier_export_kept(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import fastclr.export as export_mod

    enc = build_encoder("cnn", 1, 28, 0.25, "auto", "32|256|fc512")
    spec = EncoderSpec("cnn", 1, 28, 1.0, "auto", 0, (0.5,), (0.25,))
    out = tmp_path / "enc.onnx"
    monkeypatch.setattr(export_mod, "ONNX_TOLERANCE", -1.0)  # no model can meet it: the check must refuse
    with pytest.raises(FastclrError, match="differs from PyTorch's"):
        export_encoder(enc, spec, "", "onnx", out)
    assert not out.exists()
    monkeypatch.undo()
    export_encoder(enc, spec, "", "onnx", out)
    good = out.read_bytes()
    monkeypatch.setattr(export_mod, "ONNX_TOLERANCE", -1.0)
    with pytest.raises(FastclrError, match="not written"):
        export_encoder(enc, spec, "", "onnx", out)
    assert out.read_bytes() == good  # the refused model did not replace the good one


def tiny_cli_run(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """The command line's environment and a run it trained (one epoch of the tiny model, no probe)."""
    env = cli_env(tmp_path)
    run = tmp_path / "run"
    r = call_main(["pretrain", "--data", "mnist", "--epochs", "1", "--run-dir", str(run), *TINY_FLAGS, "--probe", "false"],
                  env, tmp_path)
    assert r.returncode == 0, r.stderr
    return env, run


def test_export_command_checks_onnx_on_the_runs_own_images(tmp_path: Path) -> None:
    env, run = tiny_cli_run(tmp_path)
    r = call_main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "h.onnx")], env, tmp_path)
    assert r.returncode == 0 and "onnxruntime's h equals PyTorch's on 64 of the run's images" in r.stdout, r.stderr


def test_export_to_onnx_of_a_run_whose_data_is_not_here_is_checked_on_random_images(tmp_path: Path) -> None:
    """A run directory copied to another machine (or its store moved): the other formats were written
    and ONNX refused, its check wanting the run's images; it is checked on random ones, with a note."""
    import onnxruntime

    env, run = tiny_cli_run(tmp_path)
    (tmp_path / "data" / "mnist").rename(tmp_path / "moved")
    r = call_main(["export", str(run), "--out", str(tmp_path / "h.onnx")], env, tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("note: the run's images are not here to check the ONNX file on (mnist files not found")
    assert r.stdout.endswith(f"wrote {tmp_path / 'h.onnx'} (onnxruntime's h equals PyTorch's on random images)\n")
    enc, spec = load_encoder(run / "encoder.safetensors")
    x = torch.randn(5, spec.in_channels, spec.image_size, spec.image_size)
    runtime = onnxruntime.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(runtime.run(None, {"x": x.numpy()})[0]), enc.eval()(x),
                                   rtol=1e-4, atol=1e-4)


def test_exports_that_cannot_be_written_here_are_refused_before_any_work(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """torchvision's names for a half-width ResNet (100 of 120 tensors of the wrong shape, written
    without a word); ONNX without onnxscript (a traceback from inside torch, after the data was read);
    an --out over the run's own encoder or a checkpoint (replaced, and the run lost)."""
    from fastclr.cli import main
    from fastclr.export import check_export

    half = EncoderSpec("resnet18", 3, 32, 0.5, "on", 256, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(FastclrError, match="torchvision's ResNets have width 1, this one 0.5"):
        check_export("torchvision", half)
    check_export("torchvision", EncoderSpec("resnet18", 3, 32, 1.0, "on", 512, (0.5,) * 3, (0.25,) * 3))
    with pytest.raises(FastclrError, match="torchvision's ResNets have width 1, this one 2"):  # wider: refused too
        check_export("torchvision", EncoderSpec("resnet18", 3, 32, 2.0, "on", 1024, (0.5,) * 3, (0.25,) * 3))
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # not installed: importing it raises ImportError
    with pytest.raises(FastclrError, match=r"--format onnx needs onnx, onnxscript and onnxruntime: ") as refused:
        check_export("onnx", half)
    assert installs(str(refused.value).split(": ", 1)[1], "onnx"), str(refused.value)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    for name in ("config.toml", "encoder.safetensors", "checkpoints/step-000000005.pt"):
        (run / name).write_bytes(b"the run's own")
    for name in ("encoder.safetensors", "checkpoints/step-000000005.pt"):
        assert main(["export", str(run), "--format", "fastclr", "--out", str(run / name)]) == 2
        err = capsys.readouterr().err
        assert (f"would replace the run's own {Path(name).name}, which the run needs; choose another --out" in err
                if "/" not in name else "is in the run's checkpoints folder, which holds its checkpoints alone" in err)
        assert (run / name).read_bytes() == b"the run's own"
    assert main(["export", str(run), "--format", "fastclr", "--out", str(run / "checkpoints" / "x.safetensors")]) == 2
    assert "is in the run's checkpoints folder" in capsys.readouterr().err  # it named "the run's own x.safetensors"


@pytest.mark.parametrize(("fmt", "name", "encoder", "expected"), [
    ("auto", "enc.pt2", "cnn", "torch-export"),
    ("auto", "enc.ONNX", "cnn", "onnx"),
    ("auto", "r18.pth", "resnet18", "torchvision"),
    ("auto", "r18.safetensors", "resnet18", "fastclr"),  # what load_encoder reads, whatever the encoder
    ("auto", "enc.safetensors", "cnn", "fastclr"),
    ("torchvision", "R18.SAFETENSORS", "resnet18", "torchvision"),
    ("auto", "enc.pth", "cnn", "enc.pth: .pth is torchvision's format, for width-1 ResNets, and this run's encoder is "
                              "cnn at width 1; name it enc.safetensors, .pt2 or .onnx"),
    ("fastclr", "enc.safetensors", "cnn", "fastclr"),
    ("torch-export", "enc.onnx", "cnn", "--format torch-export writes .pt2 files; name it e.g. enc.pt2"),
    ("torchvision", "notes.txt", "resnet18", "--format torchvision writes .pth or .pt or .safetensors files"),
    ("auto", "notes.txt", "cnn", "the name says no export format; end it in .safetensors (fastclr)"),
])
def test_the_export_format_comes_from_the_name_and_must_fit_it(fmt: str, name: str, encoder: str, expected: str) -> None:
    """`export --out notes.txt` replaced the user's file with a zip archive, and `--format torch-export
    --out enc.onnx` an ONNX model with a .pt2 program; the default (torchvision) refused the default
    CNN run."""
    from fastclr.export import export_format

    spec = EncoderSpec(encoder, 1, 28, 1.0, "off", 512, (0.5,), (0.25,))
    if expected in ("torch-export", "onnx", "torchvision", "fastclr"):
        assert export_format(fmt, Path(name), spec) == expected
    else:
        with pytest.raises(FastclrError, match=re.escape(expected)):
            export_format(fmt, Path(name), spec)


def test_export_refuses_a_name_that_does_not_fit_and_leaves_the_file(tmp_path: Path) -> None:
    from fastclr.export import load_encoder

    env, run = tiny_cli_run(tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("mine", encoding="utf-8")
    r = call_main(["export", str(run), "--out", str(notes)], env, tmp_path)
    assert r.returncode == 2 and "the name says no export format" in r.stderr
    assert notes.read_text(encoding="utf-8") == "mine"
    r = call_main(["export", str(run), "--out", str(tmp_path / "enc.safetensors")], env, tmp_path)
    assert r.returncode == 0, r.stderr  # the default CNN run, with the default format
    enc, spec = load_encoder(tmp_path / "enc.safetensors")
    assert spec.encoder == "cnn" and not enc.training
    assert all(torch.equal(v, load_encoder(run / "encoder.safetensors")[0].state_dict()[k])
               for k, v in enc.state_dict().items())


def test_the_metadata_records_the_standardisation_and_the_configs_hash() -> None:
    """What every export says about itself: the architecture and input, the mean and std to
    standardise with (per channel), and the SHA-256 of the run's config.toml text, so the config that
    trained it can be told from any other."""
    import hashlib

    from fastclr.export import export_metadata

    spec = EncoderSpec("resnet18", 3, 32, 0.5, "on", 256, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    text = '[model]\nencoder = "resnet18"\n'
    meta = export_metadata(spec, text)
    assert json.loads(meta["mean"]) == [0.1, 0.2, 0.3] and json.loads(meta["std"]) == [0.4, 0.5, 0.6]
    assert (meta["architecture"], meta["image_size"], meta["in_channels"], meta["width"], meta["cifar_stem"]) == \
        ("resnet18", "32", "3", "0.5", "on")
    assert meta["config_sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert export_metadata(spec, text.replace("resnet18", "resnet34"))["config_sha256"] != meta["config_sha256"]


def test_an_onnx_model_whose_h_is_not_a_number_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN is within no tolerance: a model whose onnxruntime h is NaN where PyTorch's is a number is
    refused, and nothing is written."""
    import numpy as np
    import onnxruntime

    real = onnxruntime.InferenceSession

    class NotANumber:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.runtime = real(*args, **kwargs)  # type: ignore[arg-type]

        def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
            return [np.full_like(h, np.nan) for h in self.runtime.run(names, feeds)]

    monkeypatch.setattr(onnxruntime, "InferenceSession", NotANumber)
    enc = build_encoder("cnn", 1, 28, 0.25, "auto", "32|256|fc512")
    spec = EncoderSpec("cnn", 1, 28, 1.0, "auto", 0, (0.5,), (0.25,))
    with pytest.raises(FastclrError, match="differs from PyTorch's by nan"):
        export_encoder(enc, spec, "", "onnx", tmp_path / "enc.onnx")
    assert not (tmp_path / "enc.onnx").exists()


def test_a_refused_export_makes_no_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--format torchvision for a cnn run, into a folder not made yet: refused in one line before
    any work, and --out's folder is made only for an export that will be written."""
    from fastclr.cli import main

    run = tiny_run(tmp_path / "run", tiny_dataset())
    out = tmp_path / "new" / "dir" / "enc.pth"
    assert main(["export", str(run), "--format", "torchvision", "--out", str(out)]) == 2
    assert "exports ResNets" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_the_onnx_check_images_are_the_runs_images_as_evaluation_standardises_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime is checked on the run's test images, then training ones up to 64, standardised
    with the run's own mean and std: the encoder's h of them is `features_of` (what evaluation
    computes) for those stored images, in that order."""
    import numpy as np

    from eval_fixtures import write_tiny_idx
    from fastclr.cli import _check_images
    from fastclr.evaluation.features import encode, features_of
    from fastclr.pretrained import load_run
    from fastclr.runtime import FP32

    ds = tiny_dataset(n_test=40, name="fashion-mnist")
    assert ds.test is not None
    write_tiny_idx(tmp_path / "data" / "fashion-mnist", ds)
    monkeypatch.setenv("FASTCLR_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr("fastclr.data.datasets.SYSTEM_ROOT", tmp_path / "none")
    run = load_run(tiny_run(tmp_path / "run", ds), log=lambda s: None)
    assert run.mean.tolist() != run.std.tolist()  # else a swap of the two would go unseen
    images = np.concatenate([ds.test.images, ds.pretrain.images[:24]])
    want = features_of(run.encoder, run.spec, images, torch.device("cpu"), FP32)
    check, what = _check_images(run)
    assert check is not None and what == f"{len(images)} of the run's images"
    assert torch.allclose(encode(run.encoder, check, FP32), want, atol=1e-6)


def test_an_export_holds_a_state_only_when_it_holds_exactly_its_tensors(tmp_path: Path) -> None:
    """`export_holds` (whether a resume may delete the export as a copy of a checkpoint's encoder):
    the same tensors, yes; one tensor more, one fewer, one changed, or no file: no, never an error."""
    from fastclr.export import export_holds, save_encoder

    enc = build_encoder("cnn", 1, 28, 0.25, "auto", "32|256|fc512")
    path = save_encoder(tmp_path / "e.safetensors", enc, EncoderSpec("cnn", 1, 28, 0.25, "auto", 0, (0.5,), (0.25,)))
    state = enc.state_dict()
    first = next(iter(state))
    assert export_holds(path, state)
    assert not export_holds(path, {**state, "extra.weight": torch.zeros(1)})
    assert not export_holds(path, {k: v for k, v in state.items() if k != first})
    assert not export_holds(path, {**state, first: state[first] + 1})
    assert not export_holds(tmp_path / "none.safetensors", state)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: an encoder on another device than the CPU")
def test_an_encoder_on_a_gpu_is_exported_from_a_cpu_copy_and_left_where_it_was(tmp_path: Path) -> None:
    """The program is traced with CPU inputs: an encoder on a GPU failed with a device mismatch.
    It is traced from a CPU copy now; the program's h equals the encoder's, and the caller's module
    stays on its GPU."""
    torch.manual_seed(0)
    enc = build_encoder("cnn", 1, 28, 1.0, "auto", "32|256|fc512").cuda().eval()
    spec = EncoderSpec("cnn", 1, 28, 1.0, "auto", 512, (0.5,), (0.25,))
    out = export_encoder(enc, spec, "", "torch-export", tmp_path / "e.pt2")[0]
    assert all(p.is_cuda for p in enc.parameters())
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        got, want = torch.export.load(str(out)).module()(x), enc(x.cuda()).cpu()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)


_RECORD = ('{"encoder": "cnn", "in_channels": %s, "image_size": %s, "width": 1, "cifar_stem": "auto", "mean": [0.5], '
           '"std": [0.25]}')


@pytest.mark.parametrize("record", ['{"encoder": "cnn"', '{"encoder": "cnn"}', '["cnn"]', _RECORD % (1, '"big"'),
                                    # crafted: an OverflowError and a convolution of -3 channels, tracebacks both
                                    _RECORD % (1, "Infinity"), _RECORD % (-3, 28), _RECORD % (1, 0)])
def test_an_export_whose_fastclr_record_is_damaged_is_refused_in_one_line(tmp_path: Path, record: str) -> None:
    """Metadata that is not JSON, lacks a key, is not a record, or holds a value of the wrong
    kind ended in a JSONDecodeError, KeyError, AttributeError or ValueError traceback."""
    from safetensors.torch import save_file

    from fastclr.export import load_encoder

    save_file({"w": torch.zeros(1)}, str(tmp_path / "e.safetensors"), metadata={"fastclr": record})
    with pytest.raises(FastclrError, match=re.escape(f"{tmp_path / 'e.safetensors'} has fastclr metadata that is "
                                                     "damaged or from a version this one cannot read (")) as e:
        load_encoder(tmp_path / "e.safetensors")
    assert str(e.value).endswith("; export it again from its run") and "\n" not in str(e.value)


def test_export_encoder_from_python_refuses_what_the_command_refuses_and_leaves_the_files(tmp_path: Path) -> None:
    """`fastclr.export_encoder` from Python (as the README shows for classifiers) had none of the
    command's checks: it wrote a .pt2 archive over notes.txt, and over a run's own
    encoder.safetensors, which every command then refused to read."""
    run = tmp_path / "run"
    tiny_run(run, tiny_dataset())
    encoder, spec = load_encoder(run)
    own = (run / "encoder.safetensors").read_bytes()
    notes = tmp_path / "notes.txt"
    notes.write_text("mine", encoding="utf-8")
    with pytest.raises(FastclrError, match=re.escape(f"--out {notes}: --format torch-export writes .pt2 files")):
        export_encoder(encoder, spec, "", "torch-export", notes)
    with pytest.raises(FastclrError, match="encoder.safetensors"):
        export_encoder(encoder, spec, "", "torch-export", run / "encoder.safetensors")
    assert notes.read_text(encoding="utf-8") == "mine" and (run / "encoder.safetensors").read_bytes() == own
    assert export_encoder(encoder, spec, "", "auto", tmp_path / "enc.pt2") == [tmp_path / "enc.pt2"]  # the name's format


def test_load_encoder_names_a_wrong_device_or_a_file_of_another_kind_not_a_damaged_export(tmp_path: Path) -> None:
    """`load_encoder(run, device="gpu")` said the file was "not a readable safetensors encoder ...
    export it again", and so did a checkpoint or a .pt2 program given as the file; the device is
    checked first now, and a whole file of another kind is named as what it is."""
    from fastclr.checkpoint import list_checkpoints
    from fastclr.semisup.network import load_classifier

    run = tmp_path / "run"
    tiny_run(run, tiny_dataset())
    for device, said in [("gpu", "unknown device 'gpu'; use auto, cpu, cuda or cuda:N"),
                         ("meta", "device 'meta' holds no weights")]:
        for load in (load_encoder, load_classifier):
            with pytest.raises(FastclrError, match=re.escape(said)):
                load(run, device=device)
    checkpoint = list_checkpoints(run)[-1]
    with pytest.raises(FastclrError, match=re.escape(f"{checkpoint} is a torch archive (a checkpoint, or weights saved "
                                                     "with torch.save), not a fastclr encoder (.safetensors)")):
        load_encoder(checkpoint)
    encoder, spec = load_encoder(run, device="auto")
    program = export_encoder(encoder, spec, "", "torch-export", tmp_path / "enc.pt2")[0]
    with pytest.raises(FastclrError, match=re.escape(f"{program} is a torch.export program (.pt2), not a fastclr")):
        load_encoder(program)
    # a path that is not there was "not a readable safetensors encoder (No such file ...); export it again"
    with pytest.raises(FastclrError, match=re.escape(f"{tmp_path / 'nope'} does not exist; give a run directory or an "
                                                     "encoder file")):
        load_encoder(tmp_path / "nope")
    # a classifier, fastclr's own file of another kind: it was "of another architecture ... re-export it"
    # (a torchvision-names export: test_foreign_weights.py)
    from fastclr.semisup.network import Classifier, save_classifier

    classifier = save_classifier(tmp_path / "classifier.safetensors",
                                 Classifier(encoder, torch.nn.Sequential(), torch.nn.Linear(spec.feature_dim, 3)), spec,
                                 ["a", "b", "c"])
    with pytest.raises(FastclrError, match=re.escape(f"{classifier} is a classifier (`fastclr finetune` or `distill`); "
                                                     "load it with fastclr.load_classifier")):
        load_encoder(classifier)
    assert load_classifier(classifier)[0].fc.out_features == 3  # (what that line sends the user to)
