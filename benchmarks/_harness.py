"""Benchmark harness shared by every ``benchmarks/bench_<op>.py``.

Timing: on CUDA with CUDA events (:func:`time_cuda`; ``triton.testing.do_bench`` is not used): warm-up calls
first, then per repetition the L2 cache is flushed (a 256 MiB buffer is zeroed, more than the 50 MiB L2 of an
H100 / 60 MiB of an H200), an event is recorded, the call runs, a second event is recorded, and the device is
synchronised; the sample is the events' elapsed time, so the flush is not in it. On CPU with ``perf_counter``
after warm-up. Medians with p20/p80. Providers of one shape are interleaved (each repetition round runs every
provider once) so that drift (thermal, other processes) spreads evenly. Peak memory on CUDA from
``torch.cuda.max_memory_allocated``; on CPU it is not measured.

Output: a table on stdout and rows appended to ``benchmarks/results/<device>.csv`` with the columns in
:data:`COLUMNS`. ``--compare OLD.csv`` flags rows more than ``--threshold`` slower than the same
(op, provider, mode, metric, x_name, x_value, config) row of OLD.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as _dt
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

COLUMNS = ["op", "provider", "mode", "metric", "unit", "x_name", "x_value", "p50", "p20", "p80", "config", "device",
           "torch", "git_sha", "timestamp"]
RESULTS = Path(__file__).resolve().parent / "results"


def device_name(device: str) -> str:
    """File-name-safe device label: the GPU's name on CUDA, 'cpu-<N>threads' on CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    return f"cpu-{torch.get_num_threads()}threads"


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _quantiles(samples: list[float]) -> tuple[float, float, float]:
    s = sorted(samples)
    q = lambda p: s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]
    return statistics.median(s), q(0.2), q(0.8)


def time_cpu(fn: Callable[[], object], warmup: int, reps: int) -> list[float]:
    """Wall-clock milliseconds per call."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


L2_FLUSH_BYTES = 256 * 2**20
_flush_buffer: torch.Tensor | None = None


def flush_l2() -> None:
    """Evict the GPU's L2 cache by writing a buffer larger than it (allocated once)."""
    global _flush_buffer
    if _flush_buffer is None:
        _flush_buffer = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    _flush_buffer.zero_()


