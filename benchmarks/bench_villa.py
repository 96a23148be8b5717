"""VILLA adversarial step vs a clean step: ``python -m benchmarks.bench_villa [--config base] [--mode both]``.

One step = the forward and backward work of one micro-batch of one pre-training task (the optimizer update is
the same for every provider and left out). Providers:

- ``clean``: the task module's loss, backward (fastvl's packed UNITER).
- ``villa-plain``: :func:`fastvl.adversarial.reference.plain_villa_step` -- VILLA as upstream structures it: a
  separate clean pass kept with its graph, K perturbed passes, one ``backward(retain_graph=True)`` per step
  through the perturbed and the clean graph, the delta update in eager PyTorch.
- ``villa-fastvl``: :class:`fastvl.adversarial.AdversarialTask` (clean pass reused as step 0, one backward through
  the clean graph, deltas detached on the last step, fused delta step) + the trainer's backward of its loss.
  Exact (same gradients as the plain loop); its floor at K = 3 is 10/3 = 3.33x a clean step (loop.py docstring).
- ``villa-fastvl-sg``: the same with ``AdvConfig(kl_clean_grad=False)``, the opt-in stop-gradient clean target
  (an approximation: 9 forward-equivalents, 3.0x at K = 3).
- ``--ablation`` adds exact variants with one cost reduction switched off, to measure its effect:
  ``villa-fastvl-sep-clean`` (``reuse_clean=False``: a separate clean forward kept with its graph, as upstream)
  and ``villa-fastvl-eager-step`` (the delta step and init on the eager ``reference`` backend).

Both VILLA providers run the same model on the same packed batch, so the ratio to ``clean`` isolates the
adversarial loop. Goal (issue): villa-fastvl <= 3.0x clean at K = 3; the plain loop is >= 3.3x.

Configs: ``--config tiny`` (CPU default: 4 layers, hidden 256, batch 8, text 10-30 tokens, 10-50 regions, fp32) and
``--config base`` (UNITER-base, GPU default: batch 32, text 8-60, regions 10-100, bf16 autocast).
"""

from __future__ import annotations

import contextlib

import torch

from benchmarks._harness import Bench, Case, env_summary
from fastvl.adversarial import AdvConfig, AdversarialTask
from fastvl.adversarial.reference import plain_villa_step
from fastvl.models.uniter import UniterForPretraining
from fastvl.models.uniter.config import resolve_config
from fastvl.models.uniter.testing import random_pretrain_batch
from fastvl.ops.testing import random_lengths
from fastvl.tasks import build_task

TASKS = ("mlm", "itm", "mrfr")
PROVIDERS = ("villa-fastvl", "villa-fastvl-sg", "villa-fastvl-sep-clean", "villa-fastvl-eager-step", "villa-plain")
OT_LAMBDA = 0.1
SETUPS = {
    "tiny": dict(model=dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
                 batch=8, txt=(10, 30), img=(10, 50)),
    "small": dict(model=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
                  batch=16, txt=(10, 40), img=(10, 100)),
    "base": dict(model={}, batch=32, txt=(8, 60), img=(10, 100)),
}


def _clean(module, batch, autocast):
    def run():
        with autocast():
            loss = module(batch)["loss"]
        loss.backward()
        module.zero_grad(set_to_none=True)

    return run


def _plain(model, task, batch, cfg, autocast):
    def run():
        with autocast():
            plain_villa_step(model, task, batch, cfg, OT_LAMBDA)
        model.zero_grad(set_to_none=True)

    return run


def _fastvl(adv, batch, autocast):
    def run():
        with autocast():
            loss = adv(batch)["loss"]
        loss.backward()
        adv.zero_grad(set_to_none=True)

    return run


