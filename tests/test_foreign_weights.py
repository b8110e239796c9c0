"""Weights in torchvision's and timm's names, both ways: `fastclr export --format torchvision` and
`fastclr pretrain --init FILE`.

torchvision cannot be installed beside this torch, so its ResNet state dicts are written out here
as torchvision's model definition makes them (torchvision/models/resnet.py: `conv1`, `bn1`,
`layer1..4` of BasicBlock or Bottleneck with `downsample` = 1x1 conv + BN in the first block of a
stage that changes shape, `fc`; ResNet-50 v1.5 strides in the 3x3). Each line: a convolution's
weight shape, or a BatchNorm's channels (its five entries are torch's BatchNorm2d state).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import call_main, cli_env
from fastclr.errors import FastclrError, first_sentence
from fastclr.export import export_encoder
from fastclr.models import build_encoder
from fastclr.models.foreign import apply_init, read_init, torchvision_state
from fastclr.models.spec import EncoderSpec

_R18 = """
conv1 64 3 7 7 | bn1 64
layer1.0.conv1 64 64 3 3 | layer1.0.bn1 64 | layer1.0.conv2 64 64 3 3 | layer1.0.bn2 64
layer1.1.conv1 64 64 3 3 | layer1.1.bn1 64 | layer1.1.conv2 64 64 3 3 | layer1.1.bn2 64
layer2.0.conv1 128 64 3 3 | layer2.0.bn1 128 | layer2.0.conv2 128 128 3 3 | layer2.0.bn2 128
layer2.0.downsample.0 128 64 1 1 | layer2.0.downsample.1 128
layer2.1.conv1 128 128 3 3 | layer2.1.bn1 128 | layer2.1.conv2 128 128 3 3 | layer2.1.bn2 128
layer3.0.conv1 256 128 3 3 | layer3.0.bn1 256 | layer3.0.conv2 256 256 3 3 | layer3.0.bn2 256
layer3.0.downsample.0 256 128 1 1 | layer3.0.downsample.1 256
layer3.1.conv1 256 256 3 3 | layer3.1.bn1 256 | layer3.1.conv2 256 256 3 3 | layer3.1.bn2 256
layer4.0.conv1 512 256 3 3 | layer4.0.bn1 512 | layer4.0.conv2 512 512 3 3 | layer4.0.bn2 512
layer4.0.downsample.0 512 256 1 1 | layer4.0.downsample.1 512
layer4.1.conv1 512 512 3 3 | layer4.1.bn1 512 | layer4.1.conv2 512 512 3 3 | layer4.1.bn2 512
"""

_R50_FIRST = """
layer1.0.conv1 64 64 1 1 | layer1.0.bn1 64 | layer1.0.conv2 64 64 3 3 | layer1.0.bn2 64 | layer1.0.conv3 256 64 1 1
layer1.0.bn3 256 | layer1.0.downsample.0 256 64 1 1 | layer1.0.downsample.1 256
layer2.0.conv1 128 256 1 1 | layer2.0.bn1 128 | layer2.0.conv2 128 128 3 3 | layer2.0.bn2 128 | layer2.0.conv3 512 128 1 1
layer2.0.bn3 512 | layer2.0.downsample.0 512 256 1 1 | layer2.0.downsample.1 512
layer3.0.conv1 256 512 1 1 | layer3.0.bn1 256 | layer3.0.conv2 256 256 3 3 | layer3.0.bn2 256 | layer3.0.conv3 1024 256 1 1
layer3.0.bn3 1024 | layer3.0.downsample.0 1024 512 1 1 | layer3.0.downsample.1 1024
layer4.0.conv1 512 1024 1 1 | layer4.0.bn1 512 | layer4.0.conv2 512 512 3 3 | layer4.0.bn2 512 | layer4.0.conv3 2048 512 1 1
layer4.0.bn3 2048 | layer4.0.downsample.0 2048 1024 1 1 | layer4.0.downsample.1 2048
"""
_R50_REST = """
layer1.J.conv1 64 256 1 1 | layer1.J.bn1 64 | layer1.J.conv2 64 64 3 3 | layer1.J.bn2 64 | layer1.J.conv3 256 64 1 1 | layer1.J.bn3 256
layer2.J.conv1 128 512 1 1 | layer2.J.bn1 128 | layer2.J.conv2 128 128 3 3 | layer2.J.bn2 128 | layer2.J.conv3 512 128 1 1 | layer2.J.bn3 512
layer3.J.conv1 256 1024 1 1 | layer3.J.bn1 256 | layer3.J.conv2 256 256 3 3 | layer3.J.bn2 256 | layer3.J.conv3 1024 256 1 1 | layer3.J.bn3 1024
layer4.J.conv1 512 2048 1 1 | layer4.J.bn1 512 | layer4.J.conv2 512 512 3 3 | layer4.J.bn2 512 | layer4.J.conv3 2048 512 1 1 | layer4.J.bn3 2048
"""
_R50_BLOCKS = {"layer1": 3, "layer2": 4, "layer3": 6, "layer4": 3}


def _expand(text: str) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for item in (i.split() for line in text.strip().splitlines() for i in line.split("|")):
        name, dims = item[0], tuple(int(d) for d in item[1:])
        if len(dims) == 4:
            out[f"{name}.weight"] = dims
        else:
            for k in ("weight", "bias", "running_mean", "running_var"):
                out[f"{name}.{k}"] = dims
            out[f"{name}.num_batches_tracked"] = ()
    return out


def torchvision_keys(arch: str) -> dict[str, tuple[int, ...]]:
    """torchvision's resnet18 / resnet50 state dict without `fc`, as names and shapes."""
    keys = _expand("conv1 64 3 7 7 | bn1 64")
    if arch == "resnet18":
        keys.update(_expand(_R18))
        return keys
    keys.update(_expand(_R50_FIRST))
    for line in _R50_REST.strip().splitlines():
        layer = line.split(".")[0]
        for j in range(1, _R50_BLOCKS[layer]):
            keys.update(_expand(line.replace(".J.", f".{j}.")))
    return keys