def time_cuda(fn: Callable[[], object], warmup: int, reps: int) -> list[float]:
    """CUDA-event milliseconds per call: ``warmup`` calls first, then per repetition an L2 flush (outside the
    timed region), start event, the call, end event, synchronise."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        flush_l2()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


@dataclass
class Case:
    """One provider at one shape: what to run and how to turn time into throughput."""

    provider: str
    fn: Callable[[], object]
    mode: str = "fwd"
    flops: float | None = None  # per call, for TFLOP/s
    bytes: float | None = None  # per call, for GB/s
    tokens: float | None = None  # per call, for tokens/s
    samples: list[float] = field(default_factory=list)
    peak_mem: float | None = None
    error: str | None = None


class Bench:
    """Collects rows for one op; see module docstring. Typical use::

        bench = Bench("ot", description)
        args = bench.parse()          # --device --quick --reps --warmup --csv --compare --threshold
        for shape in shapes:
            bench.run([Case("reference", f1), Case("cpu", f2)], x_name="B", x_value=64, config={...})
        bench.finish()
    """

    def __init__(self, op: str, description: str = ""):
        self.op = op
        self.parser = argparse.ArgumentParser(description=description or f"benchmark of fastvl.ops {op}")
        self.parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        self.parser.add_argument("--quick", action="store_true", help="few shapes and repetitions (smoke run)")
        self.parser.add_argument("--reps", type=int, default=None)
        self.parser.add_argument("--warmup", type=int, default=None)
        self.parser.add_argument("--csv", type=Path, default=None, help="CSV to append to (default results/<dev>.csv)")
        self.parser.add_argument("--no-csv", action="store_true", help="print only")
        self.parser.add_argument("--compare", type=Path, default=None, help="flag regressions against this CSV")
        self.parser.add_argument("--threshold", type=float, default=0.10, help="regression threshold (fraction)")
        self.rows: list[dict] = []
        self.args: argparse.Namespace | None = None

    def parse(self, argv: list[str] | None = None) -> argparse.Namespace:
        self.args = self.parser.parse_args(argv)
        a = self.args
        gpu = a.device.startswith("cuda")
        a.reps = a.reps or (5 if a.quick else (30 if gpu else 10))
        a.warmup = a.warmup or (1 if a.quick else (10 if gpu else 2))
        return a

    def run(self, cases: list[Case], x_name: str, x_value, config: dict | None = None) -> list[Case]:
        """Time every case (interleaved), record rows; a case that raises is reported, not fatal."""
        a = self.args or self.parse([])
        gpu = a.device.startswith("cuda")
        timer = time_cuda if gpu else time_cpu
        live = []
        for c in cases:
            try:
                if gpu:
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                timer(c.fn, a.warmup, 1)
                if gpu:
                    c.peak_mem = (torch.cuda.max_memory_allocated() - base) / 2**20
                live.append(c)
            except Exception as err:  # noqa: BLE001  (a provider failing is a result, not a crash)
                c.error = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        for _ in range(a.reps):
            for c in live:
                c.samples += timer(c.fn, 0, 1)
        cfg = json.dumps(config or {}, sort_keys=True)
        for c in cases:
            self._record(c, x_name, x_value, cfg, a.device)
        return cases

    def _record(self, c: Case, x_name: str, x_value, cfg: str, device: str) -> None:
        base = dict(op=self.op, provider=c.provider, mode=c.mode, x_name=x_name, x_value=x_value, config=cfg,
                    device=device_name(device), torch=torch.__version__, git_sha=git_sha(),
                    timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        if c.error:
            print(f"  {self.op:>10} {c.provider:>24} {c.mode:>5} {x_name}={x_value}: FAILED {c.error}")
            return
        p50, p20, p80 = _quantiles(c.samples)
        self.rows.append({**base, "metric": "time", "unit": "ms", "p50": p50, "p20": p20, "p80": p80})
        for metric, unit, amount, scale in (("throughput", "TFLOP/s", c.flops, 1e-12), ("bandwidth", "GB/s", c.bytes,
                                            1e-9), ("tokens", "tokens/s", c.tokens, 1.0)):
            if amount:  # a rate: the p20 of time is the p80 of throughput
                rate = [amount * scale / (ms * 1e-3) for ms in (p50, p80, p20)]
                self.rows.append({**base, "metric": metric, "unit": unit, "p50": rate[0], "p20": rate[1],
                                  "p80": rate[2]})
        if c.peak_mem is not None:
            self.rows.append({**base, "metric": "peak_memory", "unit": "MiB", "p50": c.peak_mem, "p20": c.peak_mem,
                              "p80": c.peak_mem})

    def finish(self) -> list[dict]:
        """Print the table, append the CSV, compare if asked. Returns the rows."""
        a = self.args or self.parse([])
        print_table(self.rows)
        if not a.no_csv and self.rows:
            path = a.csv or RESULTS / f"{self.rows[0]['device']}.csv"
            append_csv(path, self.rows)
            print(f"appended {len(self.rows)} rows to {path}")
        if a.compare:
            flagged = compare(self.rows, read_csv(a.compare), a.threshold)
            for line in flagged:
                print("REGRESSION", line)
        return self.rows


def append_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _key(r: dict) -> tuple:
    return (r["op"], r["provider"], r["mode"], r["metric"], r["x_name"], str(r["x_value"]), r["config"])


def compare(rows: list[dict], old: list[dict], threshold: float) -> list[str]:
    """Lines for rows whose time grew (or throughput fell) by more than ``threshold`` vs the newest old row."""
    latest = {}
    for r in old:
        latest[_key(r)] = r
    out = []
    for r in rows:
        prev = latest.get(_key(r))
        if prev is None:
            continue
        new_v, old_v = float(r["p50"]), float(prev["p50"])
        worse = new_v > old_v * (1 + threshold) if r["metric"] in ("time", "peak_memory") else \
            new_v < old_v * (1 - threshold)
        if worse:
            out.append(f"{r['op']}/{r['provider']}/{r['mode']} {r['metric']} {r['x_name']}={r['x_value']}: "
                       f"{old_v:.4g} -> {new_v:.4g} {r['unit']}")
    return out


def print_table(rows: list[dict]) -> None:
    times = [r for r in rows if r["metric"] == "time"]
    if not times:
        print("(no results)")
        return
    extra = {(_key(r)[:3] + _key(r)[4:]): r for r in rows if r["metric"] != "time"}
    print(f"{'op':>10} {'provider':>24} {'mode':>5} {'x':>14} {'p50 ms':>10} {'p20':>9} {'p80':>9}  other")
    for r in times:
        k = _key(r)
        others = [e for kk, e in extra.items() if kk[:3] == k[:3] and kk[3:] == k[4:]]
        other = "  ".join(f"{e['p50']:.4g} {e['unit']}" for e in others)
        print(f"{r['op']:>10} {r['provider']:>24} {r['mode']:>5} {r['x_name'] + '=' + str(r['x_value']):>14} "
              f"{r['p50']:>10.4g} {r['p20']:>9.4g} {r['p80']:>9.4g}  {other}")


def env_summary() -> str:
    return (f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
            f"cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}, "
            f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")


def add_e2e_arguments(bench: Bench, setups: dict) -> None:
    """The options of every end-to-end model benchmark: --config (a key of ``setups``), --dtype, --threads, --seed."""
    bench.parser.add_argument("--config", choices=sorted(setups), default=None,
                              help="model + batch setup (default: cpu on CPU, base on GPU)")
    bench.parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                              help="autocast dtype on GPU (default bf16 on GPU; CPU runs fp32)")
    bench.parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    bench.parser.add_argument("--seed", type=int, default=0)


@dataclass
class E2ESetup:
    """What :func:`e2e_setup` resolves: the setup's name, the dtype name actually used and an autocast context factory
    (autocast on GPU only; CPU runs fp32)."""

    name: str
    dtype: str
    autocast: Callable[[], contextlib.AbstractContextManager]


def e2e_setup(a: argparse.Namespace) -> E2ESetup:
    """Apply --threads and resolve --config / --dtype of :func:`add_e2e_arguments` for ``a.device``."""
    if a.threads:
        torch.set_num_threads(a.threads)
    gpu = a.device.startswith("cuda")
    name = a.config or ("base" if gpu else "cpu")
    dtype = (a.dtype or "bf16") if gpu else "fp32"
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    autocast = (lambda: torch.autocast("cuda", dtype=amp)) if amp is not None else contextlib.nullcontext
    return E2ESetup(name, dtype, autocast)
