"""The generic Trainer's other modes on toy tasks: a two-optimizer GAN step (against a hand-written loop, with
accumulation, per-optimizer clipping / schedules and exact resume), evaluation-only runs, and the one-optimizer
path against a hand-written AdamW loop."""

from __future__ import annotations

import copy
import json
import os
import random
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from fastvl.train import checkpoint as ckpt
from fastvl.train.evaluation import evaluate
from fastvl.train.loop import TrainConfig, Trainer
from fastvl.train.optim import OptimizerSpec, build_optimizers

# ----------------------------------------------------------------------------------------------------------------
# a 1-D GAN: G maps 2-d noise to a scalar, D scores a scalar (36 parameters)


class ToyGAN(nn.Module):
    def __init__(self):
        super().__init__()
        self.generator = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 1))
        self.discriminator = nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1))


class GANTask(nn.Module):
    """Non-saturating GAN loss; the phase picks the discriminator or the generator objective. Evaluation (no
    phase): both losses as logs, no loss."""

    def __init__(self, model: ToyGAN):
        super().__init__()
        self.model = model

    def forward(self, batch, phase: str | None = None) -> dict:
        real, z = batch
        fake = self.model.generator(z)
        D = self.model.discriminator
        count = torch.tensor(float(len(real)))
        if phase == "discriminator":
            loss = F.softplus(-D(real)).mean() + F.softplus(D(fake.detach())).mean()
        elif phase == "generator":
            loss = F.softplus(-D(fake)).mean()
        else:
            d = F.softplus(-D(real)).mean() + F.softplus(D(fake)).mean()
            return {"logs": {"d_loss": d, "g_loss": F.softplus(-D(fake)).mean()}, "count": count}
        return {"loss": loss, "logs": {"objective": loss.detach()}, "count": count}


class GANSource:
    """Batch k (real samples ~ N(2, 0.5), noise z) is a pure function of (seed, k); ``n`` examples."""

    def __init__(self, seed: int, n: int = 8):
        self.seed, self.n, self.k = seed, n, 0

    def next_batch(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.k)
        self.k += 1
        return 2.0 + 0.5 * torch.randn(self.n, 1, generator=g), torch.randn(self.n, 2, generator=g)

    def state_dict(self) -> dict:
        return {"k": self.k}

    def load_state_dict(self, s: dict) -> None:
        self.k = s["k"]


class BigSource:
    """The concatenation of ``parts`` consecutive batches of ``inner`` as one batch."""

    def __init__(self, inner: GANSource, parts: int):
        self.inner, self.parts = inner, parts

    def next_batch(self):
        bs = [self.inner.next_batch() for _ in range(self.parts)]
        return torch.cat([b[0] for b in bs]), torch.cat([b[1] for b in bs])

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.inner.load_state_dict(s)


LR_G, LR_D, BETAS, WD, CLIP, WARMUP = 1e-2, 4e-2, (0.0, 0.9), 0.01, 0.05, 2


def gan_specs(every_g: int = 1) -> dict[str, OptimizerSpec]:
    """TTUR: the discriminator first with 4x the generator's lr; both betas (0, 0.9)."""
    return {"discriminator": OptimizerSpec(("discriminator",), lr=LR_D, betas=BETAS),
            "generator": OptimizerSpec(("generator",), lr=LR_G, betas=BETAS, every=every_g)}


def gan_trainer(out, steps=6, accum=1, source=None, seed=0, ckpt_every=0, every_g=1):
    torch.manual_seed(seed)
    model = ToyGAN()
    cfg = TrainConfig(steps=steps, lr=1.0, warmup_steps=WARMUP, weight_decay=WD, grad_accum=accum, grad_clip=CLIP,
                      ckpt_every=ckpt_every, progress=False, log_every=1, seed=seed)
    tr = Trainer(model, {"gan": GANTask(model)}, {"gan": source or GANSource(1)}, {"gan": 1.0}, cfg, out,
                 log_fn=lambda s: None, optimizers=gan_specs(every_g))
    return model, tr