def test_the_literal_tables_have_torchvisions_counts() -> None:
    # With fc.weight and fc.bias, torchvision's resnet18 state dict has 122 entries and resnet50's 320.
    assert len(torchvision_keys("resnet18")) + 2 == 122
    assert len(torchvision_keys("resnet50")) + 2 == 320


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_export_has_torchvisions_names_and_shapes(arch: str) -> None:
    enc = build_encoder(arch, 3, 224, 1.0, "off")
    state = torchvision_state(enc)
    assert {k: tuple(v.shape) for k, v in state.items()} == torchvision_keys(arch)


def _perturbed(arch: str, stem: str = "off") -> torch.nn.Module:
    torch.manual_seed(3)
    enc = build_encoder(arch, 3, 224 if stem == "off" else 32, 1.0, stem)
    with torch.no_grad():
        for t in enc.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return enc


@pytest.mark.parametrize("layout", ["torchvision", "timm-ddp-wrapped", "fastclr-export"])
def test_init_from_a_file_gives_bit_equal_weights(layout: str, tmp_path: Path) -> None:
    src = _perturbed("resnet18")
    tv = torchvision_state(src)
    if layout == "torchvision":
        path = tmp_path / "r18.pth"
        torch.save({**tv, "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, path)
    elif layout == "timm-ddp-wrapped":  # timm's ResNet names are torchvision's; DDP adds module.
        path = tmp_path / "r18.tar"
        torch.save({"state_dict": {f"module.{k}": v for k, v in tv.items()}, "epoch": 90}, path)
    else:
        spec = EncoderSpec("resnet18", 3, 224, 1.0, "off", 512, (0.5,) * 3, (0.25,) * 3)
        path = export_encoder(src, spec, "", "fastclr", tmp_path / "encoder.safetensors")[0]
    fresh = build_encoder("resnet18", 3, 224, 1.0, "off")
    init = read_init(path, fresh)
    apply_init(fresh, init)
    for (k, a), (k2, b) in zip(src.state_dict().items(), fresh.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert not init.missing and len(init.tensors) == 120
    assert init.skipped == (["fc.weight", "fc.bias"] if layout == "torchvision" else [])
    assert init.naming == ("fastclr" if layout == "fastclr-export" else "torchvision/timm")


def test_bad_init_files_are_one_line_errors(tmp_path: Path) -> None:
    target = build_encoder("resnet18", 3, 224, 1.0, "off")
    r50 = tmp_path / "r50.pth"
    torch.save(torchvision_state(_perturbed("resnet50")), r50)
    # a kernel other than the stem's is another network, not another stem (which the hint said of any kernel)
    with pytest.raises(FastclrError, match=r"tensor layer1.0.conv1.weight has shape \(64, 64, 1, 1\) but the encoder's "
                                           r"stages.0.0.conv1.weight is \(64, 64, 3, 3\) \(another kernel size: a network of another design\)"):
        read_init(r50, target)
    cifar = tmp_path / "cifar.pth"
    torch.save(torchvision_state(_perturbed("resnet18", "on")), cifar)
    with pytest.raises(FastclrError, match=r"conv1.weight has shape \(64, 3, 3, 3\).*CIFAR stem"):
        read_init(cifar, target)
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes(r50.read_bytes()[:5000])
    with pytest.raises(FastclrError, match="cannot be read.*truncated"):
        read_init(truncated, target)
    truncated.write_bytes(r50.read_bytes()[:100])
    with pytest.raises(FastclrError, match="cannot be read.*truncated") as cut:
        read_init(truncated, target)
    # torch's message quoted to the end of its first sentence, not cut mid-word after 160 characters
    assert "(PytorchStreamReader failed reading zip archive: failed finding central directory); the file" \
        in str(cut.value)
    # no pickle at all: torch's legacy reader raised KeyError / IndexError, told as a traceback
    for text in ("hello world\n", "root:x:0:0:root:/root:/bin/bash\n"):
        truncated.write_text(text)
        with pytest.raises(FastclrError, match=r"cannot be read \(.*\); the file is truncated or not a state dict"):
            read_init(truncated, target)
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (open, (str(marker), "w"))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"conv1.weight": Evil()}))
    with pytest.raises(FastclrError, match="refused unread"):
        read_init(evil, target)
    assert not marker.exists()
    other = tmp_path / "vit.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3, 3)}, other)
    with pytest.raises(FastclrError, match="share no tensor name"):
        read_init(other, target)
    with pytest.raises(FastclrError, match="not the 00"):
        read_init(r50, target, expect_sha256="00" * 32)
    import hashlib

    r18 = tmp_path / "r18.pth"
    torch.save(torchvision_state(_perturbed("resnet18")), r18)
    assert read_init(r18, target, expect_sha256=hashlib.sha256(r18.read_bytes()).hexdigest().upper()).tensors
    # Another depth: ResNet-34's first two blocks of each stage have ResNet-18's names and shapes.
    r34 = build_encoder("resnet34", 3, 224, 1.0, "off")
    deeper = tmp_path / "r34.pth"
    torch.save(torchvision_state(r34), deeper)
    with pytest.raises(FastclrError, match=r"holds 96 tensors this encoder has no place for .*another depth"):
        read_init(deeper, target)
    with pytest.raises(FastclrError, match=r"lacks 80 of this encoder's tensors .*another depth"):
        read_init(r18, r34)
    wide = tmp_path / "wide.pth"
    torch.save(torchvision_state(build_encoder("resnet18", 3, 224, 2.0, "off")), wide)
    with pytest.raises(FastclrError, match=r"\(another --width\)"):
        read_init(wide, target)
    for suffix in (".pt2", ".onnx"):
        export = tmp_path / f"e{suffix}"
        export.write_bytes(b"PK\x03\x04 not a state dict" if suffix == ".pt2" else b"\x08\x07\x12\x07pytorch")
        with pytest.raises(FastclrError, match="for running h, not for training on"):
            read_init(export, target)


