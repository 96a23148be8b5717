"""BachGAN's ops, fused vs eager: ``python -m benchmarks.bench_bachgan [--quick] [--compile] [--maps M]``.

Two parts.

``spade_norm`` at SPADE ResBlock sizes (BachGAN's generator: the default 64 x 64 preset's blocks on CPU, the
official Cityscapes 512 x 256 blocks on a GPU), batch norm in training (running buffers updated) and instance norm,
modes ``fwd`` (the op) and ``full`` (forward + backward to x, gamma, beta). Providers: ``eager`` (the reference:
``F.batch_norm`` / ``F.instance_norm`` + modulation), ``torch.compile(eager)`` with ``--compile``, and every fused
backend that runs here (``cpu``: the C++ kernel; ``triton`` on a GPU). Metrics: time, GB/s against the bytes that
must move (fwd: x, gamma, beta read, out written; full: also dout read, dx, d_gamma, d_beta written, x and gamma
read again), peak memory.

``layout_retrieval``: Q queries (default 64) over M memory maps (default 10^5) at 64 x 64, 35 classes (Cityscapes
ids, 255 = ignore), queries with 1-4 boxes of BachGAN's 8 foreground classes, memory maps of blocky regions of all
classes. Providers: the fast backend (``cpu``: the C++ kernel on CPU; ``triton`` on a GPU) at M, as ``with_bank``
(a :class:`~fastvl.ops.LayoutMemory` built once, its build timed as ``memory_bank``) and ``end_to_end`` (a plain
tensor: class counts taken in the call); ``torch_chunked`` (pure PyTorch; at ``--chunked-maps`` on CPU, where it is
slow); ``reference`` at a small M only (it materialises every one-hot map). Metrics: time, maps/s, peak
memory. The memory bank is 400 MB of uint8 at M = 10^5, so every retrieval measurement runs in a FRESH process
(``--worker``): CPU peak memory is the growth of that process's resident-set high-water mark (VmHWM, reset through
``/proc/self/clear_refs`` after the inputs exist; glibc's mmap threshold fixed at 128 KiB there so freed buffers
leave the RSS), i.e. the workspace the op needs beyond its inputs; CUDA peak memory from
``torch.cuda.max_memory_allocated`` beyond the inputs.

CPU peak memory of ``spade_norm`` is measured the same way (a fresh process per provider and shape). Rows go to
``benchmarks/results/bench_bachgan-cpu.csv`` (or ``bench_bachgan-<gpu>.csv``). The machine these CPU numbers come
from is shared: timings are medians over interleaved repetitions, under whatever load the other processes put on
it.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import fastvl
from benchmarks._harness import RESULTS, Bench, Case, device_name, env_summary, git_sha
from fastvl.ops import LayoutMemory, layout_retrieval, spade_norm
from fastvl.ops.layout_ret import layout_retrieval_reference
from fastvl.ops.spade import spade_norm_reference

CITYSCAPES_CLASSES = 35
FOREGROUND = (24, 25, 26, 27, 28, 31, 32, 33)  # person rider car truck bus train motorcycle bicycle (labelIds)
IGNORE = 255
# (N, C, H, W) of SPADE blocks: the default preset's at 64 x 64 (CPU) and the official Cityscapes 512 x 256 (GPU)
CPU_SHAPES = [(8, 256, 8, 8), (8, 128, 16, 16), (8, 64, 32, 32), (8, 32, 64, 64)]
GPU_SHAPES = [(4, 1024, 16, 32), (4, 512, 64, 128), (4, 128, 128, 256), (4, 64, 256, 512)]


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def retrieval_inputs(n_q: int, n_mem: int, size: int, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """query [Q, 35, size, size] bool (1-4 foreground boxes, 5-40% of a side each), memory [M, size, size] uint8
    (8 x 8 blocks of random classes, 5% ignore), built in chunks so M = 10^5 needs no large temporaries."""
    gen = torch.Generator().manual_seed(seed)
    query = torch.zeros(n_q, CITYSCAPES_CLASSES, size, size, dtype=torch.bool)
    for i in range(n_q):
        for _ in range(int(torch.randint(1, 5, (1,), generator=gen))):
            c = FOREGROUND[int(torch.randint(0, len(FOREGROUND), (1,), generator=gen))]
            h, w = (int(v) for v in torch.randint(max(1, size // 20), max(2, 2 * size // 5), (2,), generator=gen))
            y, x = int(torch.randint(0, size - h + 1, (1,), generator=gen)), int(torch.randint(0, size - w + 1, (1,),
                                                                                                generator=gen))
            query[i, c, y:y + h, x:x + w] = True
    memory = torch.empty(n_mem, size, size, dtype=torch.uint8)
    cell = max(1, size // 8)
    for start in range(0, n_mem, 4096):
        b = min(4096, n_mem - start)
        coarse = torch.randint(0, CITYSCAPES_CLASSES, (b, -(-size // cell), -(-size // cell)), generator=gen,
                               dtype=torch.uint8)
        block = coarse.repeat_interleave(cell, 1).repeat_interleave(cell, 2)[:, :size, :size]
        block[torch.rand(b, size, size, generator=gen) < 0.05] = IGNORE
        memory[start:start + b] = block
    return query.to(device), memory.to(device)


def spade_inputs(shape, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x, gamma, beta = (torch.randn(shape, generator=gen).to(device, dtype) for _ in range(3))
    gamma.mul_(0.3)
    dout = torch.randn(shape, generator=gen).to(device, dtype)
    return x, gamma, beta, dout


def _spade_call(provider: str, norm: str, fn_compiled=None):
    """A callable (x, gamma, beta, rm, rv) -> out for one provider (running buffers used with batch norm)."""
    if provider == "eager":
        return lambda x, g, b, rm, rv: spade_norm_reference(x, g, b, norm, 1e-5, rm, rv, 0.1, True)
    if provider == "torch.compile(eager)":
        return lambda x, g, b, rm, rv: fn_compiled(x, g, b, norm, 1e-5, rm, rv, 0.1, True)
    return lambda x, g, b, rm, rv: spade_norm(x, g, b, norm=norm, running_mean=rm, running_var=rv, backend=provider)


def _spade_step(call, x, gamma, beta, dout, norm, mode):
    """One forward (mode 'fwd') or forward + backward (mode 'full') of ``call``; returns a thunk."""
    c = x.shape[1]
    rm = torch.zeros(c, device=x.device) if norm == "batch" else None
    rv = torch.ones(c, device=x.device) if norm == "batch" else None
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return call(x, gamma, beta, rm, rv)
        return run
    leaves = [t.detach().requires_grad_() for t in (x, gamma, beta)]

    def run():
        out = call(*leaves, rm, rv)
        return torch.autograd.grad(out, leaves, dout)
    return run


# ---------------------------------------------------------------------------------------------------------------
# Fresh-process measurements (CPU peak memory)
# ---------------------------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


class PeakRss:
    """Resident-set growth of this process over a block: VmHWM after it minus VmRSS before it (VmHWM reset to the
    current RSS through /proc/self/clear_refs, Linux >= 4.0)."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.before = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.mib = (_status_kib("VmHWM") - self.before) / 1024
        return False


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) of a few samples."""
    v = sorted(samples)
    pick = lambda q: v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]  # noqa: E731
    return statistics.median(v), pick(0.2), pick(0.8)


def _measure(fn, device: str, reps: int, warmup: int = 0) -> tuple[list[float], float]:
    """(milliseconds of ``reps`` timed calls, peak memory MiB beyond what exists of one untimed call after
    ``warmup`` calls)."""
    gpu = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        with PeakRss() as p:
            fn()
        peak = p.mib
    times = []
    for _ in range(reps):
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if gpu:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, peak


def worker(spec: dict) -> dict:
    """Run one measurement described by ``spec`` in this (fresh) process; returns its results."""
    dev = spec["device"]
    if not dev.startswith("cuda"):
        torch.set_num_threads(spec["threads"])
    if spec["part"] == "spade":
        x, gamma, beta, dout = spade_inputs(tuple(spec["shape"]), getattr(torch, spec["dtype"]), dev)
        run = _spade_step(_spade_call(spec["provider"], spec["norm"]), x, gamma, beta, dout, spec["norm"],
                          spec["mode"])
        times, peak = _measure(run, dev, spec["reps"], warmup=1)  # the first backward starts autograd's threads
        return dict(times=times, peak=peak)
    query, memory = retrieval_inputs(spec["queries"], spec["maps"], spec["size"], spec["seed"], dev)
    out: dict = {}
    prov, k = spec["provider"], spec["k"]
    if prov == "reference":
        times, peak = _measure(lambda: layout_retrieval_reference(query, memory, k, None, IGNORE), dev, spec["reps"])
        return dict(end_to_end=dict(times=times, peak=peak))
    t0 = time.perf_counter()
    with PeakRss() as p:
        bank = LayoutMemory(memory, CITYSCAPES_CLASSES, IGNORE)
    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    out["memory_bank"] = dict(times=[(time.perf_counter() - t0) * 1e3], peak=None if dev.startswith("cuda")
                              else p.mib)
    times, peak = _measure(lambda: layout_retrieval(query, bank, k, backend=prov), dev, spec["reps"])
    out["with_bank"] = dict(times=times, peak=peak)
    if spec["end_to_end"]:
        times, peak = _measure(lambda: layout_retrieval(query, memory, k, backend=prov), dev, spec["reps"])
        out["end_to_end"] = dict(times=times, peak=peak)
    # the answer of this provider, for a cross-check against another provider on the same inputs
    s, i = layout_retrieval(query, bank, k, backend=prov)
    out["top1"] = i[:, 0].tolist()
    return out


def run_worker(spec: dict, timeout: float) -> dict:
    """``worker(spec)`` in a fresh interpreter (glibc's mmap threshold fixed, so freed buffers leave the RSS)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(spec.get("threads", 1)))
    res = subprocess.run([sys.executable, "-m", "benchmarks.bench_bachgan", "--worker", json.dumps(spec)],
                         capture_output=True, text=True, timeout=timeout, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if res.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------


def _spade_providers(device: str) -> list[str]:
    if device.startswith("cuda"):
        return ["triton"]
    return ["cpu"] if fastvl.HAS_C else []


def bench_spade(bench: Bench, a) -> None:
    dev = a.device
    gpu = dev.startswith("cuda")
    shapes = (GPU_SHAPES if gpu else CPU_SHAPES)[:1 if a.quick else None]
    dtypes = [torch.float32] if (a.quick or not gpu) else [torch.float32, torch.bfloat16]
    compiled = torch.compile(spade_norm_reference) if a.compile else None
    providers = ["eager"] + (["torch.compile(eager)"] if compiled else []) + _spade_providers(dev)
    for dtype in dtypes:
        for shape in shapes:
            for norm in ("batch", "instance"):
                x, gamma, beta, dout = spade_inputs(shape, dtype, dev)
                numel, size = x.numel(), x.element_size()
                for mode in ("fwd", "full"):
                    cases = []
                    for prov in providers:
                        run = _spade_step(_spade_call(prov, norm, compiled), x, gamma, beta, dout, norm, mode)
                        moved = (4 if mode == "fwd" else 4 + 7) * numel * size
                        cases.append(Case(prov, run, mode=mode, bytes=moved))
                    cfg = dict(N=shape[0], C=shape[1], H=shape[2], W=shape[3], norm=norm,
                               dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads())
                    x_value = "x".join(map(str, shape)) + "/" + norm
                    bench.run(cases, "NCHW/norm", x_value, cfg)
                    if not gpu and not a.no_peak:  # CPU peak memory: a fresh process per provider
                        for c in cases:
                            if c.error or c.provider.startswith("torch.compile"):
                                continue
                            got = run_worker(dict(part="spade", device=dev, shape=list(shape), dtype="float32",
                                                  norm=norm, mode=mode, provider=c.provider, reps=1,
                                                  threads=torch.get_num_threads()), timeout=600)
                            _row(bench, c.provider, mode, "peak_memory", "MiB", "NCHW/norm", x_value, [got["peak"]],
                                 dict(cfg, measure="RSS high-water growth, fresh process"), "spade_norm")
                            print(f"  spade_norm {c.provider:>6} {mode:>4} {x_value}: peak {got['peak']:.2f} MiB "
                                  f"(inputs {3 * numel * size / 2**20:.2f} MiB)", flush=True)


def _row(bench: Bench, provider, mode, metric, unit, x_name, x_value, samples, cfg, op):
    p50, p20, p80 = quantiles(samples)
    bench.rows.append(dict(op=op, provider=provider, mode=mode, metric=metric, unit=unit, x_name=x_name,
                           x_value=x_value, p50=p50, p20=p20, p80=p80, config=json.dumps(cfg, sort_keys=True),
                           device=device_name(bench.args.device), torch=torch.__version__, git_sha=git_sha(),
                           timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")))


def bench_retrieval(bench: Bench, a) -> None:
    dev = a.device
    gpu = dev.startswith("cuda")
    n_mem = a.maps or (2000 if a.quick else 100_000)
    fast = "triton" if gpu else ("cpu" if fastvl.HAS_C else "torch_chunked")
    threads = torch.get_num_threads()
    base = dict(device=dev, queries=a.queries, size=a.size, seed=0, k=3, threads=threads)
    cfg = dict(Q=a.queries, H=a.size, W=a.size, C=CITYSCAPES_CLASSES, k=3, threads=threads)
    runs = [(fast, n_mem, True)]
    if fast != "torch_chunked":
        runs.append(("torch_chunked", n_mem if gpu else min(n_mem, a.chunked_maps), False))
    runs.append(("reference", min(n_mem, a.reference_maps), False))
    top1 = {}
    summary = []
    for prov, m, e2e in runs:
        print(f"  layout_retrieval {prov}: Q={a.queries} over M={m} maps at {a.size}x{a.size} (fresh process) ...",
              flush=True)
        got = run_worker(dict(base, part="retrieval", provider=prov, maps=m, reps=a.retrieval_reps, end_to_end=e2e),
                         timeout=3600)
        if "top1" in got:
            top1[(prov, m)] = got["top1"]
        for part, res in got.items():
            if part == "top1":
                continue
            c = dict(cfg, M=m, part=part, measure="RSS high-water growth beyond the inputs, fresh process"
                     if not gpu else "max_memory_allocated beyond the inputs")
            _row(bench, prov, "eval", "time", "ms", "maps", m, res["times"], c, "layout_retrieval")
            _row(bench, prov, "eval", "maps_per_s", "maps/s", "maps", m, [m / (t * 1e-3) for t in res["times"]], c,
                 "layout_retrieval")
            if res["peak"] is not None:
                _row(bench, prov, "eval", "peak_memory", "MiB", "maps", m, [res["peak"]], c, "layout_retrieval")
            p50 = quantiles(res["times"])[0]
            peak = "-" if res["peak"] is None else f"{res['peak']:.1f} MiB"
            summary.append(f"  {prov:>14} {part:>11} M={m:<7} {p50 / 1e3:9.3f} s  {m / (p50 * 1e-3):12.0f} maps/s  "
                           f"peak {peak}")
    print(f"\nlayout_retrieval, Q={a.queries}, {a.size}x{a.size}, k=3, {threads} thread(s) (p50 of "
          f"{a.retrieval_reps}; peak = {'RSS growth beyond the inputs' if not gpu else 'CUDA allocations'}):")
    print("\n".join(summary))
    answers = {key: v for key, v in top1.items() if key[1] == n_mem}
    if len({tuple(v) for v in answers.values()}) > 1:
        print("WARNING: providers disagree on the best map per query")


def main(argv: list[str] | None = None) -> None:
    if argv is None and len(sys.argv) > 2 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
        return
    bench = Bench("spade_norm", __doc__)
    p = bench.parser
    p.add_argument("--part", choices=["all", "spade", "retrieval"], default="all")
    p.add_argument("--compile", action="store_true", help="also torch.compile(eager) for spade_norm")
    p.add_argument("--maps", type=int, default=None, help="retrieval memory size M (default 10^5; --quick 2000)")
    p.add_argument("--queries", type=int, default=64)
    p.add_argument("--size", type=int, default=64, help="map side (H = W)")
    p.add_argument("--reference-maps", type=int, default=200, help="M for the (materialising) reference")
    p.add_argument("--chunked-maps", type=int, default=10_000, help="M for torch_chunked on CPU (slow)")
    p.add_argument("--retrieval-reps", type=int, default=2, help="timed retrieval calls after one untimed")
    p.add_argument("--threads", type=int, default=1,
                   help="intra-op threads on CPU (default 1: multi-threaded small ops stall on a busy shared CPU)")
    p.add_argument("--no-peak", action="store_true", help="skip the fresh-process CPU peak memory of spade_norm")
    a = bench.parse(argv)
    gpu = a.device.startswith("cuda")
    if not gpu:
        torch.set_num_threads(a.threads)
    if a.csv is None:
        a.csv = RESULTS / ("bench_bachgan-" + ("cpu" if not gpu else device_name(a.device)) + ".csv")
    print(env_summary())
    if a.part in ("all", "spade"):
        bench_spade(bench, a)
    if a.part in ("all", "retrieval"):
        bench_retrieval(bench, a)
    bench.finish()


if __name__ == "__main__":
    main()
