"""Encoders: feature dimensions, output shapes, stems; the projection head's structure."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastclr.errors import FastclrError
from fastclr.config import ModelConfig
from fastclr.models import (
    CNN_STAGES,
    ENCODERS,
    ProjectionHead,
    build_encoder,
    EncoderSpec,
    encoder_from_spec,
    feature_dim,
    resolve_encoder,
    use_cifar_stem,
)
from fastclr.models.cnn import FloorPooledConv, Readout, SmallCNN, Stages, parse_stages, trim_pooled

EXPECTED_DIM = {"cnn": 512, "resnet18": 512, "resnet34": 512, "resnet50": 2048}


@pytest.mark.parametrize("name", sorted(ENCODERS))
@pytest.mark.parametrize("width", [0.25, 0.5])
def test_every_registered_encoder_outputs_its_feature_dim(name: str, width: float) -> None:
    size, c = (28, 1) if name == "cnn" else (32, 3)
    enc = build_encoder(name, c, size, width)
    h = enc(torch.randn(3, c, size, size))
    assert h.shape == (3, enc.feature_dim)
    assert enc.feature_dim == int(EXPECTED_DIM[name] * width)


def test_resnet_parameter_counts_match_the_standard_architectures() -> None:
    # torchvision's resnet18/50 have 11,689,512 / 25,557,032 parameters including the 1000-way
    # fc layer (512*1000+1000 / 2048*1000+1000). Our trunk is the same network without it.
    n18 = sum(p.numel() for p in build_encoder("resnet18", 3, 224, cifar_stem="off").parameters())
    n50 = sum(p.numel() for p in build_encoder("resnet50", 3, 224, cifar_stem="off").parameters())
    assert n18 == 11_689_512 - 513_000
    assert n50 == 25_557_032 - 2_049_000


def test_cifar_stem_is_chosen_for_small_inputs() -> None:
    assert use_cifar_stem("auto", 32) and not use_cifar_stem("auto", 96)
    small = build_encoder("resnet18", 3, 32)
    big = build_encoder("resnet18", 3, 96)
    assert small.stem[0].kernel_size == (3, 3) and small.stem[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in small.stem)
    assert big.stem[0].kernel_size == (7, 7) and any(isinstance(m, nn.MaxPool2d) for m in big.stem)
    # a 32 px image keeps 4x4 spatial positions before pooling with the CIFAR stem
    feats = small.stages(small.stem(torch.randn(1, 3, 32, 32)))
    assert feats.shape[-2:] == (4, 4)


def test_auto_encoder_and_bad_names() -> None:
    assert resolve_encoder("auto", 28) == "cnn" and resolve_encoder("auto", 32) == "resnet18"
    with pytest.raises(FastclrError, match="unknown encoder 'resnet19'; choose one of"):
        resolve_encoder("resnet19", 32)


def test_small_cnn_space_to_depth_and_stage_spec() -> None:
    assert parse_stages("64|128,128|256") == Stages([[64], [128, 128], [256]], Readout("gap"), (False,) * 3)
    assert parse_stages("32|64|fc512") == Stages([[32], [64]], Readout("fc", 512), (False, False))
    assert parse_stages("32|64|sfc512") == Stages([[32], [64]], Readout("sfc", 512), (False, False))
    assert parse_stages("32|64|attn64") == Stages([[32], [64]], Readout("attn", 64), (False, False))
    assert parse_stages("32|64|cat0") == Stages([[32], [64]], Readout("cat0"), (False, False))
    assert parse_stages("32p|64,64p|fc512") == Stages([[32], [64, 64]], Readout("fc", 512), (True, True))
    assert parse_stages("32p|64|attn64") == Stages([[32], [64]], Readout("attn", 64), (True, False))
    assert parse_stages("silu:32p|64p|fc512") == Stages([[32], [64]], Readout("fc", 512), (True, True), "silu")
    assert parse_stages("relu:32|64") == parse_stages("32|64")
    # a 'p' must end a stage, and the last stage's needs the pool of an fc, sfc or flat readout
    for bad in ("32|fc0", "32|sfc", "32|attn4", "32|fcx", "32p,32|64|fc512", "32|6p4|fc512", "32|64p|attn64",
                "32|64p", "32|64p|flat0", "32|64p|cat0", "p|64|fc512", "swish:32|64", "silu:silu:32|64", ":32|64"):
        with pytest.raises(ValueError):
            parse_stages(bad)
    enc = SmallCNN(1, 1.0, "16|32")
    assert isinstance(enc.features[0], nn.PixelUnshuffle)
    assert enc.features[1].in_channels == 4  # 1 channel x 2 x 2
    assert enc(torch.randn(2, 1, 28, 28)).shape == (2, 32)
    # 28 -> 14 (space to depth) -> 7 (pool) -> 3 (pool before the linear stage): 3 * 3 * 32 inputs
    enc = SmallCNN(1, 1.0, "16|32|fc64")
    fc = [m for m in enc.pool if isinstance(m, nn.Linear)][0]
    assert fc.in_features == 3 * 3 * 32 and enc.feature_dim == 64
    assert enc(torch.randn(2, 1, 28, 28)).shape == (2, 64)


def test_symmetric_readout_covers_the_whole_map_and_mirrors_under_a_flip() -> None:
    # 7 x 7 map: fc's 2x2 pool gives 3 x 3 and never reads the last row and column; sfc's
    # overlapping 3x3 / 2 pool gives 4 x 4 windows centred on columns 0, 2, 4, 6.
    fc, sfc = SmallCNN(1, 1.0, "8|16|fc32"), SmallCNN(1, 1.0, "8|16|sfc32")
    assert [m for m in sfc.pool if isinstance(m, nn.Linear)][0].in_features == 4 * 4 * 16
    m = torch.rand(3, 16, 7, 7)
    pool_fc, pool_sfc = fc.pool[0], sfc.pool[0]
    # pooling a mirrored map gives the mirrored pooled map (a flip permutes h's fc inputs) ...
    torch.testing.assert_close(pool_sfc(m.flip(-1)), pool_sfc(m).flip(-1))
    # ... and every position reaches h: raising the last column changes sfc's pooled map only
    bump = m.clone()
    bump[..., 6] += 1
    assert torch.equal(pool_fc(bump), pool_fc(m)) and not torch.equal(pool_sfc(bump), pool_sfc(m))
    # the 2x2 pool has no such symmetry: its windows pair columns (0, 1) ... (4, 5) and drop 6
    assert not torch.allclose(pool_fc(m.flip(-1)), pool_fc(m).flip(-1))


def test_cnn_stages_option_shapes_the_encoder_and_saved_metadata_rebuilds_it() -> None:
    # one default, three places: the config option, build_encoder and SmallCNN's own default
    assert ModelConfig().cnn_stages == CNN_STAGES
    assert SmallCNN().feature_dim == build_encoder("cnn", 1, 28).feature_dim == 512
    enc = build_encoder("cnn", 1, 28, cnn_stages="8,8|24|flat0")
    assert enc.feature_dim == 7 * 7 * 24 and enc(torch.randn(2, 1, 28, 28)).shape == (2, 7 * 7 * 24)
    info = {"encoder": "cnn", "in_channels": 1, "image_size": 28, "width": 1.0, "cifar_stem": "off",
            "feature_dim": enc.feature_dim, "stages": "8,8|24|flat0", "mean": [0.2], "std": [0.3]}
    spec = EncoderSpec.from_dict(info)
    assert spec.to_dict() == info and EncoderSpec.from_dict(spec.to_dict()) == spec
    again = encoder_from_spec(spec)
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in enc.state_dict().items()}
    # metadata written before the spec was recorded: the three past defaults, named by their h width
    old = {k: v for k, v in info.items() if k != "stages"}
    for channels in (64, 128, 256):
        old["feature_dim"] = 49 * channels
        assert EncoderSpec.from_dict(old).stages == f"32|{channels}|flat0"
        assert encoder_from_spec(EncoderSpec.from_dict(old)).feature_dim == 49 * channels
    assert EncoderSpec.from_dict({**old, "feature_dim": 50}).stages == ""  # not inferable: none recorded
    with pytest.raises(FastclrError, match="cnn_stages '32\\|wide' is not a stage spec; write e.g. 32\\|256\\|fc512"):
        build_encoder("cnn", 1, 28, cnn_stages="32|wide")


ACTS = {"relu": lambda t: t.clamp(min=0), "silu": lambda t: t * torch.sigmoid(t),
        "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / 2**0.5))}
"""The activations a stage spec may name, transcribed from their definitions."""


def _by_hand(x: torch.Tensor, enc: SmallCNN, act: str = "relu") -> torch.Tensor:
    """h of a "[act:]Ap|Bp|fcN" encoder in training mode, transcribed in float64 from the spec:
    space to depth; conv, 2x2 max-pool, BatchNorm on the batch's statistics, the activation, twice;
    flatten in (H, W, C) order; linear, BatchNorm, the activation."""
    F = torch.nn.functional
    f = ACTS[act]
    conv1, bn1, conv2, bn2 = (m for m in enc.features if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)))
    linear, bn3 = (m for m in enc.pool if isinstance(m, (nn.Linear, nn.BatchNorm1d)))

    def norm(t: torch.Tensor, bn: nn.Module, dims: tuple[int, ...]) -> torch.Tensor:
        shape = (1, -1) + (1,) * (t.ndim - 2)
        mean, var = t.mean(dims, keepdim=True), t.var(dims, unbiased=False, keepdim=True)
        return (t - mean) / (var + bn.eps).sqrt() * bn.weight.double().view(shape) + bn.bias.double().view(shape)

    t = F.pixel_unshuffle(x.double(), 2)
    for conv, bn in ((conv1, bn1), (conv2, bn2)):
        t = f(norm(F.max_pool2d(F.conv2d(t, conv.weight.double(), padding=1), 2), bn, (0, 2, 3)))
    t = t.permute(0, 2, 3, 1).flatten(1) @ linear.weight.double().T
    return f(norm(t, bn3, (0,)))


@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
def test_pool_first_stages_pool_each_conv_before_its_batchnorm(act: str) -> None:
    torch.manual_seed(0)
    enc = SmallCNN(1, 1.0, ("" if act == "relu" else f"{act}:") + "8p|16p|fc32")
    for m in enc.modules():  # BatchNorm's affine away from its initial 1 and 0, so a wrong order shows
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.normal_(m.weight), nn.init.normal_(m.bias)
    x = torch.randn(6, 1, 28, 28)
    torch.testing.assert_close(enc(x).double(), _by_hand(x, enc, act), rtol=1e-4, atol=1e-5)
    # 14 px views (multi-crop) end at 3 x 3 before the readout's pool, which lets them pass
    assert enc.features(torch.randn(2, 1, 14, 14)).shape == (2, 16, 3, 3) and enc(torch.randn(2, 1, 14, 14)).shape == (2, 32)


@pytest.mark.parametrize("size", [28, 26, 14])
def test_a_convolution_a_pool_follows_computes_only_what_the_pool_reads(size: int) -> None:
    """The default's 7 x 7 map (28 px) loses its last row and column to the 2x2 pool: the conv
    before it leaves them out (6 x 6), and h and every gradient are those of the whole map
    (float64, BatchNorm in training mode with its affine moved off 1 and 0). 26 px trims the 13 x 13
    map of the first stage instead; 14 px views (multi-crop) trim the first stage's 7 x 7 and end at
    3 x 3, which the readout's pool passes as it is, so the last conv computes all of it."""
    torch.manual_seed(0)
    enc = SmallCNN(1).double()
    for m in enc.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.normal_(m.weight), nn.init.normal_(m.bias)
    convs = [m for m in enc.modules() if isinstance(m, FloorPooledConv)]
    assert [m.out_channels for m in convs] == [32, 256] and [m.keep for m in convs] == [0, 3]
    sides: list[int] = []
    hooks = [m.register_forward_hook(lambda m, i, o: sides.append(o.shape[-1])) for m in convs]
    x = torch.randn(5, 1, size, size, dtype=torch.float64)
    h = enc(x)
    grads = torch.autograd.grad(h.square().sum(), list(enc.parameters()))
    assert sides == {28: [14, 6], 26: [12, 6], 14: [6, 3]}[size]  # 7 -> 6, 13 -> 12; 3 passes whole
    whole = trim_pooled(enc, on=False)(x)
    torch.testing.assert_close(h, whole, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads, torch.autograd.grad(whole.square().sum(), list(enc.parameters()))):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    for h_ in hooks:
        h_.remove()
    # odd and even sides apart, in channels_last (the training step's layout), against the whole map
    for shape in ((5, 1, 26, 30), (5, 1, 30, 26)):
        y = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        trimmed = trim_pooled(enc, on=True).features(y)
        torch.testing.assert_close(trimmed, trim_pooled(enc, on=False).features(y), rtol=1e-12, atol=1e-12)
    # an overlapping padded pool (sfc) reads every row: its conv stays whole; unpooled convs are plain
    sfc = [type(m) for m in SmallCNN(1, stages="32p|256p|sfc512").modules() if isinstance(m, nn.Conv2d)]
    assert sfc == [FloorPooledConv, nn.Conv2d]  # 32p (a 2x2 pool follows), 256p (sfc's pool)