def test_pretrain_init_records_the_file_and_starts_from_it(tmp_path: Path) -> None:
    """The CLI end to end on a 28 px cnn: export of one run is the init of the next."""
    env = cli_env(tmp_path)
    flags = ["--data", "mnist", "--epochs", "1", "--width", "0.125", "--head-hidden", "32", "--proj-dim", "16",
             "--batch-size", "32", "--monitor-every", "0", "--probe", "false", "--quiet"]
    first = call_main(["pretrain", *flags, "--run-dir", str(tmp_path / "a")], env, tmp_path)
    assert first.returncode == 0, first.stderr
    src = tmp_path / "a" / "encoder.safetensors"
    second = call_main(["pretrain", *flags, "--epochs", "0.01", "--run-dir", str(tmp_path / "b"), "--init", str(src)],
                      env, tmp_path)
    assert second.returncode == 0, second.stderr
    assert "init from" in second.stdout and "fastclr names" in second.stdout and "missing none" in second.stdout
    from fastclr.config import read_toml
    from fastclr.models.foreign import file_sha256

    saved = read_toml(tmp_path / "b" / "config.toml")
    assert saved["model.init"] == str(src) and saved["model.init_sha256"] == file_sha256(src)
    bad = call_main(["pretrain", *flags, "--run-dir", str(tmp_path / "c"), "--init", str(tmp_path / "nope.pth")], env,
                   tmp_path)
    assert bad.returncode == 2 and "init weights" in bad.stderr and not (tmp_path / "c").exists()


