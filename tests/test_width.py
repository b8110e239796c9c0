"""`--width` auto (0, the default): a ResNet on a CPU trains at a quarter of its channels, every
other encoder and any encoder on a GPU at its full width; a run records the width it trained at,
and a resume keeps it whatever its own device would choose."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from fastclr.cli import main as cli_main
from fastclr.config import Config, apply_overrides, read_toml
from fastclr.errors import FastclrError
from fastclr.export import export_encoder, export_format
from fastclr.models import EncoderSpec, build_encoder, resolve_width
from fastclr.models.foreign import recorded_width, torchvision_state
from fastclr.pretraining import pretrain
from tiny import tiny_config, tiny_dataset


@pytest.mark.parametrize(("width", "encoder", "device", "expected"), [
    (0.0, "resnet18", "cpu", 0.25),
    (0.0, "resnet50", "cpu", 0.25),
    (0.0, "resnet18", "cuda", 1.0),
    (0.0, "cnn", "cpu", 1.0),
    (0.0, "custom", "cpu", 1.0),  # a module passed in keeps its own channels
    (0.5, "resnet18", "cpu", 0.5),  # given: stands
    (2.0, "resnet18", "cuda", 2.0),
    (0.125, "cnn", "cuda", 0.125),
])
def test_auto_width_is_a_quarter_for_a_resnet_on_a_cpu_only(width: float, encoder: str, device: str,
                                                             expected: float) -> None:
    assert resolve_width(width, encoder, device) == expected


def _run(run_dir: Path, **over: object) -> tuple[list[str], object]:
    lines: list[str] = []
    cfg = tiny_config(run_dir, train__device="cpu", train__epochs=1.0, train__batch_size=32, **over)
    res = pretrain(cfg, dataset=tiny_dataset(64, size=32), progress=False, log=lines.append)
    return lines, res


def test_a_resnet_run_at_auto_width_on_the_cpu_trains_and_records_a_quarter_of_the_channels(tmp_path: Path) -> None:
    lines, res = _run(tmp_path / "r", model__width=0.0)  # 32 px: auto picks resnet18
    assert read_toml(tmp_path / "r" / "config.toml")["model.width"] == 0.25
    spec = res.model.spec  # type: ignore[attr-defined]
    assert (spec.encoder, spec.width) == ("resnet18", 0.25)
    encoder = res.model.encoder  # type: ignore[attr-defined]
    # ResNet-18's stem has 64 channels and its last stage 512: a quarter is 16 and 128 (h)
    assert encoder.stem[0].out_channels == 16 and spec.feature_dim == 128
    quarter = build_encoder("resnet18", 1, 32, 0.25)
    assert [(n, p.shape) for n, p in encoder.named_parameters()] == [(n, p.shape) for n, p in quarter.named_parameters()]
    assert sum(line.startswith("width 0.25: a resnet18 on a CPU") for line in lines) == 1


def test_a_cnn_run_at_auto_width_keeps_all_its_channels_and_says_nothing(tmp_path: Path) -> None:
    lines, res = _run(tmp_path / "c", model__width=0.0, model__encoder="cnn")
    assert read_toml(tmp_path / "c" / "config.toml")["model.width"] == 1.0
    assert res.model.spec.width == 1.0  # type: ignore[attr-defined]
    assert not any(line.startswith("width ") for line in lines)


def test_a_resume_at_auto_width_keeps_the_width_the_run_trained_at(tmp_path: Path) -> None:
    """0.5 is neither what this CPU would choose (0.25) nor the full width: only the checkpoint's
    config can give it."""
    run = tmp_path / "half"
    cfg = tiny_config(run, train__device="cpu", train__epochs=2.0, train__batch_size=32, model__width=0.5)
    ds = tiny_dataset(64, size=32)
    assert pretrain(cfg, dataset=ds, progress=False, log=lambda s: None, stop=lambda step: step == 2).stopped
    auto = tiny_config(run, train__device="cpu", train__epochs=2.0, train__batch_size=32, model__width=0.0)
    res = pretrain(auto, resume=run, dataset=ds, progress=False, log=lambda s: None)
    assert res.steps == 4 and res.model.spec.width == 0.5  # type: ignore[union-attr]
    assert read_toml(run / "config.toml")["model.width"] == 0.5
    full = tiny_config(run, train__device="cpu", train__epochs=3.0, train__batch_size=32, model__width=1.0)
    with pytest.raises(FastclrError, match="model.width differs from the checkpoint's config"):
        pretrain(full, resume=run, dataset=ds, progress=False, log=lambda s: None)


def test_info_json_names_the_resnet_width_pretrain_would_choose_here() -> None:
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert cli_main(["info", "--json", "--no-measure"]) == 0
    report = json.loads(buf.getvalue())
    # the device `info` reports (the CPU where a GPU is there but this torch has no kernels for it)
    assert report["resnet_width"]["choice"] == (0.25 if report["device"] == "cpu" else 1.0)


def test_the_word_auto_is_width_0_and_help_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert apply_overrides(Config(), {"model.width": "auto"}).model.width == 0.0
    assert apply_overrides(Config(), {"model.width": " AUTO "}).model.width == 0.0
    assert apply_overrides(Config(), {"model.width": "0.5"}).model.width == 0.5
    with pytest.raises(FastclrError, match="model.width must be a finite number, got 'wide'"):
        apply_overrides(Config(), {"model.width": "wide"})
    with pytest.raises(FastclrError, match="model.head_hidden must be an integer, got 'auto'"):
        apply_overrides(Config(), {"model.head_hidden": "auto"})  # no auto there: 0 means another thing
    with pytest.raises(SystemExit):
        cli_main(["pretrain", "--help"])
    assert ("model.width: channel multiplier; 0: auto (a quarter for a ResNet on a CPU, else 1; an --init file's or a "
            "resumed run's own) (default: auto (0.0))") \
        in " ".join(capsys.readouterr().out.split())


def _init_run(tmp_path: Path, init: Path) -> tuple[list[str], dict[str, object]]:
    lines: list[str] = []
    cfg = tiny_config(tmp_path / "run", train__device="cpu", train__epochs=0.5, train__batch_size=32,
                      model__width=0.0, model__init=str(init))
    pretrain(cfg, dataset=tiny_dataset(64, size=32), progress=False, log=lines.append)
    return lines, read_toml(tmp_path / "run" / "config.toml")


def test_auto_width_with_init_takes_a_torchvision_files_full_width_on_a_cpu(tmp_path: Path) -> None:
    """A torchvision or timm ResNet has width 1: at auto the run builds that network, not the
    quarter the CPU would choose (which the file's tensors would not fit)."""
    src = build_encoder("resnet18", 1, 32, 1.0)
    path = tmp_path / "r18.pth"
    torch.save(torchvision_state(src), path)
    assert recorded_width(path) is None
    lines, saved = _init_run(tmp_path, path)
    assert saved["model.width"] == 1.0
    assert any(line.startswith("init from") and "missing none" in line for line in lines)
    said = [line for line in lines if line.startswith("width ")]
    assert said == [f"width 1: that of the network in {path} (--init), not the 0.25 `auto` gives a resnet18 on this "
                    "device"]


def test_an_unreadable_init_file_is_refused_without_a_width_line_first(tmp_path: Path) -> None:
    """The width line named the network "in" a file the next line refused as unreadable."""
    path = tmp_path / "cut.pth"
    torch.save(torchvision_state(build_encoder("resnet18", 1, 32, 1.0)), path)
    path.write_bytes(path.read_bytes()[:5000])
    lines: list[str] = []
    cfg = tiny_config(tmp_path / "run", train__device="cpu", train__epochs=0.5, train__batch_size=32,
                      model__width=0.0, model__init=str(path))
    with pytest.raises(FastclrError, match="cannot be read"):
        pretrain(cfg, dataset=tiny_dataset(64, size=32), progress=False, log=lines.append)
    assert not [line for line in lines if line.startswith("width ")], lines


def test_auto_width_with_init_takes_the_width_a_fastclr_export_records(tmp_path: Path) -> None:
    """0.5 is neither the CPU's choice (0.25) nor a torchvision file's (1): only the export's
    metadata gives it."""
    src = build_encoder("resnet18", 1, 32, 0.5)
    spec = EncoderSpec("resnet18", 1, 32, 0.5, "on", 256, (0.5,), (0.25,))
    path = export_encoder(src, spec, "", "fastclr", tmp_path / "half.safetensors")[0]
    assert recorded_width(path) == 0.5
    lines, saved = _init_run(tmp_path, path)
    assert saved["model.width"] == 0.5
    assert any(line.startswith("init from") and "missing none" in line for line in lines)


def test_a_torchvision_export_of_a_narrow_resnet_is_refused_naming_width_1(tmp_path: Path) -> None:
    quarter = EncoderSpec("resnet18", 3, 32, 0.25, "on", 128, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(FastclrError, match=r"or \.onnx \(or pretrain with --width 1: on a CPU a ResNet trains"):
        export_format("auto", tmp_path / "r18.pth", quarter)
    cnn = EncoderSpec("cnn", 1, 28, 1.0, "n/a", 512, (0.5,), (0.25,))
    with pytest.raises(FastclrError) as err:
        export_format("auto", tmp_path / "enc.pth", cnn)
    assert "--width 1" not in str(err.value)  # no width makes a cnn a torchvision ResNet
