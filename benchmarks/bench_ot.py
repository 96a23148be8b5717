"""Benchmark of word-region alignment OT (UNITER's WRA): ``python -m benchmarks.bench_ot [--quick]``.

Two measurements per shape:
- ``op``: the whole ``optimal_transport_dist`` (cosine cost + IPOT + trace), forward;
- ``ipot``: the 50 IPOT iterations alone, given the cost matrix (what the fused kernels replace).
Providers: reference (eager), reference under torch.compile, and every fused backend that can run here
(cpu; cuda and triton on a GPU). Lengths vary per pair: text uniform in [1, max_txt], regions in
[10, max_img] (UNITER clips regions to >= 10).
"""

from __future__ import annotations

import torch

import fastvl
from benchmarks._harness import Bench, Case, env_summary
from fastvl.ops import ot
from fastvl.ops.testing import ot_inputs, random_lengths


def _providers(device: str) -> list[str]:
    names = ["cpu"] if device == "cpu" else ["cuda", "triton"]
    return [n for n in names if not (n == "cpu" and not fastvl.HAS_C)]


def main(argv: list[str] | None = None) -> None:
    bench = Bench("ot", __doc__)
    bench.parser.add_argument("--hidden", type=int, default=768)
    bench.parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    a = bench.parse(argv)
    print(env_summary())
    dev = a.device
    gpu = dev.startswith("cuda")
    if a.quick:
        shapes = [(64, 40, 100)]
    elif gpu:
        shapes = [(32, 60, 100), (128, 60, 100), (512, 60, 100), (64, 40, 100)]
    else:
        shapes = [(32, 60, 100), (64, 40, 100), (128, 60, 100), (512, 60, 100)]
    dtypes = [torch.float32] if (a.quick or not gpu) else [torch.float32, torch.bfloat16]
    compiled_ref = None if a.no_compile else torch.compile(ot.optimal_transport_dist_reference)
    compiled_ipot = None if a.no_compile else torch.compile(ot.ipot_reference)
    for dtype in dtypes:
        for B, max_txt, max_img in shapes:
            gen = torch.Generator().manual_seed(B)
            txt_lens = random_lengths(B, 1, max_txt, gen)
            img_lens = random_lengths(B, 10, max_img, gen)
            txt, img, tp, ip = ot_inputs(B, max_txt, max_img, a.hidden, gen, dtype=dtype, device=dev,
                                         txt_lens=txt_lens, img_lens=img_lens)
            cfg = dict(max_txt=max_txt, max_img=max_img, hidden=a.hidden, dtype=str(dtype).removeprefix("torch."))
            # whole op (the reference computes in fp32 too, as UNITER's WRA does)
            ref = lambda: ot.optimal_transport_dist_reference(txt.float(), img.float(), tp, ip)
            cases = [Case("reference", ref)]
            if compiled_ref is not None:
                cases.append(Case("torch.compile(reference)", lambda: compiled_ref(txt.float(), img.float(), tp, ip)))
            for name in _providers(dev):
                cases.append(Case(name, lambda name=name: ot.optimal_transport_dist(txt, img, tp, ip, backend=name)))
            bench.run(cases, "B", B, {**cfg, "part": "op"})
            # IPOT iterations alone
            cost = ot.cosine_cost(txt.float(), img.float()).masked_fill(tp[:, :, None] | ip[:, None, :], 0)
            cases = [Case("reference", lambda: ot.ipot_reference(cost, tp, ip))]
            if compiled_ipot is not None:
                cases.append(Case("torch.compile(reference)", lambda: compiled_ipot(cost, tp, ip)))
            for name in _providers(dev):
                cases.append(Case(name, lambda name=name: ot.ipot_plan(cost, tp, ip, backend=name)))
            bench.run(cases, "B", B, {**cfg, "part": "ipot"})
    rows = bench.finish()
    _print_speedups(rows)


def _print_speedups(rows: list[dict]) -> None:
    times = {}
    for r in rows:
        if r["metric"] == "time":
            times[(r["config"], r["x_value"], r["provider"])] = r["p50"]
    print("\nspeed-up over the eager reference (p50):")
    for (cfg, x, prov), t in sorted(times.items()):
        ref = times.get((cfg, x, "reference"))
        if prov != "reference" and ref:
            print(f"  B={x} {cfg}: {prov} {ref / t:.2f}x")


if __name__ == "__main__":
    main()
