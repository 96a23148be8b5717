"""Benchmark of the fused masked-region and token losses at UNITER-base sizes: ``python -m benchmarks.bench_losses``.

Cases (a 10240-token batch, 15% of it masked = 1536 rows, hidden 768):
- ``mlm``: fused_linear_cross_entropy, tied decoder (V = 28996), rows gathered by index from [10240, 768];
- ``mlm50k``: the same at a 50265-word vocabulary (HERO / RoBERTa: the large-vocabulary stress case);
- ``mrc``: fused_linear_cross_entropy over 1601 region classes (ignore_index 0);
- ``mrckl``: fused_linear_kl over 1601 classes against soft labels (official element mean);
- ``mrfr`` / ``mffr``: fused_masked_regression to 2048-d features (mse, official mean) / (l2, HERO);
- ``itm``: fused_linear_cross_entropy with 2 classes on 64 pooled outputs;
- ``vqa``: fused_bce_soft, 256 x 1536 -> 3129 answers ('batchmean', the official instance-level BCE);
- ``skl``: symmetric_kl of two [256, 3129] logit sets (VILLA VQA).

Modes: ``full`` (forward + backward w.r.t. hidden, weight and bias, as in training; default) and ``fwd``.
Providers: ``reference`` (eager PyTorch: all logits materialised), ``compile`` (torch.compile of the
reference), ``torch_chunked`` and, on GPU, ``triton``; each case records which backend the public function
selects by itself (config ``auto``: on CPU ``torch_chunked``, or ``reference`` for tiny problems such as itm).
GPU rows carry the peak memory above the inputs (harness); CPU memory is not measured. Default dtype: bfloat16
on GPU, float32 on CPU. The summary gives every provider's ratio to eager (time; on GPU also memory) and flags
automatically selected backends more than 10% slower than eager.

    python -m benchmarks.bench_losses [--quick] [--cases mlm mrc ...] [--modes full fwd] [--compile all|mlm|none]
    python -m benchmarks.bench_losses --providers compile      # CPU: torch.compile in a run of its own

On a CPU shared with other work, 2-thread timings of many small ops are dominated by waiting for the second
thread; ``OMP_NUM_THREADS=1`` gives stable comparisons.
"""

from __future__ import annotations

import json

import torch

from benchmarks._harness import Bench, Case, env_summary
from fastvl.ops import bce_soft, linear_cross_entropy, linear_kl, masked_regression, sym_kl
from fastvl.ops._chunked import select_backend
from fastvl.ops.testing import (
    class_targets,
    linear_head_inputs,
    logit_pair,
    masked_positions,
    soft_label_targets,
    vqa_soft_scores,
)

TOKENS, MASK_FRAC, HIDDEN = 10240, 0.15, 768
CASES = ["mlm", "mlm50k", "mrc", "mrckl", "mrfr", "mffr", "itm", "vqa", "skl"]


