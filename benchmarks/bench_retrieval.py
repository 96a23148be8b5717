"""Image-text retrieval evaluation, fast vs naive: ``python -m benchmarks.bench_retrieval [--quick]``.

The full text x image score matrix of a single-stream cross-encoder (UNITER: every pair needs a joint forward),
N texts x M images (default 1,000 x 5,000 = 5M pairs), synthetic inputs with realistic lengths (texts 12-20
tokens with [CLS]/[SEP], 10-36 regions of ``img_dim`` features), tiny UNITER (hidden 64, 2 layers, 4 heads,
FFN 128; the default ``tiny`` config), no gradient, fp32 on CPU (``--amp`` = bf16 autocast on GPU). Providers:

- ``naive_per_pair``: :func:`fastvl.tasks.retrieval.brute_force_scores`, one model forward per pair (embeddings
  recomputed), ``--naive-pairs`` random pairs per round;
- ``itr_task_chunked``: :meth:`fastvl.tasks.itr.ITRTask.score_matrix`, the task module's own evaluation (pairs
  packed 256 per model forward, embeddings recomputed per pair), ``--chunked-texts`` texts x M images per round;
- ``fast_exact``: :func:`fastvl.tasks.retrieval.score_matrix` ``mode='exact'`` (embeddings once per text / image,
  length-sorted packed tiles, layer-0 QKV cache, [CLS]-only last layer), ``--subset-texts`` texts x M per round;
- ``fast_exact_no_shortcuts``: the same with ``shortcuts=False`` (each chunk through the model's own encoder);
- ``two_stage_k<k>``: ``mode='two_stage'`` on the full matrix (N + M unimodal encodings, cosine shortlist,
  cross-encoder re-ranking of the top-k per query). Its recall may differ from exact: a different, APPROXIMATE
  mode, reported separately (here: speed only; the inputs are random).

The machine this runs on is shared and its load drifts, so the providers are timed in ``--rounds`` interleaved
rounds, each on its own slice of texts; per-pair times are medians (p20 / p80) over rounds and the speed-up is the
median of per-round ratios. The full-matrix times of the rounds' providers are EXTRAPOLATED linearly from their
per-pair times (pairs are independent, every text row is the same work; the fast paths' one-time embedding of the
M images is included in every round, so their extrapolation is conservative): metric
``time_full_matrix_extrapolated``, config ``"extrapolated": true``. The fast exact path is also run on the full
matrix when the rounds predict it fits in ``--budget-s`` (metric ``time_full_matrix``, measured). Rows go to
``benchmarks/results/cpu-retrieval.csv`` (CPU) or ``<gpu>-retrieval.csv``. On a busy shared CPU keep
``--threads 1`` (the default): multi-threaded tiny ops stall when the cores are oversubscribed.
"""

from __future__ import annotations

import datetime as _dt
import json
import statistics
import time

import torch

from benchmarks._harness import RESULTS, Bench, device_name, env_summary, git_sha
from fastvl.batch import PackedVLBatch
from fastvl.models.uniter import UniterForImageTextRetrieval
from fastvl.models.uniter.config import resolve_config
from fastvl.tasks import ITRTask
from fastvl.tasks.retrieval import RetrievalImages, RetrievalTexts, brute_force_scores, score_matrix

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


def _data(n: int, m: int, img_dim: int, vocab: int, gen: torch.Generator, device: str):
    tl = torch.randint(12, 21, (n,), generator=gen).tolist()
    il = torch.randint(10, 37, (m,), generator=gen).tolist()
    texts = RetrievalTexts(torch.randint(4, vocab, (sum(tl),), generator=gen), tl)
    images = RetrievalImages(torch.randn(sum(il), img_dim, generator=gen).abs(), torch.rand(sum(il), 7, generator=gen),
                             il)
    return texts.to(device), images.to(device)


def _subset_texts(texts: RetrievalTexts, start: int, n: int) -> RetrievalTexts:
    """Texts ``start .. start + n - 1``."""
    a, b = sum(texts.lens[:start]), sum(texts.lens[:start + n])
    return RetrievalTexts(texts.input_ids[a:b], texts.lens[start:start + n])


def _as_batch(texts: RetrievalTexts, images: RetrievalImages) -> PackedVLBatch:
    """Example j = text j (empty past the texts) with image j, the input ITRTask.score_matrix indexes."""
    b = max(len(texts), len(images))
    tl = texts.lens + [0] * (b - len(texts))
    il = images.lens + [0] * (b - len(images))
    return PackedVLBatch(input_ids=texts.input_ids, txt_lens=tl, img_feat=images.feat, img_pos=images.pos, img_lens=il)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _q(values: list[float]) -> tuple[float, float, float]:
    """(p50, p20, p80) of a few samples."""
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]  # noqa: E731
    return statistics.median(v), pick(0.2), pick(0.8)


