"""The encoder f alone, exported as safetensors (no pickle: loading it cannot run code).

Metadata (strings) records how to rebuild the module: encoder name, input channels and size,
width, stem, feature dimension, the input standardisation, the library version and a checksum of
the weights.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from fastclr.extras import install_command
from fastclr.files import atomic_write, atomic_write_all, through_link
from fastclr.errors import FastclrError
from fastclr.models import EncoderSpec, encoder_from_spec
from fastclr.tensor_file import safetensors_writer, weights_sha256
from fastclr.models.modes import in_eval_mode
from fastclr.version import __version__

ENCODER_FILE = "encoder.safetensors"


def save_encoder(path: Path, encoder: nn.Module, spec: EncoderSpec, data_content: str = "",
                 checkpoint_step: int | None = None) -> Path:
    """Write the encoder's state and its spec (as JSON metadata) to `path`; `data_content`: the
    content identity of the store it was trained on (`Dataset.content`), read by `exported_data_content`;
    `checkpoint_step`: the step of the checkpoint it came from, for a run that had not finished.
    `weights_sha256` (`tensor_file.weights_sha256`) lets `load_encoder` and `--init` refuse a file
    whose numbers changed after it was written: a bit flipped on disk still parses, and loads."""
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    info = dict(spec.to_dict(), fastclr_version=__version__, weights_sha256=weights_sha256(state),
                **({"data_content": data_content} if data_content else {}),
                **({"checkpoint_step": checkpoint_step} if checkpoint_step is not None else {}))
    meta = {"fastclr": json.dumps(info)}
    atomic_write(path, safetensors_writer(state, meta))
    return path


def exported_data_content(path: Path) -> str:
    """The data content identity an export records ("" when it records none or cannot be read:
    `load_encoder` says what is wrong with it)."""
    from fastclr.models.foreign import safetensors_metadata

    info = safetensors_metadata(path).get("fastclr")
    return str(info.get("data_content", "")) if isinstance(info, dict) else ""


def export_holds(path: Path, state: dict[str, torch.Tensor]) -> bool:
    """Whether the export at `path` holds exactly the encoder weights `state` (unreadable: no)."""
    try:
        held = load_file(str(path))
    except (SafetensorError, OSError, ValueError):
        return False
    return held.keys() == state.keys() and all(torch.equal(held[k], state[k].cpu()) for k in held)


class UnreadableExport(FastclrError):
    """An exported encoder file that cannot be read as one (damaged, cut short, or metadata this
    version cannot read); `reason` says why, without the path."""

    def __init__(self, path: Path, reason: str, where: str = "") -> None:
        self.path, self.reason = path, reason
        super().__init__(f"{path} {reason}; export it again{where}")


def load_encoder(path: str | Path, device: torch.device | str = "cpu", module: nn.Module | None = None
                 ) -> tuple[nn.Module, EncoderSpec]:
    """Rebuild an exported encoder, in eval mode (BatchNorm's running statistics: an image's h does
    not depend on the batch it is in; call `.train()` to fine-tune it), and return it with its
    metadata. A run trained on your own module (`pretrain(cfg, encoder=...)`, spec "custom") cannot
    be rebuilt by name: pass a module of that architecture as `module` and its weights are loaded
    into it. `path` may be a run directory: its encoder.safetensors."""
    from fastclr.runtime import loading_device

    path, device = Path(path), loading_device(device)
    if not path.exists():  # not a damaged export: nothing to export again
        raise FastclrError(f"{path} does not exist; give a run directory or an encoder file")
    if path.is_dir():
        if not (path / ENCODER_FILE).is_file():
            raise FastclrError(f"{path} is a directory without {ENCODER_FILE}; give a run directory whose "
                               "pretraining finished, or the encoder file itself")
        path = path / ENCODER_FILE
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        other = _other_kind(path)
        if other:  # a whole file of another kind: "export it again" sent the user the wrong way
            raise FastclrError(f"{path} is {other}, not a fastclr encoder (.safetensors); give the run directory or "
                               f"its {ENCODER_FILE} (a run's encoder in that form: `fastclr export RUN --out "
                               "enc.safetensors`)") from None
        raise UnreadableExport(path, f"is not a readable safetensors encoder ({e})") from None
    if meta.get("naming") == "torchvision":  # fastclr's export in torchvision's names: for torchvision, not here
        raise FastclrError(f"{path} holds a ResNet in torchvision's parameter names (`fastclr export --format "
                           "torchvision`), for torchvision's resnet; give the run directory or its own "
                           f"{ENCODER_FILE} to load it here")
    if "classifier" in meta:  # finetune's or distill's: its state holds a neck and fc beside the encoder
        raise FastclrError(f"{path} is a classifier (`fastclr finetune` or `distill`); load it with "
                           "fastclr.load_classifier")
    if "fastclr" not in meta:
        raise FastclrError(f"{path} carries no fastclr metadata; it was not exported by fastclr")
    try:
        info = json.loads(meta["fastclr"])
        spec = EncoderSpec.from_dict(info)
    except (ValueError, KeyError, TypeError, AttributeError, OverflowError) as e:  # AttributeError: a record that is not a dict
        raise UnreadableExport(path, f"has fastclr metadata that is damaged or from a version this one cannot read "
                                     f"({type(e).__name__}: {e})", " from its run") from None
    recorded = info.get("weights_sha256")  # exports of earlier versions record none: they load unchecked
    if recorded is not None and weights_sha256(state) != recorded:
        raise UnreadableExport(path, "is damaged: its weights differ from the checksum written with them", " from its run")
    if module is None and not spec.rebuildable:
        raise FastclrError(f"{path} holds your own encoder module (trained with pretrain(cfg, encoder=...)), which "
                           "cannot be rebuilt by name: in Python, fastclr.load_encoder(path, module=your_module); the "
                           "command line cannot load it")
    encoder = module if module is not None else encoder_from_spec(spec)
    try:
        encoder.load_state_dict(state)
    except RuntimeError:
        if module is not None:
            raise FastclrError(f"{path} does not fit the module given: its weights are of another architecture") from None
        raise FastclrError(
            f"{path} does not match the {spec.encoder} architecture of this fastclr version "
            f"(exported by {info.get('fastclr_version', '?')}); re-export it with that version"
        ) from None
    return encoder.to(device).eval(), spec


def _other_kind(path: Path) -> str:
    """What a file `load_encoder` cannot read is, where it is whole and of a kind fastclr writes:
    a torch archive (a checkpoint, a torchvision-names export, a .pt2 program) or an ONNX model."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return ""
    if head == b"PK\x03\x04":
        return "a torch.export program (.pt2)" if path.suffix.lower() == ".pt2" else \
            "a torch archive (a checkpoint, or weights saved with torch.save)"
    return "an ONNX model" if path.suffix.lower() == ".onnx" else ""


