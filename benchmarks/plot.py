"""Plot benchmark CSVs: ``python -m benchmarks.plot [CSV ...] [--out DIR] [--metric time]``.

One PNG per (op, metric, mode, config): p50 against the x value for every provider, with p20-p80 bars.
Default input: every CSV in benchmarks/results/; default output: benchmarks/results/plots/.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from benchmarks._harness import RESULTS, read_csv


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
            groups[(r["device"], r["op"], r["metric"], r["mode"], r["config"], r["x_name"])][r["provider"]].append(r)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (device, op, met, mode, config, x_name), providers in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        unit = ""
        for provider, rows in sorted(providers.items()):
            latest = {}
            for r in rows:  # newest row per x value
                latest[float(r["x_value"])] = r
            xs = sorted(latest)
            p50 = [float(latest[x]["p50"]) for x in xs]
            lo = [p - float(latest[x]["p20"]) for p, x in zip(p50, xs)]
            hi = [float(latest[x]["p80"]) - p for p, x in zip(p50, xs)]
            lo, hi = [abs(v) for v in lo], [abs(v) for v in hi]
            ax.errorbar(xs, p50, yerr=[lo, hi], marker="o", capsize=3, label=provider)
            unit = rows[0]["unit"]
        cfg = ", ".join(f"{k}={v}" for k, v in json.loads(config or "{}").items())
        ax.set_title(f"{op} {mode} {met} on {device}\n{cfg}", fontsize=9)
        ax.set_xlabel(x_name)
        ax.set_ylabel(f"{met} ({unit})")
        if met == "time":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"{_slug('_'.join([device, op, met, mode, cfg]))}.png"
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