def _decay_groups(module: nn.Module, wd: float) -> list[dict]:
    """UNITER's grouping by hand: weights decayed, biases not (LayerNorm-free toy modules)."""
    named = list(module.named_parameters())
    return [{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": wd},
            {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}]


def _schedule(step: int, warmup: int, total: int) -> float:
    return (step + 1) / warmup if step < warmup else (total - step) / (total - warmup)


def hand_gan(model: ToyGAN, steps: int, accum: int, source: GANSource) -> list[float]:
    """The reference: two torch AdamW optimizers, D then G on the same micro-batches, each clipped on its own."""
    task = GANTask(model)
    opt_d = torch.optim.AdamW(_decay_groups(model.discriminator, WD), lr=LR_D, betas=BETAS, eps=1e-6)
    opt_g = torch.optim.AdamW(_decay_groups(model.generator, WD), lr=LR_G, betas=BETAS, eps=1e-6)
    norms = []
    for step in range(steps):
        batches = [source.next_batch() for _ in range(accum)]
        for opt, base, phase in ((opt_d, LR_D, "discriminator"), (opt_g, LR_G, "generator")):
            for g in opt.param_groups:
                g["lr"] = base * _schedule(step, WARMUP, steps)
            for b in batches:
                (task(b, phase)["loss"] / accum).backward()
            params = [p for g in opt.param_groups for p in g["params"]]
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, CLIP)))
            opt.step()
            model.zero_grad(set_to_none=True)
    return norms


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_optimizers_partition_the_parameters_by_module():
    model = ToyGAN()
    opts = build_optimizers(model, {k: s.resolved(TrainConfig()) for k, s in gan_specs().items()})
    assert list(opts) == ["discriminator", "generator"]
    for name, opt in opts.items():
        owned = {id(p) for g in opt.param_groups for p in g["params"]}
        assert owned == {id(p) for p in getattr(model, name).parameters()}, name
        assert all(g["betas"] == BETAS for g in opt.param_groups)
    with pytest.raises(ValueError, match="unselected"):
        build_optimizers(model, {"g": OptimizerSpec(("generator",), lr=1.0, betas=BETAS, weight_decay=0.0, eps=1e-6)})
    both = OptimizerSpec(("generator", "discriminator.0"), lr=1.0, betas=BETAS, weight_decay=0.0, eps=1e-6)
    with pytest.raises(ValueError, match="selected twice"):
        build_optimizers(model, {"g": both, "d": OptimizerSpec(("discriminator",), lr=1.0, betas=BETAS,
                                                               weight_decay=0.0, eps=1e-6)})


def test_gan_step_equals_hand_written_two_optimizer_loop(tmp_path):
    model, tr = gan_trainer(tmp_path, steps=6, accum=2)
    ref = copy.deepcopy(model)
    hist = [tr.train_step() for _ in range(6)]
    norms = hand_gan(ref, 6, 2, GANSource(1))
    for (k, a), b in zip(_weights(model).items(), _weights(ref).values()):
        assert torch.equal(a, b), k
    got = [h[f"grad_norm/{p}"] for h in hist for p in ("discriminator", "generator")]
    assert got == norms
    assert max(norms) > CLIP  # clipping was active, so a joint clip over both optimizers would differ
    assert [h["lr/generator"] for h in hist] == [LR_G * _schedule(s, WARMUP, 6) for s in range(6)]
    assert [h["lr/discriminator"] for h in hist] == [LR_D * _schedule(s, WARMUP, 6) for s in range(6)]
    assert hist[0]["gan/discriminator/loss"] == hist[0]["loss/discriminator"]
    assert {"gan/discriminator/objective", "gan/generator/objective"} <= set(hist[0])  # the task's logs, per phase
    assert hist[0]["loss"] == hist[0]["loss/discriminator"] + hist[0]["loss/generator"]


