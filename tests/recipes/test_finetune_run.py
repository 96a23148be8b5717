"""Fine-tuning driver: the task registry, model preparation from a pre-training checkpoint, runs with checkpoints,
exact resume and evaluation, and VILLA (AdversarialTask) on every fine-tuning task against a plain VILLA loop."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fastvl.adversarial import AdvConfig, AdversarialTask
from fastvl.adversarial.reference import _update
from fastvl.models.uniter import (
    UniterForImageTextRetrieval,
    UniterForNlvr2Paired,
    UniterForNlvr2PairedAttn,
    UniterForPretraining,
    UniterForReferringExpressionComprehension,
    UniterForVisualCommonsenseReasoning,
    UniterForVisualQuestionAnswering,
)
from fastvl.models.uniter.caption import CaptionTokens, UniterForCaptioning
from fastvl.models.uniter.testing import random_pretrain_batch, tiny_config
from fastvl.recipes import (
    FinetuneSettings,
    Recipe,
    evaluate_finetune,
    finetune,
    get_recipe,
    list_models,
    list_recipes,
    register_recipe,
    unregister_recipe,
)
from fastvl.recipes.base import load_init_state, load_pretrained
from fastvl.recipes.runner import finetune_cpu_threads
from fastvl.tasks import ITRTask, NLVR2Task, RETask, VCRTask, VQATask
from fastvl.tasks.caption import CaptionTask
from fastvl.train import checkpoint as ckpt

TINY = dict(synthetic_images=24, synthetic_val_images=6)
BUILTIN = ("vqa", "gqa", "ve", "nlvr2", "itr", "re", "vcr")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FASTVL_CACHE", str(tmp_path_factory.getbasetemp() / "fastvl-cache"))


def _settings(task, tmp_path, **kw):
    base = dict(task=task, output=str(tmp_path / task), steps=4, batch_tokens=400, warmup_steps=1, log_every=1,
                val_every=0, ckpt_every=0, progress=False, options=dict(TINY, eval_images=6))
    return FinetuneSettings(**{**base, **kw})


# ----------------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------------
def test_registry():
    assert set(BUILTIN) <= set(list_recipes())
    vqa = get_recipe("vqa")
    toy = register_recipe(replace(vqa, name="toy-qa", defaults={"steps": 7}))
    try:
        assert "toy-qa" in list_recipes() and get_recipe("toy-qa") is toy
        assert FinetuneSettings(task="toy-qa").resolved().steps == 7
        assert FinetuneSettings(task="toy-qa").resolved().output == "runs/finetune-toy-qa"
        with pytest.raises(ValueError, match="'toy-qa' of model 'uniter' is already registered"):
            register_recipe(replace(vqa, name="toy-qa"))
        register_recipe(replace(vqa, name="toy-qa", metric="x"), replace_existing=True)
        assert get_recipe("toy-qa").metric == "x"
    finally:
        unregister_recipe("toy-qa")
    with pytest.raises(ValueError, match=r"defaults \['stepz'\] are not FinetuneSettings fields"):
        register_recipe(replace(vqa, name="bad", defaults={"stepz": 1}))
    with pytest.raises(TypeError, match="must be a fastvl.recipes.Recipe"):
        register_recipe({"name": "x"})
    with pytest.raises(ValueError, match=r"model 'uniter' has no task 'nope'; its tasks: \[.*'vqa'"):
        get_recipe("nope")
    with pytest.raises(ValueError, match=r"unknown model 'nomodel'; models with recipes: \[.*'uniter'"):
        get_recipe("vqa", model="nomodel")
    other = register_recipe(replace(vqa, model="toy-model"))  # the same task name, another model family
    try:
        assert get_recipe("vqa", "toy-model") is other and get_recipe("vqa") is vqa
        assert "toy-model" in list_models() and list_recipes("toy-model") == ["vqa"]
        assert FinetuneSettings(task="vqa", model="toy-model").resolved().output == "runs/finetune-toy-model-vqa"
    finally:
        unregister_recipe("vqa", model="toy-model")
    assert "toy-model" not in list_models()
    assert isinstance(vqa, Recipe) and vqa.metric == "accuracy"


# ----------------------------------------------------------------------------------------------------------------
# models from a pre-training checkpoint
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrain_run(tmp_path_factory):
    """A `fastvl pretrain`-shaped run folder (model_config.json + checkpoints/step_*) of a random tiny model with the
    synthetic data's vocabulary and feature size."""
    from fastvl.data.finetune_synthetic import FinetuneSynthConfig
    from fastvl.data.synthetic import synthetic_vocab

    run = tmp_path_factory.mktemp("pt")
    cfg = tiny_config(vocab_size=len(synthetic_vocab()), img_dim=FinetuneSynthConfig().world.img_dim,
                      img_label_dim=9, initializer_range=0.3)
    torch.manual_seed(0)
    model = UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim)
    cfg.to_json_file(run / "model_config.json")
    ckpt.save_checkpoint(run, 5, model, {"step": 5})
    return run, model


