"""Settings nothing in a run reads: a value given beside the setting that switches its part off
(`--momentum` with AdamW, `--blur-sigma-max` where the recipe has no blur, `--cnn-stages` for a
ResNet) trained exactly as without it, and config.toml then recorded it as if it had counted."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from fastclr.config import Config, flag_of, to_flat
from fastclr.errors import FastclrError


class Unread(NamedTuple):
    """Why nothing reads a setting, and what would make it count."""

    why: str
    fix: str


def unread_settings(cfg: Config, encoder: str | None = None, channels: int | None = None) -> dict[str, Unread]:
    """The settings of `cfg` that nothing in its run reads. `encoder`: the encoder the run builds
    (`auto` resolved; "custom" for a module passed in), `channels`: its images' channels; None where
    not known yet, which leaves out the settings that depend on it."""
    a, m, o, t = cfg.augment, cfg.model, cfg.optim, cfg.train
    found: dict[str, Unread] = {}

    def off(keys: tuple[str, ...], why: str, fix: str) -> None:
        for key in keys:
            found.setdefault(key, Unread(why, fix))

    if o.optimizer == "adamw":
        off(("optim.momentum",), "--optimizer adamw has no momentum", "--optimizer sgd or lars")
    if o.optimizer != "lars":
        off(("optim.trust_coefficient",), f"only LARS has a trust coefficient, and this run uses {o.optimizer}",
            "--optimizer lars")
    if not t.queue:
        off(("train.queue_momentum",), "it moves the queue's key network, and --queue is 0", "--queue Q")
    if not t.local_views:
        off(("augment.local_size", "augment.local_scale_min", "augment.local_scale_max"),
            "--local-views is 0 (no small views)", "--local-views L")
    if m.head_layers == 1:
        off(("model.head_hidden", "model.head_bn"), "--head-layers 1 is one linear layer, with no hidden layer",
            "--head-layers 2 or more")
    if a.jitter_p == 0:
        off(("augment.brightness", "augment.contrast", "augment.saturation", "augment.hue"),
            "--jitter-p is 0 (no colour jitter)", "--jitter-p above 0")
    if a.blur_p == 0:
        off(("augment.blur_sigma_min", "augment.blur_sigma_max"), "--blur-p is 0 (no blur)",
            "--blur-p above 0")
    if a.erase_p == 0:
        off(("augment.erase_scale_min", "augment.erase_scale_max"), "--erase-p is 0 (no random erasing)",
            "--erase-p above 0")
    if channels == 1:  # saturation, hue and grayscale act on colour (augment.py)
        off(("augment.saturation", "augment.hue", "augment.grayscale_p"), "the images are gray (one channel)",
            "colour images")
    if encoder is not None and encoder != "cnn":
        off(("model.cnn_stages",), f"it shapes the cnn, and this run's encoder is {encoder}", "--encoder cnn")
    if encoder is not None and not encoder.startswith("resnet"):
        off(("model.cifar_stem",), f"only a ResNet has a stem to choose, and this run's encoder is {encoder}",
            "--encoder resnet18")
    return found


def refuse_unread(cfg: Config, bases: Sequence[Config], encoder: str | None = None, channels: int | None = None,
                  files: Mapping[str, Any] | None = None, log: Callable[[str], None] | None = None) -> None:
    """One line naming every setting of `cfg` that nothing in the run reads and that was given: it
    differs from each of `bases` (the recipe the run started from; for a resume also the run it
    continues) and from the default, with what would make it count. Values a recipe holds are never named, nor the
    default's (a config built in Python from the default recipe and pointed at a store carries the
    default's values for the store recipe's, which nobody gave), nor a 0 or false (none, off: what
    the run does). `files`: the settings the --config files give (flat keys); their values (a run's own
    config.toml reused with a part switched off) are a note through `log`, not a refusal."""
    unread = unread_settings(cfg, encoder, channels)
    now, known = to_flat(cfg), [to_flat(b) for b in (*bases, Config())]
    given = [k for k in unread if all(now[k] != was[k] for was in known) and now[k] not in (0, False)]
    carried = files or {}
    noted = [k for k in given if k in carried and carried[k] == now[k]]
    given = [k for k in given if k not in noted]
    for k in noted:
        if log is not None:
            log(f"note: {_shown(k, now)} (from the --config file) is read by nothing in this run: {unread[k].why}")
    if not given:
        return
    fixes = list(dict.fromkeys(unread[k].fix for k in given))
    raise FastclrError(f"{'; '.join(f'{_shown(k, now)} is read by nothing in this run: {unread[k].why}' for k in given)}; "
                       f"drop {'it' if len(given) == 1 else 'them'} (the flag, or the line of a --config file that "
                       f"sets {'it' if len(given) == 1 else 'them'}), or train with {' / '.join(fixes)}")


def _shown(key: str, flat: Mapping[str, Any]) -> str:
    value = flat[key]
    shown = str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else value
    return f"{flag_of(key)} {shown}"
