"""The plain-text table `fastclr evaluate` prints: one block per protocol that ran."""

from __future__ import annotations

from typing import Any

from fastclr.evaluation.reference import lift_summary
from fastclr.progress import counted


def pct(x: float) -> str:
    """0.8678 -> '86.78%'."""
    return f"{100 * x:.2f}%"


def pct_spread(entry: dict[str, Any]) -> str:
    """Mean ± sample std over seeds, e.g. '71.53 ± 0.42% (3 seeds)'; one seed has no spread to
    give ('87.11% (1 seed)', not '± 0.00%', which reads as a measured zero)."""
    n = len(entry["runs"])
    if n == 1:
        return f"{100 * entry['mean']:.2f}% (1 seed)"
    return f"{100 * entry['mean']:.2f} ± {100 * entry['std']:.2f}% ({n} seeds{same_subsets(entry['runs'])})"


def same_subsets(runs: list[dict[str, Any]]) -> str:
    """', 1 distinct subset' where seeds drew the same images (a count of every image of each
    class): their spread is the fit's alone, not the labelled images'; '' otherwise."""
    ids = [r.get("subset") for r in runs]
    distinct = len(set(ids))
    if None in ids or distinct == len(ids):  # an eval.json from before subsets were recorded cannot tell
        return ""
    return f", {distinct} distinct subset{'s' if distinct > 1 else ''}"


def render(rows: list[list[str]]) -> str:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def points(x: float) -> str:
    """0.0512 -> '+5.12 points'."""
    return f"{100 * x:+.2f} points"


def paired_gap(probe: dict[str, Any], scratch: dict[str, Any]) -> tuple[float, int] | None:
    """The probe's mean lead over training from scratch on the label subsets both used (matched by
    subset id), and how many; None when they share none. Means over different subsets would mix
    the subsets' difficulty into the gap."""
    theirs = {r["subset"]: r["accuracy"] for r in scratch["runs"]}
    diffs = [r["accuracy"] - theirs[r["subset"]] for r in probe["runs"] if r["subset"] in theirs]
    return (sum(diffs) / len(diffs), len(diffs)) if diffs else None


def curve_rows(results: dict[str, Any]) -> list[list[str]]:
    """Label-efficiency rows: labels per class, few-label probe (and on the untrained network, with
    the lift over it), supervised baseline, and the probe's lead over it on the same labels."""
    probe = {e["labels_per_class"]: e for e in results.get("fewshot", {}).get("curve", [])}
    untrained = {e["labels_per_class"]: e for e in results.get("fewshot", {}).get("random_init_curve", [])}
    lift = lift_summary(results).get("fewshot", {})
    sup = {e["labels_per_class"]: e for e in results.get("supervised", {}).get("curve", [])}
    head = ["labels/class", "linear probe on h"] + (["same net untrained", "lift"] if untrained else []) + \
        ["supervised from scratch"] + (["probe over scratch, same labels"] if probe and sup else [])
    rows = [head]
    for n in sorted(set(probe) | set(sup)):
        row = [str(n), pct_spread(probe[n]) if n in probe else "-"]
        if untrained:
            row += [pct_spread(untrained[n]), points(lift[str(n)])] if str(n) in lift else ["-", "-"]
        row.append(pct_spread(sup[n]) if n in sup else "-")
        if probe and sup:
            gap = paired_gap(probe[n], sup[n]) if n in probe and n in sup else None
            row.append("-" if gap is None else f"{points(gap[0])} ({counted(gap[1], 'subset')})")
        rows.append(row)
    return rows


def untrained_cells(entry: dict[str, Any], lift: float | None) -> list[str]:
    """'same net untrained' and 'lift' cells of a protocol; the lift is `lift_summary`'s, as the
    flags below the table read it."""
    if "random_init" not in entry or lift is None:
        return ["-", "-"]
    return [pct(entry["random_init"]["accuracy"]), points(lift)]


def probe_flags(lift: dict[str, Any]) -> list[str]:
    """FLAG lines under the protocol rows: a linear-probe lift under the threshold (most of the
    accuracy is the architecture's), and a kNN lift below zero (the untrained network did better)."""
    lines = []
    if lift.get("small"):
        where = f"only {points(lift['linear'])} above" if lift["linear"] >= 0 else \
            f"{100 * -lift['linear']:.2f} points below"  # "only -57.14 points above" read as a typo
        lines.append(f"FLAG: the linear probe is {where} the same network untrained "
                     f"(threshold {100 * lift['threshold']:g} points): most of this accuracy is the architecture's, "
                     "not what pretraining learned")
    if lift.get("knn", 0.0) < 0:
        lines.append(f"FLAG: kNN on h is {100 * -lift['knn']:.2f} points below the same network untrained: "
                     "for it, pretraining did not help")
    return lines