@pytest.mark.parametrize("task", BUILTIN)
def test_models_from_a_pretrain_checkpoint(task, pretrain_run, tmp_path):
    run, pre = pretrain_run
    s = _settings(task, tmp_path, init=str(run)).resolved()
    spec = get_recipe(task)
    data = spec.build_data(s, 0, 1)
    state, found = load_init_state(run)
    assert found == run
    model = spec.build_model(s, data, state)
    pw = pre.state_dict()
    emb = model.uniter.embeddings
    torch.testing.assert_close(model.uniter.encoder.layer[0].attention.self.query.weight,
                               pw["uniter.encoder.layer.0.attention.self.query.weight"])
    n_words = pw["uniter.embeddings.word_embeddings.weight"].shape[0]
    torch.testing.assert_close(emb.word_embeddings.weight[:n_words], pw["uniter.embeddings.word_embeddings.weight"])
    types = emb.token_type_embeddings.weight
    old_types = pw["uniter.embeddings.token_type_embeddings.weight"]
    if task == "nlvr2":
        assert types.shape[0] == 3
        torch.testing.assert_close(types[2], old_types[1])
    elif task == "vcr":
        assert types.shape[0] == 4 and emb.word_embeddings.weight.shape[0] == n_words + 81
        torch.testing.assert_close(types[2], old_types[0])
        torch.testing.assert_close(types[3], old_types[0])
    else:
        assert types.shape[0] == 2
    if task == "itr":
        torch.testing.assert_close(model.rank_output.weight, pw["itm_output.weight"][1:])


# ----------------------------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------------------------
def test_run_resume_and_evaluate(tmp_path):
    """6 steps with checkpoints at 3 and 6; a run resumed from step 3 ends with the same weights; evaluating the
    checkpoint gives the run's last validation metric."""
    s = _settings("vqa", tmp_path, steps=6, ckpt_every=3, val_every=6)
    result = finetune(s, log=lambda m: None)
    out = tmp_path / "vqa"
    assert result["metric"] is not None and 0.0 <= result["metric"] <= 1.0 and result["chance"] > 0
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, 7))
    assert json.loads((out / "finetune.json").read_text())["dims"]["num_answers"] > 2
    final = ckpt.latest_checkpoint(out)
    from safetensors.torch import load_file

    want = load_file(str(final / "model.safetensors"))
    (out / "checkpoints" / "latest").write_text("step_00000003")  # as if killed after step 3
    again = finetune(replace(s, resume=True), log=lambda m: None)
    got = load_file(str(ckpt.latest_checkpoint(out) / "model.safetensors"))
    assert again["history"][0]["step"] == 4
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
    ev = evaluate_finetune(out)
    assert ev["task"] == "vqa" and ev["metric"] == pytest.approx(result["metric"], abs=1e-6)
    with pytest.raises(ValueError, match="fine-tuned for task 'vqa', not 've'"):
        evaluate_finetune(out, "ve")


def test_adversarial_run(tmp_path):
    s = _settings("nlvr2", tmp_path, steps=3, adv=dict(mode="both", adv_steps=2, adv_lr_txt=0.05,
                                                       adv_lr_img=0.05))
    result = finetune(s, log=lambda m: None)
    assert "nlvr2/adv_kl" in result["history"][-1] and result["metric"] is not None