def main(argv: list[str] | None = None) -> None:
    bench = Bench("villa", __doc__)
    bench.parser.add_argument("--config", choices=sorted(SETUPS), default=None,
                              help="model + batch setup (default: tiny on CPU, base on GPU)")
    bench.parser.add_argument("--mode", choices=["text", "image", "both", "alter"], default="both")
    bench.parser.add_argument("--steps", type=int, default=3, help="K, adversarial steps")
    bench.parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    bench.parser.add_argument("--batch", type=int, default=None)
    bench.parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="GPU autocast (default bf16)")
    bench.parser.add_argument("--threads", type=int, default=None)
    bench.parser.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    bench.parser.add_argument("--ablation", action="store_true",
                              help="also time fastvl with one cost reduction off (separate clean pass, eager step)")
    bench.parser.add_argument("--seed", type=int, default=0)
    a = bench.parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    dev = a.device
    gpu = dev.startswith("cuda")
    setup_name = a.config or ("base" if gpu else "tiny")
    setup = SETUPS[setup_name]
    batch_size = a.batch or setup["batch"]
    dtype_name = a.dtype or ("bf16" if gpu else "fp32")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if (gpu and dtype_name == "bf16") else \
        contextlib.nullcontext
    print(env_summary())
    mcfg = resolve_config("base").replace(**setup["model"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(a.seed)
    model = UniterForPretraining(mcfg, mcfg.img_dim, mcfg.img_label_dim).to(dev)
    adv_cfg = AdvConfig(mode=a.mode, adv_steps=a.steps, adv_lr_txt=1e-3, adv_lr_img=1e-3, adv_kl_weight=1.5)
    gen = torch.Generator().manual_seed(a.seed)
    config = dict(setup=setup_name, batch=batch_size, layers=mcfg.num_hidden_layers, hidden=mcfg.hidden_size,
                  mode=a.mode, K=a.steps, dtype=dtype_name if gpu else "fp32", threads=torch.get_num_threads())
    tasks = [t for t in a.tasks.split(",") if t]
    for task in tasks:
        tl = random_lengths(batch_size, *setup["txt"], gen)
        il = random_lengths(batch_size, *setup["img"], gen)
        batch = random_pretrain_batch(task, gen, mcfg, txt_lens=tl, img_lens=il, device=dev)
        module = build_task(task, model=model, **({"ot_lambda": OT_LAMBDA} if task == "itm" else {}))
        adv = AdversarialTask(module, adv_cfg)
        adv_sg = AdversarialTask(module, AdvConfig(**{**adv_cfg.to_dict(), "kl_clean_grad": False}))
        cases = [Case("clean", _clean(module, batch, autocast), "full", tokens=batch.num_tokens),
                 Case("villa-fastvl", _fastvl(adv, batch, autocast), "full", tokens=batch.num_tokens),
                 Case("villa-fastvl-sg", _fastvl(adv_sg, batch, autocast), "full", tokens=batch.num_tokens)]
        if a.ablation:
            sep = AdversarialTask(module, adv_cfg, reuse_clean=False)
            eager = AdversarialTask(module, adv_cfg, backend="reference")
            cases += [Case("villa-fastvl-sep-clean", _fastvl(sep, batch, autocast), "full", tokens=batch.num_tokens),
                      Case("villa-fastvl-eager-step", _fastvl(eager, batch, autocast), "full",
                           tokens=batch.num_tokens)]
        if not a.no_plain:
            cases.append(Case("villa-plain", _plain(model, task, batch, adv_cfg, autocast), "full",
                              tokens=batch.num_tokens))
        bench.run(cases, "task", task, config)
    rows = bench.finish()
    times = {(r["x_value"], r["provider"]): r["p50"] for r in rows if r["metric"] == "time"}
    print(f"\nVILLA (K={a.steps}, mode {a.mode}) time per step / clean step (p50):")
    for task in tasks:
        clean = times.get((task, "clean"))
        if not clean:
            continue
        parts = [f"{p} {times[(task, p)] / clean:.2f}x" for p in PROVIDERS if (task, p) in times]
        print(f"  {task:>5}: clean {clean:8.1f} ms  " + "  ".join(parts))


if __name__ == "__main__":
    main()
