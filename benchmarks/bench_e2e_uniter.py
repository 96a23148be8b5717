"""End-to-end UNITER pre-training step, packed vs padded: ``python -m benchmarks.bench_e2e_uniter``.

One step = forward + backward of one task's loss with the official reduction (the optimizer update is the same
for both and left out). Tasks: mlm, mrfr, mrc-kl, itm (+ WRA, weight 0.1); the ``all`` row runs the four in
sequence. Providers:

- ``reference``: :class:`fastvl.models.uniter.reference.UniterReferenceForPretraining` -- text and regions padded,
  joined by ``gather_index``, every layer on [B, L, H], WRA with the PyTorch IPOT loop; fed the official dict.
- ``fastvl``: :class:`fastvl.models.uniter.UniterForPretraining` on the native :class:`~fastvl.batch.PackedVLBatch`
  (no padding FLOPs, heads on masked rows, fused backends chosen by ``fastvl.ops``).
- ``fastvl-dict``: the same model fed the official dict (the drop-in path: converts at the boundary).

Configs: ``--config cpu`` (default on CPU: 6 layers, hidden 384, batch 16, text 10-40 tokens, 10-100 regions, fp32)
and ``--config base`` (UNITER-base, default on GPU: batch 64, text 8-60 tokens as UNITER's max_txt_len, 10-100
regions, bf16 autocast on GPU). Reported: ms per step, tokens/s (real tokens), peak memory on GPU, and the speed-up.
"""

from __future__ import annotations

import torch

from benchmarks._harness import Bench, Case, add_e2e_arguments, e2e_setup, env_summary
from fastvl.models.uniter import UniterForPretraining
from fastvl.models.uniter.config import UniterConfig, resolve_config
from fastvl.models.uniter.reference import UniterReferenceForPretraining
from fastvl.models.uniter.testing import random_pretrain_batch, to_official_batch
from fastvl.ops.testing import random_lengths

TASKS = ("mlm", "mrfr", "mrc-kl", "itm")
OT_LAMBDA = 0.1
SETUPS = {
    "cpu": dict(model=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
                batch=16, txt=(10, 40), img=(10, 100)),
    "base": dict(model={}, batch=64, txt=(8, 60), img=(10, 100)),
}


def _config(name: str) -> UniterConfig:
    base = resolve_config("base")
    return base.replace(**SETUPS[name]["model"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _reference_loss(model, batch: dict, task: str) -> torch.Tensor:
    out = model(batch, task)
    if task != "itm":
        return out.mean()
    itm, (pos, neg) = out
    return itm.mean() + OT_LAMBDA * (pos.sum() - neg.sum()) / (pos.numel() + neg.numel())


def _fastvl_loss(model, batch, task: str) -> torch.Tensor:
    if task != "itm":
        return model(batch, task, reduction="mean")
    if isinstance(batch, dict):
        itm, (pos, neg) = model(batch, task)
        return itm.mean() + OT_LAMBDA * (pos.sum() - neg.sum()) / (pos.numel() + neg.numel())
    itm, dist = model(batch, task, reduction="mean")
    sign = batch.itm_targets.to(dist.dtype) * 2 - 1
    return itm + OT_LAMBDA * (dist * sign).sum() / dist.numel()


def _step(model, loss_fn, batches: dict, tasks, autocast):
    def run():
        for task in tasks:
            with autocast():
                loss = loss_fn(model, batches[task], task)
            loss.backward()
        model.zero_grad(set_to_none=True)

    return run


def main(argv: list[str] | None = None) -> None:
    bench = Bench("e2e_uniter", __doc__)
    add_e2e_arguments(bench, SETUPS)
    bench.parser.add_argument("--batch", type=int, default=None, help="examples per batch (default: the setup's)")
    bench.parser.add_argument("--no-dict", action="store_true", help="skip the fastvl-dict provider")
    a = bench.parse(argv)
    e2e = e2e_setup(a)
    dev = a.device
    setup_name, dtype_name, autocast = e2e.name, e2e.dtype, e2e.autocast
    setup = SETUPS[setup_name]
    batch_size = a.batch or setup["batch"]
    print(env_summary())
    cfg = _config(setup_name)
    torch.manual_seed(a.seed)
    fast = UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim).to(dev)
    ref = UniterReferenceForPretraining(cfg, cfg.img_dim, cfg.img_label_dim).to(dev)
    ref.load_state_dict(fast.state_dict())
    gen = torch.Generator().manual_seed(a.seed)
    packed, official, tokens, padded = {}, {}, {}, {}
    for task in TASKS:
        tl = random_lengths(batch_size, *setup["txt"], gen)
        il = random_lengths(batch_size, *setup["img"], gen)
        packed[task] = random_pretrain_batch(task, gen, cfg, txt_lens=tl, img_lens=il, device=dev)
        official[task] = to_official_batch(packed[task], task)
        tokens[task] = sum(tl) + sum(il)
        padded[task] = batch_size * max(t + i for t, i in zip(tl, il))
    config = dict(setup=setup_name, batch=batch_size, layers=cfg.num_hidden_layers, hidden=cfg.hidden_size,
                  txt=list(setup["txt"]), img=list(setup["img"]), dtype=dtype_name,
                  threads=torch.get_num_threads())
    runs = [(task, (task,)) for task in TASKS] + ([("all", TASKS)] if not a.quick else [])
    for name, tasks in runs:
        n_tok = sum(tokens[t] for t in tasks)
        cases = [Case("reference", _step(ref, _reference_loss, official, tasks, autocast), "full", tokens=n_tok),
                 Case("fastvl", _step(fast, _fastvl_loss, packed, tasks, autocast), "full", tokens=n_tok)]
        if not a.no_dict:
            cases.append(Case("fastvl-dict", _step(fast, _fastvl_loss, official, tasks, autocast), "full",
                              tokens=n_tok))
        fill = n_tok / sum(padded[t] for t in tasks)
        print(f"task {name}: {n_tok} real tokens, padding fill {fill:.2f}")
        bench.run(cases, "task", name, config)
    rows = bench.finish()
    _print_speedups(rows)


def _print_speedups(rows: list[dict]) -> None:
    times = {(r["x_value"], r["provider"]): r["p50"] for r in rows if r["metric"] == "time"}
    print("\nspeed-up over the padded reference (p50 ms/step):")
    for (task, prov), t in times.items():
        ref = times.get((task, "reference"))
        if prov != "reference" and ref:
            print(f"  {task:>7}: {prov:<12} {t:9.1f} ms vs {ref:9.1f} ms  = {ref / t:.2f}x")


if __name__ == "__main__":
    main()