def test_pool_first_is_the_usual_order_when_batchnorm_keeps_the_order_of_values() -> None:
    """Evaluated with fixed statistics and a positive scale, BatchNorm and ReLU are monotone per
    channel, so they commute with max-pooling: moving the pool changes nothing. With a negative
    scale they reverse the order of values, and the two networks differ."""
    torch.manual_seed(0)
    usual, first = SmallCNN(1, 1.0, "8|16|fc32"), SmallCNN(1, 1.0, "8p|16p|fc32")
    for m in first.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            m.weight.data.uniform_(0.5, 2), m.bias.data.normal_(), m.running_mean.normal_(), m.running_var.uniform_(0.5, 2)
    # the same layers at other indices: BatchNorm sits after the pool, so one place later
    renamed = {k.replace("features.3.", "features.2.").replace("features.7.", "features.6."): v
               for k, v in first.state_dict().items()}
    usual.load_state_dict(renamed)
    usual.eval(), first.eval()
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(first(x), usual(x))
    first.features[3].weight.data[0] *= -1
    usual.features[2].weight.data[0] *= -1
    assert not torch.allclose(first(x), usual(x))


def test_the_usual_order_keeps_its_parameter_names() -> None:
    """Runs saved before 'p' existed record "32|256|fc512" and load by these names."""
    names = [k.rsplit(".", 1)[0] for k in SmallCNN(stages="32|256|fc512").state_dict() if k.endswith(".weight")]
    assert names == ["features.1", "features.2", "features.5", "features.6", "pool.2", "pool.3"]