def fewshot_flags(lift: dict[str, Any]) -> list[str]:
    """The FLAG line under the label-efficiency rows: the points where the few-label probe did
    worse than on the same network untrained (a few labels read random features better)."""
    below = sorted((int(n), -v) for n, v in lift.get("fewshot", {}).items() if v < 0)
    if not below:
        return []
    return ["FLAG: the few-label probe is below the same network untrained at "
            + ", ".join(f"{n} labels per class ({100 * v:.2f} points)" for n, v in below)
            + ": there pretraining did not help"]


def unfinished(step: int | None) -> str:
    """Words for an encoder read from a run's checkpoint at `step`, as a run without an exported
    encoder is read: most often one stopped before its end or still training, whose figures are not
    its final ones (a finished run whose export is gone reads its last checkpoint too). "" for an
    export (`step` None)."""
    if step is None:
        return ""
    return (f"the checkpoint of step {step} (the run has no exported encoder: it stopped before its end, is still "
            "training, or its export is gone)")


def format_table(out: dict[str, Any], footer: bool = True, run_dir: str | None = None) -> str:
    """The whole evaluation as text; `footer`: with the line naming its time and eval.json;
    `run_dir`: the run as it is named now (a run moved since names its old folder in `out`). Every
    lift shown and flagged is `lift_summary` of the figures shown, not the file's stored copy."""
    p = out["protocols"]
    enc = out["encoder"]
    name = out["run_dir"] if run_dir is None else run_dir
    step = unfinished(out.get("checkpoint_step"))
    blocks = [f"{name}: {enc['encoder']} encoder (h: {enc['feature_dim']}-d) on {out['dataset']}"
              + (f", measured at {step}" if step else "")]
    lift = lift_summary(p)
    rows = [["protocol", "labels", "test accuracy", "same net untrained", "lift"]]
    if "linear" in p:
        rows.append(["linear probe on h", f"all ({p['linear']['labels']})", pct(p["linear"]["accuracy"]),
                     *untrained_cells(p["linear"], lift.get("linear"))])
    if "knn" in p:
        rows.append([f"kNN on h (k={p['knn']['k']})", "all", pct(p["knn"]["accuracy"]),
                     *untrained_cells(p["knn"], lift.get("knn"))])
    if "pixels" in p:
        rows.append(["linear probe on pixels", "all", pct(p["pixels"]["linear_accuracy"])])
        rows.append(["kNN on pixels", "all", pct(p["pixels"]["knn_accuracy"])])
    if len(rows) > 1:
        blocks.append(render(rows))
    blocks += probe_flags(lift)
    if "fewshot" in p or "supervised" in p:
        blocks.append(render(curve_rows(p)))
        blocks += fewshot_flags(lift)
    if "finetune" in p:
        rows = [["label fraction", "fine-tuned", "linear probe", "from scratch"]]
        for e in p["finetune"]["fractions"]:
            runs = e["runs"]
            lin = sum(r["linear_accuracy"] for r in runs) / len(runs)
            used = e.get("label_fraction", e["fraction"])  # results saved before it was recorded: the one asked for
            rows.append([f"{100 * used:.3g}% ({e['labels_per_class']}/class)", pct_spread(e), pct(lin),
                         pct(e["scratch_mean"]) if "scratch_mean" in e else "-"])
        blocks.append(render(rows))
    if "quality" in p:
        q, r = p["quality"], p["quality"]["random_init"]
        blocks.append(render([
            ["label-free (no labels used)", "this encoder", "same net, random init"],
            ["alignment (lower: views agree)", f"{q['alignment']:.3f}", f"{r['alignment']:.3f}"],
            ["uniformity (lower: spread out)", f"{q['uniformity']:.3f}", f"{r['uniformity']:.3f}"],
            ["effective rank", f"{q['effective_rank']:.1f} / {q['feature_dim']}", f"{r['effective_rank']:.1f}"],
        ]))
    if footer:
        blocks.append(footer_line(out, name))
    return "\n\n".join(blocks)


def footer_line(out: dict[str, Any], run_dir: str | None = None) -> str:
    """The evaluation's time and where its results are (in `run_dir`, the run as named now). The time
    is the last call's: protocols it kept from an earlier one are named, not counted."""
    ran: list[str] = (out.get("options") or {}).get("protocols") or list(out["protocols"])
    kept = [n for n in out["protocols"] if n not in ran]
    took = f"total {out['total_seconds']:.0f} s" if not kept else \
        f"{out['total_seconds']:.0f} s for {', '.join(ran)} ({', '.join(kept)} kept from an earlier evaluate)"
    return f"{took}; results in {out['run_dir'] if run_dir is None else run_dir}/eval.json"