def test_export_command_writes_torchvision_names_with_metadata(tmp_path: Path) -> None:
    spec = EncoderSpec("resnet18", 3, 32, 1.0, "on", 512, (0.5,) * 3, (0.25,) * 3)
    enc = _perturbed("resnet18", "on")
    pth, side = export_encoder(enc, spec, "[train]\n", "torchvision", tmp_path / "r18.pth")
    state = torch.load(pth, weights_only=True)
    assert list(state)[:2] == ["conv1.weight", "bn1.weight"] and tuple(state["conv1.weight"].shape) == (64, 3, 3, 3)
    import json

    meta = json.loads(side.read_text())
    assert meta["cifar_stem"] == "on" and meta["naming"] == "torchvision" and meta["architecture"] == "resnet18"
    with pytest.raises(FastclrError, match="exports ResNets"):
        export_encoder(enc, dataclass_replace(spec, encoder="cnn"), "", "torchvision", tmp_path / "x.pth")
    # a .safetensors name in any case holds the metadata inside (an upper-case one was a pickle plus a .json)
    from safetensors import safe_open

    assert export_encoder(enc, spec, "[train]\n", "torchvision", tmp_path / "R18.SAFETENSORS") == [tmp_path / "R18.SAFETENSORS"]
    with safe_open(str(tmp_path / "R18.SAFETENSORS"), framework="pt") as f:
        assert (f.metadata() or {})["naming"] == "torchvision" and "conv1.weight" in f.keys()


def test_torchvision_metadata_sits_beside_its_own_file(tmp_path: Path) -> None:
    """A .pth export's metadata is FILE.pth.json: a .pth and a .pt export in one folder each keep
    their own (one FILE.json would be shared, the second export's over the first's)."""
    import hashlib
    import json

    spec = EncoderSpec("resnet18", 3, 32, 1.0, "on", 512, (0.5,) * 3, (0.25,) * 3)
    enc = _perturbed("resnet18", "on")
    configs = {"r18.pth": "[train]\nepochs = 1\n", "r18.pt": "[train]\nepochs = 2\n"}
    sides = {name: export_encoder(enc, spec, text, "torchvision", tmp_path / name)[1] for name, text in configs.items()}
    for name, text in configs.items():
        meta = json.loads(sides[name].read_text(encoding="utf-8"))
        assert meta["config_sha256"] == hashlib.sha256(text.encode("utf-8")).hexdigest(), name