def _case(name: str, dtype: torch.dtype, device: str, gen: torch.Generator):
    """(fused function (backend=...) -> loss, reference function -> loss, differentiable inputs, description)."""
    idx = masked_positions(TOKENS, MASK_FRAC, gen, device=device)
    n = idx.numel()
    if name in ("mlm", "mlm50k", "mrc"):
        vocab = {"mlm": 28996, "mlm50k": 50265, "mrc": 1601}[name]
        ignore = 0 if name == "mrc" else -1
        h, w, b, _ = linear_head_inputs(TOKENS, HIDDEN, vocab, gen, dtype=dtype, device=device)
        t = class_targets(n, vocab, gen, device=device)
        if name == "mrc":
            t = t.clamp(min=1)
        fused = lambda backend, h, w, b: linear_cross_entropy.fused_linear_cross_entropy(  # noqa: E731
            h, w, b, t, ignore, "mean", indices=idx, validate=False, backend=backend)
        ref = lambda h, w, b: linear_cross_entropy.linear_cross_entropy_reference(h, w, b, t, ignore, "mean", idx)  # noqa: E731
        auto = select_backend(linear_cross_entropy.LINEAR_CE, (h, w, b, t, idx), n, vocab, None)
        return fused, ref, [h, w, b], dict(rows=n, vocab=vocab, gathered_from=TOKENS, auto=auto)
    if name == "itm":
        h, w, b, _ = linear_head_inputs(64, HIDDEN, 2, gen, dtype=dtype, device=device)
        t = class_targets(64, 2, gen, device=device)
        fused = lambda backend, h, w, b: linear_cross_entropy.fused_linear_cross_entropy(  # noqa: E731
            h, w, b, t, validate=False, backend=backend)
        ref = lambda h, w, b: linear_cross_entropy.linear_cross_entropy_reference(h, w, b, t)  # noqa: E731
        auto = select_backend(linear_cross_entropy.LINEAR_CE, (h, w, b, t, None), 64, 2, None)
        return fused, ref, [h, w, b], dict(rows=64, vocab=2, auto=auto)
    if name == "mrckl":
        h, w, b, _ = linear_head_inputs(TOKENS, HIDDEN, 1601, gen, dtype=dtype, device=device)
        p = soft_label_targets(n, 1601, gen, device=device)
        fused = lambda backend, h, w, b: linear_kl.fused_linear_kl(  # noqa: E731
            h, w, b, p, indices=idx, validate=False, backend=backend)
        ref = lambda h, w, b: linear_kl.linear_kl_reference(h, w, b, p, indices=idx)  # noqa: E731
        auto = select_backend(linear_kl.LINEAR_KL, (h, w, b, p, idx), n, 1601, None)
        return fused, ref, [h, w, b], dict(rows=n, vocab=1601, gathered_from=TOKENS, auto=auto)
    if name in ("mrfr", "mffr"):
        loss = "mse" if name == "mrfr" else "l2"
        h, wt, b, _ = linear_head_inputs(TOKENS, HIDDEN, 2048, gen, transposed=True, logit_std=1.0, dtype=dtype,
                                         device=device)
        y = torch.randn(n, 2048, generator=gen).relu().to(device=device, dtype=dtype)
        fused = lambda backend, h, wt, b: masked_regression.fused_masked_regression(  # noqa: E731
            h, wt, b, y, "mean", loss, indices=idx, validate=False, backend=backend)
        ref = lambda h, wt, b: masked_regression.masked_regression_reference(h, wt, b, y, "mean", loss, idx)  # noqa: E731
        auto = select_backend(masked_regression.MASKED_REGRESSION, (h, wt, b, y, idx), n, 2048, None)
        return fused, ref, [h, wt, b], dict(rows=n, features=2048, loss=loss, gathered_from=TOKENS, auto=auto)
    if name == "vqa":
        h, w, b, _ = linear_head_inputs(256, 2 * HIDDEN, 3129, gen, dtype=dtype, device=device)
        y = vqa_soft_scores(256, 3129, gen, device=device)
        fused = lambda backend, h, w, b: bce_soft.fused_bce_soft(h, w, b, y, validate=False, backend=backend)  # noqa: E731
        ref = lambda h, w, b: bce_soft.bce_soft_reference(h, w, b, y)  # noqa: E731
        auto = select_backend(bce_soft.BCE_SOFT, (h, w, b, y, None), 256, 3129, None)
        return fused, ref, [h, w, b], dict(rows=256, answers=3129, auto=auto)
    if name == "skl":
        a, c = logit_pair((256, 3129), gen, dtype=dtype, device=device)
        fused = lambda backend, a, c: sym_kl.symmetric_kl(a, c, backend=backend)  # noqa: E731
        auto = select_backend(sym_kl.SYMMETRIC_KL, (a, c), 256, 3129, None)
        return fused, sym_kl.symmetric_kl_reference, [a, c], dict(rows=256, classes=3129, auto=auto)
    raise ValueError(f"unknown case {name!r}; choose from {CASES}")


def _runner(fn, inputs: list[torch.Tensor], mode: str):
    """A closure timing one call: forward only, or forward + gradients of every input."""
    leaves = [t.detach().requires_grad_(mode == "full") for t in inputs]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*leaves)
    else:
        def run():
            return torch.autograd.grad(fn(*leaves), leaves)
    return run


