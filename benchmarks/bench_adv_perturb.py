"""Benchmark of the VILLA adversarial delta step (fastvl.ops.adv_perturb_step / _multi) at VILLA sizes.

Shapes: text deltas [B, 60, 768] (word embeddings), image deltas [B, 100, 2048] (raw region features), and
both in one call (VILLA's ``both`` mode), B in 32 / 64 / 128, lengths varying within the batch.
Providers: ``reference`` (the eager PyTorch reference, as the public function runs it), ``compile``
(torch.compile of the reference; on GPU by default, on CPU with --compile), ``cpu`` (C++), ``cuda`` and
``triton`` (GPU). Bandwidth counts the bytes that must move: read delta and grad, write delta (and the mask).

    python -m benchmarks.bench_adv_perturb [--quick] [--device cuda] [--norm linf] [--max-norm 0.1] [--layout packed]

``--layout packed`` times the packed form (fastvl's native batch: [T, D] + cu_seqlens) on the same lengths.
"""

from __future__ import annotations

import json

import torch

import fastvl
from benchmarks._harness import Bench, Case
from fastvl.ops import adv_perturb as A
from fastvl.ops.testing import adv_inputs, adv_inputs_packed, random_lengths

TEXT = (60, 768)
IMAGE = (100, 2048)


def _inputs(batch: int, L: int, D: int, dtype: torch.dtype, device: str, gen: torch.Generator, packed: bool):
    """(delta, grad, mask or cu_seqlens, max_seqlen) with lengths uniform in [L/2, L]."""
    lens = random_lengths(batch, L // 2, L, gen, must_include=[L])
    if packed:
        return adv_inputs_packed(lens, D, gen, dtype=dtype, device=device)
    return (*adv_inputs(lens, L, D, gen, dtype=dtype, device=device), L)


def _compiled_reference():
    def step(deltas, grads, masks, lrs, norm, max_norms, max_seqlens):
        for d, g, m, lr, mx, ms in zip(deltas, grads, masks, lrs, max_norms, max_seqlens, strict=True):
            if d.dim() == 2:
                d.copy_(A.adv_perturb_step_packed_reference(d, g, m, ms, lr, norm, mx))
            else:
                d.copy_(A.adv_perturb_step_reference(d, g, m, lr, norm, mx))

    return torch.compile(step, dynamic=False)


def main() -> None:
    bench = Bench("adv_perturb_step", __doc__)
    bench.parser.add_argument("--norm", default="l2", choices=A.NORMS)
    bench.parser.add_argument("--max-norm", type=float, default=0.0, help="projection radius (VILLA default 0)")
    bench.parser.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: bf16 on GPU, fp32 on CPU)")
    bench.parser.add_argument("--compile", action="store_true", help="also time torch.compile(reference) on CPU")
    bench.parser.add_argument("--layout", default="padded", choices=["padded", "packed"])
    args = bench.parse()
    device = args.device
    gpu = device.startswith("cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if gpu else torch.float32)
    providers = ["reference"]
    if gpu or args.compile:
        providers.append("compile")
    if not gpu and fastvl.HAS_C:
        providers.append("cpu")
    if gpu:
        providers += ["cuda", "triton"]
    batches = [32] if args.quick else [32, 64, 128]
    gen = torch.Generator().manual_seed(0)
    compiled = _compiled_reference() if "compile" in providers else None
    lr_txt, lr_img = 1e-3, 1e-3
    for modality in ("text", "image", "both"):
        for batch in batches:
            shapes = {"text": [TEXT], "image": [IMAGE], "both": [TEXT, IMAGE]}[modality]
            inputs = [_inputs(batch, L, D, dtype, device, gen, args.layout == "packed") for L, D in shapes]
            deltas = [x[0] for x in inputs]
            grads = [x[1] for x in inputs]
            masks = [x[2] for x in inputs]
            max_seqlens = [x[3] for x in inputs]
            lrs = [lr_txt, lr_img][:len(shapes)]
            max_norms = [args.max_norm] * len(shapes)
            moved = sum(3 * d.numel() * d.element_size() + m.numel() for d, m in zip(deltas, masks, strict=True))
            cases = []
            for p in providers:
                if p == "compile":
                    fn = (lambda: compiled(deltas, grads, masks, lrs, args.norm, max_norms, max_seqlens))
                else:
                    fn = (lambda p=p: A.adv_perturb_step_multi(deltas, grads, masks, lrs, args.norm, max_norms,
                                                               max_seqlens=max_seqlens, backend=p))
                cases.append(Case(p, fn, "fwd", bytes=moved))
            config = dict(modality=modality, layout=args.layout, norm=args.norm, max_norm=args.max_norm,
                          dtype=str(dtype).split(".")[-1], shapes=[list(d.shape) for d in deltas])
            bench.run(cases, "B", batch, config)
    rows = bench.finish()
    times = {(json.loads(r["config"])["modality"], r["x_value"], r["provider"]): r["p50"] for r in rows
             if r["metric"] == "time"}
    print(f"\ndelta step, speed-up over the eager reference (p50; goal on GPU: >= 5x), {args.layout}, {args.norm}:")
    for (modality, batch, provider), t in times.items():
        ref = times.get((modality, batch, "reference"))
        if provider != "reference" and ref:
            print(f"  {modality:>5} B={batch:<4} {provider:>8}: {ref / t:6.1f}x  ({t:.3f} ms vs {ref:.3f} ms)")


if __name__ == "__main__":
    main()