def test_a_torchvision_named_safetensors_is_refused_by_load_encoder_in_one_line(tmp_path: Path) -> None:
    """`export --format torchvision` to .safetensors holds torchvision's names: `load_encoder` says
    what the file is and what it is for, not a KeyError, nor "not exported by fastclr" (fastclr wrote
    it, in another's names)."""
    from fastclr.export import load_encoder

    spec = EncoderSpec("resnet18", 3, 32, 1.0, "on", 512, (0.5,) * 3, (0.25,) * 3)
    out = export_encoder(_perturbed("resnet18", "on"), spec, "", "torchvision", tmp_path / "r18.safetensors")[0]
    with pytest.raises(FastclrError, match=re.escape(f"{out} holds a ResNet in torchvision's parameter names (`fastclr "
                                                     "export --format torchvision`), for torchvision's resnet; give the "
                                                     "run directory or its own encoder.safetensors to load it here")):
        load_encoder(out)


def dataclass_replace(spec: EncoderSpec, **kw: str) -> EncoderSpec:
    import dataclasses

    return dataclasses.replace(spec, **kw)


def test_a_small_cnns_learned_readout_is_never_dropped_by_init(tmp_path: Path) -> None:
    """A file of a `…|fc512` network loaded into a `…|flat0` one: its readout (pool.*) was listed as
    skipped and the run started from another architecture; it is refused like another depth."""
    source = build_encoder("cnn", 1, 28, 1.0, "auto", "32|256|fc512")
    spec = EncoderSpec("cnn", 1, 28, 1.0, "n/a", source.feature_dim, (0.5,), (0.25,), "32|256|fc512")
    path = export_encoder(source, spec, "[model]\n", "fastclr", tmp_path / "fc.safetensors")[0]
    with pytest.raises(FastclrError, match="a network of another depth or shape; pick the matching"):
        read_init(path, build_encoder("cnn", 1, 28, 1.0, "auto", "32|256|flat0"))
    assert read_init(path, build_encoder("cnn", 1, 28, 1.0, "auto", "32|256|fc512")).tensors


def test_a_cnn_export_of_other_stages_is_refused_though_its_tensors_fit(tmp_path: Path) -> None:
    """An activation, a pool's place and the readout's kind have no tensors: a SiLU network's export
    loaded into the ReLU default with 'loaded 30 tensors, skipped none, missing none', and so did an
    sfc readout's into an fc one at 32 px. Both are refused in one line naming the file's stages;
    the same stages written another way (`relu:` spelled out) load."""
    cases = [("silu:32,32,32p|256p|fc512", "32,32,32p|256p|fc512", 28),
             ("32,32p|256p|sfc512", "32,32p|256p|fc512", 32)]
    for i, (theirs, ours, size) in enumerate(cases):
        source = build_encoder("cnn", 1, size, 0.25, "auto", theirs)
        spec = EncoderSpec("cnn", 1, size, 0.25, "n/a", source.feature_dim, (0.5,), (0.25,), theirs)
        path = export_encoder(source, spec, "[model]\n", "fastclr", tmp_path / f"e{i}.safetensors")[0]
        target = build_encoder("cnn", 1, size, 0.25, "auto", ours)
        assert read_init(path, target).tensors.keys() == target.state_dict().keys()  # names and shapes fit
        with pytest.raises(FastclrError, match=re.escape(f'are of the cnn {theirs!r}, and this run builds {ours!r}: '
                                                         f'the same tensors in another network; give --cnn-stages "{theirs}"')):
            read_init(path, target, stages=ours)
        same = read_init(path, build_encoder("cnn", 1, size, 0.25, "auto", theirs), stages=theirs)
        assert all(torch.equal(same.tensors[k], v) for k, v in source.state_dict().items())
    relu = build_encoder("cnn", 1, 28, 0.25, "auto", "32|256|fc512")
    spec = EncoderSpec("cnn", 1, 28, 0.25, "n/a", relu.feature_dim, (0.5,), (0.25,), "32|256|fc512")
    path = export_encoder(relu, spec, "[model]\n", "fastclr", tmp_path / "relu.safetensors")[0]
    assert read_init(path, build_encoder("cnn", 1, 28, 0.25, "auto", "32|256|fc512"), stages="relu:32|256|fc512").tensors
    # pretrain asks with the stages it builds: a run of the default from a SiLU run's export stops before it starts
    from tiny import tiny_config, tiny_dataset, tiny_run
    from fastclr.config import ModelConfig
    from fastclr.pretraining.loop import pretrain

    ds = tiny_dataset(64)
    silu = "silu:" + ModelConfig().cnn_stages
    src = tiny_run(tmp_path / "silu", ds, model__cnn_stages=silu) / "encoder.safetensors"
    with pytest.raises(FastclrError, match=re.escape(f'give --cnn-stages "{silu}"')):
        pretrain(tiny_config(tmp_path / "relu", model__init=str(src)), dataset=ds, progress=False, log=lambda s: None)
    assert not (tmp_path / "relu").exists()


