"""VILLA under DDP (2 gloo processes on CPU): the K ascent steps' gradients are all-reduced once per optimizer step,
in the last micro-batch's backward, exactly as for a clean step, and the update equals the one-process update on
the same global batch."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fastvl.adversarial import AdvConfig, adversarial_tasks
from fastvl.batch import PackedVLBatch
from fastvl.models.uniter import UniterForPretraining
from fastvl.models.uniter.testing import random_pretrain_batch, tiny_config
from fastvl.tasks import build_task
from fastvl.train.loop import TrainConfig, Trainer

TASKS = ("mlm", "itm", "mrfr")
WORLD, ACCUM, STEPS = 2, 2, 3
ADV = AdvConfig(mode="both", adv_steps=3, adv_lr_txt=0.05, adv_lr_img=0.05)


def _concat(parts: list[PackedVLBatch]) -> PackedVLBatch:
    """One packed batch holding the examples of ``parts`` in order (every packed field is concatenated)."""
    kw = {}
    for f in dataclasses.fields(PackedVLBatch):
        vals = [getattr(p, f.name) for p in parts]
        if f.name == "layout" or vals[0] is None or isinstance(vals[0], str):  # the layout is rebuilt
            continue
        kw[f.name] = torch.cat(vals) if torch.is_tensor(vals[0]) else sum(vals, [] if isinstance(vals[0], list) else 0)
    return PackedVLBatch(**kw)


def _shards(cfg) -> dict[str, list[list[PackedVLBatch]]]:
    """shards[task][micro-batch index][rank]: each rank's share of every micro-batch of every step."""
    gen = torch.Generator().manual_seed(11)
    return {t: [[random_pretrain_batch(t, gen, cfg, batch=3, img_range=(2, 6)) for _ in range(WORLD)]
                for _ in range(STEPS * ACCUM)] for t in TASKS}


class _Source:
    def __init__(self, batches: list[PackedVLBatch]):
        self.batches, self.i = batches, 0

    def next_batch(self) -> PackedVLBatch:
        self.i += 1
        return self.batches[self.i - 1]

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def _train(sources: dict, adv: bool, out, dist_info=None, count_hook: bool = False):
    cfg = tiny_config(initializer_range=0.1)
    torch.manual_seed(0)
    model = UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim)
    tasks = {t: build_task(t, model=model, **({"ot_lambda": 0.1} if t == "itm" else {})) for t in TASKS}
    if adv:
        tasks = adversarial_tasks(tasks, ADV)
    tcfg = TrainConfig(steps=STEPS, grad_accum=ACCUM, warmup_steps=0, lr=1e-3, progress=False, seed=5)
    tr = Trainer(model, tasks, sources, {t: 1.0 for t in TASKS}, tcfg, out, dist_info=dist_info,
                 log_fn=lambda *_: None)
    calls = []
    if count_hook:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def hook(state, bucket):
            calls[-1] += 1
            return allreduce_hook(None, bucket)

        tr.module.register_comm_hook(None, hook)
    for _ in range(STEPS):
        calls.append(0)
        tr.train_step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, calls


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fastvl.train import distributed as D

    info = D.init_distributed("cpu")
    shards = _shards(tiny_config())
    result = {}
    for adv in (False, True):
        sources = {t: _Source([m[rank] for m in shards[t]]) for t in TASKS}
        weights, calls = _train(sources, adv, os.path.join(out, f"r{rank}-{adv}"), info, count_hook=True)
        result[adv] = dict(weights=weights, calls=calls)
    if rank == 0:
        torch.save(result, os.path.join(out, "ddp.pt"))
    D.cleanup()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_villa_ddp_reduces_once_per_step_and_matches_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ddp = torch.load(tmp_path / "ddp.pt")
    clean_calls, adv_calls = ddp[False]["calls"], ddp[True]["calls"]
    # every optimizer step all-reduces each gradient bucket once (the last micro-batch's backward), with or without
    # the K = 3 ascent steps run inside the forward
    assert all(c > 0 for c in clean_calls) and adv_calls == clean_calls, (clean_calls, adv_calls)

    shards = _shards(tiny_config())
    sources = {t: _Source([_concat(m) for m in shards[t]]) for t in TASKS}
    one, _ = _train(sources, True, tmp_path / "one")
    clean_one, _ = _train({t: _Source([_concat(m) for m in shards[t]]) for t in TASKS}, False, tmp_path / "clean")
    # 3 AdamW steps of lr 1e-3: a wrong gradient moves weights by ~1e-3; fp32 sums in another order by ~1e-6
    for k, w in one.items():
        torch.testing.assert_close(ddp[True]["weights"][k], w, rtol=0, atol=2e-5, msg=lambda m, k=k: f"{k}: {m}")
    gap = max(float((w - clean_one[k]).abs().max()) for k, w in one.items())
    assert gap > 1e-4, gap  # the adversarial update is not the clean one, by far more than the tolerance
