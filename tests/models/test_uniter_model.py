"""UniterModel / UniterForPretraining as drop-ins: keys, configs, checkpoint loading, encoder equivalence, helpers."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fastvl.batch import PackedVLBatch
from fastvl.models import create_model, list_models
from fastvl.models.uniter import UniterConfig, UniterForPretraining, UniterModel
from fastvl.models.uniter.config import resolve_config
from fastvl.models.uniter.testing import (
    assert_autocast_rule,
    assert_same_grads,
    model_pair,
    random_pretrain_batch,
    tiny_config,
    to_official_batch,
    weighted_sum,
)
from fastvl.nn.bert import BertLayer
from fastvl.ops.testing import assert_rel_close

OFFICIAL_BASE = {  # the official uniter-base.json, verbatim
    "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 512, "num_attention_heads": 12,
    "num_hidden_layers": 12, "type_vocab_size": 2, "vocab_size": 28996,
}
TINY_JSON = {**OFFICIAL_BASE, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
             "num_hidden_layers": 2, "vocab_size": 61, "max_position_embeddings": 64}


def expected_pretrain_keys(n_layers: int) -> set[str]:
    """The official UniterForPretraining state_dict keys (REFERENCE.md), written out."""
    keys = [
        "uniter.embeddings.word_embeddings.weight", "uniter.embeddings.position_embeddings.weight",
        "uniter.embeddings.token_type_embeddings.weight", "uniter.embeddings.LayerNorm.weight",
        "uniter.embeddings.LayerNorm.bias",
        "uniter.img_embeddings.img_linear.weight", "uniter.img_embeddings.img_linear.bias",
        "uniter.img_embeddings.img_layer_norm.weight", "uniter.img_embeddings.img_layer_norm.bias",
        "uniter.img_embeddings.pos_linear.weight", "uniter.img_embeddings.pos_linear.bias",
        "uniter.img_embeddings.pos_layer_norm.weight", "uniter.img_embeddings.pos_layer_norm.bias",
        "uniter.img_embeddings.mask_embedding.weight",
        "uniter.img_embeddings.LayerNorm.weight", "uniter.img_embeddings.LayerNorm.bias",
        "uniter.pooler.dense.weight", "uniter.pooler.dense.bias",
        "cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.decoder.weight",
        "feat_regress.weight", "feat_regress.bias", "feat_regress.net.0.weight", "feat_regress.net.0.bias",
        "feat_regress.net.2.weight", "feat_regress.net.2.bias",
        "region_classifier.net.0.weight", "region_classifier.net.0.bias", "region_classifier.net.2.weight",
        "region_classifier.net.2.bias", "region_classifier.net.3.weight", "region_classifier.net.3.bias",
        "itm_output.weight", "itm_output.bias",
    ]
    for n in range(n_layers):
        p = f"uniter.encoder.layer.{n}."
        keys += [p + f"attention.self.{m}.{w}" for m in ("query", "key", "value") for w in ("weight", "bias")]
        keys += [p + f"attention.output.{m}.{w}" for m in ("dense", "LayerNorm") for w in ("weight", "bias")]
        keys += [p + f"intermediate.dense.{w}" for w in ("weight", "bias")]
        keys += [p + f"output.{m}.{w}" for m in ("dense", "LayerNorm") for w in ("weight", "bias")]
    return set(keys)


# ----------------------------------------------------------------------------------------------------------
# Keys, configs, checkpoints
# ----------------------------------------------------------------------------------------------------------


def test_official_key_set_and_strict_round_trip(tmp_path):
    cfg_file = tmp_path / "uniter-tiny.json"
    cfg_file.write_text(json.dumps(TINY_JSON))
    config = UniterConfig.from_json_file(cfg_file)
    model = UniterForPretraining(config, img_dim=24, img_label_dim=13)
    sd = model.state_dict()
    assert set(sd) == expected_pretrain_keys(2)
    # ties: the MLM decoder IS the word table; the MRFR weight IS img_linear's weight
    assert model.cls.predictions.decoder.weight is model.uniter.embeddings.word_embeddings.weight
    assert model.feat_regress.weight is model.uniter.img_embeddings.img_linear.weight
    assert sd["feat_regress.weight"].shape == (32, 24) and sd["cls.predictions.decoder.weight"].shape == (61, 32)
    torch.save(sd, tmp_path / "ckpt.pt")
    other = UniterForPretraining(UniterConfig(str(cfg_file)), 24, 13)  # official: path as first argument
    result = other.load_state_dict(torch.load(tmp_path / "ckpt.pt"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k
    assert other.cls.predictions.decoder.weight is other.uniter.embeddings.word_embeddings.weight


def test_config_sources_agree(tmp_path):
    path = tmp_path / "base.json"
    path.write_text(json.dumps(OFFICIAL_BASE))
    from_json = UniterConfig.from_json_file(path)
    assert resolve_config("base") == from_json == UniterConfig.from_dict(OFFICIAL_BASE)
    large = resolve_config("large")
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads, large.intermediate_size) == \
        (1024, 24, 16, 4096)
    tiny = resolve_config("tiny")
    assert tiny.vocab_size == 28996 and tiny.hidden_size % tiny.num_attention_heads == 0
    assert UniterConfig.from_json_file(_write(tmp_path, from_json.to_json_string())) == from_json
    assert set(list_models()) >= {"uniter", "uniter-pretrain", "uniter-tiny", "uniter-base", "uniter-large"}
    m = create_model("uniter-pretrain", config=TINY_JSON, img_dim=24, img_label_dim=13)
    assert set(m.state_dict()) == expected_pretrain_keys(2)


def _write(tmp_path, text: str):
    p = tmp_path / "round.json"
    p.write_text(text)
    return p


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="num_attention_heads"):
        UniterConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="hidden_act"):
        UniterConfig(hidden_act="tanh")
    with pytest.raises(ValueError, match="unknown keys"):
        resolve_config({**OFFICIAL_BASE, "hiden_size": 3})
    with pytest.warns(UserWarning, match="unknown keys"):
        cfg = UniterConfig.from_dict({**OFFICIAL_BASE, "model_type": "bert"})
    assert cfg.extra == {"model_type": "bert"} and cfg.to_dict()["model_type"] == "bert"
    with pytest.raises(FileNotFoundError, match="no such file"):
        UniterConfig.from_json_file(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="neither a known size"):
        resolve_config("huge")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("uniter-huge")


def test_from_pretrained_official_conventions(tmp_path, caplog):
    cfg_file = tmp_path / "tiny.json"
    cfg_file.write_text(json.dumps(TINY_JSON))
    src = UniterForPretraining(UniterConfig.from_json_file(cfg_file), 24, 13)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    ckpt = {}
    for k, v in src.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        ckpt[k.replace("uniter.", "bert.", 1) if k.startswith("uniter.") else k] = v.half()
    del ckpt["itm_output.bias"]
    ckpt["some_head.weight"] = torch.zeros(3)
    with caplog.at_level("INFO", logger="fastvl.models.uniter"):
        model = UniterForPretraining.from_pretrained(cfg_file, ckpt, img_dim=24, img_label_dim=13)
    assert model.loading_info == {"missing_keys": ["itm_output.bias"], "unexpected_keys": ["some_head.weight"]}
    assert "not initialized" in caplog.text and "not used" in caplog.text
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32
        if k != "itm_output.bias":
            assert torch.equal(v, src.state_dict()[k].half().float()), k
    # an encoder-only model takes a pre-training checkpoint (the uniter. prefix is stripped)
    enc = UniterModel.from_pretrained(cfg_file, src.state_dict(), img_dim=24)
    assert enc.loading_info["missing_keys"] == []
    assert torch.equal(enc.pooler.dense.weight, src.uniter.pooler.dense.weight)
    # and a pre-training model takes an encoder checkpoint (prefix added)
    back = UniterForPretraining.from_pretrained(cfg_file, enc.state_dict(), 24, 13)
    assert all(k.startswith(("cls.", "feat_regress.", "region_classifier.", "itm_output."))
               for k in back.loading_info["missing_keys"])


# ----------------------------------------------------------------------------------------------------------
# Encoder equivalence with the padded reference (official interface)
# ----------------------------------------------------------------------------------------------------------


def _official_inputs(mode: str, gen: torch.Generator, cfg: UniterConfig):
    pb = random_pretrain_batch("none", gen, cfg, batch=5)
    ob = to_official_batch(pb, "none")
    b, max_tl = ob["input_ids"].shape
    max_nbb = ob["img_feat"].shape[1]
    img_masks = torch.rand(b, max_nbb, generator=gen) < 0.3
    position_ids = torch.randint(0, cfg.max_position_embeddings, (b, max_tl), generator=gen)
    txt_type = torch.randint(0, 2, (b, max_tl), generator=gen)
    img_type = torch.randint(0, 2, (b, max_nbb), generator=gen)
    if mode == "joint":
        args = (ob["input_ids"], position_ids, ob["img_feat"], ob["img_pos_feat"], ob["attn_masks"],
                ob["gather_index"])
        kw = dict(img_masks=img_masks, txt_type_ids=txt_type, img_type_ids=img_type)
    elif mode == "text":
        attn = (torch.arange(max_tl)[None] < torch.tensor(pb.txt_lens)[:, None]).long()
        args = (ob["input_ids"], ob["position_ids"], None, None, attn)
        kw = dict(txt_type_ids=txt_type)
    else:
        attn = (torch.arange(max_nbb)[None] < torch.tensor(pb.img_lens)[:, None]).long()
        args = (None, None, ob["img_feat"], ob["img_pos_feat"], attn)
        kw = dict(img_masks=img_masks)
    return args, kw


@pytest.mark.parametrize("mode", ["joint", "text", "image"])
def test_encoder_matches_padded_reference(mode, gen, seed):
    cfg, fast, ref = model_pair(pretrain=False, seed=seed)
    args, kw = _official_inputs(mode, gen, cfg)
    valid = args[4].bool()
    outs_f = fast(*args, **kw)
    outs_r = ref(*args, **kw)
    assert isinstance(outs_f, list) and len(outs_f) == cfg.num_hidden_layers
    for i, (f, r) in enumerate(zip(outs_f, outs_r)):
        assert f.shape == r.shape
        assert_rel_close(f[valid], r[valid], 1e-4, f"layer {i}")
        assert bool((f[~valid] == 0).all()), "positions where attention_mask is 0 must be 0"
    pooled_f, pooled_r = fast.pooler(outs_f[-1]), ref.pool(outs_r[-1])
    assert_rel_close(pooled_f, pooled_r, 1e-4, "pooled")
    seed_w = int(torch.randint(2**31, (1,), generator=gen))
    loss_f = weighted_sum([o[valid] for o in outs_f] + [pooled_f], torch.Generator().manual_seed(seed_w))
    loss_r = weighted_sum([o[valid] for o in outs_r] + [pooled_r], torch.Generator().manual_seed(seed_w))
    loss_f.backward()
    loss_r.backward()
    assert_same_grads(fast, ref)
    last = fast(*args, **kw, output_all_encoded_layers=False)
    assert isinstance(last, torch.Tensor) and torch.allclose(last, outs_f[-1])


def test_packed_api_matches_official_api(gen, seed):
    """forward_packed on a PackedVLBatch gives the rows of the official output, without padding."""
    cfg, fast, _ = model_pair(pretrain=False, seed=seed)
    pb = random_pretrain_batch("none", gen, cfg, batch=6)
    ob = to_official_batch(pb, "none")
    padded = fast(ob["input_ids"], ob["position_ids"], ob["img_feat"], ob["img_pos_feat"], ob["attn_masks"],
                  ob["gather_index"], output_all_encoded_layers=False)
    packed = fast.forward_packed(pb)
    assert packed.shape == (pb.num_tokens, cfg.hidden_size)
    assert_rel_close(packed, padded[ob["attn_masks"].bool()], 1e-5, "packed vs official")


def test_perturbation_deltas(gen, seed):
    """VILLA hooks: txt_delta is added to the word embeddings, img_delta to the raw features; both get gradients."""
    cfg, fast, _ = model_pair(pretrain=False, seed=seed)
    pb = random_pretrain_batch("none", gen, cfg, batch=4)
    other = torch.randint(4, cfg.vocab_size, pb.input_ids.shape, generator=gen)
    table = fast.embeddings.word_embeddings.weight.detach()
    txt_delta = (table[other] - table[pb.input_ids]).requires_grad_()
    img_delta = torch.randn(pb.img_feat.shape, generator=gen).requires_grad_()
    got = fast.forward_packed(pb, txt_delta=txt_delta, img_delta=img_delta)
    want = fast.forward_packed(replace(pb, input_ids=other, img_feat=pb.img_feat + img_delta.detach()))
    assert_rel_close(got, want, 1e-5, "perturbed")
    got.pow(2).sum().backward()
    assert txt_delta.grad.abs().sum() > 0 and img_delta.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="'img_delta' must have shape"):
        fast.forward_packed(pb, img_delta=img_delta[1:])


def test_cpu_autocast_bf16(gen, seed):
    """Under bf16 autocast every task's predictions follow the model tolerance rule against the reference in float64
    (fast RMS error <= 3 x the reference's own bf16 RMS error, see assert_autocast_rule), autocast is honoured, and
    forward + backward run (GPU: the cuda-marked test of test_uniter_pretrain)."""
    cfg, fast, ref = model_pair(seed=seed)
    for task in ("mlm", "mrfr", "mrc", "mrc-kl", "itm"):
        pb = random_pretrain_batch(task, gen, cfg, batch=4)
        if task == "itm":
            pb.itm_targets[:2] = torch.tensor([0, 1])
        assert_autocast_rule(fast, ref, to_official_batch(pb, task), task, "cpu")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fast(pb, task, reduction="mean")
        (got[0] if task == "itm" else got).backward()


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def test_bad_encoder_inputs(gen):
    cfg = tiny_config()
    model = UniterModel(cfg, cfg.img_dim)
    pb = random_pretrain_batch("none", gen, cfg, batch=3)
    ob = to_official_batch(pb, "none")
    args = [ob[k] for k in ("input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks", "gather_index")]
    bad = list(args)
    bad[2] = args[2][:2]
    with pytest.raises(ValueError, match="'img_feat' has batch size 2 but 'attention_mask' has 3"):
        model(*bad)
    bad = list(args)
    bad[5] = None
    with pytest.raises(ValueError, match="'gather_index'"):
        model(*bad)
    bad = list(args)
    bad[3] = args[3][..., :6]
    with pytest.raises(ValueError, match="'img_pos_feat' must have 7"):
        model(*bad)
    with pytest.raises(ValueError, match="both None"):
        model(None, None, None, None, args[4])


def test_wrong_feature_dim_is_named():
    cfg = tiny_config(img_dim=2048)
    model = UniterModel(cfg, 2048)
    gen = torch.Generator().manual_seed(0)
    pb = random_pretrain_batch("none", gen, cfg.replace(img_dim=1024), batch=2)
    with pytest.raises(ValueError, match=r"'img_feat' has feature size 1024 .* img_dim=2048"):
        model.forward_packed(pb)
    ob = to_official_batch(pb, "none")
    with pytest.raises(ValueError, match=r"'img_feat' has feature size 1024 .* img_dim=2048"):
        model(ob["input_ids"], ob["position_ids"], ob["img_feat"], ob["img_pos_feat"], ob["attn_masks"],
              ob["gather_index"])


def test_text_longer_than_max_positions(gen):
    cfg = tiny_config(max_position_embeddings=16)
    model = UniterModel(cfg, cfg.img_dim)
    pb = random_pretrain_batch("none", gen, cfg, txt_lens=[3, 17], img_lens=[2, 2])
    with pytest.raises(ValueError, match="17 tokens but max_position_embeddings is 16"):
        model.forward_packed(pb)
    ob = to_official_batch(pb, "none")
    ob["position_ids"] = ob["position_ids"].clamp(max=15)
    with pytest.raises(ValueError, match="17 tokens but max_position_embeddings is 16"):
        model(ob["input_ids"], ob["position_ids"], ob["img_feat"], ob["img_pos_feat"], ob["attn_masks"],
              ob["gather_index"])


def test_non_finite_features_reported(gen):
    cfg = tiny_config()
    model = UniterModel(cfg, cfg.img_dim)
    pb = random_pretrain_batch("none", gen, cfg, batch=3)
    pb.img_feat[2, 5] = float("nan")
    out = model.forward_packed(pb)  # off by default: no device read
    assert torch.isnan(out).any()
    with pytest.raises(ValueError, match=r"'img_feat' has 1 non-finite values .* first at index \[2, 5\]"):
        model.forward_packed(pb, check_finite=True)
    model.check_finite = True
    ob = to_official_batch(pb, "none")
    with pytest.raises(ValueError, match="'img_feat' has 1 non-finite"):
        model(ob["input_ids"], ob["position_ids"], ob["img_feat"], ob["img_pos_feat"], ob["attn_masks"],
              ob["gather_index"])


def test_packed_batch_field_shapes(gen):
    cfg = tiny_config()
    model = UniterModel(cfg, cfg.img_dim)
    pb = random_pretrain_batch("none", gen, cfg, batch=3)
    pb.img_type_ids = torch.ones(pb.img_feat.shape[0] + 1, dtype=torch.long)
    with pytest.raises(ValueError, match="'img_type_ids' must have shape"):
        model.forward_packed(pb)
    with pytest.raises(ValueError, match="'img_feat' has"):
        PackedVLBatch(pb.input_ids, pb.txt_lens, pb.img_feat[1:], pb.img_pos[1:], pb.img_lens)


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning helpers
# ----------------------------------------------------------------------------------------------------------


def test_grow_type_embeddings_as_official(gen):
    cfg = tiny_config()
    model = UniterModel(cfg, cfg.img_dim)
    old = model.embeddings.token_type_embeddings.weight.detach().clone()
    model.init_type_embedding("nlvr2")
    w = model.embeddings.token_type_embeddings.weight
    assert w.shape[0] == 3 and model.config.type_vocab_size == 3
    assert torch.equal(w[:2], old) and torch.equal(w[2], old[1])
    pb = random_pretrain_batch("none", gen, cfg, batch=2)
    pb.img_type_ids = torch.full((pb.img_feat.shape[0],), 2, dtype=torch.long)
    assert torch.isfinite(model.forward_packed(pb)).all()
    vcr = UniterModel(tiny_config(), cfg.img_dim)
    old = vcr.embeddings.token_type_embeddings.weight.detach().clone()
    vcr.init_type_embedding("vcr")
    w = vcr.embeddings.token_type_embeddings.weight
    assert w.shape[0] == 4 and torch.equal(w[2], old[0]) and torch.equal(w[3], old[0])
    with pytest.raises(ValueError, match="'task' must be one of"):
        vcr.init_type_embedding("vqa")


def test_grow_word_embeddings_keeps_mlm_tie(gen):
    cfg = tiny_config()
    model = UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim)
    old = model.uniter.embeddings.word_embeddings.weight.detach().clone()
    model.grow_word_embeddings(5)
    new = model.uniter.embeddings.word_embeddings.weight
    assert new.shape == (cfg.vocab_size + 5, cfg.hidden_size) and torch.equal(new[:cfg.vocab_size], old)
    assert model.cls.predictions.decoder.weight is new and model.cls.predictions.bias.shape == (cfg.vocab_size + 5,)
    assert "cls.predictions.decoder.weight" in model.state_dict()
    pb = random_pretrain_batch("mlm", gen, model.config, batch=3)
    pb.txt_labels[pb.txt_labels != -1] = cfg.vocab_size + 4  # a new token as target
    loss = model(pb, "mlm", reduction="mean")
    loss.backward()
    assert new.grad[cfg.vocab_size + 4].abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_torch_compile_smoke(gen, seed):
    """torch.compile(model, dynamic=True): one graph set serves batches of any lengths; same losses and grads.

    Inductor on ITM (encoder + pooler + the OT custom op, forward and backward); aot_eager on MLM (masked-row
    selection with a static count).
    """
    cfg, fast, _ = model_pair(seed=seed)
    for task, backend in (("itm", "inductor"), ("mlm", "aot_eager")):
        compiled = torch.compile(fast, backend=backend, dynamic=True)
        for _ in range(2):  # the second batch has other lengths
            pb = random_pretrain_batch(task, gen, cfg, batch=4)
            fast.zero_grad()
            want = fast(pb, task, reduction="mean")
            want_loss = want if task == "mlm" else want[0] + want[1].sum()
            want_loss.backward()
            want_grads = {n: p.grad.clone() for n, p in fast.named_parameters() if p.grad is not None}
            fast.zero_grad()
            got = compiled(pb, task, reduction="mean")
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
            (got if task == "mlm" else got[0] + got[1].sum()).backward()
            for n, g in want_grads.items():
                torch.testing.assert_close(dict(fast.named_parameters())[n].grad, g, rtol=1e-4, atol=1e-5)


def test_bert_layer_public_parts_compose_its_forward(gen):
    """BertLayer's public parts (the projections, post_attention) are what its forward runs: exact equality."""
    layer = BertLayer(tiny_config())
    x = torch.randn(7, 32, generator=gen)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    sa = layer.attention.self
    q, k, v = sa.qkv(x)
    assert q.shape == k.shape == v.shape == (7, 4, 8)
    assert torch.equal(q, sa.project_q(x)) and all(torch.equal(a, b) for a, b in zip((k, v), sa.project_kv(x)))
    assert torch.equal(sa.project_q(x[:, None]), q[:, None])  # any leading dims
    assert torch.equal(layer(x, cu, 4), layer.post_attention(sa(x, cu, 4), x))
    assert torch.equal(layer.post_attention(sa(x, cu, 4), x), layer.feed_forward(layer.attention(x, cu, 4)))
