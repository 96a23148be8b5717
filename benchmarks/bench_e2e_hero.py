"""End-to-end HERO pre-training step, packed vs padded: ``python -m benchmarks.bench_e2e_hero``.

One step = forward + backward of one pre-training task's loss (the optimizer update is the same for both and left
out), on the official collate dict of a random batch at realistic length spread (1-100 frames per video, 1-60
tokens per subtitle, subtitles on runs of 1-4 frames, ~10 % frames unmatched, 5 VSM queries per video).
Providers, with the same weights:

- ``reference``: :mod:`fastvl.models.hero.reference` -- every subtitle segment padded to the batch's longest,
  ``gather_index`` compaction, -10000 masks, the per-subtitle Python fusion loop, the padded temporal transformer,
  padded query pass (the official code's structure).
- ``fastvl``: :class:`fastvl.models.hero.HeroForPretraining` -- all segments in one varlen call, fusion as one
  index-add, packed temporal transformer and query encoder.

Tasks: ``vsm`` (span heads + hinge ranking, lw_neg_ctx = lw_neg_q = 8) and ``fom``. The ``fusion`` rows time the
fusion alone (forward + backward of segment outputs -> frame grid): ``index_add`` (layout prebuilt, as in the model
where one layout serves the whole step), ``index_add+layout`` (the layout built from the Python lists each call)
and ``loop`` (the official per-subtitle loop over the padded segment outputs).

Configs: ``--config cpu`` (default on CPU: hidden 256, 4 heads, cross-modal 6 / temporal 3 layers, 8 videos,
4352-d frames, fp32) and ``--config base`` (official HERO sizes, default on GPU: hidden 768, 12 heads, 32 videos;
``--dtype bf16`` autocast on GPU).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from benchmarks._harness import Bench, Case, add_e2e_arguments, e2e_setup, env_summary
from fastvl.models.hero import HeroForPretraining, HeroSegmentLayout, VideoModelConfig
from fastvl.models.hero.reference import (
    hero_fuse_reference,
    temporal_padded_reference,
    vsm_reference,
)
from fastvl.models.hero.testing import random_pretrain_batch

VOCAB = 50272
VFEAT = 4352
SETUPS = {
    "cpu": dict(hidden=256, heads=4, inter=1024, videos=8),
    "base": dict(hidden=768, heads=12, inter=3072, videos=32),
}


def _config(setup: dict) -> VideoModelConfig:
    common = dict(hidden_size=setup["hidden"], num_attention_heads=setup["heads"], intermediate_size=setup["inter"],
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=514)
    return VideoModelConfig({"f_config": {**common, "num_hidden_layers": 6, "vocab_size": VOCAB, "type_vocab_size": 2},
                             "c_config": {**common, "num_hidden_layers": 3},
                             "q_config": {**common, "num_hidden_layers": 0, "type_vocab_size": 1}})


def _fom_batch(batch: dict) -> dict:
    return dict(batch, targets=batch["fom_targets"])


def _fom_reference(model: HeroForPretraining, batch: dict) -> torch.Tensor:
    ve = model.v_encoder
    fused = hero_fuse_reference(ve, batch)
    idx = batch["shuffled_orders"].unsqueeze(-1).expand_as(fused)
    enc = temporal_padded_reference(ve.c_encoder, torch.zeros_like(fused).scatter(1, idx, fused),
                                    batch["c_attn_masks"])
    logits = ve.fom_output(enc.reshape(-1, enc.shape[-1]))
    return F.cross_entropy(logits, batch["targets"].view(-1), ignore_index=-1)


def _step(loss_fn, autocast, model):
    def run():
        with autocast():
            out = loss_fn()
        (sum(o.sum() for o in out) if isinstance(out, tuple) else out).backward()
        model.zero_grad(set_to_none=True)
    return run


def _fusion_cases(model: HeroForPretraining, batch: dict, device: str) -> list[Case]:
    """Segment outputs (the same values, packed and padded) -> frame grid, forward + backward."""
    layout = HeroSegmentLayout.from_batch(batch)
    hidden = model.config.f_config.hidden_size
    n_vid, n_frm = batch["c_v_feats"].shape[:2]
    n_seg, width = batch["f_attn_masks"].shape
    seg_pad = torch.randn(n_seg, width, hidden, device=device)
    # packed rows: each segment's real [frames ; text] rows, in order
    rows = torch.cat([torch.arange(s * width, s * width + f + t, device=device)
                      for s, (f, t) in enumerate(zip(layout.frm_lens, layout.txt_lens))])
    seg_packed = seg_pad.reshape(-1, hidden).index_select(0, rows).clone()
    seg_pad.requires_grad_(True)
    seg_packed.requires_grad_(True)

    def index_add(lay: HeroSegmentLayout | None = None):
        def run():
            lo = lay or HeroSegmentLayout.from_batch(batch)
            grid = seg_packed.new_zeros(n_vid * n_frm, hidden).index_add(0, lo.fuse_dst,
                                                                         seg_packed.index_select(0, lo.fuse_src))
            grid.sum().backward()
            seg_packed.grad = None
        return run

    def loop():
        grid = torch.zeros(n_vid, n_frm, hidden, device=device)
        start = 0
        for vid, num_sub in enumerate(batch["num_subs"]):
            segs = seg_pad[start:start + num_sub]
            for sid, frames in batch["sub_idx2frame_idx"][vid]:
                if not frames:
                    continue
                idx = torch.tensor(frames, dtype=torch.long, device=device)
                grid[vid, idx] = grid[vid, idx] + segs[sid, :len(frames)]
            start += num_sub
        grid.sum().backward()
        seg_pad.grad = None

    return [Case("loop", loop, "full"), Case("index_add", index_add(layout), "full"),
            Case("index_add+layout", index_add(None), "full")]


def main(argv: list[str] | None = None) -> None:
    bench = Bench("e2e_hero", __doc__)
    add_e2e_arguments(bench, SETUPS)
    bench.parser.add_argument("--videos", type=int, default=None, help="videos per batch (default: the setup's)")
    bench.parser.add_argument("--tasks", default="vsm,fom,fusion", help="comma-separated: vsm, fom, fusion")
    a = bench.parse(argv)
    e2e = e2e_setup(a)
    dev = a.device
    setup_name, dtype_name, autocast = e2e.name, e2e.dtype, e2e.autocast
    setup = SETUPS[setup_name]
    n_videos = a.videos or setup["videos"]
    print(env_summary())
    torch.manual_seed(a.seed)
    model = HeroForPretraining(_config(setup), VFEAT, 100, lw_neg_ctx=8, lw_neg_q=8).to(dev).train()
    gen = torch.Generator().manual_seed(a.seed)
    batch = random_pretrain_batch(gen, n_videos, VFEAT, VOCAB, device=dev)
    real = int(batch["f_attn_masks"].sum()) + int(batch["c_attn_masks"].sum()) + int(batch["query_attn_masks"].sum())
    padded = (batch["f_attn_masks"].numel() + batch["c_attn_masks"].numel() + batch["query_attn_masks"].numel())
    n_seg = batch["f_attn_masks"].shape[0]
    config = dict(setup=setup_name, videos=n_videos, segments=n_seg, hidden=setup["hidden"], f_layers=6, c_layers=3,
                  vfeat=VFEAT, frames=[1, 100], tokens=[1, 60], dtype=dtype_name,
                  threads=torch.get_num_threads(), real_tokens=real, padded_tokens=padded)
    print(f"batch: {n_videos} videos, {n_seg} segments, {real} real tokens of {padded} padded slots "
          f"(fill {real / padded:.2f})")
    tasks = [t for t in a.tasks.split(",") if t]
    fom = _fom_batch(batch)
    for task in tasks:
        if task == "vsm":
            cases = [Case("reference", _step(lambda: vsm_reference(model, batch), autocast, model), "full",
                          tokens=real),
                     Case("fastvl", _step(lambda: model(batch, "vsm"), autocast, model), "full", tokens=real)]
        elif task == "fom":
            cases = [Case("reference", _step(lambda: _fom_reference(model, fom), autocast, model), "full",
                          tokens=real),
                     Case("fastvl", _step(lambda: model(fom, "fom"), autocast, model), "full", tokens=real)]
        elif task == "fusion":
            cases = _fusion_cases(model, batch, dev)
        else:
            raise SystemExit(f"bench_e2e_hero: --tasks: unknown task {task!r} (vsm, fom, fusion)")
        bench.run(cases, "task", task, config)
    rows = bench.finish()
    times = {(r["x_value"], r["provider"]): r["p50"] for r in rows if r["metric"] == "time"}
    print("\nspeed-up (p50 ms per fwd+bwd):")
    for (task, prov), t in times.items():
        base = times.get((task, "reference")) or times.get((task, "loop"))
        if prov not in ("reference", "loop") and base:
            print(f"  {task:>7}: {prov:<18} {t:9.2f} ms vs {base:9.2f} ms = {base / t:.2f}x")


if __name__ == "__main__":
    main()
