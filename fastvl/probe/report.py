"""Probe outputs: ``probes.json`` and ``probes.csv`` with every figure (trained model beside its random-weights
control) and the PNG plots (matplotlib, Agg backend, imported when plotting)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

__all__ = ["csv_rows", "headline", "plot_all", "write_report"]


def _acc(r: dict | None) -> float | None:
    return None if not r or "accuracy" not in r else r["accuracy"]


def _metrics(f: dict) -> dict[str, float | None]:
    """The headline numbers of one model's figures (None where a probe was skipped)."""
    out: dict[str, float | None] = {}
    if "fusion_nmi" in f:
        out["fusion_nmi_last_layer"] = f["fusion_nmi"][-1]
    if "cls_text_mass" in f:
        out["cls_text_mass_mean"] = float(np.mean(f["cls_text_mass"]))
        out["img2txt_heads"] = float(len(f["img2txt_heads"]))
        out["txt2img_heads"] = float(len(f["txt2img_heads"]))
    if "coreference" in f:
        out["coreference_accuracy"] = _acc(f["coreference"])
    for name, r in f.get("relations", {}).items():
        out[f"relation_{name.replace(' ', '_')}_accuracy"] = _acc(r)
    for name, per_layer in f.get("linguistic", {}).items():
        out[f"linguistic_{name}_max_over_layers"] = max((_acc(r) or 0.0) for r in per_layer)
    return out


def headline(trained: dict, controls: dict | list[dict]) -> dict:
    """The figures the report leads with: {name: {'trained', 'control' (mean over the controls), 'control_std',
    'controls' (how many), 'chance'}}; chance is the majority-class accuracy over the same folds for the linear
    probes, the uniform-attention share for the [CLS] text mass."""
    controls = [controls] if isinstance(controls, dict) else list(controls)
    mine = _metrics(trained)
    theirs = [_metrics(c) for c in controls]
    chance = {"cls_text_mass_mean": trained.get("uniform_text_share")}
    if "coreference" in trained:
        chance["coreference_accuracy"] = trained["coreference"].get("majority")
    for name, r in trained.get("relations", {}).items():
        chance[f"relation_{name.replace(' ', '_')}_accuracy"] = r.get("majority")
    for name, per_layer in trained.get("linguistic", {}).items():
        chance[f"linguistic_{name}_max_over_layers"] = per_layer[0].get("majority")
    out = {}
    for key, value in mine.items():
        vals = [t[key] for t in theirs if t.get(key) is not None]
        row = {"trained": value, "control": float(np.mean(vals)) if vals else None,
               "control_std": float(np.std(vals)) if vals else None, "controls": len(vals)}
        if chance.get(key) is not None:
            row["chance"] = chance[key]
        if key in ("img2txt_heads", "txt2img_heads"):
            row["of"] = trained["layers"] * trained["heads"]
        if value is None:
            skipped = [r.get("skipped") for n, r in trained.get("relations", {}).items()
                       if key == f"relation_{n.replace(' ', '_')}_accuracy"]
            row["skipped"] = skipped[0] if skipped else "skipped"
        out[key] = row
    return out


def csv_rows(trained: dict, controls: dict | list[dict]) -> list[dict]:
    """Every figure as rows {probe, measure, layer, head, trained, control (mean over the controls), chance}
    (per-layer outputs count the input layer as 0; attention layers count from 0 too)."""
    controls = [controls] if isinstance(controls, dict) else list(controls)
    rows = _rows(trained, controls[0])
    others = [_rows(trained, c) for c in controls[1:]]
    for k, row in enumerate(rows):
        vals = [row["control"]] + [o[k]["control"] for o in others]
        vals = [v for v in vals if v is not None]
        row["control"] = float(np.mean(vals)) if vals else None
    return rows


