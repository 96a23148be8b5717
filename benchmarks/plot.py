"""Plot benchmark CSVs: ``python -m benchmarks.plot [CSV ...] [--out DIR] [--metric time]``.

One PNG per (op, metric, mode, config): p50 against the x value for every provider, with p20-p80 bars. Config
keys that describe the point rather than the series (:data:`PER_POINT`, e.g. the tensor shapes of each batch size)
are left out of the grouping. Numeric x values (batch, sequence length) give a line plot; others (VILLA's task names)
a categorical axis in first-seen order. Default input: every CSV in benchmarks/results/; default output:
benchmarks/results/plots/ (not tracked).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import defaultdict
from pathlib import Path

from benchmarks._harness import RESULTS, read_csv

PER_POINT = ("shapes",)


def _series_config(config: str) -> str:
    cfg = json.loads(config or "{}")
    return json.dumps({k: v for k, v in cfg.items() if k not in PER_POINT}, sort_keys=True)


def _number(x: str) -> float | None:
    try:
        return float(x)
    except ValueError:
        return None


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:120]


def plot(paths: list[Path], out: Path, metric: str | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for path in paths:
        for r in read_csv(path):
            if metric and r["metric"] != metric:
                continue
            key = (r["device"], r["op"], r["metric"], r["mode"], _series_config(r["config"]), r["x_name"])
            groups[key][r["provider"]].append(r)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (device, op, met, mode, config, x_name), providers in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(8.0, 4.0))
        unit = ""
        labels = list(dict.fromkeys(r["x_value"] for rows in providers.values() for r in rows))
        numeric = all(_number(x) is not None for x in labels)
        position = (lambda x: float(x)) if numeric else {x: i for i, x in enumerate(labels)}.__getitem__
        for provider, rows in sorted(providers.items()):
            latest = {}
            for r in rows:  # newest row per x value
                latest[position(r["x_value"])] = r
            xs = sorted(latest)
            p50 = [float(latest[x]["p50"]) for x in xs]
            lo = [abs(p - float(latest[x]["p20"])) for p, x in zip(p50, xs)]
            hi = [abs(float(latest[x]["p80"]) - p) for p, x in zip(p50, xs)]
            ax.errorbar(xs, p50, yerr=[lo, hi], marker="o", capsize=3, label=provider,
                        linestyle="-" if numeric else "none")
            unit = rows[0]["unit"]
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        cfg = ", ".join(f"{k}={v}" for k, v in json.loads(config or "{}").items())
        ax.set_title(f"{op} {mode} {met} on {device}\n{cfg}", fontsize=9)
        ax.set_xlabel(x_name)
        ax.set_ylabel(f"{met} ({unit})")
        if met == "time":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")  # outside: never hides a point
        fig.tight_layout()
        name = "_".join([device, op, met, mode, cfg])
        path = out / f"{_slug(name)[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}.png"  # unique when cut
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("csv", nargs="*", type=Path)
    p.add_argument("--out", type=Path, default=RESULTS / "plots")
    p.add_argument("--metric", default=None, help="only this metric (time, throughput, bandwidth, peak_memory)")
    a = p.parse_args(argv)
    paths = a.csv or sorted(RESULTS.glob("*.csv"))
    if not paths:
        raise SystemExit(f"no CSV files given and none in {RESULTS}")
    for path in plot(paths, a.out, a.metric):
        print(path)


if __name__ == "__main__":
    main()