# ----------------------------------------------------------------------------------------------------------------
# VILLA on every fine-tuning task vs a plain loop
# ----------------------------------------------------------------------------------------------------------------
def _sym_kl(a, b, lens=None, element_mean=False):
    """VILLA's symmetric KL, batchmean (``element_mean``: the mean over every element, as train_vcr_adv.py); with
    ``lens`` row i compares its first lens[i] entries only (RE regions)."""
    a, b = a.float(), b.float()
    if lens is not None:
        return sum(_sym_kl(a[i:i + 1, :n], b[i:i + 1, :n]) for i, n in enumerate(lens)) / a.shape[0]
    kl = F.kl_div(F.log_softmax(a, -1), F.softmax(b, -1), reduction="none") + \
        F.kl_div(F.log_softmax(b, -1), F.softmax(a, -1), reduction="none")
    return kl.mean() if element_mean else kl.sum() / a.shape[0]


def _setup(name, gen):
    cfg = tiny_config(initializer_range=0.3)
    torch.manual_seed(0)
    if name == "vqa":
        model = UniterForVisualQuestionAnswering(cfg, cfg.img_dim, 7)
        batch = random_pretrain_batch("none", gen, cfg, batch=4)
        batch.targets = torch.rand(4, 7, generator=gen)
        return VQATask(model), batch, lambda p: p
    if name in ("nlvr2", "nlvr2-attn"):
        model = (UniterForNlvr2Paired if name == "nlvr2" else UniterForNlvr2PairedAttn)(cfg, cfg.img_dim)
        model.init_type_embedding()
        batch = random_pretrain_batch("none", gen, cfg, batch=6, img_range=(1, 6))
        batch.targets = torch.randint(0, 2, (3,), generator=gen)
        return NLVR2Task(model), batch, lambda p: p
    if name == "itr":
        model = UniterForImageTextRetrieval(cfg, cfg.img_dim, margin=2.0)  # every hinge active: no ~0 gradients
        batch = random_pretrain_batch("none", gen, cfg, batch=4)
        return ITRTask(model, num_neg=1), batch, lambda p: p.reshape(-1, 3)
    if name == "re":
        model = UniterForReferringExpressionComprehension(cfg, cfg.img_dim, mlp=2)
        batch = random_pretrain_batch("none", gen, cfg, batch=4, img_range=(2, 6))
        batch.targets = torch.tensor([int(torch.randint(n, (1,), generator=gen)) for n in batch.img_lens])
        return RETask(model), batch, lambda p: p
    if name == "caption":
        model = UniterForCaptioning(cfg, cfg.img_dim)
        batch = random_pretrain_batch("mlm", gen, cfg, batch=4)
        return CaptionTask(model, CaptionTokens(cls=1, sep=2, mask=3)), batch, lambda p: p
    model = UniterForVisualCommonsenseReasoning(cfg, cfg.img_dim)
    batch = random_pretrain_batch("none", gen, cfg, batch=8)
    t = torch.zeros(8, dtype=torch.long)
    t[[1, 6]] = 1
    batch.targets = t
    return VCRTask(model), batch, lambda p: p