def _rows(trained: dict, control: dict) -> list[dict]:
    rows = []

    def add(probe, measure, layer, head, t, c, chance=None):
        rows.append({"probe": probe, "measure": measure, "layer": "" if layer is None else layer,
                     "head": "" if head is None else head, "trained": t, "control": c,
                     "chance": "" if chance is None else chance})

    for n, (t, c) in enumerate(zip(trained.get("fusion_nmi", []), control.get("fusion_nmi", []))):
        add("fusion", "nmi", n, None, t, c)
    for key, probe in (("cls_text_mass", "modality_importance"), ("cls_image_mass", "modality_importance"),
                       ("img2txt_share", "cross_modal"), ("txt2img_share", "cross_modal")):
        if key not in trained:
            continue
        for n, (tr, cr) in enumerate(zip(trained[key], control[key])):
            for h, (t, c) in enumerate(zip(tr, cr)):
                add(probe, key, n, h, t, c, trained["uniform_text_share"] if key == "cls_text_mass" else None)
    if "coreference" in trained:
        add("coreference", "accuracy", None, None, _acc(trained["coreference"]), _acc(control["coreference"]),
            trained["coreference"].get("majority"))
    for name, r in trained.get("relations", {}).items():
        add("relations", f"{name} accuracy", None, None, _acc(r), _acc(control.get("relations", {}).get(name)),
            r.get("majority"))
    for name, per_layer in trained.get("linguistic", {}).items():
        for n, r in enumerate(per_layer):
            add("linguistic", f"{name} accuracy", n, None, _acc(r), _acc(control["linguistic"][name][n]),
                r.get("majority"))
    return rows


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _heat(ax, values, title, vmin=0.0, vmax=1.0):
    v = np.asarray(values)
    im = ax.imshow(v, vmin=vmin, vmax=vmax, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(v.shape[1]))
    ax.set_yticks(range(v.shape[0]))
    ax.set_title(title, fontsize=9)
    if v.size <= 64:
        for (i, j), x in np.ndenumerate(v):
            ax.text(j, i, f"{x:.2f}", ha="center", va="center", fontsize=7, color="w" if x < 0.6 else "k")
    return im