def test_each_optimizer_steps_only_its_own_parameters(tmp_path):
    model, tr = gan_trainer(tmp_path, steps=4, every_g=2)  # the generator's phase runs at steps 0 and 2 only
    before = _weights(model)
    rec = tr.train_step()  # step 0: both phases
    after0 = _weights(model)
    assert "loss/generator" in rec and "loss/discriminator" in rec
    assert all(not torch.equal(before[k], after0[k]) for k in before)
    rec = tr.train_step()  # step 1: the discriminator alone, although G's loss would reach every parameter
    after1 = _weights(model)
    assert "loss/generator" not in rec
    for k in before:
        assert torch.equal(after0[k], after1[k]) == k.startswith("generator."), k
    assert all(p.grad is None for p in model.parameters())


def test_gan_grad_accumulation_equals_big_batch(tmp_path):
    small, tr = gan_trainer(tmp_path / "a", steps=4, accum=2, source=GANSource(1, n=8))
    tr.fit()
    big, tr_big = gan_trainer(tmp_path / "b", steps=4, accum=1, source=BigSource(GANSource(1, n=8), 2))
    tr_big.fit()
    for (k, a), b in zip(_weights(small).items(), _weights(big).values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    moved = max(float((a - b).abs().max()) for a, b in zip(_weights(small).values(), _weights(ToyGAN()).values()))
    assert moved > 1e-3


def test_gan_resume_is_bit_identical(tmp_path):
    model_a, tr_a = gan_trainer(tmp_path / "a", steps=8)
    tr_a.fit()
    model_b, tr = gan_trainer(tmp_path / "b", steps=8, ckpt_every=3)
    real_step = tr.train_step

    def crashing_step():
        if tr.step == 5:
            raise KeyboardInterrupt
        return real_step()

    tr.train_step = crashing_step
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    state = torch.load(ckpt.latest_checkpoint(tmp_path / "b") / "trainer.pt", weights_only=False)
    assert state["step"] == 3 and list(state["optimizers"]) == ["discriminator", "generator"]
    assert all(len(s["state"]) == 4 for s in state["optimizers"].values())  # Adam moments of 4 tensors each
    model_c, tr_c = gan_trainer(tmp_path / "b", steps=8, ckpt_every=3, seed=123)  # another init: resume overrides
    assert tr_c.resume() and tr_c.step == 3
    tr_c.fit()
    for (k, a), c in zip(_weights(model_a).items(), _weights(model_c).values()):
        assert torch.equal(a, c), k
    for name in ("discriminator", "generator"):
        sa, sc = tr_a.optimizers[name].state_dict(), tr_c.optimizers[name].state_dict()
        for i in sa["state"]:
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(sa["state"][i][key], sc["state"][i][key]), (name, i, key)


def test_resume_refuses_another_optimizer_layout(tmp_path):
    _, tr = gan_trainer(tmp_path, steps=2)
    tr.fit()
    model = ToyGAN()
    plain = Trainer(model, {"gan": GANTask(model)}, {"gan": GANSource(1)}, {"gan": 1.0},
                    TrainConfig(steps=2, progress=False), tmp_path, log_fn=lambda s: None)
    with pytest.raises(ValueError, match="optimizers"):
        plain.resume()


# ----------------------------------------------------------------------------------------------------------------
# evaluation only


class Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(3, 1)
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.BatchNorm1d(3)  # kept in eval mode by its owner: evaluation must give that back


class RegressionTask(nn.Module):
    def __init__(self, model: Regressor):
        super().__init__()
        self.model = model

    def forward(self, batch) -> dict:
        x, y = batch
        pred = self.model.body(self.model.drop(self.model.frozen(x))).squeeze(-1)
        mse = ((pred - y) ** 2).mean()
        return {"loss": mse, "logs": {"mse": mse.detach(), "mae": (pred - y).abs().mean()},
                "count": torch.tensor(float(len(y)))}


def _reg_batches(sizes=(3, 5, 2)) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(n, 3, generator=g), torch.randn(n, generator=g)) for n in sizes]