def test_a_resume_keeps_how_the_run_started(tmp_path: Path) -> None:
    """--init is read by a new run only, and a learned temperature continues from its checkpoint:
    a resume given another --init (or --temperature) trained on as before while config.toml recorded
    the new file with an empty checksum (or the new start). The run's own start is kept, and a
    different one said in a note; the same --init again (a job script run twice) says nothing."""
    import shutil

    from tiny import tiny_config, tiny_dataset, tiny_run
    from fastclr.config import read_toml
    from fastclr.models.foreign import file_sha256
    from fastclr.pretraining.loop import pretrain

    ds = tiny_dataset(64)
    src = tiny_run(tmp_path / "a", ds) / "encoder.safetensors"
    other = tmp_path / "other.safetensors"
    shutil.copy(src, other)
    quiet: dict[str, Any] = dict(dataset=ds, progress=False)
    run = tmp_path / "b"
    over = dict(train__batch_size=32, train__epochs=1.0, model__init=str(src), train__learn_temperature=True,
                train__temperature=0.2)
    assert pretrain(tiny_config(run, **over), stop=lambda step: step == 1, log=lambda s: None, **quiet).stopped
    lines: list[str] = []
    pretrain(tiny_config(run, **over), resume=run, log=lines.append, stop=lambda step: step == 2, **quiet)
    assert not any(line.startswith("note: model.init") for line in lines)
    saved = read_toml(run / "config.toml")
    assert saved["model.init"] == str(src) and saved["model.init_sha256"] == file_sha256(src)
    lines.clear()
    pretrain(tiny_config(run, **dict(over, model__init=str(other), train__temperature=0.5)), resume=run,
             log=lines.append, **quiet)
    assert ("note: model.init, train.temperature set how a run starts, and this one continues from its checkpoint: "
            "not used, and its config.toml keeps the run's") in lines
    saved = read_toml(run / "config.toml")
    assert (saved["model.init"], saved["model.init_sha256"], saved["train.temperature"]) == \
        (str(src), file_sha256(src), 0.2)


