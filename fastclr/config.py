"""The one typed configuration of a run.

`Config()` is the default run, exactly what `fastclr pretrain` without arguments trains: the
Fashion-MNIST CPU recipe. Other datasets start from their own recipe, `presets.config_for(name)`,
which holds only what differs; a TOML file overrides it and `--key value` flags override the
file. The resolved configuration is saved into every run directory and every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import tomllib
from dataclasses import Field, dataclass, field, fields
from pathlib import Path
from typing import Any

from fastclr.errors import FastclrError


@dataclass(frozen=True)
class Allowed:
    """The values a setting accepts: a closed or open range, or a list of choices."""

    low: float | None = None
    high: float | None = None
    above: bool = False
    """The range excludes `low` itself."""
    below: bool = False
    """The range excludes `high` itself."""
    choices: tuple[str, ...] = ()

    def admits(self, value: Any) -> bool:
        """Whether `value` (of the field's type) is allowed."""
        if self.choices:
            return value in self.choices
        if self.low is not None and (value < self.low or (self.above and value == self.low)):
            return False
        return self.high is None or not (value > self.high or (self.below and value == self.high))

    def describe(self) -> str:
        """'one of: a, b', '> 0', 'in [0, 1]', '>= 2'."""
        if self.choices:
            return "one of: " + ", ".join(self.choices)
        if self.high is None:
            return f"{'>' if self.above else '>='} {_number(self.low)}"
        return f"in {'(' if self.above else '['}{_number(self.low)}, {_number(self.high)}{')' if self.below else ']'}"


def _number(x: float | None) -> str:
    """0.5 -> '0.5', 4294967295 -> '4294967295' (not '4.29497e+09')."""
    return str(int(x)) if x is not None and float(x).is_integer() else f"{x:g}"


def at_least(low: float, above: bool = False) -> dict[str, Allowed]:
    """Field metadata: values >= low (> low with `above`)."""
    return {"allowed": Allowed(low=low, above=above)}


def between(low: float, high: float, above: bool = False, below: bool = False) -> dict[str, Allowed]:
    """Field metadata: values in [low, high] (open at an end with `above` / `below`)."""
    return {"allowed": Allowed(low=low, high=high, above=above, below=below)}


AUTO = "auto"
"""Field metadata key: the value the word `auto` stands for in a numeric setting whose auto is a number."""


def one_of(*choices: str) -> dict[str, Allowed]:
    """Field metadata: one of `choices`."""
    return {"allowed": Allowed(choices=choices)}


PROBABILITY = between(0, 1)

MIN_TEMPERATURE = 1e-6
"""The lowest NT-Xent temperature: a float32 cosine is rounded by up to 6e-8, which at t = 1e-6
moves a logit by 0.06 and below it by more, until 1 / t overflows (t = 1e-40 made every logit
infinite and the run stopped at its first step, after writing its directory)."""

SEED_MAX = 2**64 - 1
"""The largest seed: what torch's generators take (`manual_seed`)."""



@dataclass
class DataConfig:
    """Where the images come from."""

    name: str = field(default="fashion-mnist", metadata={"flag": "data"})
    """A built-in dataset name (fashion-mnist, mnist, cifar10, cifar100, stl10) or a store path."""
    root: str = field(default="", metadata={"flag": "data-root"})
    """A directory searched before $FASTCLR_DATA, the user cache and the system location."""
    download: bool = True
    """Download missing files from the official source (checksums verified)."""
    preset: str = "fashion-mnist"
    """Whose recipe the other settings start from (set by `presets.config_for`; `pretrain` refuses a
    config whose preset is not its dataset's, so no run silently trains on another dataset's recipe)."""


@dataclass
class AugmentConfig:
    """Parameters of `two_views`: the Fashion-MNIST recipe (docs/benchmarks.md); presets.py holds
    the paper's ImageNet recipe (Chen et al. 2020, appendix A) and CIFAR's."""

    crop_size: int = field(default=0, metadata=at_least(0))
    """Side of the output views in pixels; 0 keeps the stored image size."""
    scale_min: float = field(default=0.8, metadata=between(0, 1, above=True))
    """Crops keep 80-100% of the image: Fashion-MNIST items are centred and size-normalised (80%
    beat 60% on three seeds, 90% and 100% lost: docs/benchmarks.md section 3)."""
    scale_max: float = field(default=1.0, metadata=between(0, 1, above=True))
    ratio_min: float = field(default=3 / 4, metadata=at_least(0, above=True))
    ratio_max: float = field(default=4 / 3, metadata=at_least(0, above=True))
    flip_p: float = field(default=0.5, metadata=PROBABILITY)
    jitter_p: float = field(default=0.8, metadata=PROBABILITY)
    brightness: float = field(default=0.4, metadata=at_least(0))
    contrast: float = field(default=0.4, metadata=at_least(0))
    saturation: float = field(default=0.8, metadata=at_least(0))
    hue: float = field(default=0.2, metadata=between(0, 0.5))
    grayscale_p: float = field(default=0.2, metadata=PROBABILITY)
    blur_p: float = field(default=0.0, metadata=PROBABILITY)
    """Off at 28 px, as SimCLR turns it off for CIFAR (appendix B.9)."""
    blur_sigma_min: float = field(default=0.1, metadata=at_least(0, above=True))
    blur_sigma_max: float = field(default=2.0, metadata=at_least(0, above=True))
    erase_p: float = field(default=0.25, metadata=PROBABILITY)
    """Random erasing (Zhong et al. 2020): each view has a rectangle of erase_scale_min-max of its
    area (aspect ratio 0.3-3.3) filled with one random grey level, with this probability.
    Fashion-MNIST, 12 epochs, seeds 0 / 1 / 2 against none: kNN +0.62 / +0.70 / +0.66, 10 labels per
    class +1.36 / +1.02 / +1.26, linear probe +0.10 / -0.21 / -0.43, at the same step time
    (docs/benchmarks.md section 3). Off in the ImageNet and CIFAR presets, as in SimCLR."""
    erase_scale_min: float = field(default=0.02, metadata=between(0, 1, above=True, below=True))
    erase_scale_max: float = field(default=0.33, metadata=between(0, 1, above=True, below=True))
    local_size: int = field(default=0, metadata=at_least(0))
    """Side in pixels of the small views of multi-crop (--local-views); 0: half the view side (28 px
    -> 14 px, where the default cnn's map ends at 3 x 3, the side its readout pools 7 x 7 to)."""
    local_scale_min: float = field(default=0.2, metadata=between(0, 1, above=True))
    """Small views crop 20-50% of the image here (global crops keep 80-100%, `scale_min`). SwAV's local crops
    (Caron et al. 2020) keep 5-14% of an ImageNet image whose global crops keep 14-100%: the
    ImageNet and CIFAR presets take those."""
    local_scale_max: float = field(default=0.5, metadata=between(0, 1, above=True))
    solarize_p: float = field(default=0.2, metadata=PROBABILITY)
    """Each view inverts its pixels above 0.5 with this probability (BYOL's solarisation, Grill et
    al. 2020). Fashion-MNIST, 12 epochs, seeds 0 / 1 / 2 against none: linear probe +0.47 / +0.30 /
    +0.53, kNN +1.11 / +1.11 / +0.85 (docs/benchmarks.md section 3). Off in the ImageNet and CIFAR
    presets, as in SimCLR."""


@dataclass
class ModelConfig:
    """Encoder f and projection head g."""

    encoder: str = field(default="auto", metadata=one_of("auto", "cnn", "resnet18", "resnet34", "resnet50"))
    """cnn, resnet18, resnet34, resnet50; auto picks cnn for 28 px images, resnet18 otherwise."""
    width: float = field(default=0.0, metadata={**at_least(0), AUTO: 0.0})
    """Channel multiplier of the encoder; 0 (auto): a quarter for a ResNet on a CPU, 1 otherwise
    (fastclr.models.resolve_width). Every layer keeps at least 8 channels (`--width 0.125` gives
    the default cnn's 32-channel convs 8, not 4). A run records the width it trained at."""
    cnn_stages: str = "32,32,32p|256p|fc512"
    """Shape of the cnn encoder (fastclr.models.cnn.parse_stages): 3x3 conv widths per stage,
    '|' between stages (a 2x2 max-pool), ',' between convs of a stage, a 'p' after a stage's last
    width to run that pool before the conv's BatchNorm and ReLU, then how h is read off.
    The default runs three convs of 32 at 14 x 14, pooled to 7 x 7, one conv of 256 pooled to
    3 x 3, and reads a 512-d h off that map by a learned linear pooling (fc512): of the compact
    readouts measured it probed best (docs/benchmarks.md, "Compact h"). Each stage pools before its
    last BatchNorm and ReLU, which then see 4x and 5.4x fewer values ("Pooling before BatchNorm").
    At equal wall time the three convs at 14 x 14 probe better and lift more than one
    ("32p|256p|fc512", the default before) on every seed measured, with AMX in bf16 and under an
    AVX2 cap in fp32, at 0.6-0.7x the steps; kNN and 10 labels per class tie ("The default since
    the night of 2026-12-04"). "32|256|flat0" is the former 12544-d readout, the whole map
    flattened, which a linear probe scores well even untrained (89.9% on Fashion-MNIST).
    "silu:" (or "gelu:") first replaces the ReLU of every conv and of an fc or sfc readout (an attn
    readout keeps its own): kNN and 10 labels per class
    gain, but the untrained network more, and the lift falls by 2 points ("Activation, pooling
    kind and kernel size"), so the default keeps ReLU."""
    cifar_stem: str = field(default="auto", metadata=one_of("auto", "on", "off"))
    """ResNet stem: on (3x3 stride 1, no max-pool), off (7x7 stride 2 + max-pool), auto (on at or below 64 px)."""
    head_layers: int = field(default=2, metadata=at_least(1))
    """Linear layers in g: 2 as in SimCLR, 3 as in SimCLRv2."""
    head_hidden: int = field(default=256, metadata=at_least(0))
    """Hidden width of g; 0 uses the encoder's feature dimension."""
    head_bn: bool = True
    """BatchNorm after the hidden linear layers of g (the official SimCLR code does this; its v2 code
    also puts BatchNorm after the last layer, which fastclr does not)."""
    proj_dim: int = field(default=128, metadata=at_least(1))
    init: str = ""
    """Weights to start the encoder from instead of random ones: a fastclr export
    (encoder.safetensors) or a torchvision/timm ResNet state dict (.pth, .pt, .safetensors), names
    mapped (fastclr.models.foreign). Read before anything is written; used by a new run only."""
    init_sha256: str = ""
    """The SHA-256 of `init`'s file: recorded by a run that used it; when given, the file must match."""
    init_seed: int = field(default=-1, metadata=between(-1, SEED_MAX))
    """The seed the encoder's initial weights are drawn with; -1: train.seed. A resume given another
    `train.seed` (--allow-config-change) records the first here, so that the untrained reference
    rebuilds the run's own start; a new run started from that config.toml draws its weights with it."""


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule."""

    optimizer: str = field(default="adamw", metadata=one_of("adamw", "sgd", "lars"))
    """adamw, sgd or lars."""
    lr: float = field(default=3e-3, metadata=at_least(0, above=True))
    """Base learning rate, before `lr_scaling` with the batch size."""
    lr_scaling: str = field(default="none", metadata=one_of("none", "linear", "sqrt"))
    """none; linear: lr * B / 256; sqrt: lr * sqrt(B) (the paper's rule for LARS at small B)."""
    weight_decay: float = field(default=5e-4, metadata=at_least(0))
    momentum: float = field(default=0.9, metadata=between(0, 1, below=True))
    """SGD and LARS momentum; AdamW (the default optimiser) keeps its betas (0.9, 0.999) and does not use it."""
    trust_coefficient: float = field(default=1e-3, metadata=at_least(0, above=True))
    """LARS eta (You et al. 2017)."""
    warmup_epochs: float = field(default=1.0, metadata=at_least(0))
    min_lr_ratio: float = field(default=0.0, metadata=between(0, 1))
    """The cosine decays to lr * min_lr_ratio."""


@dataclass
class TrainConfig:
    """The pretraining loop."""

    epochs: float = field(default=100.0, metadata=at_least(0))
    """Length of the run (the cosine's length); unused when time_budget > 0."""
    batch_size: int = field(default=256, metadata=at_least(2))
    """The global batch: under N processes each embeds batch_size / N images."""
    temperature: float = field(default=0.2, metadata=at_least(MIN_TEMPERATURE))
    """t of NT-Xent (logits are cosine similarities / t); at least MIN_TEMPERATURE. 0.2 rather than the paper's 0.1 for the
    default encoder: side by side at equal wall time (three seeds in bf16, one in fp32) it raised 10
    labels per class and the linear probe on every run, for 0.2-0.5 points of kNN
    (docs/benchmarks.md section 3, "The default since 2026-12-05")."""
    precision: str = field(default="auto", metadata=one_of("auto", "bf16", "fp16", "fp32"))
    """auto, bf16, fp16 or fp32: the autocast dtype of encoder and head (the loss is fp32). auto
    decides from the hardware (fastclr.runtime.decide_precision): bf16 on CPUs with native bf16
    (AVX512_BF16, AMX) and CUDA GPUs of compute capability 8.0 and up, fp16 with dynamic loss
    scaling on older GPUs, fp32 on every other CPU. The run's config.toml records the result."""
    channels_last: bool = True
    compile: str = field(default="auto", metadata=one_of("auto", "on", "off"))
    """torch.compile of model, loss and augmentation: auto (on for CUDA where Triton runs: compute
    capability 7.0 and up with the triton package, a C compiler and Python's headers; off on CPU,
    where the compiled step measured slower), on or off (on where it cannot build is refused,
    on a CPU without g++ too: fastclr.runtime.compile_blocker)."""
    seed: int = field(default=0, metadata=between(0, SEED_MAX))
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""
    time_budget: float = field(default=9.5, metadata=at_least(0))
    """Minutes of training wall time (the whole loop: steps, checkpoints and kNN monitor passes);
    > 0 fits the number of steps (and so the cosine) to it instead of
    `epochs`, from the measured pace, refitted every 25 steps and every epoch; once spent, the run
    ends at the next refit. 0 trains for `epochs`."""
    threads: int = field(default=0, metadata=at_least(0))
    """CPU threads for PyTorch; 0: PyTorch's choice, at most one per usable CPU (affinity and cgroup CPU quota)."""
    keep_memory: bool = True
    """Linux/glibc: malloc keeps freed memory for reuse instead of unmapping it (process-wide,
    fastclr.cpu_memory): the default CPU step then stops zero-filling ~19k fresh pages per step,
    1.13x faster (benchmarks/allocator.py). False leaves malloc as it is: memory goes back to the
    OS as usual, unless a run earlier in the same process (a notebook) kept it; that lasts until the
    process ends."""
    log_every: int = field(default=25, metadata=at_least(1))
    checkpoint_every: int = field(default=0, metadata=at_least(0))
    """Steps between checkpoints; 0 writes one at the end of every epoch."""
    run_dir: str = ""
    """Where the run is written; empty: runs/<data>-<time>."""
    loss_block: int = field(default=0, metadata=at_least(0))
    """0: the plain NT-Xent; > 0: the memory-efficient one in row blocks of this many anchors
    (same values and gradients; never holds the 2N x 2N matrix; for batches of many thousands)."""
    grad_cache_chunk: int = field(default=0, metadata=at_least(0))
    """0: off; > 0: gradient caching, the encoder runs on this many images (per process) at a
    time, so the activation memory is one chunk's whatever the batch. BatchNorm then uses
    per-chunk statistics (ghost BatchNorm)."""
    sync_bn: bool = True
    """Under several processes: BatchNorm statistics over the global batch (the paper's global
    BN); false normalises each process's share alone."""
    dist_timeout: float = field(default=600.0, metadata=at_least(0, above=True))
    """Seconds a process waits on the others in a collective before failing the run."""
    deterministic: bool = False
    """CUDA: deterministic cuDNN/cuBLAS kernels, so a run and its stop-and-resume twin agree bit for
    bit (slower). CPU runs are deterministic without it."""
    check_sync: bool = False
    """CUDA: fail any step that synchronises the host with the device (torch's sync debug mode
    "error"); metrics are read only every log_every steps. For tests and debugging."""
    views: int = field(default=2, metadata=at_least(2))
    """Views per image: K > 2 makes every other view of an image a positive (multi-positive
    NT-Xent, fastclr.pretraining.multi_positive); 2 is SimCLR's NT-Xent."""
    local_views: int = field(default=0, metadata=at_least(0))
    """Multi-crop (Caron et al. 2020): N more views per image, small crops rendered at
    augment.local_size pixels, positives of the image's other views (multi-positive NT-Xent). 0: off."""
    supcon: bool = False
    """Supervised contrastive (Khosla et al. 2020): views of pretraining images with the same label
    are positives too; images without a label keep NT-Xent's positives."""
    queue: int = field(default=0, metadata=at_least(0))
    """0: off; Q > 0: the projections of the last Q views, from a momentum copy of encoder and head,
    are extra negatives for every anchor (MoCo's queue, He et al. 2020; fastclr.pretraining.queue)."""
    queue_momentum: float = field(default=0.99, metadata=between(0, 1, below=True))
    """m of the key network's update theta_k <- m theta_k + (1 - m) theta (with --queue)."""
    nn_support: int = field(default=0, metadata=at_least(0))
    """0: off; S > 0: nearest-neighbour positives (NNCLR, Dwibedi et al. 2021): each anchor is scored
    as its nearest neighbour among the first views of the last S images (fastclr.pretraining.neighbours)."""
    learn_temperature: bool = False
    """Train the temperature with the model from `temperature` (log-parameterised, kept in
    [0.01, 1], logged every window as `temperature`)."""
    trackers: str = field(default="none", metadata={"flag": "log", **one_of("none", "mlflow", "wandb", "mlflow,wandb", "wandb,mlflow")})
    """Experiment trackers that receive the config, every metrics record, the probe and evaluation
    numbers and the encoder, besides metrics.jsonl and TensorBoard (fastclr.tracking): none,
    mlflow, wandb or mlflow,wandb."""


@dataclass
class EvalConfig:
    """Evaluation done by `pretrain` itself."""

    probe: bool = True
    """Linear probe on frozen h at the end of pretraining (needs labels)."""
    monitor_every: int = field(default=1, metadata=at_least(0))
    """Epochs between kNN monitor evaluations during pretraining; 0 turns it off."""
    knn_k: int = field(default=20, metadata=at_least(1))
    untrained_reference: bool = True
    """With the probe: the same probe on the same network at its initial weights, and the lift
    (trained minus untrained): what pretraining added beyond the architecture."""
    monitor_share: float = field(default=0.05, metadata=between(0, 1))
    """Most of the pretraining wall time the kNN monitor may take: a due pass is skipped while the
    passes so far cost more than this share, so the monitor is sized by this machine's speed."""


@dataclass
class Config:
    """A whole run."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS: tuple[str, ...] = tuple(f.name for f in fields(Config))


FLAG_HELP: dict[str, str] = {
    "augment.crop_size": "side of the views in px; 0: the images' side",
    "augment.local_size": "side of multi-crop's small views in px; 0: half the view side",
    "augment.scale_min": "smallest share of the image a crop keeps",
    "augment.local_scale_min": "smallest share of the image a small view keeps",
    "model.width": "channel multiplier; 0: auto (a quarter for a ResNet on a CPU, else 1; an --init file's or a resumed run's own)",
    "model.init": "a weights file to start the encoder from",
    "model.init_seed": "seed of the initial weights; -1: --seed",
    "optim.lr": "base learning rate, before --lr-scaling",
    "optim.warmup_epochs": "epochs of linear warm-up",
    "train.epochs": "length of the run in epochs (used when --time-budget is 0)",
    "train.time_budget": "minutes of training; 0: train --epochs",
    "train.batch_size": "the global batch of images (over all processes)",
    "train.threads": "CPU threads; 0: one per usable CPU",
    "train.log_every": "steps between metrics records",
    "train.checkpoint_every": "steps between checkpoints; 0: at every epoch end",
    "train.loss_block": "NT-Xent in row blocks of this many anchors; 0: off",
    "train.grad_cache_chunk": "gradient caching, this many images through the encoder at a time; 0: off",
    "train.dist_timeout": "seconds a process waits on the others before the run fails",
    "train.views": "views per image",
    "train.local_views": "multi-crop's small views per image; 0: off",
    "train.queue": "rows of the queue of negatives; 0: off",
    "train.nn_support": "images in the nearest-neighbour support set; 0: off",
    "eval.monitor_every": "epochs between kNN monitor passes; 0: off",
    "eval.monitor_share": "most of the wall time the kNN monitor may take (0 to 1)",
}
"""What a flag's key alone does not say (its unit, what 0 or -1 means), shown by `pretrain --help`
(fastclr/config.py's docstrings say the rest)."""


def parse_switch(value: str | bool, key: str) -> bool | None:
    """An auto/on/off setting: True for on, False for off, None for auto (the caller decides)."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text == "auto":
        return None
    if text in ("on", "true"):
        return True
    if text in ("off", "false"):
        return False
    raise FastclrError(f"{key} must be auto, on or off, got {value!r}")


def flag_table() -> dict[str, tuple[str, str]]:
    """Map every CLI flag name (without `--`) to its (section, field)."""
    table: dict[str, tuple[str, str]] = {}
    for section in fields(Config):
        for f in fields(section.default_factory()):  # type: ignore[misc,operator]
            flag = f.metadata.get("flag", f.name.replace("_", "-"))
            assert flag not in table, f"duplicate flag --{flag}"
            table[flag] = (section.name, f.name)
    return table


def _field_type(section: str, name: str) -> type:
    obj = getattr(Config(), section)
    value = getattr(obj, name)
    return type(value)


def auto_value(section: str, name: str) -> Any:
    """What `auto` stands for in the numeric setting `section.name` (its AUTO metadata), else None."""
    return next((f.metadata.get(AUTO) for f in fields(getattr(Config(), section)) if f.name == name), None)


def parse_value(section: str, name: str, raw: Any) -> Any:
    """Convert a raw value (a CLI string or a TOML scalar) to the type of `section.name`."""
    kind = _field_type(section, name)
    where = f"{section}.{name}"
    if isinstance(raw, str) and kind is not str:
        text = raw.strip().lower()
        auto = auto_value(section, name)
        if text == AUTO and auto is not None:
            return auto
        try:
            if kind is bool:
                if text in ("1", "true", "yes", "on"):
                    return True
                if text in ("0", "false", "no", "off"):
                    return False
                raise ValueError(raw)
            if kind is int:
                return int(text)
            if kind is float:
                value = float(text)
                if not math.isfinite(value):
                    raise ValueError(raw)
                return value
        except ValueError:
            raise FastclrError(
                f"{where} must be {_KIND_NAMES[kind]}, got {raw!r}; pass e.g. --{name.replace('_', '-')} "
                f"{getattr(getattr(Config(), section), name)}"
            ) from None
    if kind is str and (isinstance(raw, bool) or isinstance(raw, str) and raw.lower() in ("true", "false")):
        allowed = next(f for f in fields(getattr(Config(), section)) if f.name == name).metadata.get("allowed")
        if allowed is not None and "on" in allowed.choices:  # an auto/on/off setting written as true/false
            return "on" if raw is True or str(raw).lower() == "true" else "off"
        if isinstance(raw, bool):  # a path or a name: `run_dir = true` was the folder ./on
            raise FastclrError(f"{where} must be a string, got {raw!r}")
    if kind is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if not isinstance(raw, kind) or (kind is int and isinstance(raw, bool)):
        raise FastclrError(f"{where} must be {_KIND_NAMES[kind]}, got {raw!r}{_example(_setting(where))}")
    return raw


def _example(known: _Setting) -> str:
    """'; write e.g. seed = 0': a value of the setting's kind as a file writes it (its default, or a
    name for a text one that has none)."""
    default = getattr(getattr(Config(), known.section), known.field.name)
    return f"; write e.g. {known.field.name} = {toml_scalar(default) if default != '' else toml_string('...')}"


_KIND_NAMES = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}


def _nearest_key(key: str) -> str:
    """' (did you mean train.batch_size?)' for a misspelt or misplaced key, else ''."""
    keys = list(to_flat(Config()))
    name = key.rpartition(".")[2]
    placed = [k for k in keys if k.rpartition(".")[2] == name]  # the right name in another section
    flagged = flag_table().get(name.replace("_", "-"))  # a flag's name used as a key: `log` for train.trackers
    close = placed or ([".".join(flagged)] if flagged else []) or difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return f" (did you mean {close[0]}?)" if close else ""


@dataclass(frozen=True)
class _Setting:
    section: str
    field: Field[Any]


def _setting(key: str) -> _Setting:
    """The setting "section.name" names, or the one-line error for a key no setting has."""
    section, _, name = key.partition(".")
    known = next((f for f in fields(getattr(Config(), section)) if f.name == name), None) \
        if section in SECTIONS else None
    if known is None:
        raise FastclrError(f"unknown config key {key!r}{_nearest_key(key)}; `fastclr pretrain --help` lists every key")
    return _Setting(section, known)


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of `cfg` with `{"section.field": value}` overrides applied (values parsed),
    then validated (`validate`)."""
    out = dataclasses.replace(cfg, **{s: dataclasses.replace(getattr(cfg, s)) for s in SECTIONS})
    for key, raw in overrides.items():
        section, name = _setting(key).section, key.partition(".")[2]
        setattr(getattr(out, section), name, parse_value(section, name, raw))
    validate(out)
    return out


LEARNED_TEMPERATURE_RANGE = (0.01, 1.0)
"""Where a learned temperature is kept. Below 0.01 the logits of unit vectors span +-100 and a
few hard negatives dominate every gradient; above 1 the softmax over thousands of negatives is
nearly flat. CLIP (Radford et al. 2021) clips its learned logit scale the same way (at 100)."""

RELATIONS: tuple[tuple[str, str], ...] = (
    ("augment.scale_min", "augment.scale_max"),
    ("augment.ratio_min", "augment.ratio_max"),
    ("augment.blur_sigma_min", "augment.blur_sigma_max"),
    ("augment.local_scale_min", "augment.local_scale_max"),
    ("augment.erase_scale_min", "augment.erase_scale_max"),
)
"""Pairs (a, b) of settings that must hold a <= b."""


def flag_of(key: str) -> str:
    """The command-line flag of setting `key` ('train.batch_size' -> '--batch-size')."""
    section, name = key.split(".")
    f = next(f for f in fields(getattr(Config(), section)) if f.name == name)
    return "--" + f.metadata.get("flag", name.replace("_", "-"))


def _of_kind(value: Any, default: Any) -> bool:
    """Whether `value` is of its setting's kind (the type of its default): an int for a float, never
    a bool for a number."""
    kind = type(default)
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def _check_setting(f: Field[Any], key: str, value: Any, default: Any) -> None:
    """One setting against its kind, its range or choices (field metadata `allowed`) and finiteness."""
    example = f"e.g. {flag_of(key)} {default}"
    if not _of_kind(value, default):  # a config built in Python: 'false' for a switch was true
        raise FastclrError(f"{key} = {value!r} must be {_KIND_NAMES[type(default)]}; {example}")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a path of undecodable bytes: config.toml could not be written
            raise FastclrError(f"{key} = {value!r} is not valid UTF-8 (config.toml records every setting "
                               "as text); rename it") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise FastclrError(f"{key} = {value} is not a finite number; {example}")
    allowed: Allowed | None = f.metadata.get("allowed")
    if allowed is not None and not allowed.admits(value):
        raise FastclrError(f"{key} = {value!r} is not allowed: it must be {allowed.describe()}; {example}")


def check_settings(flat: dict[str, Any]) -> None:
    """Each of `flat`'s settings on its own (the key known, the value of its kind and range), so that
    a caller can name the file a bad one came from; what holds between settings is `validate`'s."""
    defaults = Config()
    for key, raw in flat.items():
        known = _setting(key)
        section, name = known.section, known.field.name
        kind = _field_type(section, name)
        if isinstance(raw, str) and kind is not str and not (raw.strip().lower() == AUTO and
                                                             auto_value(section, name) is not None):
            # A file's value has its kind in TOML: text in quotes for a number or a switch was parsed
            # as a flag's text (`probe = "yes"` a probe, "no" none) without a word.
            raise FastclrError(f"{key} must be {_KIND_NAMES[kind]}, got {raw!r} (text, in quotes){_example(known)}")
        _check_setting(known.field, key, parse_value(section, name, raw), getattr(getattr(defaults, section), name))


def validate(cfg: Config) -> None:
    """Every setting against its declared range or choices (field metadata `allowed`), every float
    finite, and the RELATIONS; the first violation is one FastclrError naming the key, the value,
    what is allowed and an example."""
    defaults = Config()
    for section in SECTIONS:
        for f in fields(getattr(cfg, section)):
            _check_setting(f, f"{section}.{f.name}", getattr(getattr(cfg, section), f.name),
                           getattr(getattr(defaults, section), f.name))
    for a, b in RELATIONS:
        va, vb = (getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in (a, b))
        if va > vb:
            raise FastclrError(f"{a} = {va!r} is larger than {b} = {vb!r}; it must be <= {b} "
                               f"(e.g. {flag_of(a)} {vb!r})")  # a value that holds whatever the preset set
    from fastclr.models.cnn import check_stages  # the stage grammar lives with the network it builds

    check_stages(cfg.model.cnn_stages)  # before the data is read and the run directory made
    low, high = LEARNED_TEMPERATURE_RANGE
    if cfg.train.learn_temperature and not low <= cfg.train.temperature <= high:
        raise FastclrError(f"train.temperature = {cfg.train.temperature!r} is outside [{low:g}, {high:g}], where "
                           f"--learn-temperature keeps t; start it inside, e.g. --temperature {defaults.train.temperature}")


CONFIG_MAX_BYTES = 1 << 20
"""The most a config file may hold: a run's whole config.toml is about 3 KB."""


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file into flat `{"section.field": value}` overrides."""
    p = Path(path)
    try:
        with open(p, "rb") as f:  # a file, or a pipe (--config <(...)); read bounded: /dev/zero never ends
            data = f.read(CONFIG_MAX_BYTES + 1)
        if len(data) > CONFIG_MAX_BYTES:
            raise FastclrError(f"config file {p} is larger than {CONFIG_MAX_BYTES >> 20} MiB, which no config is; "
                               "check the path given to --config")
        doc = tomllib.loads(data.decode("utf-8-sig"))  # a byte-order mark, as some Windows editors save one
    except FileNotFoundError:
        raise FastclrError(f"config file {p} does not exist; check the path given to --config") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FastclrError(f"config file {p} is not valid TOML ({e}); fix the file") from None
    flat: dict[str, Any] = {}
    for section, body in doc.items():
        if not isinstance(body, dict):
            raise FastclrError(
                f"config file {p}: key {section!r} must sit in a section such as [train]; "
                f"sections are {', '.join(SECTIONS)}"
            )
        for name, value in body.items():
            flat[f"{section}.{name}"] = value
    return flat


def to_flat(cfg: Config) -> dict[str, Any]:
    """The config as {"section.key": value}, the names flags and TOML files use."""
    return {f"{s}.{k}": v for s, body in to_dict(cfg).items() for k, v in body.items()}


def to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The config as nested plain dicts (JSON, TOML and `torch.load(weights_only=True)` safe)."""
    return dataclasses.asdict(cfg)


ADDED_LATER: dict[str, Any] = {"augment.erase_p": 0.0}
"""Settings a config saved by an earlier version may lack, with the value that reproduces the run
that saved it where the current default would not (random erasing became a default on 2026-12-02)."""


def from_dict(d: dict[str, dict[str, Any]]) -> Config:
    """Inverse of `to_dict`; unknown keys are an error so that old runs fail loudly, not silently,
    and keys added since the config was saved take ADDED_LATER's value, not today's default."""
    flat = {f"{s}.{k}": v for s, body in d.items() for k, v in body.items()}
    return apply_overrides(Config(), {**ADDED_LATER, **flat})


def toml_string(value: str) -> str:
    """`value` as a TOML basic string. JSON's escapes are TOML's, except that JSON writes a
    character beyond U+FFFF as a surrogate pair, which TOML rejects: such characters (and all
    non-ASCII) are written as themselves, and DEL, which TOML forbids raw, as an escape."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def to_toml(cfg: Config) -> str:
    """Render the config as TOML (scalars only, so a tiny writer suffices)."""
    return toml_text(to_dict(cfg))


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """`{section: {key: scalar}}` as `to_toml` writes it, in the order given."""
    lines: list[str] = []
    for section, body in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {toml_scalar(v)}" for k, v in body.items()]
        lines.append("")
    return "\n".join(lines)


def toml_scalar(v: Any) -> str:
    """A setting's value as TOML writes it: true, 0.2, 256, "text"."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return toml_string(v)
    return repr(v) if isinstance(v, float) else str(v)


def diff(a: Config, b: Config, keys: tuple[str, ...] | None = None) -> list[str]:
    """The `section.field` keys whose values differ between `a` and `b` (restricted to `keys`)."""
    da, db = to_dict(a), to_dict(b)
    out = []
    for s in SECTIONS:
        for k in da[s]:
            key = f"{s}.{k}"
            if (keys is None or key in keys) and da[s][k] != db[s][k]:
                out.append(key)
    return out


def weights_seed(cfg: Config) -> int:
    """The seed a run's initial encoder weights were drawn with (`model.init_seed`, else `train.seed`)."""
    return cfg.model.init_seed if cfg.model.init_seed >= 0 else cfg.train.seed