def test_evaluate_weights_logs_by_count_and_leaves_the_model_as_it_was(tmp_path):
    torch.manual_seed(0)
    model = Regressor()
    model.train()
    model.frozen.eval()
    modes = {n: m.training for n, m in model.named_modules()}
    before = _weights(model)
    batches = _reg_batches()
    seen = []
    res = evaluate({"reg": RegressionTask(model)}, {"reg": batches}, output_dir=tmp_path, step=7, tag="probe",
                   consume=lambda task, batch, out: seen.append((task, len(batch[1]), out["loss"].requires_grad)))
    with torch.no_grad():  # by hand: every example once, no dropout, BatchNorm on its running statistics
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        err = (model.body(model.frozen(x)).squeeze(-1) - y).double()
    assert res["reg/mse"] == pytest.approx(float((err ** 2).mean()), rel=1e-6)
    assert res["reg/loss"] == pytest.approx(float((err ** 2).mean()), rel=1e-6)
    assert res["reg/mae"] == pytest.approx(float(err.abs().mean()), rel=1e-6)
    assert (res["reg/count"], res["reg/batches"]) == (10.0, 3)
    assert seen == [("reg", 3, False), ("reg", 5, False), ("reg", 2, False)]
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())  # BatchNorm statistics included
    assert all(p.grad is None for p in model.parameters())
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 7 and rec["probe/reg/mse"] == res["reg/mse"]


def test_evaluate_reads_n_batches_from_a_batch_source():
    model = ToyGAN()
    src = GANSource(3)
    res = evaluate({"gan": GANTask(model)}, {"gan": src}, batches=4)
    assert src.k == 4 and res["gan/batches"] == 4 and res["gan/count"] == 32.0
    assert set(res) == {"gan/d_loss", "gan/g_loss", "gan/count", "gan/batches"}
    with pytest.raises(ValueError, match="batches"):
        evaluate({"gan": GANTask(model)}, {"gan": GANSource(3)})


def test_trainer_evaluate_builds_no_optimizer_state(tmp_path):
    model, tr = gan_trainer(tmp_path, steps=3)
    before = _weights(model)
    res = tr.evaluate({"gan": _finite(GANSource(9), 3)}, tag="eval")
    assert res["gan/batches"] == 3 and tr.step == 0 and tr.sources["gan"].k == 0
    assert all(not opt.state for opt in tr.optimizers.values())
    assert all(torch.equal(before[k], v) for k, v in _weights(model).items())
    tr.fit()
    res_after = tr.evaluate({"gan": _finite(GANSource(9), 3)})
    assert res_after["gan/d_loss"] != res["gan/d_loss"]
    recs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"eval/' in x]
    assert [r["step"] for r in recs] == [0, 3]


def _finite(source, n: int) -> list:
    return [source.next_batch() for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# the one-optimizer path


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 1)
        self.drop = nn.Dropout(0.2)


class FitTask(nn.Module):
    def __init__(self, model: Net, scale: float):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, batch) -> dict:
        x, y = batch
        pred = self.model.head(self.model.drop(torch.tanh(self.model.LayerNorm(self.model.dense(x))))).squeeze(-1)
        loss = ((pred - y) ** 2).mean() * self.scale
        return {"loss": loss, "logs": {"mse": loss.detach()}, "count": torch.tensor(float(len(y)))}


class FitSource(GANSource):
    def next_batch(self):
        x, _ = super().next_batch()
        x = torch.cat([x, x.new_ones(len(x), 1), 0.5 * x, -x], 1)
        return x, x @ torch.tensor([1.0, -0.5, 0.25, 0.0])