def test_multi_scale_h_is_the_flat_map_then_the_earlier_maps_pooled_to_its_side() -> None:
    flat, cat = SmallCNN(1, 1.0, "16|32|flat0"), SmallCNN(1, 1.0, "16|32|cat0")
    cat.load_state_dict(flat.state_dict())  # the same layers: only h differs
    flat.eval(), cat.eval()
    x = torch.randn(3, 1, 28, 28)
    h = cat(x)
    assert cat.feature_dim == (32 + 16) * 7 * 7 and h.shape == (3, cat.feature_dim)
    torch.testing.assert_close(h[:, : 32 * 7 * 7], flat(x))  # the last 7 x 7 x 32 map, as flat0 gives it
    first = flat.features[:4](x)  # space to depth, conv-BN-ReLU 16 at 14 x 14
    expected = torch.nn.functional.max_pool2d(first, 2).permute(0, 2, 3, 1).flatten(1)
    torch.testing.assert_close(h[:, 32 * 7 * 7 :], expected)


def test_feature_dim_of_a_custom_module_is_measured() -> None:
    custom = nn.Sequential(nn.Conv2d(3, 7, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    assert feature_dim(custom, 3, 16) == 7


@pytest.mark.parametrize("layers,bn", [(2, True), (3, True), (2, False), (1, False)])
def test_projection_head_structure(layers: int, bn: bool) -> None:
    head = ProjectionHead(32, 64, 16, layers, bn)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    bns = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == layers and len(bns) == (layers - 1 if bn else 0)
    assert linears[0].in_features == 32 and linears[-1].out_features == 16
    assert head(torch.randn(4, 32)).shape == (4, 16)


@pytest.mark.parametrize("spec", ["0|256|fc512", "32|-5|fc512", "32|256|attn12", "32|256|attn9", "swish:32|256|fc512"])
def test_stage_specs_that_would_build_another_network_are_refused(spec: str) -> None:
    """Widths below 1 were raised to 8, and an attention width not a multiple of its 8 heads was
    rounded: each silently built a network other than the one written."""
    from fastclr.models.cnn import check_stages

    with pytest.raises(FastclrError, match=f"cnn_stages '{spec}' is not a stage spec.*relu, silu, gelu and a colon"):
        check_stages(spec)


def test_the_activation_a_stage_spec_names_is_rebuilt_from_the_saved_record() -> None:
    record = EncoderSpec("cnn", 1, 28, 1.0, "n/a", 64, (0.5,), (0.25,), stages="gelu:16p|fc64").to_dict()
    enc = encoder_from_spec(EncoderSpec.from_dict(record))
    assert [type(m) for m in enc.modules() if isinstance(m, (nn.ReLU, nn.SiLU, nn.GELU))] == [nn.GELU, nn.GELU]
    plain = encoder_from_spec(EncoderSpec("cnn", 1, 28, 1.0, "n/a", 64, (0.5,), (0.25,), stages="16p|fc64"))
    assert [type(m) for m in plain.modules() if isinstance(m, (nn.ReLU, nn.SiLU, nn.GELU))] == [nn.ReLU, nn.ReLU]
    assert plain.state_dict().keys() == enc.state_dict().keys()  # an activation has no parameters


def test_a_record_without_stages_rebuilds_its_network_at_any_width() -> None:
    """Runs saved before the stage spec was recorded: the channels were guessed from h's size, which
    has the width applied, so a width-0.5 run rebuilt at half its channels and its weights did not load."""
    from fastclr.models import encoder_from_spec
    from fastclr.models.spec import EncoderSpec

    trained = SmallCNN(1, 0.5, "32|128|flat0", image_size=28)
    record = {"encoder": "cnn", "in_channels": 1, "image_size": 28, "width": 0.5, "cifar_stem": "on",
              "feature_dim": trained.feature_dim, "mean": [0.5], "std": [0.25]}
    spec = EncoderSpec.from_dict(record)
    assert spec.stages == "32|128|flat0" and trained.feature_dim == 49 * 64
    encoder_from_spec(spec).load_state_dict(trained.state_dict())  # the same tensors, the same shapes


def test_the_small_cnn_records_no_resnet_stem_and_rebuilds_from_that() -> None:
    from fastclr.config import Config
    from fastclr.models import encoder_from_spec
    from fastclr.models.spec import EncoderSpec
    from fastclr.pretraining.model import named_encoder

    encoder, name, stem = named_encoder(Config(), (28, 28, 1), "cpu")
    assert (name, stem) == ("cnn", "n/a")
    spec = EncoderSpec(name, 1, 28, 1.0, stem, encoder.feature_dim, (0.5,), (0.25,), Config().model.cnn_stages)
    encoder_from_spec(spec).load_state_dict(encoder.state_dict())


def test_eval_mode_for_a_while_gives_each_submodule_its_own_mode_back() -> None:
    """Inside, every module is in eval mode; after, each has the mode it had, whatever the outer
    module's: a wrapper in train mode around eval-mode modules, and modules of mixed modes."""
    from fastclr.models.modes import in_eval_mode

    inner = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)).eval()
    other = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(2))
    other[1].eval()
    wrapper = torch.nn.Sequential(inner, other)  # new: train mode
    before = [m.training for m in wrapper.modules()]
    assert before == [True, False, False, False, True, True, False]
    with in_eval_mode(wrapper):
        assert not any(m.training for m in wrapper.modules())
    assert [m.training for m in wrapper.modules()] == before
    with pytest.raises(RuntimeError), in_eval_mode(wrapper):
        raise RuntimeError("a failed forward")
    assert [m.training for m in wrapper.modules()] == before


