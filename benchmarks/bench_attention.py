"""Benchmark of cross-modal attention: ``python -m benchmarks.bench_attention [--quick] [--providers a,b]``.

Shapes (H heads of head_dim D, lengths drawn per sequence):
- ``uniter``: UNITER-base single stream, B in {32, 128, 256}, H 12, D 64, lengths uniform in [20, 160], bidirectional;
- ``caption``: the same lengths under seq2seq (bidirectional prefix of 10..L tokens, causal after);
- ``hero``: HERO temporal / long sequences, lengths uniform in [256, 1024] and all-1024, bidirectional;
- ``cross``: text (<= 60 tokens) queries over regions (10..100), B 128 (two-stream / pair attention).
Modes: ``fwd`` (no autograd graph), ``bwd`` (backward alone, graph kept), ``full`` (forward + backward).
Providers: ``reference`` (padded PyTorch), ``triton`` (fastvl's kernels) and every peer that can take the input:
``sdpa_padded`` (SDPA with a boolean mask), ``sdpa_varlen`` (PyTorch varlen FlashAttention), ``flex``
(compiled FlexAttention, block mask built once outside the timing: its best case), ``xformers``, ``flash_attn``.
FlexAttention compiles per shape (tens of seconds), so by default it runs on the ``cross`` shape only
(``--flex-all`` for every shape). The GPU run is sized to finish in about two minutes.

Throughput follows the flash-attention convention: forward FLOPs = 4 * H * D * (visible (query, key) pairs) summed
over the ragged sequences (4 * L^2 * H * D per bidirectional sequence), backward 2.5x, full 3.5x. Peak memory is
the harness's (allocated on top of the inputs). After the table, triton's speed-up over every other provider is
printed and stored as ``speedup_vs_<provider>`` rows.

On CPU only the reference and the Triton interpreter run, at tiny sizes (the interpreter is ~1000x slower).
"""

from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

from benchmarks._harness import RESULTS, Bench, Case, append_csv, env_summary  # noqa: E402
from fastvl.ops import attention as A  # noqa: E402
from fastvl.ops.testing import attention_inputs, random_lengths  # noqa: E402

PEERS = ("sdpa_padded", "sdpa_varlen", "flex", "xformers", "flash_attn")


def visible_pairs(lens_q: list[int], lens_k: list[int], mask: str, prefix: list[int] | None) -> int:
    """Number of (query, key) pairs the mask lets through, summed over sequences."""
    if mask != "seq2seq":
        return sum(a * b for a, b in zip(lens_q, lens_k))
    # query i sees keys j < max(prefix, i + 1), capped at the sequence length
    total = 0
    for n, p in zip(lens_q, prefix):
        total += sum(min(n, max(p, i + 1)) for i in range(n))
    return total


def shapes(device: str, quick: bool, gen: torch.Generator) -> list[dict]:
    """Every shape: name, x (batch), lengths, mask, prefix, heads, head_dim, whether FlexAttention runs."""
    out = []

    def add(name, B, lens_q, lens_k=None, mask="bidirectional", prefix=None, heads=12, head_dim=64, flex=False):
        out.append(dict(name=name, B=B, lens_q=lens_q, lens_k=lens_k or lens_q, mask=mask, prefix=prefix,
                        heads=heads, head_dim=head_dim, flex=flex))

    if device == "cpu":
        add("tiny", 2, random_lengths(2, 5, 24, gen), heads=2, head_dim=32)
        add("tiny-cross", 2, random_lengths(2, 1, 12, gen), random_lengths(2, 10, 24, gen), mask="cross", heads=2,
            head_dim=32)
        if not quick:
            lens = random_lengths(32, 20, 160, gen)
            add("uniter", 32, lens)  # reference only (see main)
        return out
    for B in ([32] if quick else [32, 128, 256]):
        add("uniter", B, random_lengths(B, 20, 160, gen))
    if not quick:
        lens = random_lengths(64, 20, 160, gen)
        add("caption", 64, lens, mask="seq2seq", prefix=[int(torch.randint(10, n + 1, (1,), generator=gen))
                                                          for n in lens])
        add("hero", 16, random_lengths(16, 256, 1024, gen))
        add("hero-1024", 8, [1024] * 8)
    add("cross", 128, random_lengths(128, 1, 60, gen), random_lengths(128, 10, 100, gen), mask="cross", flex=True)
    return out


def _fn(provider: str, args: tuple):
    """(q, k, v) -> out for one provider (FlexAttention gets its block mask built here, outside the timing)."""
    q, k, v, cq, ck, mq, mk, mask, prefix = args
    if provider == "reference":
        return lambda q, k, v: A.cross_modal_attention_reference(q, k, v, cq, ck, mq, mk, mask, prefix)
    if provider == "flex":
        from fastvl.ops import _attention_peers as P

        block_mask = P.flex_block_mask(cq, ck, q.shape[0], k.shape[0], mask, prefix)
        scale = q.shape[-1] ** -0.5
        return lambda q, k, v: P.run_flex(q, k, v, cq, ck, mq, mk, mask, prefix, 0.0, scale, False, block_mask)
    return lambda q, k, v: A.cross_modal_attention(q, k, v, cq, ck, mq, mk, mask, prefix, backend=provider,
                                                   validate=False)