def main(argv: list[str] | None = None) -> None:
    bench = Bench("retrieval", __doc__)
    p = bench.parser
    p.add_argument("--texts", type=int, default=None, help="N texts (default 1000; --quick 60)")
    p.add_argument("--images", type=int, default=None, help="M images (default 5000; --quick 300)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 5; --quick 2)")
    p.add_argument("--naive-pairs", type=int, default=None, help="pairs per round, naive (default 100; --quick 10)")
    p.add_argument("--chunked-texts", type=int, default=1, help="texts x M per round via ITRTask (default 1)")
    p.add_argument("--ablation-texts", type=int, default=None, help="texts x M per round, shortcuts off (default 2)")
    p.add_argument("--subset-texts", type=int, default=None,
                   help="texts x M per round on the fast path (default 20; --quick 3)")
    p.add_argument("--budget-s", type=float, default=600.0, help="also time the full fast matrix if predicted to fit")
    p.add_argument("--k", type=int, default=32, help="two-stage re-rank depth")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (GPU)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads on CPU (default 1)")
    p.add_argument("--seed", type=int, default=0)
    a = bench.parse(argv)
    dev = a.device
    gpu = dev.startswith("cuda")
    if not gpu:
        torch.set_num_threads(a.threads)
    if a.csv is None:
        a.csv = RESULTS / (("cpu" if not gpu else device_name(dev)) + "-retrieval.csv")
    n = a.texts or (60 if a.quick else 1000)
    m = a.images or (300 if a.quick else 5000)
    rounds = a.rounds or (2 if a.quick else 5)
    per_round = dict(naive_per_pair=a.naive_pairs or (10 if a.quick else 100),
                     itr_task_chunked=a.chunked_texts * m,
                     fast_exact_no_shortcuts=(a.ablation_texts or (1 if a.quick else 2)) * m,
                     fast_exact=(a.subset_texts or (3 if a.quick else 20)) * m)
    if rounds * (a.subset_texts or (3 if a.quick else 20)) > n:
        raise SystemExit(f"bench_retrieval: {rounds} rounds x subset texts exceed N = {n}")
    amp = "bf16" if a.amp else None
    print(env_summary())

    cfg = resolve_config("tiny", **TINY, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(a.seed)
    model = UniterForImageTextRetrieval(cfg, cfg.img_dim).to(dev).eval()
    gen = torch.Generator().manual_seed(a.seed)
    texts, images = _data(n, m, cfg.img_dim, cfg.vocab_size, gen, dev)
    total = n * m
    base_cfg = dict(N=n, M=m, hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads,
                    ffn=cfg.intermediate_size, img_dim=cfg.img_dim, txt_len=[12, 20], regions=[10, 36],
                    dtype="bf16" if amp else "fp32", threads=torch.get_num_threads(), rounds=rounds)
    stamp = dict(device=device_name(dev), torch=torch.__version__, git_sha=git_sha(),
                 timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def row(provider: str, metric: str, unit: str, x_value: int, q: tuple[float, float, float], extra: dict) -> None:
        bench.rows.append(dict(op="retrieval", provider=provider, mode="eval", metric=metric, unit=unit,
                               x_name="pairs", x_value=x_value, p50=q[0], p20=q[1], p80=q[2],
                               config=json.dumps({**base_cfg, **extra}, sort_keys=True), **stamp))

    # warm-up (first calls allocate, pick kernels)
    small_t, small_i = _subset_texts(texts, 0, 2), RetrievalImages.from_list([(images.feat[:10], images.pos[:10])])
    score_matrix(model, small_t, small_i, progress=False, amp=amp)
    brute_force_scores(model, small_t, small_i, amp=amp)
    task = ITRTask(model)
    g = torch.Generator().manual_seed(a.seed + 1)

    def run_round(r: int) -> dict[str, float]:
        """Seconds per pair of every provider on this round's own slice of texts (interleaved: load drift hits
        every provider alike)."""
        out = {}
        pairs = list(zip(torch.randint(0, n, (per_round["naive_per_pair"],), generator=g).tolist(),
                         torch.randint(0, m, (per_round["naive_per_pair"],), generator=g).tolist()))
        out["naive_per_pair"] = _timed(lambda: brute_force_scores(model, texts, images, pairs=pairs, amp=amp), dev)
        k = a.chunked_texts
        batch = _as_batch(_subset_texts(texts, r * k, k), images)
        with torch.autocast(dev.split(":")[0], dtype=torch.bfloat16, enabled=bool(amp)):
            out["itr_task_chunked"] = _timed(lambda: task.score_matrix(batch, range(k), range(m)), dev)
        k = per_round["fast_exact_no_shortcuts"] // m
        sub = _subset_texts(texts, r * k, k)
        out["fast_exact_no_shortcuts"] = _timed(
            lambda: score_matrix(model, sub, images, shortcuts=False, amp=amp, progress=False), dev)
        k = per_round["fast_exact"] // m
        sub = _subset_texts(texts, r * k, k)
        out["fast_exact"] = _timed(lambda: score_matrix(model, sub, images, amp=amp, progress=False), dev)
        return {prov: sec / per_round[prov] for prov, sec in out.items()}

    samples: dict[str, list[float]] = {prov: [] for prov in per_round}
    for r in range(rounds):
        got = run_round(r)
        for prov, v in got.items():
            samples[prov].append(v)
        print(f"  round {r + 1}/{rounds}: " + "  ".join(f"{prov} {v * 1e6:.1f} us/pair" for prov, v in got.items()),
              flush=True)
    speedups = {prov: [nv / fv for nv, fv in zip(samples["naive_per_pair"], samples[prov])] for prov in per_round}
    summary = {}
    for prov, per_pair in samples.items():
        q = _q([v * 1e6 for v in per_pair])
        extra = {"pairs_per_round": per_round[prov]}
        row(prov, "time", "ms", per_round[prov], tuple(v * per_round[prov] / 1e3 for v in q), extra)
        row(prov, "time_per_pair", "us", per_round[prov], q, extra)
        full = tuple(v * total / 1e6 for v in q)
        row(prov, "time_full_matrix_extrapolated", "s", total, full,
            {**extra, "extrapolated": True, "basis": "per-pair time of the timed rounds x N*M"})
        if prov != "naive_per_pair":
            row(prov, "speedup_vs_naive", "x", total, _q(speedups[prov]),
                {**extra, "basis": "naive / provider per-pair time, per round (extrapolated to N*M)"})
        summary[prov] = (full[0], True, statistics.median(speedups[prov]))

    # the full fast matrix, when it fits the budget
    predicted = summary["fast_exact"][0]
    if predicted <= a.budget_s:
        print(f"  full fast exact predicted {predicted:.0f} s <= budget {a.budget_s:.0f} s: running it", flush=True)
        sec = _timed(lambda: score_matrix(model, texts, images, amp=amp, progress=not a.quick), dev)
        row("fast_exact", "time_full_matrix", "s", total, (sec, sec, sec), {"extrapolated": False})
        row("fast_exact", "time", "ms", total, (sec * 1e3,) * 3, {"extrapolated": False})
        naive_full = summary["naive_per_pair"][0]
        row("fast_exact", "speedup_vs_naive_measured_full", "x", total, (naive_full / sec,) * 3,
            {"basis": "naive extrapolated / fast measured on the full matrix"})
        summary["fast_exact (full, measured)"] = (sec, False, naive_full / sec)
    else:
        print(f"  full fast exact predicted {predicted:.0f} s > budget {a.budget_s:.0f} s: extrapolated only")

    # two-stage on the full matrix
    holder = {}

    def two_stage():
        holder["info"] = score_matrix(model, texts, images, mode="two_stage", k=a.k, amp=amp, progress=not a.quick,
                                      return_info=True)[1]

    sec = _timed(two_stage, dev)
    scored = holder["info"]["pairs_scored"]
    note = {"k": a.k, "pairs_cross_encoded": scored, "extrapolated": False,
            "note": "approximate mode: recall may differ from exact"}
    prov = f"two_stage_k{a.k}"
    row(prov, "time_full_matrix", "s", total, (sec, sec, sec), note)
    row(prov, "time", "ms", total, (sec * 1e3,) * 3, note)
    naive_full = summary["naive_per_pair"][0]
    row(prov, "speedup_vs_naive", "x", total, (naive_full / sec,) * 3, note)
    summary[prov + " (APPROXIMATE)"] = (sec, False, naive_full / sec)

    bench.finish()
    print(f"\nFull {n} x {m} matrix ({total} pairs), {base_cfg['dtype']}, {torch.get_num_threads()} thread(s) "
          f"on {stamp['device']}; per-pair times are medians of {rounds} interleaved rounds:")
    for prov, (secs, extrap, speedup) in summary.items():
        tag = "extrapolated" if extrap else "measured"
        print(f"  {prov:>34}: {secs:12.1f} s ({tag:>12})   speed-up vs naive {speedup:8.1f}x")
    print(f"  two-stage cross-encoded {scored} of {total} pairs (k={a.k}); its recall is approximate (a different "
          f"mode, reported separately; see fastvl.tasks.retrieval.evaluate_retrieval)")


if __name__ == "__main__":
    main()