class _FreezesWhenTrained(nn.Module):
    """A user's module whose own `train()` does more than set flags: it records the mode it was
    last given and keeps its BatchNorm in eval mode, as encoders fine-tuned with frozen statistics do."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.given: list[bool] = []

    def train(self, mode: bool = True) -> _FreezesWhenTrained:
        super().train(mode)
        self.bn.eval()
        self.given.append(mode)
        return self


def test_eval_mode_for_a_while_runs_a_modules_own_train_override_on_the_way_out() -> None:
    """After the block, a module whose `train()` override does more than set flags has been given its
    own mode back through that override, so what the override keeps (here the last mode given) is
    what it was before the block, not eval."""
    from fastclr.models.modes import in_eval_mode

    frozen = _FreezesWhenTrained()
    wrapper = nn.Sequential(nn.Linear(2, 2), frozen).train()
    assert frozen.given[-1] is True and not frozen.bn.training
    with in_eval_mode(wrapper):
        assert frozen.given[-1] is False
    assert frozen.given[-1] is True
    assert [m.training for m in wrapper.modules()] == [True, True, True, False]


def _batch_norm(t: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """BatchNorm in training mode, in float64: the batch's statistics (biased variance) per channel."""
    dims = (0,) + tuple(range(2, t.ndim))
    shape = (1, -1) + (1,) * (t.ndim - 2)
    mean, var = t.mean(dims, keepdim=True), t.var(dims, unbiased=False, keepdim=True)
    return (t - mean) / (var + bn.eps).sqrt() * bn.weight.double().view(shape) + bn.bias.double().view(shape)