def test_one_optimizer_path_equals_hand_written_adamw_loop(tmp_path):
    steps, accum, lr, warmup, clip, seed = 10, 3, 3e-2, 3, 0.5, 4
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    rng = torch.get_rng_state()
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=warmup, grad_accum=accum, grad_clip=clip, progress=False,
                      seed=seed)
    tr = Trainer(model, {"a": FitTask(model, 1.0), "b": FitTask(model, 2.0)}, {"a": FitSource(1), "b": FitSource(2)},
                 {"a": 2, "b": 1}, cfg, tmp_path, log_fn=lambda s: None)
    hist = tr.fit()

    torch.set_rng_state(rng)  # the same dropout masks, drawn in the same order
    tasks, sources = {"a": FitTask(ref, 1.0), "b": FitTask(ref, 2.0)}, {"a": FitSource(1), "b": FitSource(2)}
    groups = [{"params": [ref.dense.weight, ref.head.weight], "weight_decay": 0.01},
              {"params": [ref.dense.bias, ref.LayerNorm.weight, ref.LayerNorm.bias, ref.head.bias],
               "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    task_rng = random.Random(seed)
    chosen = []
    for step in range(steps):
        task = task_rng.choices(["a", "b"], weights=[2, 1])[0]
        chosen.append(task)
        for g in opt.param_groups:
            g["lr"] = lr * _schedule(step, warmup, steps)
        for _ in range(accum):
            (tasks[task](sources[task].next_batch())["loss"] / accum).backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert [h["task"] for h in hist] == chosen and set(chosen) == {"a", "b"}
    for (k, a), b in zip(_weights(model).items(), _weights(ref).values()):
        assert torch.equal(a, b), k
    assert sorted(tr.state_dict()) == ["config", "optimizer", "rng", "sources", "step", "task_rng"]


# ----------------------------------------------------------------------------------------------------------------
# DDP: two gloo processes with half the batch each follow the one-process run


def _ddp_worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from fastvl.train import distributed as D

    info = D.init_distributed("cpu")
    torch.manual_seed(0)
    model = ToyGAN()
    cfg = TrainConfig(steps=3, lr=1.0, warmup_steps=0, grad_accum=2, grad_clip=CLIP, progress=False, log_every=1)
    source = _Half(GANSource(1, n=8), rank)
    tr = Trainer(model, {"gan": GANTask(model)}, {"gan": source}, {"gan": 1.0}, cfg, os.path.join(out, f"r{rank}"),
                 info, log_fn=lambda s: None, optimizers=gan_specs())
    tr.fit()
    val = tr.evaluate({"gan": _finite(_Half(GANSource(7, n=8), rank), 2 + rank)})  # ranks see unequal counts
    if rank == 0:
        torch.save({"weights": _weights(model), "val": val}, os.path.join(out, "ddp.pt"))
    D.cleanup()


class _Half:
    """Rank ``rank``'s half of every batch of ``inner`` (2 processes)."""

    def __init__(self, inner: GANSource, rank: int):
        self.inner, self.rank = inner, rank

    def next_batch(self):
        real, z = self.inner.next_batch()
        return real[self.rank * 4:(self.rank + 1) * 4], z[self.rank * 4:(self.rank + 1) * 4]

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, s: dict) -> None:
        self.inner.load_state_dict(s)


@pytest.mark.slow
def test_gan_ddp_matches_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt")
    torch.manual_seed(0)
    model = ToyGAN()
    cfg = TrainConfig(steps=3, lr=1.0, warmup_steps=0, grad_accum=2, grad_clip=CLIP, progress=False, log_every=1)
    tr = Trainer(model, {"gan": GANTask(model)}, {"gan": GANSource(1, n=8)}, {"gan": 1.0}, cfg, tmp_path / "one",
                 log_fn=lambda s: None, optimizers=gan_specs())
    tr.fit()
    for k, w in _weights(model).items():
        torch.testing.assert_close(ddp["weights"][k], w, rtol=0, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # rank 0 evaluated 2 half-batches of stream 7, rank 1 three: the pooled mean is over all 20 examples
    halves = [_finite(_Half(GANSource(7, n=8), r), 2 + r) for r in (0, 1)]
    one = evaluate({"gan": GANTask(model)}, {"gan": halves[0] + halves[1]})
    assert ddp["val"]["gan/count"] == 20.0 and ddp["val"]["gan/batches"] == 5
    assert ddp["val"]["gan/d_loss"] == pytest.approx(one["gan/d_loss"], rel=1e-6)