def _plain_villa(task, batch, cfg: AdvConfig, shape):
    """The plain loop (REFERENCE.md, VILLA) on the model's own forward: clean pass kept with its graph, K steps of
    (official loss + w * symmetric KL) / K backpropagated, normalised delta ascent between steps."""
    model = task.model
    if isinstance(task, ITRTask):
        batch = task.adv_prepare(batch)  # the same negatives (the caller seeds torch's RNG identically)

    fwd = model if isinstance(task, CaptionTask) else model.forward_packed

    def run(txt, img):
        loss = fwd(batch, compute_loss=True, reduction="mean", txt_delta=txt, img_delta=img)
        if isinstance(task, VCRTask):  # train_vcr_adv.py compares the 2-way scores [4n, 2] of every row
            h = model.uniter.forward_packed(batch, txt_delta=txt, img_delta=img)
            pred = model.vcr_output(model.pooled(h, batch.packed_layout()))
        else:
            pred = fwd(batch, compute_loss=False, txt_delta=txt, img_delta=img)
        return loss.float(), shape(pred)

    _, clean = run(None, None)
    txt = torch.zeros(batch.input_ids.shape[0], model.uniter.config.hidden_size)
    img = torch.zeros_like(batch.img_feat)
    for k in range(cfg.adv_steps):
        txt.requires_grad_()
        img.requires_grad_()
        loss, pred = run(txt, img)
        lens = batch.img_lens if isinstance(task, RETask) else None
        kl = _sym_kl(pred, clean, lens, element_mean=isinstance(task, VCRTask))
        ((loss + cfg.adv_kl_weight * kl) / cfg.adv_steps).backward(retain_graph=True)
        if k < cfg.adv_steps - 1:
            txt = _update(txt, txt.grad, batch.txt_lens, cfg.adv_lr_txt, cfg.norm, cfg.adv_max_norm)
            img = _update(img, img.grad, batch.img_lens, cfg.adv_lr_img, cfg.norm, cfg.adv_max_norm)


@pytest.mark.parametrize("name", ["vqa", "nlvr2", "nlvr2-attn", "itr", "re", "vcr", "caption"])
def test_villa_matches_plain_loop(name, seed, gen):
    task, batch, shape = _setup(name, gen)
    cfg = AdvConfig(mode="both", adv_steps=3, adv_lr_txt=0.05, adv_lr_img=0.05, adv_kl_weight=1.5)
    torch.manual_seed(seed)
    _plain_villa(task, batch, cfg, shape)
    want = {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}
    task.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = AdversarialTask(task, cfg)(batch)
    out["loss"].backward()
    got = {n: p.grad for n, p in task.model.named_parameters() if p.grad is not None}
    assert set(got) == set(want), (set(got) ^ set(want))
    assert float(out["logs"]["adv_kl"]) > 0
    scale = max(float(g.abs().max()) for g in want.values())  # fp32 sums in another order: absolute tolerance
    for n in want:                                              # relative to the largest gradient
        torch.testing.assert_close(got[n], want[n], rtol=2e-4, atol=2e-5 * scale, msg=lambda m, n=n: f"{n}: {m}")
    if name == "caption":  # the masked tokens
        assert int(out["count"]) == int((batch.txt_labels != -1).sum()) > 0
    else:
        assert out["count"] == (3 if name.startswith("nlvr2") else 4 if name != "vcr" else 8)


def test_load_pretrained_tied_decoder_is_not_missing():
    """A checkpoint storing a tied weight once (the decoder shares the word embeddings) loads with nothing missing;
    a genuinely absent head is still reported."""
    from fastvl.models.uniter.caption import UniterForCaptioning

    src = UniterForCaptioning(tiny_config(), 16)
    state = {k: v for k, v in src.state_dict().items() if k != "cls.predictions.decoder.weight"}
    logs: list[str] = []
    missing, unexpected = load_pretrained(UniterForCaptioning(tiny_config(), 16), state, logs.append)
    assert missing == [] and unexpected == [] and "1 tied to loaded weights" in logs[0]
    state.pop("cls.predictions.bias")
    missing, _ = load_pretrained(UniterForCaptioning(tiny_config(), 16), state, logs.append)
    assert missing == ["cls.predictions.bias"]


def test_cpu_threads_default(monkeypatch):
    """1 thread for a tiny model on CPU unless OMP_NUM_THREADS is set; an explicit setting wins; bad values fail."""
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        tiny = UniterForPretraining(tiny_config(), tiny_config().img_dim)
        torch.set_num_threads(2)
        assert finetune_cpu_threads(None, tiny, torch.device("cpu")) == 1
        assert finetune_cpu_threads(2, tiny, torch.device("cpu")) == 2
        assert finetune_cpu_threads(None, tiny, torch.device("cuda")) is None
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert finetune_cpu_threads(1, tiny, torch.device("cpu")) == 2  # the environment wins
        with pytest.raises(ValueError, match="'threads' must be >= 1"):
            finetune_cpu_threads(0, tiny, torch.device("cpu"))
    finally:
        torch.set_num_threads(before)