def _cases(provider: str, args: tuple, fwd_flops: float, modes: list[str]) -> list[Case]:
    fn = _fn(provider, args)
    q, k, v = (t.detach().clone().requires_grad_() for t in args[:3])
    dout = torch.randn_like(q)
    cases = []
    for mode in modes:
        if mode == "fwd":
            def run():
                with torch.no_grad():
                    return fn(q, k, v)
            cases.append(Case(provider, run, "fwd", flops=fwd_flops))
        elif mode == "bwd":
            holder = {}

            def run():
                if "out" not in holder:  # the graph is built once (the first call is a warm-up)
                    holder["out"] = fn(q, k, v)
                return torch.autograd.grad(holder["out"], (q, k, v), dout, retain_graph=True)
            cases.append(Case(provider, run, "bwd", flops=2.5 * fwd_flops))
        else:
            cases.append(Case(provider, lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), dout), "full",
                              flops=3.5 * fwd_flops))
    return cases


def _providers(shape: dict, args: tuple, device: str, wanted: list[str] | None, flex_all: bool) -> tuple[list, dict]:
    """Providers that can run this shape here, and the reasons of those that cannot."""
    names = ["reference", "triton"] + ([] if device == "cpu" else list(PEERS))
    if device == "cpu" and shape["name"] == "uniter":
        names = ["reference"]
    run, skipped = [], {}
    for name in names:
        if wanted and name not in wanted:
            continue
        if name == "flex" and not (shape["flex"] or flex_all):
            skipped[name] = "compiles per shape: only on shapes marked for it (--flex-all for every shape)"
            continue
        if name != "reference":
            why = A.ATTENTION.backends[name].supports(*args, 0.0, None, False)
            if why:
                skipped[name] = "; ".join(why)
                continue
        run.append(name)
    return run, skipped


def _speedups(rows: list[dict]) -> list[dict]:
    """Rows ``speedup_vs_<provider>`` (p50 time of the provider / p50 time of triton), printed as they are made."""
    times = {}
    for r in rows:
        if r["metric"] == "time":
            times[(r["config"], str(r["x_value"]), r["mode"], r["provider"])] = r
    out = []
    print("\ntriton speed-up over each provider (p50 time ratio; > 1 = triton faster):")
    for (cfg, x, mode, prov), r in times.items():
        mine = times.get((cfg, x, mode, "triton"))
        if prov == "triton" or mine is None:
            continue
        ratio = r["p50"] / mine["p50"]
        shape = json.loads(cfg).get("shape", cfg)
        print(f"  {shape:>10} B={x:<4} {mode:>4}: {ratio:7.2f}x vs {prov}")
        out.append({**mine, "metric": f"speedup_vs_{prov}", "unit": "x", "p50": ratio, "p20": ratio, "p80": ratio})
    return out


def main(argv: list[str] | None = None) -> None:
    bench = Bench("attention", __doc__)
    bench.parser.add_argument("--providers", default="", help="comma-separated subset (default: all that fit)")
    bench.parser.add_argument("--modes", default="fwd,bwd,full")
    bench.parser.add_argument("--flex-all", action="store_true", help="FlexAttention on every shape (compiles each)")
    bench.parser.add_argument("--autotune", action="store_true", help="autotune the Triton kernels per shape class")
    bench.parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    a = bench.parse(argv)
    if a.autotune:
        os.environ["FASTVL_TRITON_AUTOTUNE"] = "1"
    print(env_summary())
    device = "cpu" if not a.device.startswith("cuda") else a.device
    dtype = torch.float32 if device == "cpu" else getattr(torch, a.dtype)
    wanted = [p for p in a.providers.split(",") if p] or None
    modes = a.modes.split(",")
    gen = torch.Generator().manual_seed(0)
    for shape in shapes("cpu" if device == "cpu" else "cuda", a.quick, gen):
        args = attention_inputs(shape["lens_q"], shape["lens_k"], shape["heads"], shape["head_dim"], gen, dtype,
                                device, shape["mask"], shape["prefix"])
        pairs = visible_pairs(shape["lens_q"], shape["lens_k"], shape["mask"], shape["prefix"])
        fwd_flops = 4.0 * shape["heads"] * shape["head_dim"] * pairs
        run, skipped = _providers(shape, args, device, wanted, a.flex_all)
        for name, why in skipped.items():
            print(f"  [{shape['name']} B={shape['B']}] {name} skipped: {why}")
        cases = [c for name in run for c in _cases(name, args, fwd_flops, modes)]
        cfg = dict(shape=shape["name"], mask=shape["mask"], H=shape["heads"], D=shape["head_dim"],
                   dtype=str(dtype).removeprefix("torch."), tokens=sum(shape["lens_q"]),
                   max_len=max(shape["lens_q"]))
        bench.run(cases, "B", shape["B"], cfg)
        del cases, args
        if device != "cpu":
            torch.cuda.empty_cache()
    rows = bench.finish()
    extra = _speedups(rows)
    if extra and not a.no_csv:
        append_csv(a.csv or RESULTS / f"{rows[0]['device']}.csv", extra)


if __name__ == "__main__":
    main()
