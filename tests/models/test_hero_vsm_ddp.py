"""VSM under torch.distributed (2 gloo processes on CPU): the in-batch negatives are gathered across ranks
(videos of different lengths padded to the longest), every rank's ranking losses equal the one-process losses over
all videos, and the gradients follow the official all-gather (each rank gets its own slice): the rank gradients of
the frame features equal the one-process gradient's rows, and the parameter gradients sum to it."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_hero_tasks import _model
from test_hero_vsm import vsm_collate, vsm_videos

QUERIES = [[0, 1], [0], [1, 3], [1]]
SPLIT = 2  # rank 0: videos 0, 1 (7 and 1 frames); rank 1: videos 2, 3 (6 and 10 frames)


def _model_for_ranking() -> torch.nn.Module:
    model = _model(True)  # dropout 0
    model.lw_st_ed, model.lw_neg_ctx, model.lw_neg_q = 0, 1.0, 0.5  # the span loss is a local mean: left out
    return model


def _run(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
    batch = dict(batch, c_v_feats=batch["c_v_feats"].clone().requires_grad_(True))
    _, neg_ctx, neg_q = model(batch, "vsm")
    (neg_ctx + neg_q).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack([neg_ctx.detach(), neg_q.detach()]), {"c_v_feats": batch["c_v_feats"].grad, **grads}


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        videos = vsm_videos(3)
        part = slice(0, SPLIT) if rank == 0 else slice(SPLIT, None)
        batch = vsm_collate(videos[part], QUERIES[part], 2)
        losses, grads = _run(_model_for_ranking(), batch)
        torch.save({"losses": losses, "grads": grads}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_vsm_gathers_negatives_across_ranks(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    videos = vsm_videos(3)
    losses, grads = _run(_model_for_ranking(), vsm_collate(videos, QUERIES, 2))
    for r in ranks:
        torch.testing.assert_close(r["losses"], losses, rtol=1e-4, atol=1e-6)
    # frame features: each rank's gradient is its rows of the one-process gradient
    n0 = [v[0].shape[0] for v in videos]
    for r, vids in ((0, range(0, SPLIT)), (1, range(SPLIT, len(videos)))):
        for local, v in enumerate(vids):
            torch.testing.assert_close(ranks[r]["grads"]["c_v_feats"][local, :n0[v]], grads["c_v_feats"][v, :n0[v]],
                                       rtol=1e-4, atol=1e-6)
    scale = max(float(g.abs().max()) for g in grads.values())
    for name, g in grads.items():
        if name == "c_v_feats":
            continue
        total = ranks[0]["grads"].get(name, torch.zeros_like(g)) + ranks[1]["grads"].get(name, torch.zeros_like(g))
        torch.testing.assert_close(total, g, rtol=1e-4, atol=1e-4 * scale, msg=name)