FORMATS = ("fastclr", "torchvision", "torch-export", "onnx")
"""What `fastclr export` writes: fastclr's own safetensors (what `load_encoder` reads), a ResNet
in torchvision's (and timm's) parameter names, a `torch.export` program (.pt2) that
`torch.export.load` runs without fastclr installed, or an ONNX model (the `onnx` extra)."""
ONNX_TOLERANCE = 1e-4
"""Largest difference allowed between onnxruntime's h and PyTorch's (fp32) in the check after writing."""


def _batch_dim() -> tuple[dict[int, object]]:
    """The input's batch dimension is dynamic: the program takes any B >= 1. Built when exporting,
    not at import: `torch.export.Dim` imports sympy, which added about a second to every command."""
    return ({0: torch.export.Dim("batch", min=1)},)


def _example(spec: EncoderSpec) -> torch.Tensor:
    return torch.zeros(2, spec.in_channels, spec.image_size, spec.image_size)


def _save_program(encoder: nn.Module, spec: EncoderSpec, meta: dict[str, str], out: Path) -> Path:
    """The encoder in eval mode as a torch.export program with a dynamic batch dimension; the
    metadata travels inside the archive as `extra/fastclr.json`. Input: float32 (B, C, S, S)
    standardised with the metadata's mean and std; output: h (B, D)."""
    with in_eval_mode(encoder):
        program = torch.export.export(encoder, (_example(spec),), dynamic_shapes=_batch_dim())
    buf = io.BytesIO()
    torch.export.save(program, buf, extra_files={"fastclr.json": json.dumps(dict(meta, naming="fastclr"))})
    data = buf.getvalue()
    atomic_write(out, lambda f: f.write(data))
    return out