def test_a_refused_export_leaves_no_folder_it_made(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`export --out NEW/DEEP/e.onnx` made NEW/DEEP before the export, and an export refused
    afterwards (onnxruntime's check) left the empty folders: exit 2 "with nothing written" held for
    files only. Folders that were there before stay."""
    import fastclr.export as export_mod
    from tiny import tiny_dataset, tiny_run
    from fastclr.cli import main

    run = tiny_run(tmp_path / "run", tiny_dataset(64))

    def refused(*args: object, **kw: object) -> list[Path]:
        raise FastclrError("onnxruntime's h differs from PyTorch's")
    monkeypatch.setattr(export_mod, "export_encoder", refused)
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "new" / "deep" / "e.safetensors"
    assert main(["export", str(run), "--format", "fastclr", "--out", str(out)]) == 2
    assert "onnxruntime's h differs" in capsys.readouterr().err
    assert (tmp_path / "kept").is_dir() and list((tmp_path / "kept").iterdir()) == []


def test_a_relative_init_is_recorded_as_the_file_it_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--init ex/a.safetensors` was saved as written: the run's config.toml, given to --config from
    another directory, named a file that was not there. It is recorded absolute, and that config
    starts a new run from the same file wherever it is read."""
    import dataclasses

    from tiny import tiny_config, tiny_dataset, tiny_run
    from fastclr.config import apply_overrides, Config, read_toml
    from fastclr.models.foreign import file_sha256
    from fastclr.pretraining.loop import pretrain

    ds = tiny_dataset(64)
    src = tiny_run(tmp_path / "ex" / "a", ds) / "encoder.safetensors"
    monkeypatch.chdir(tmp_path)
    quiet: dict[str, Any] = dict(dataset=ds, progress=False, log=lambda s: None)
    pretrain(tiny_config(tmp_path / "b", model__init="ex/a/encoder.safetensors", train__epochs=0.5), **quiet)
    saved = read_toml(tmp_path / "b" / "config.toml")
    assert saved["model.init"] == str(src.resolve()) and saved["model.init_sha256"] == file_sha256(src)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again = apply_overrides(Config(), saved)
    again = dataclasses.replace(again, train=dataclasses.replace(again.train, run_dir=str(tmp_path / "c")))
    pretrain(again, **quiet)
    assert read_toml(tmp_path / "c" / "config.toml")["model.init"] == str(src.resolve())


def test_a_run_that_recorded_a_relative_init_resumes_with_the_same_flag_silently(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs saved before --init was recorded absolute hold it as given: the same relative flag again
    (a job script run twice, from where it started) is the same file, not a different start."""
    from tiny import tiny_config, tiny_dataset, tiny_run
    from fastclr.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
    from fastclr.pretraining.loop import pretrain

    ds = tiny_dataset(64)
    tiny_run(tmp_path / "ex", ds)
    monkeypatch.chdir(tmp_path)
    over: dict[str, Any] = dict(model__init="ex/encoder.safetensors", train__batch_size=32, train__epochs=1.0)
    quiet: dict[str, Any] = dict(dataset=ds, progress=False)
    assert pretrain(tiny_config(tmp_path / "b", **over), stop=lambda step: step == 1, log=lambda s: None, **quiet).stopped
    path = list_checkpoints(tmp_path / "b")[-1]
    state = {k: v for k, v in load_checkpoint(path).items() if k not in ("format", "fastclr_version", "sha256")}
    state["config"]["model"]["init"] = "ex/encoder.safetensors"  # as a run of the version before recorded it
    save_checkpoint(tmp_path / "b", state)
    lines: list[str] = []
    pretrain(tiny_config(tmp_path / "b", **over), resume=tmp_path / "b", log=lines.append, **quiet)
    assert not any(line.startswith("note: model.init") for line in lines)
    other = tmp_path / "ex" / "copy.safetensors"
    other.write_bytes((tmp_path / "ex" / "encoder.safetensors").read_bytes())
    lines.clear()
    pretrain(tiny_config(tmp_path / "b", **dict(over, model__init=str(other), train__epochs=2.0)), resume=tmp_path / "b",
             log=lines.append, **quiet)
    assert any(line.startswith("note: model.init sets how a run starts") for line in lines)


@pytest.mark.parametrize("name", ["e.onnx", "e.pt2", "missing.pth"])
def test_an_init_file_that_cannot_start_a_run_is_refused_without_a_width_line_first(tmp_path: Path, name: str) -> None:
    """`--init` of an ONNX model, a torch.export program or a file that is not there printed "width 1:
    that of the network in FILE (--init)" (a torchvision file's width) before refusing it."""
    env = cli_env(tmp_path)
    if name != "missing.pth":
        (tmp_path / name).write_bytes(b"PK\x03\x04 not a state dict" if name.endswith(".pt2") else b"\x08\x07\x12\x07pytorch")
    r = call_main(["pretrain", "--data", "mnist", "--encoder", "resnet18", "--epochs", "1", "--init", str(tmp_path / name),
                   "--run-dir", str(tmp_path / "run"), "--quiet"], env, tmp_path)
    assert r.returncode == 2 and "(--init)" not in r.stdout, r.stdout
    assert r.stderr.startswith("error: ") and str(tmp_path / name) in r.stderr and not (tmp_path / "run").exists()


def test_first_sentence_quotes_a_library_message_to_its_first_full_stop_or_a_whole_word() -> None:
    assert first_sentence(RuntimeError("a failed: b. Advice follows.\nmore")) == "a failed: b"
    assert first_sentence(ValueError("no stop here.")) == "no stop here"
    assert first_sentence(OSError()) == "OSError"
    long = first_sentence(RuntimeError("word " * 40), limit=22)
    assert long == "word word word word..."