def main(argv: list[str] | None = None) -> None:
    bench = Bench("losses", __doc__)
    bench.parser.add_argument("--cases", nargs="+", default=None, choices=CASES)
    bench.parser.add_argument("--modes", nargs="+", default=["full"], choices=["full", "fwd"])
    bench.parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    bench.parser.add_argument("--providers", nargs="+", default=None,
                              help="time only these besides the eager reference (e.g. compile torch_chunked)")
    bench.parser.add_argument("--compile", default=None, choices=["all", "mlm", "none"],
                              help="which cases also time torch.compile(reference) (default: all on CPU, mlm on "
                                   "GPU, none with --quick)")
    a = bench.parse(argv)
    print(env_summary())
    dev = a.device
    gpu = dev.startswith("cuda")
    dtype = getattr(torch, a.dtype) if a.dtype else (torch.bfloat16 if gpu else torch.float32)
    cases = a.cases or (["mlm", "mrckl", "vqa", "skl"] if a.quick else CASES)
    # On CPU, compiled (inductor, OpenMP) and eager calls interleaved in one process slow each other down, so
    # compile is timed only when asked for there (best in its own run: --providers compile).
    cpu_compile = "all" if a.providers and "compile" in a.providers else "none"
    compile_mode = a.compile or ("none" if a.quick else ("mlm" if gpu else cpu_compile))
    fused_backends = ["triton", "torch_chunked"] if gpu else ["torch_chunked"]
    for name in cases:
        gen = torch.Generator().manual_seed(0)
        fused, ref, inputs, cfg = _case(name, dtype, dev, gen)
        cfg = {**cfg, "dtype": str(dtype).removeprefix("torch.")}
        compiled = torch.compile(ref, dynamic=False) if compile_mode == "all" or compile_mode == name else None
        for mode in a.modes:
            cases_ = [Case("reference", _runner(ref, inputs, mode), mode)]
            if compiled is not None:
                cases_.append(Case("compile", _runner(compiled, inputs, mode), mode))
            for backend in fused_backends:
                cases_.append(Case(backend, _runner(lambda *x, b=backend: fused(b, *x), inputs, mode), mode))
            if a.providers:
                cases_ = [c for c in cases_ if c.provider == "reference" or c.provider in a.providers]
            bench.run(cases_, "case", name, cfg)
            if gpu:
                torch.cuda.empty_cache()
    rows = bench.finish()
    _summary(rows)


def _summary(rows: list[dict]) -> None:
    """Ratios to the eager reference per (case, mode). The automatically selected backend of each case (config
    ``auto``) is what users get; it is flagged when more than 10% slower than eager."""
    stat, auto = {}, {}
    for r in rows:
        stat[(r["x_value"], r["mode"], r["provider"], r["metric"])] = float(r["p50"])
        auto[r["x_value"]] = json.loads(r["config"]).get("auto", "")
    print("\nratio to eager (time p50; peak memory on GPU); * = selected automatically on this device:")
    flagged = []
    for (case, mode, prov, metric), v in sorted(stat.items()):
        ref_t = stat.get((case, mode, "reference", "time"))
        if metric != "time" or not ref_t:
            continue
        mem, ref_mem = stat.get((case, mode, prov, "peak_memory")), stat.get((case, mode, "reference", "peak_memory"))
        mem_txt = f"  memory {mem / ref_mem:5.2f}x ({mem:.0f} / {ref_mem:.0f} MiB)" if mem and ref_mem else ""
        star = "*" if prov == auto.get(case) else " "
        print(f"  {case:>7} {mode:>4} {prov:<14}{star} time {v / ref_t:5.2f}x ({v:9.3f} / {ref_t:9.3f} ms){mem_txt}")
        if star == "*" and v > 1.10 * ref_t:
            flagged.append(f"{case}/{mode}/{prov} {v / ref_t:.2f}x")
    print("automatically selected backends more than 10% slower than eager: " + (", ".join(flagged) or "none"))


if __name__ == "__main__":
    main()
