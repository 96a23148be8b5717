"""A job written outside the package: a toy recipe (data, model, task, evaluation, chance) defined in this file,
registered with one call and run through ``fastvl finetune`` / ``fastvl eval`` without editing fastvl."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fastvl import cli
from fastvl.recipes import FinetuneData, Recipe, register_recipe, unregister_recipe

DIM = 5


def _draw(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=g)
    return x, (x.sum(1) > 0).long()  # the label: the sign of the sum


class SignSource:
    """A resumable batch source of the trainer's protocol: next_batch / state_dict / load_state_dict."""

    def __init__(self, seed: int, batch: int = 32):
        self.seed, self.batch, self.i = seed, batch, 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.i += 1
        return _draw(self.batch, self.seed * 100_003 + self.i)

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


class SignTask(nn.Module):
    """The task protocol: forward(batch) -> dict(loss, logs, count); the model is a submodule."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch) -> dict:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        return {"loss": loss, "logs": {"sign_loss": loss.detach()}, "count": len(y)}

    @torch.no_grad()
    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float((self.model(x).argmax(1) == y).float().mean())


def _data(s, rank: int, world: int) -> FinetuneData:
    return FinetuneData(sources={"sign": SignSource(s.seed + rank)}, mix={"sign": 1.0}, val=_draw(400, 7),
                        dims={"dim": DIM}, info={"source": "toy"})


def _model(s, data: FinetuneData, init: dict | None) -> nn.Module:
    model = nn.Sequential(nn.Linear(data.dims["dim"], 16), nn.ReLU(), nn.Linear(16, 2))
    if init is not None:
        model.load_state_dict(init)
    return model


def _evaluate(tasks, data: FinetuneData, device, s) -> dict[str, float]:
    x, y = data.val
    return {"accuracy": tasks["sign"].accuracy(x.to(device), y.to(device))}


def _chance(data: FinetuneData) -> float:
    y = data.val[1]
    return float(torch.bincount(y).max()) / len(y)


TOY = Recipe(name="toy-sign", build_data=_data, build_model=_model, build_tasks=lambda m, s, d: {"sign": SignTask(m)},
             evaluate=_evaluate, metric="accuracy", chance=_chance,
             defaults=dict(steps=150, lr=3e-2, warmup_steps=10, val_every=50, ckpt_every=50, log_every=10),
             help="toy: the sign of a vector's sum")


@pytest.fixture
def toy_recipe():
    register_recipe(TOY)
    yield TOY
    unregister_recipe(TOY.name)


def test_toy_recipe_through_the_cli(toy_recipe, tmp_path, capsys):
    out = tmp_path / "toy"
    code = cli.main(["finetune", "--task", "toy-sign", "--output", str(out), "--no-progress", "--device", "cpu"])
    text = capsys.readouterr().out
    assert code == 0, text
    final = json.loads(text.split("final:", 1)[1])
    assert final["task"] == "toy-sign" and final["metric"] == "accuracy"
    assert final["value"] > final["chance"] + 0.3, final  # it learned
    assert not (out / "model_config.json").exists()  # a recipe without a model config writes none
    code = cli.main(["eval", "--task", "toy-sign", "--checkpoint", str(out)])
    again = json.loads(capsys.readouterr().out)
    assert code == 0 and again["accuracy"] == pytest.approx(final["value"])


def test_unknown_task_is_an_error(toy_recipe):
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--task", "toy-nope"])
    unregister_recipe(TOY.name)
    with pytest.raises(SystemExit):  # gone from the choices once unregistered
        cli.main(["finetune", "--task", "toy-sign"])