def _randomise_batchnorm(module: nn.Module) -> None:
    """Move every BatchNorm's affine away from its initial values (1 and 0, or a zero scale), so a
    layer in the wrong place, or one left out, changes h."""
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.normal_(m.weight), nn.init.normal_(m.bias)


@pytest.mark.parametrize("stages", ["8|16|fc32", "8|16|sfc32", "8p|16p|sfc32", "8|16|attn64", "8|16|flat", "8|16|flat0",
                                    "8|8|16|cat0", "8|16"])
@pytest.mark.parametrize("width", [1.0, 0.3])
def test_every_readout_returns_the_h_width_it_declares(stages: str, width: float) -> None:
    """Whatever the readout, the number of stages and the width, the network runs on a 28 px batch and
    h has `feature_dim` columns: the width the projection head and the probes are built for."""
    enc = SmallCNN(1, width, stages)
    assert enc(torch.randn(3, 1, 28, 28)).shape == (3, enc.feature_dim)


@pytest.mark.parametrize("stages", ["cat0", "silu:cat0", "flat0", "flat", "fc16", "sfc16", "attn16"])
@pytest.mark.parametrize("size", [14, 28, 32])
def test_a_readout_on_the_stem_alone_declares_the_width_it_returns(stages: str, size: int) -> None:
    """No conv stages: h is read off the stem's map. `cat0` declared 0 columns and returned all the
    stem's (784 at 28 px), and the projection head built for 0 failed at the first step."""
    enc = SmallCNN(1, 1.0, stages, image_size=size)
    assert enc(torch.randn(3, 1, size, size)).shape == (3, enc.feature_dim) and enc.feature_dim > 0