def plot_nmi(results: dict[str, dict], path: Path) -> Path:
    """NMI per layer for every {label: figures} (trained models and controls)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, fig_r in results.items():
        nmi = fig_r.get("fusion_nmi")
        if nmi:
            ax.plot(range(len(nmi)), nmi, marker="o", ls="--" if "random" in label else "-", label=label)
    ax.set_xlabel("layer (0 = input: embeddings / the cross encoder's input)", fontsize=8)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("NMI(k-means k=2, modality)")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title("fusion degree (lower = more fused)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_modality(trained: dict, control: dict, name: str, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), constrained_layout=True)
    im = _heat(axes[0], trained["cls_text_mass"], f"{name} trained:\n[CLS] attention mass on text")
    _heat(axes[1], control["cls_text_mass"], f"{name} random weights:\n(uniform share of text keys "
                                             f"{trained['uniform_text_share']:.2f})")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cross_modal(trained: dict, control: dict, name: str, path: Path) -> Path:
    plt = _plt()
    fig, axes = plt.subplots(2, 2, figsize=(8, 6.5), constrained_layout=True)
    for row, (fig_r, who) in enumerate(((trained, "trained"), (control, "random weights"))):
        im = _heat(axes[row, 0], fig_r["img2txt_share"], f"{name} {who}:\nshare with a region > 0.5 on text")
        _heat(axes[row, 1], fig_r["txt2img_share"], f"{name} {who}:\nshare with a word > 0.5 on regions")
    fig.colorbar(im, ax=axes, shrink=0.8)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def chosen_head(trained: dict) -> tuple[int, int]:
    """(layer, head) of the text -> region attention (the joint layers of a single-stream model, the cross layers of
    a two-stream one) whose phrase -> region attention best separates coreferent from other regions (else 0, 0)."""
    gap = trained.get("coreference_head_gap")
    if not gap:
        return 0, 0
    layer, head = np.unravel_index(int(np.argmax(np.asarray(gap))), np.asarray(gap).shape)
    return int(layer), int(head)


def plot_regions(item: dict, layer: int, head: int, name: str, path: Path, max_phrases: int = 3) -> Path:
    """One example: for each grounded phrase (up to ``max_phrases``) a unit canvas with the image's regions drawn as
    boxes, filled by the chosen head's phrase -> region attention (the region the phrase names outlined in red),
    beside the word x region attention matrix of that head."""
    plt = _plt()
    from matplotlib.patches import Rectangle

    t2i = np.asarray(item["t2i"])[layer, head]  # [text tokens, regions]
    words, spans = item["words"], item["word_tokens"]
    boxes = np.asarray(item["norm_bb"])
    n = len(boxes)
    w2r = np.stack([t2i[s:e].mean(0) for s, e in spans])  # [words, regions]
    grounded = [p for p in item["phrases"] if p["regions"]][:max_phrases]
    k_max = len(grounded)
    fig, axes = plt.subplots(1, k_max + 1, figsize=(3.2 * k_max + 4.5, 3.8),
                             gridspec_kw={"width_ratios": [1] * k_max + [1.4]}, squeeze=False)
    axes = axes[0]
    cmap = plt.cm.Blues
    for k, p in enumerate(grounded):
        ax = axes[k]
        a = w2r[p["start"]:p["end"]].mean(0)
        ax.set_xlim(0, 1)
        ax.set_ylim(1, 0)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        for r in np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])):  # big boxes first
            x1, y1, x2, y2 = boxes[r, :4]
            named = r in p["regions"]
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, facecolor=cmap(0.15 + 0.85 * float(a[r]) / max(
                float(a.max()), 1e-9)), edgecolor="red" if named else "k", lw=2.5 if named else 0.8, alpha=0.85))
            ax.text(x1 + 0.01, y1 + 0.05, f"r{r}: {a[r]:.2f}", fontsize=7, color="k")
        ax.set_title(f"'{' '.join(words[p['start']:p['end']])}'\n-> regions (red: the one it names)", fontsize=7)
    ax = axes[-1]
    im = ax.imshow(w2r, aspect="auto", cmap="magma")
    ax.set_yticks(range(len(words)))
    ax.set_yticklabels(words, fontsize=6)
    ax.set_xticks(range(n))
    ax.set_xticklabels([f"r{r}" for r in range(n)])
    ax.set_title("word -> region attention", fontsize=8)
    fig.colorbar(im, ax=ax)
    fig.suptitle(f"{name} layer {layer} head {head}: {' '.join(words)}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_all(result: dict, name: str, out: Path, compare: dict[str, dict] | None = None) -> list[str]:
    """Every plot of one probe run into ``out``; ``compare``: other models' {label: figures} for the NMI plot."""
    trained, control = result["model"], result["control"]
    nmi = {f"{name} trained": trained, f"{name} random weights (seed {result['settings']['seed']})": control,
           **(compare or {})}
    paths = [plot_nmi(nmi, out / "nmi_per_layer.png")]
    if "cls_text_mass" in trained:  # single-stream models only (see fastvl.probe.views)
        paths += [plot_modality(trained, control, name, out / "modality_importance.png"),
                  plot_cross_modal(trained, control, name, out / "cross_modal_heads.png")]
    if result.get("maps"):
        layer, head = chosen_head(trained)
        paths.append(plot_regions(result["maps"][0], layer, head, name, out / "attention_regions.png"))
    return [str(p) for p in paths]


def write_report(result: dict, out: str | os.PathLike, meta: dict) -> dict:
    """``probes.json`` (meta, settings, headline, the trained figures, the first control's as ``control`` and every
    control's as ``controls``) and ``probes.csv`` in ``out``; returns the JSON document."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    controls = result.get("controls") or [result["control"]]
    doc = {**meta, "settings": result.get("settings"), "headline": headline(result["model"], controls),
           "trained": result["model"], "control": controls[0], "controls": controls}
    tmp = out / "probes.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out / "probes.json")
    rows = csv_rows(result["model"], controls)
    with open(out / "probes.csv.tmp", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["probe", "measure", "layer", "head", "trained", "control", "chance"])
        w.writeheader()
        w.writerows(rows)
    os.replace(out / "probes.csv.tmp", out / "probes.csv")
    return doc