def _save_onnx(encoder: nn.Module, spec: EncoderSpec, meta: dict[str, str], out: Path,
               check: torch.Tensor | None) -> Path:
    """The encoder in eval mode as ONNX (torch's dynamo exporter, dynamic batch, input `x`, output
    `h`), the metadata as the model's metadata_props; the serialised model is run in onnxruntime on
    `check` (standardised images) and refused, with any earlier file at `out` left as it was, if it
    differs from PyTorch by more than ONNX_TOLERANCE."""
    check_export(fmt="onnx", spec=spec)
    import onnx
    import onnxruntime
    x = (check if check is not None else torch.randn(3, spec.in_channels, spec.image_size, spec.image_size)).float()
    quiet = logging.getLogger("torch.onnx")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it lists every torchvision operator it cannot register
    try:
        with in_eval_mode(encoder), torch.no_grad(), warnings.catch_warnings():
            # torch 2.13's exporter warns about its own use of a deprecated pytree class (LeafSpec)
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            program = torch.onnx.export(encoder, (_example(spec),), dynamo=True, input_names=["x"],
                                        output_names=["h"], dynamic_shapes=_batch_dim(), verbose=False)
            want = encoder(x)
    finally:
        quiet.setLevel(level)
    assert program is not None  # dynamo=True always returns one
    model = program.model_proto
    onnx.helper.set_model_props(model, dict(meta, naming="fastclr"))
    data = model.SerializeToString()
    # Checked on the bytes the file will hold, before it replaces anything at `out`.
    runtime = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(runtime.run(["h"], {"x": x.numpy()})[0])
    gap = float((got - want).abs().max())
    if not gap <= ONNX_TOLERANCE:
        raise FastclrError(f"the ONNX model's h differs from PyTorch's by {gap:.2e} (> {ONNX_TOLERANCE:g}) on "
                           f"{len(x)} images; not written; export --format torch-export instead")
    atomic_write(out, lambda f: f.write(data))
    return out


def export_metadata(spec: EncoderSpec, config_text: str, checkpoint_step: int | None = None) -> dict[str, str]:
    """What every export says about itself: the architecture, input, standardisation, version,
    the SHA-256 of the run's config and, for a run that had not finished, the step of the
    checkpoint its weights came from (a file passed on says what it is without its run)."""
    step = {"checkpoint_step": str(checkpoint_step)} if checkpoint_step is not None else {}
    return {**step, "architecture": spec.encoder, "image_size": str(spec.image_size), "in_channels": str(spec.in_channels),
            "mean": json.dumps(list(spec.mean)), "std": json.dumps(list(spec.std)), "width": str(spec.width),
            "cifar_stem": spec.cifar_stem, "fastclr_version": __version__,
            "config_sha256": hashlib.sha256(config_text.encode()).hexdigest()}


_FULL_WIDTH = "pretrain with --width 1: on a CPU a ResNet trains at a quarter of its width unless told"
"""How a narrow ResNet run gets torchvision's shapes, said by both refusals of its torchvision export."""