def _attention_by_hand(m: torch.Tensor, pool: nn.Module) -> torch.Tensor:
    """An attention readout's h in training mode, in float64, from `AttentionPool`'s description:
    tokens are the map's positions in (H, W) order plus the position embedding; head i's weights are
    a softmax over the positions of (token keys . query i) / sqrt(key_dim); its output the weighted
    sum of the value projection's i-th slice; the heads concatenated, then BatchNorm and ReLU."""
    b, c, s, _ = m.shape
    heads, k = pool.heads, pool.key_dim
    tokens = m.double().permute(0, 2, 3, 1).reshape(b, s * s, c) + pool.position.double()
    keys = (tokens @ pool.key.weight.double().T).reshape(b, s * s, heads, k)
    values = (tokens @ pool.value.weight.double().T).reshape(b, s * s, heads, -1)
    outs = []
    for i in range(heads):
        weights = (keys[:, :, i] @ pool.query[i].double() / k**0.5).softmax(dim=1)  # (B, positions)
        outs.append((weights.unsqueeze(-1) * values[:, :, i]).sum(1))
    return _batch_norm(torch.cat(outs, 1), pool.out[0]).clamp(min=0)


def test_attention_pooling_is_a_softmax_over_positions_per_head() -> None:
    from fastclr.models.cnn import AttentionPool

    torch.manual_seed(0)
    enc = SmallCNN(1, 1.0, "8|16|attn64")
    pool = enc.pool
    assert isinstance(pool, AttentionPool) and enc.feature_dim == 64
    nn.init.normal_(pool.position)  # a position embedding large enough to matter
    _randomise_batchnorm(pool)
    m = torch.randn(5, 16, 7, 7)
    torch.testing.assert_close(pool(m).double(), _attention_by_hand(m, pool), rtol=1e-4, atol=1e-4)


def test_global_pooling_averages_the_last_map() -> None:
    """With no readout named, and in every ResNet, h is the mean of the last map over its positions."""
    torch.manual_seed(0)
    cnn = SmallCNN(1, 1.0, "8|16").eval()
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(cnn(x), cnn.features(x).mean((2, 3)))
    resnet = build_encoder("resnet18", 3, 32, 0.125).eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(resnet(x), resnet.stages(resnet.stem(x)).mean((2, 3)))


def test_stages_pool_between_them_until_the_map_is_1x1() -> None:
    """8 px: space to depth gives 4 x 4; the 2x2 pools between stages give 2 x 2, then 1 x 1, after
    which no pool follows: the fourth stage's map is 1 x 1 too, so a flat0 h is its 8 channels."""
    enc = SmallCNN(1, 1.0, "8|8|8|8|flat0", image_size=8)
    assert enc.feature_dim == 8 and enc(torch.randn(2, 1, 8, 8)).shape == (2, 8)


@pytest.mark.parametrize("width", [0.1, 0.2, 0.7])
def test_a_width_names_the_same_channels_for_the_cnn_as_for_the_resnets(width: float) -> None:
    """`--width` means one thing whichever encoder it scales: a layer of 64 channels gets 64 * width
    rounded to the nearest integer, and never fewer than 8 (0.1: 8; 0.2: 13; 0.7: 45)."""
    cnn = SmallCNN(3, width, "64", image_size=32)
    resnet = build_encoder("resnet18", 3, 32, width)
    assert cnn.feature_dim == resnet.stem[0].out_channels


@pytest.mark.parametrize("size", [28, 32, 56])
def test_a_stage_spec_inferred_for_an_old_record_rebuilds_its_recorded_h(size: int) -> None:
    """Only records of 28 px CNNs name their network by h's width (7 x 7 x channels): a record of
    another size whose h width happens to be a multiple of 49 is not given a network whose h has
    another width."""
    record = {"encoder": "cnn", "in_channels": 1, "image_size": size, "width": 1.0, "cifar_stem": "n/a",
              "feature_dim": 49 * 64, "mean": [0.5], "std": [0.25]}
    spec = EncoderSpec.from_dict(record)
    assert bool(spec.stages) == (size == 28)
    if spec.stages:
        assert encoder_from_spec(spec).feature_dim == spec.feature_dim


