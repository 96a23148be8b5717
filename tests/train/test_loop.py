"""The generic trainer on a toy task: schedule, parameter groups, accumulation, checkpoints, resume."""

import pytest
import torch
from torch import nn

from fastvl.train import checkpoint as ckpt
from fastvl.train.loop import TrainConfig, Trainer
from fastvl.train.optim import param_groups, warmup_linear


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 1)
        self.tied = nn.Linear(4, 4, bias=False)
        self.tied.weight = self.dense.weight  # a tie, as UNITER's decoder / word embeddings
        self.drop = nn.Dropout(0.1)


class ToyTask(nn.Module):
    def __init__(self, model, scale=1.0):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, batch):
        x, y = batch
        h = self.model.drop(torch.tanh(self.model.dense(x)))
        pred = self.model.head(h).squeeze(-1)
        loss = ((pred - y) ** 2).mean() * self.scale
        return {"loss": loss, "logs": {"mse": loss.detach()}, "count": torch.tensor(float(len(y)))}


class ToySource:
    """Deterministic: batch k is a pure function of (seed, k)."""

    def __init__(self, seed):
        self.seed, self.k = seed, 0

    def next_batch(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.k)
        self.k += 1
        x = torch.randn(8, 4, generator=g)
        return x, x @ torch.tensor([1.0, -0.5, 0.25, 0.0])

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, s):
        self.k = s["k"]


def make_trainer(out, steps=12, ckpt_every=0, seed=0):
    torch.manual_seed(seed)
    model = ToyModel()
    tasks = {"a": ToyTask(model), "b": ToyTask(model, 2.0)}
    cfg = TrainConfig(steps=steps, lr=3e-2, warmup_steps=3, grad_accum=2, ckpt_every=ckpt_every, progress=False,
                      log_every=1, seed=seed)
    return model, Trainer(model, tasks, {"a": ToySource(1), "b": ToySource(2)}, {"a": 2, "b": 1}, cfg, out,
                          log_fn=lambda s: None)


def test_warmup_linear_schedule():
    assert [round(warmup_linear(s, 4, 10), 4) for s in range(10)] == [0.25, 0.5, 0.75, 1.0, 1.0, 0.8333, 0.6667, 0.5,
                                                                       0.3333, 0.1667]


def test_no_decay_groups_and_ties_once():
    groups = param_groups(ToyModel(), 0.01)
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == 6  # dense.w/b, LayerNorm.w/b, head.w/b; tied.weight is dense.weight, counted once
    no_decay = [g for g in groups if g["weight_decay"] == 0.0][0]
    assert len(no_decay["params"]) == 4  # every bias and the LayerNorm weight


def test_training_reduces_loss(tmp_path):
    _, tr = make_trainer(tmp_path, steps=40)
    hist = tr.fit()
    first = sum(h["loss"] for h in hist[:5]) / 5
    last = sum(h["loss"] for h in hist[-5:]) / 5
    assert last < first * 0.5
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") >= 40
    assert ckpt.latest_checkpoint(tmp_path) is not None


def test_resume_gives_identical_weights(tmp_path):
    model_a, tr = make_trainer(tmp_path / "a", steps=12)
    tr.fit()
    model_b, tr = make_trainer(tmp_path / "b", steps=12, ckpt_every=5)
    real_step = tr.train_step

    def crashing_step():
        if tr.step == 7:  # "crash" two steps after the step-5 checkpoint
            raise KeyboardInterrupt
        return real_step()

    tr.train_step = crashing_step
    with pytest.raises(KeyboardInterrupt):
        tr.fit()
    model_c, tr = make_trainer(tmp_path / "b", steps=12, ckpt_every=5, seed=123)  # different init: resume overrides
    assert tr.resume() and tr.step == 5
    tr.fit()
    for (n, a), (_, c) in zip(model_a.state_dict().items(), model_c.state_dict().items()):
        assert torch.equal(a, c), n


def test_interrupted_write_leaves_previous_checkpoint(tmp_path):
    model, tr = make_trainer(tmp_path, steps=3)
    tr.fit()
    good = ckpt.latest_checkpoint(tmp_path)
    # a writer killed mid-way leaves a partial temp folder (and maybe a temp pointer); neither is trusted
    partial = tmp_path / "checkpoints" / ".tmp_step_00000004_999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / "checkpoints" / ".latest.999").write_text("step_00000004")
    assert ckpt.latest_checkpoint(tmp_path) == good
    state = ckpt.load_checkpoint(good, ToyModel())
    assert state["step"] == 3
