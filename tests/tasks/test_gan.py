"""BachGAN training: the two-optimiser step changes G and D as it should, exact resume, PNG grids, synthesis."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from fastvl.recipes.bachgan import (
    GanSettings,
    LayoutBatchSource,
    build_gan_model,
    load_gan_run,
    open_layout_sets,
    synthesize_boxes,
    train_bachgan,
)
from fastvl.tasks.gan import BachGANTask
from fastvl.train.checkpoint import latest_checkpoint, load_checkpoint
from fastvl.train.loop import TrainConfig, Trainer
from fastvl.train.optim import OptimizerSpec

TINY = {"ngf": 2, "spade_hidden": 4, "ndf": 4}


@pytest.fixture(autouse=True)
def _plain_spade_norm(monkeypatch):
    # the wiring is under test here; spade_norm's backends are checked in tests/ops (TRITON_INTERPRET=1 would
    # otherwise route every CPU call through the Triton interpreter)
    monkeypatch.setenv("FASTVL_BACKEND", "spade_norm=reference")
    torch.set_num_threads(1)


def _settings(out, **kw) -> GanSettings:
    base = dict(output=str(out), size=(16, 16), model_overrides=dict(TINY), options={"n_train": 24, "n_val": 3},
                batch_size=4, steps=3, sample_every=2, ckpt_every=1, progress=False, memory_fraction=0.5)
    base.update(kw)
    return GanSettings(**base)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_two_optimiser_step(tmp_path, seed):
    s = _settings(tmp_path / "run", seed=seed % 1000, size=(32, 32))  # 2 x 2 latent grid (1 x 1 is degenerate)
    train, _ = open_layout_sets(s, s.size)
    model = build_gan_model(s, train)
    task = BachGANTask(model)
    batch = LayoutBatchSource(train, 4, seed=1).next_batch()
    # the discriminator phase builds no generator gradients; the generator phase none for D's weights
    task(batch, phase="discriminator")["loss"].backward()
    assert all(p.grad is None for p in model.generator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.discriminator.parameters())
    model.zero_grad(set_to_none=True)
    task(batch, phase="generator")["loss"].backward()
    assert all(p.grad is None for p in model.discriminator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.generator.parameters())
    model.zero_grad(set_to_none=True)

    specs = {"discriminator": OptimizerSpec(("discriminator",), lr=4e-4),
             "generator": OptimizerSpec(("generator",), lr=1e-4)}
    cfg = TrainConfig(steps=1, warmup_steps=0, weight_decay=0.0, betas=(0.0, 0.9), eps=1e-8, grad_clip=0.0,
                      progress=False)
    trainer = Trainer(model, {"bachgan": task}, {"bachgan": LayoutBatchSource(train, 4, seed=2)},
                      {"bachgan": 1.0}, cfg, tmp_path / "t", optimizers=specs)
    before = _snapshot(model)
    rec = trainer.train_step()
    after = _snapshot(model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    d_params = {n for n, _ in model.discriminator.named_parameters()}
    g_params = {n for n, _ in model.generator.named_parameters()}
    # (a tensor whose gradient is exactly 0 at init may stay: a last D bias when every hinge term is active, a conv
    # bias that only feeds a batch norm)
    assert len({f"discriminator.{n}" for n in d_params} - changed) <= 0.1 * len(d_params)
    assert len({f"generator.{n}" for n in g_params} - changed) <= 0.1 * len(g_params)
    assert not any(k.startswith("memory.") for k in changed)  # the bank never changes
    # Adam's first step with betas (0, 0.9) moves every weight by lr * g / |g| = lr (schedule factor 1 at step 0):
    # the generator's weights by 1e-4, the discriminator's by 4e-4 (TTUR)
    w = "generator.conv_img.weight"
    delta_g = (after[w] - before[w]).abs().max()
    wd = "discriminator.discriminator_0.model0.0.weight"
    delta_d = (after[wd] - before[wd]).abs().max()
    assert 0.99e-4 < delta_g <= 1.01e-4 and 3.96e-4 < delta_d <= 4.04e-4, (delta_g, delta_d)
    assert set(rec) >= {"loss/discriminator", "loss/generator", "bachgan/discriminator/d_real",
                        "bachgan/generator/g_feat"}


@pytest.mark.slow
def test_resume_is_exact(tmp_path, seed):
    straight = train_bachgan(_settings(tmp_path / "a", steps=3), resume=False, log=lambda *_: None)
    # a run killed after step 2: its folder as the checkpoint of step 2 left it
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    ckpts = tmp_path / "b" / "checkpoints"
    shutil.rmtree(ckpts / "step_00000003")
    (ckpts / "latest").write_text("step_00000002")
    resumed = train_bachgan(_settings(tmp_path / "b", steps=3), resume=True, log=lambda *_: None)
    assert [h["step"] for h in resumed["history"]] == [3]
    a = straight["model"].state_dict()
    b = resumed["model"].state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight["history"][-1]["loss/generator"] == resumed["history"][-1]["loss/generator"]
    # the checkpoint holds the memory bank, and a run folder loads back for synthesis
    run = load_gan_run(tmp_path / "b")
    assert run.step == 3 and torch.equal(run.model.memory.maps, straight["model"].memory.maps)
    assert (tmp_path / "b" / "samples" / "step_00000002.png").is_file()
    folder = latest_checkpoint(tmp_path / "b")
    fresh = build_gan_model(_settings(tmp_path / "c"), config=run.model.cfg)
    load_checkpoint(folder, fresh, trainer_state=False)
    assert torch.equal(fresh.memory.source_index, run.model.memory.source_index)


def test_grid_and_synthesize_from_boxes(tmp_path, seed):
    from PIL import Image

    res = train_bachgan(_settings(tmp_path / "r", steps=2, retrieval=True), resume=False, log=lambda *_: None)
    grid = Image.open(res["grid"])
    assert grid.size == (4 * 16, 3 * 16)  # layout | retrieved | generated | real, one row per validation item
    run = load_gan_run(tmp_path / "r")
    doc = json.loads((tmp_path / "r" / "bachgan.json").read_text())
    assert doc["kind"] == "bachgan" and doc["class_names"] == run.class_names
    car = run.class_names.index("car")
    image, inp = synthesize_boxes(run, torch.tensor([[car, 2, 8, 9, 13]]))
    assert image.shape == (3, 16, 16) and image.abs().max() <= 1
    assert inp.box_map[0, car, 8:13, 2:9].all() and inp.box_map[0].sum() == 5 * 7
    assert inp.retrieved.shape == (1, 3, run.model.cfg.label_nc, 16, 16)
    # pasted: the box is the car channel inside the box, and nothing else is there
    assert (inp.retrieved[0, :, car, 8:13, 2:9] == 1).all()
    assert inp.retrieved[0, :, :, 8:13, 2:9].sum() == 3 * 35


def test_ablation_trains(tmp_path, seed):
    res = train_bachgan(_settings(tmp_path / "n", steps=1, retrieval=False), resume=False, log=lambda *_: None)
    assert not res["model"].cfg.retrieval
    run = load_gan_run(tmp_path / "n")
    assert not hasattr(run.model, "memory")
    image, inp = synthesize_boxes(run, torch.tensor([[run.class_names.index("boat"), 0, 0, 4, 4]]))
    assert inp.retrieved is None and image.shape == (3, 16, 16)


@pytest.mark.slow
def test_evaluation_table(tmp_path, seed):
    from fastvl.recipes.bachgan import evaluate_gan_runs, format_table

    train_bachgan(_settings(tmp_path / "g", steps=1), resume=False, log=lambda *_: None)
    train_bachgan(_settings(tmp_path / "n", steps=1, retrieval=False), resume=False, log=lambda *_: None)
    runs = {"BachGAN": load_gan_run(tmp_path / "g"), "ablation": load_gan_run(tmp_path / "n")}
    rows = evaluate_gan_runs(runs, segmenter_steps=2, progress=False, log=lambda *_: None)
    assert [r["name"] for r in rows] == ["real images", "BachGAN", "ablation"]
    real = rows[0]
    for r in rows:
        assert 0 <= r["pixel_acc"] <= 1 and 0 <= r["miou"] <= 1 and r["n"] == 3
        assert r["fid_label"] == "FID (fastvl feature net)"
        assert r["ratio_to_real"] == pytest.approx(r["pixel_acc"] / real["pixel_acc"])
    assert rows[0]["fid"] is None and rows[1]["fid"] >= 0 and rows[2]["fid"] >= 0
    table = format_table(rows)
    assert "FID (fastvl feature net)" in table and "Inception" not in table