def test_the_specs_standardisation_tensors_are_its_mean_and_std() -> None:
    """What training, evaluation and `Pretrained` standardise with: (x - mean) / std per channel, in
    float32, with the record's own values in channel order."""
    spec = EncoderSpec("cnn", 3, 28, 1.0, "n/a", 8, (0.1, 0.2, 0.3), (0.5, 0.25, 0.125))
    mean, std = spec.mean_tensor(), spec.std_tensor()
    assert mean.dtype == std.dtype == torch.float32 and mean.shape == std.shape == (3,)
    pixel = torch.tensor([0.6, 0.7, 0.8])
    expected = torch.tensor([(0.6 - 0.1) / 0.5, (0.7 - 0.2) / 0.25, (0.8 - 0.3) / 0.125], dtype=torch.float64)
    torch.testing.assert_close(((pixel - mean) / std).double(), expected)


def _conv(t: torch.Tensor, conv: nn.Module, stride: int, padding: int) -> torch.Tensor:
    return torch.nn.functional.conv2d(t, conv.weight.double(), stride=stride, padding=padding)


def _residual_block_by_hand(t: torch.Tensor, block: nn.Module, stride: int) -> torch.Tensor:
    """A residual block in float64 (He et al. 2016; the stride in the 3x3 conv, as torchvision's):
    basic: conv3x3(stride)-BN-ReLU, conv3x3-BN; bottleneck: conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU,
    conv1x1-BN; plus the input, or its 1x1(stride)-BN projection where the shape changes; then ReLU."""
    from fastclr.models.resnet import Bottleneck

    if isinstance(block, Bottleneck):
        out = _batch_norm(_conv(t, block.conv1, 1, 0), block.bn1).clamp(min=0)
        out = _batch_norm(_conv(out, block.conv2, stride, 1), block.bn2).clamp(min=0)
        out = _batch_norm(_conv(out, block.conv3, 1, 0), block.bn3)
    else:
        out = _batch_norm(_conv(t, block.conv1, stride, 1), block.bn1).clamp(min=0)
        out = _batch_norm(_conv(out, block.conv2, 1, 1), block.bn2)
    if stride == 1 and t.shape[1] == out.shape[1]:
        shortcut = t
    else:
        conv, bn = block.shortcut
        shortcut = _batch_norm(_conv(t, conv, stride, 0), bn)
    return (out + shortcut).clamp(min=0)


def _resnet_by_hand(x: torch.Tensor, enc: nn.Module, cifar_stem: bool) -> torch.Tensor:
    """h of a ResNet in training mode, in float64: the stem (CIFAR: conv3x3/1-BN-ReLU; standard:
    conv7x7/2 padded 3, BN, ReLU, max-pool 3x3/2 padded 1), four stages of residual blocks whose first
    block strides 2 from the second stage on, then the mean over positions."""
    conv, bn = enc.stem[0], enc.stem[1]
    if cifar_stem:
        t = _batch_norm(_conv(x.double(), conv, 1, 1), bn).clamp(min=0)
    else:
        t = torch.nn.functional.max_pool2d(_batch_norm(_conv(x.double(), conv, 2, 3), bn).clamp(min=0), 3, 2, 1)
    for i, stage in enumerate(enc.stages):
        for j, block in enumerate(stage):
            t = _residual_block_by_hand(t, block, 2 if i > 0 and j == 0 else 1)
    return t.mean((2, 3))