def check_export(fmt: str, spec: EncoderSpec) -> None:
    """One line, before any work, when `fmt` cannot be written for this encoder here: an unknown
    format, ONNX's packages missing (torch's exporter needs onnxscript too), or torchvision's names
    for what is not one of torchvision's ResNets (another encoder, or another width)."""
    if fmt not in FORMATS:
        raise FastclrError(f"unknown export format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError:
            raise FastclrError(f"--format onnx needs onnx, onnxscript and onnxruntime: {install_command('onnx')}") from None
    if fmt == "torchvision":
        if not spec.encoder.startswith("resnet"):
            raise FastclrError(f"--format torchvision exports ResNets; this run's encoder is {spec.encoder}: "
                               "use --format fastclr")
        if spec.width != 1.0:
            raise FastclrError(f"--format torchvision: torchvision's ResNets have width 1, this one {spec.width:g} (its "
                               f"tensors would not fit them); use --format fastclr, torch-export or onnx, or {_FULL_WIDTH}")


SUFFIXES = {"fastclr": (".safetensors",), "torchvision": (".pth", ".pt", ".safetensors"), "torch-export": (".pt2",),
            "onnx": (".onnx",)}
"""The file names each format is written under: another name (a mistyped --out, someone's notes.txt)
would be replaced by an archive its name does not announce."""


def export_format(fmt: str, out: Path, spec: EncoderSpec) -> str:
    """The format to write `out` in: `fmt`, or for "auto" the one its suffix names (.safetensors:
    fastclr's, which `load_encoder` reads; .pth/.pt: torchvision's names; .pt2: torch-export;
    .onnx: onnx). One line when the suffix does not fit the format, or names none."""
    suffix = out.suffix.lower()
    if fmt == "auto":
        named = next((f for f in ("fastclr", "torch-export", "onnx", "torchvision") if suffix in SUFFIXES[f]), None)
        if named is None:
            raise FastclrError(f"--out {out}: the name says no export format; end it in .safetensors (fastclr), "
                               ".pth (torchvision), .pt2 (torch-export) or .onnx, or give --format")
        if named == "torchvision" and not (spec.encoder.startswith("resnet") and spec.width == 1.0):
            narrow = f" (or {_FULL_WIDTH})" if spec.encoder.startswith("resnet") else ""
            raise FastclrError(f"--out {out}: {suffix} is torchvision's format, for width-1 ResNets, and this run's "
                               f"encoder is {spec.encoder} at width {spec.width:g}; name it "
                               f"{out.with_suffix('.safetensors').name}, .pt2 or .onnx{narrow}")
        return named
    if fmt in SUFFIXES and suffix not in SUFFIXES[fmt]:
        raise FastclrError(f"--out {out}: --format {fmt} writes {' or '.join(SUFFIXES[fmt])} files; "
                           f"name it e.g. {out.with_suffix(SUFFIXES[fmt][0]).name}")
    return fmt


def export_encoder(encoder: nn.Module, spec: EncoderSpec, config_text: str, fmt: str, out: Path,
                   check: torch.Tensor | None = None, data_content: str = "",
                   checkpoint_step: int | None = None) -> list[Path]:
    """Write `encoder` as `fmt` to `out` ("auto": the format its name says); returns the files written.

    torchvision: the state dict in torchvision's names without `fc`, so
    `torchvision.models.resnet50().load_state_dict(sd, strict=False)` misses only `fc.*`;
    `.safetensors` carries the metadata inside, any other suffix is a `torch.save` of the plain
    dict (what torchvision's own weights are) with the metadata in OUT.json beside it. A CIFAR
    stem is said in the metadata (`cifar_stem: on`): torchvision's own stem is 7x7, stride 2.
    onnx: checked after writing on `check` (standardised (B, C, S, S) images; random ones if None).
    fastclr: as the run's own export, with the data's content identity `data_content`.
    `checkpoint_step`: recorded in every format's metadata when the weights are a checkpoint's."""
    from fastclr.models.foreign import torchvision_state
    from fastclr.runs import refuse_output

    # A link named as --out (latest.pt into a models folder) is written through: the format, the checks and the
    # sidecar's name follow the file it leads to, not the link (the rename made the link a plain file)
    out = through_link(out)
    # What `fastclr export` checks before its work, for a call from Python too: a name of another
    # kind (notes.txt) or a run's own encoder.safetensors was replaced by an archive.
    refuse_output(out)
    fmt = export_format(fmt, out, spec)
    check_export(fmt, spec)
    meta = export_metadata(spec, config_text, checkpoint_step)
    if fmt == "fastclr":
        return [save_encoder(out, encoder, spec, data_content=data_content, checkpoint_step=checkpoint_step)]
    if fmt in ("torch-export", "onnx"):  # traced on a CPU copy: the program runs anywhere, the caller's module stays put
        on_cpu = all(t.device.type == "cpu" for t in encoder.state_dict().values())
        traced = encoder if on_cpu else copy.deepcopy(encoder).cpu()
        if fmt == "torch-export":
            return [_save_program(traced, spec, meta, out)]
        return [_save_onnx(traced, spec, meta, out, check if check is None else check.cpu())]
    state = torchvision_state(encoder)
    if out.suffix.lower() == ".safetensors":
        atomic_write(out, safetensors_writer(state, dict(meta, naming="torchvision")))
        return [out]
    side = out.with_name(out.name + ".json")
    text = json.dumps(dict(meta, naming="torchvision"), indent=2) + "\n"
    atomic_write_all([(out, lambda f: torch.save(state, f)), (side, lambda f: f.write(text.encode("utf-8")))])
    return [out, side]
