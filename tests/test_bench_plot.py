"""benchmarks/plot.py: one PNG per series; numeric and categorical x values; per-point config keys (shapes) do not
split a series; long configs that share a prefix still get distinct files."""

import json

import pytest

from benchmarks._harness import COLUMNS, append_csv
from benchmarks.plot import plot


def _row(op, provider, x_name, x_value, config, p50=1.0):
    r = dict.fromkeys(COLUMNS, "")
    r.update(op=op, provider=provider, mode="fwd", metric="time", unit="ms", x_name=x_name, x_value=x_value,
             p50=p50, p20=p50 * 0.9, p80=p50 * 1.1, config=json.dumps(config, sort_keys=True), device="cpu-test")
    return r


def test_plot_series(tmp_path):
    pytest.importorskip("matplotlib")
    rows = []
    for b in (32, 64):  # numeric x; the shapes differ per point but it is one series
        for p in ("reference", "cpu"):
            rows.append(_row("step", p, "B", b, {"modality": "text", "shapes": [[b, 60, 768]]}))
    for task in ("mlm", "itm"):  # categorical x
        for p in ("clean", "villa"):
            rows.append(_row("villa", p, "task", task, {"mode": "both"}))
    long = "x" * 150
    for tail in ("a", "b"):  # configs whose names only differ after the file-name cut
        rows.append(_row("ret", "fast", "N", 10, {"basis": long + tail}))
    csv_path = tmp_path / "r.csv"
    append_csv(csv_path, rows)
    written = plot([csv_path], tmp_path / "plots")
    assert len(written) == 4 and len(set(written)) == 4
    assert all(p.is_file() and p.stat().st_size > 0 for p in written)