@pytest.mark.parametrize("name, size, stem", [("resnet18", 64, "off"), ("resnet18", 32, "on"), ("resnet50", 64, "off")])
def test_resnets_compute_the_published_architecture(name: str, size: int, stem: str) -> None:
    torch.manual_seed(0)
    enc = build_encoder(name, 3, size, 0.125, stem)
    _randomise_batchnorm(enc)  # the zero-initialised last BatchNorm of each block would hide its branch
    x = torch.randn(4, 3, size, size)
    torch.testing.assert_close(enc(x).double(), _resnet_by_hand(x, enc, stem == "on"), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_every_residual_block_starts_as_the_identity_whatever_its_statistics(name: str) -> None:
    """The last BatchNorm of each residual branch starts with a zero scale (Goyal et al. 2017): the
    branch then adds its shift, 0, whatever the input and the running statistics, so a new block
    computes relu(shortcut(x))."""
    torch.manual_seed(0)
    enc = build_encoder(name, 3, 32, 0.125)
    for m in enc.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
    enc.eval()
    with torch.no_grad():
        t = enc.stem(torch.randn(2, 3, 32, 32))
        for block in (b for stage in enc.stages for b in stage):
            out = block(t)
            torch.testing.assert_close(out, block.shortcut(t).clamp(min=0))
            t = out


def test_resnet_convolutions_start_with_he_initialisation_over_their_outputs() -> None:
    """He et al. 2015 in fan-out mode, as torchvision's ResNets: a conv's weights have standard
    deviation sqrt(2 / (out_channels * kernel area)) (the stem's 7x7 conv from 3 channels: 0.025,
    not the 0.117 of fan-in)."""
    torch.manual_seed(0)
    enc = build_encoder("resnet18", 3, 224, cifar_stem="off")
    for name, m in enc.named_modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
            assert float(m.weight.detach().std()) == pytest.approx((2 / fan_out) ** 0.5, rel=0.05), name


def _head_by_hand(h: torch.Tensor, head: ProjectionHead, batch_norm: bool) -> torch.Tensor:
    """g in training mode, in float64: (Linear, BatchNorm on the batch, ReLU) per hidden layer, the
    Linear's bias left out where a BatchNorm follows (it would cancel it), kept without one; then a
    Linear with its bias."""
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    norms = [m for m in head.modules() if isinstance(m, nn.BatchNorm1d)]
    t = h.double()
    for i, linear in enumerate(linears[:-1]):
        t = t @ linear.weight.double().T
        t = _batch_norm(t, norms[i]) if batch_norm else t + linear.bias.double()
        t = t.clamp(min=0)
    return t @ linears[-1].weight.double().T + linears[-1].bias.double()


@pytest.mark.parametrize("layers,bn", [(2, True), (3, True), (2, False), (3, False), (1, False)])
def test_projection_head_computes_its_mlp(layers: int, bn: bool) -> None:
    torch.manual_seed(0)
    head = ProjectionHead(12, 24, 8, layers, bn)
    _randomise_batchnorm(head)
    for m in head.modules():  # biases away from their near-zero initial values
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.normal_(m.bias)
    h = torch.randn(6, 12)
    torch.testing.assert_close(head(h).double(), _head_by_hand(h, head, bn), rtol=1e-4, atol=1e-5)


def test_the_cifar_stem_is_chosen_up_to_64_px() -> None:
    """`cifar_stem = auto` is on at or below 64 px (ModelConfig.cifar_stem), off above."""
    assert use_cifar_stem("auto", 64) and not use_cifar_stem("auto", 65)
    assert build_encoder("resnet18", 3, 64, 0.125).stem[0].kernel_size == (3, 3)


def test_measuring_h_leaves_the_module_as_it_was() -> None:
    """`feature_dim` of a custom module runs it in eval mode (its BatchNorm statistics untouched) and
    gives it back in the mode it was in."""
    custom = nn.Sequential(nn.Conv2d(3, 7, 3), nn.BatchNorm2d(7), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    for training in (True, False):
        custom.train(training)
        assert feature_dim(custom, 3, 16) == 7
        assert all(m.training == training for m in custom.modules())
        assert torch.equal(custom[1].running_mean, torch.zeros(7)) and int(custom[1].num_batches_tracked) == 0


@pytest.mark.parametrize("size, stem", [(32, "off"), (96, "on")])
def test_a_resnet_rebuilds_with_the_stem_its_spec_records(size: int, stem: str) -> None:
    """A stem set against the size's default (`--cifar-stem off` at 32 px, on at 96) is rebuilt as
    recorded, not as `auto` would choose: the weights load and give the same h."""
    torch.manual_seed(0)
    enc = build_encoder("resnet18", 3, size, 0.125, stem).eval()
    spec = EncoderSpec("resnet18", 3, size, 0.125, stem, enc.feature_dim, (0.5,) * 3, (0.25,) * 3)
    again = encoder_from_spec(spec)
    again.load_state_dict(enc.state_dict())
    x = torch.randn(2, 3, size, size)
    torch.testing.assert_close(again.eval()(x), enc(x))


def test_feature_dim_of_a_fixed_feature_map_without_parameters_is_measured() -> None:
    # a user's parameter-free encoder (a head trained on fixed features) once raised StopIteration
    assert feature_dim(nn.Sequential(nn.AvgPool2d(4), nn.Flatten()), 1, 28) == 7 * 7
    assert feature_dim(nn.Sequential(nn.AvgPool2d(7), nn.Flatten()), 3, 28) == 3 * 4 * 4


@pytest.mark.parametrize("name,size", [("cnn", 28), ("resnet18", 32)])
def test_any_width_keeps_at_least_8_channels_in_every_layer(name: str, size: int) -> None:
    """`--width 1e-9` trained (config.toml records the width asked for): every conv keeps 8 channels,
    as the docs say; at width 0.125 the default cnn's 32-channel convs are 8, not 4."""
    from fastclr.models import build_encoder

    for width, smallest in ((1e-9, 8), (0.125, 8)):
        convs = [m for m in build_encoder(name, 1, size, width).modules() if isinstance(m, nn.Conv2d)]
        assert min(m.out_channels for m in convs) == smallest
    wide = [m.out_channels for m in build_encoder(name, 1, size, 0.5).modules() if isinstance(m, nn.Conv2d)]
    assert min(wide) == (16 if name == "cnn" else 32)  # 32 x 0.5; the ResNet's first stage 64 x 0.5
