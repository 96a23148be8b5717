"""LXMERT against the ``transformers`` port: state_dict keys and shapes (strict both ways), outputs, attentions, the
pre-training loss and every parameter gradient within 1e-4 relative in fp32, the port's padding quirks; bad input."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fastvl.models.lxmert import (  # noqa: E402
    LxmertCheckpointError,
    LxmertConfig,
    LxmertForPreTraining,
    LxmertModel,
    load_lxmert_state,
)

TINY = dict(vocab_size=53, hidden_size=24, num_attention_heads=3, intermediate_size=40, l_layers=2, x_layers=2,
            r_layers=1, num_qa_labels=7, num_object_labels=11, num_attr_labels=5, visual_feat_dim=13,
            max_position_embeddings=19, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)


def port_pair(cls_name: str, **over):
    port_cfg = transformers.LxmertConfig(**{**TINY, **over})
    port = getattr(transformers, cls_name)(port_cfg)
    ours_cls = LxmertForPreTraining if cls_name == "LxmertForPreTraining" else LxmertModel
    ours = ours_cls(LxmertConfig.from_dict(port_cfg.to_dict()))
    return port, ours


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def inputs(gen: torch.Generator, b: int = 3, width: int = 7, n: int = 5, img_lens=(5, 3, 2)):
    txt = torch.tensor([width, 1, 4][:b])
    img = torch.tensor(list(img_lens)[:b])
    ids = torch.randint(1, TINY["vocab_size"], (b, width), generator=gen)
    am = (torch.arange(width)[None] < txt[:, None]).long()
    vm = (torch.arange(n)[None] < img[:, None]).float()
    ids = ids * am  # padding id 0, as a tokenizer pads
    feats = torch.randn(b, n, TINY["visual_feat_dim"], generator=gen)
    feats[0, 1] = 0.0  # a real region with zero features is still a region (padding comes from the mask)
    pos = torch.rand(b, n, 4, generator=gen)
    types = torch.randint(0, 2, (b, width), generator=gen) * am
    return dict(input_ids=ids, visual_feats=feats, visual_pos=pos, attention_mask=am, visual_attention_mask=vm,
                token_type_ids=types), am.bool(), vm.bool()


@pytest.mark.parametrize("cls_name", ["LxmertModel", "LxmertForPreTraining"])
@pytest.mark.parametrize("over", [{}, dict(visual_attr_loss=False, task_qa=False), dict(task_obj_predict=False)])
def test_state_dict_keys_and_shapes_equal_the_port(cls_name, over):
    port, ours = port_pair(cls_name, **over)
    a = {k: tuple(v.shape) for k, v in port.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert a == b
    ours.load_state_dict(port.state_dict(), strict=True)
    port.load_state_dict(ours.state_dict(), strict=True)
    if cls_name == "LxmertForPreTraining":
        assert ours.cls.predictions.decoder.weight is ours.lxmert.embeddings.word_embeddings.weight


def test_config_round_trips_the_port_json(tmp_path):
    port_cfg = transformers.LxmertConfig(**TINY)
    port_cfg.to_json_file(tmp_path / "config.json")
    cfg = LxmertConfig.from_json_file(tmp_path / "config.json")
    for k, v in TINY.items():
        assert getattr(cfg, k) == v
    cfg.to_json_file(tmp_path / "again.json")
    assert LxmertConfig.from_json_file(tmp_path / "again.json") == cfg
    with pytest.raises(ValueError, match="model_type 'uniter'"):
        LxmertConfig.from_dict({"model_type": "uniter"})


def _labels(gen, am, vm, b, width, n):
    labels = torch.randint(0, TINY["vocab_size"], (b, width), generator=gen)
    keep = am & (torch.rand(b, width, generator=gen) < 0.5)
    keep[0, 2] = True
    labels = labels.masked_fill(~keep, -100)
    conf = torch.rand(b, n, generator=gen) * vm
    obj_labels = {"obj": (torch.randint(0, TINY["num_object_labels"], (b, n), generator=gen), conf),
                  "attr": (torch.randint(0, TINY["num_attr_labels"], (b, n), generator=gen), conf * 0.5),
                  "feat": (torch.randn(b, n, TINY["visual_feat_dim"], generator=gen), vm.float())}
    return dict(labels=labels, obj_labels=obj_labels, matched_label=torch.randint(0, 2, (b,), generator=gen),
                ans=torch.randint(0, TINY["num_qa_labels"], (b,), generator=gen))


def test_pretraining_outputs_attentions_loss_and_gradients_match_the_port(gen):
    port, ours = port_pair("LxmertForPreTraining")
    ours.load_state_dict(port.state_dict(), strict=True)
    port.eval()
    ours.eval()
    x, am, vm = inputs(gen)
    b, width = x["input_ids"].shape
    n = x["visual_feats"].shape[1]
    lab = _labels(gen, am, vm, b, width, n)
    outs = []
    for model in (port, ours):
        model.zero_grad()
        o = model(**x, **lab, output_attentions=True, output_hidden_states=True)
        # the loss plus every output at real positions, so each gradient path is exercised
        extra = (o.prediction_logits * am[..., None]).sum() * 1e-3 + o.cross_relationship_score.sum() \
            + o.question_answering_score.sum() * 0.1
        (o.loss + extra).backward()
        outs.append(o)
    p, f = outs
    assert rel(f.loss, p.loss) < 1e-4
    assert rel(f.prediction_logits[am], p.prediction_logits[am]) < 1e-4
    assert rel(f.cross_relationship_score, p.cross_relationship_score) < 1e-4
    assert rel(f.question_answering_score, p.question_answering_score) < 1e-4
    for name, mq, mk in (("language_attentions", am, am), ("vision_attentions", vm, vm),
                         ("cross_encoder_attentions", am, vm)):
        pa, fa = getattr(p, name), getattr(f, name)
        assert len(pa) == len(fa) > 0
        valid = (mq[:, None, :, None] & mk[:, None, None, :]).expand_as(pa[0])
        for a, c in zip(fa, pa):
            assert a.shape == c.shape
            assert rel(a[valid], c[valid]) < 1e-4
            assert (a[~valid] == 0).all()  # 0 at padding (the port's padded rows hold whatever they compute)
    for name, m in (("language_hidden_states", am), ("vision_hidden_states", vm)):
        for a, c in zip(getattr(f, name), getattr(p, name), strict=True):
            assert rel(a[m], c[m]) < 1e-4
    grads_p = {k: v.grad for k, v in port.named_parameters()}
    # key biases get an exactly-zero gradient (a constant shift of every score): rounding noise ~1e-12 on both sides,
    # so each tensor's scale is floored at 1e-6 of the largest gradient
    floor = 1e-6 * max(float(g.abs().max()) for g in grads_p.values())
    checked = 0
    for k, v in ours.named_parameters():
        gp = grads_p[k]
        assert v.grad is not None and gp is not None, k
        assert float((v.grad - gp).abs().max()) <= 1e-4 * max(float(gp.abs().max()), floor), k
        checked += 1
    assert checked == len(list(ours.parameters()))
    emb = ours.lxmert.embeddings
    assert (emb.position_embeddings.weight.grad[0] == 0).all()  # padding_idx=0 on all three tables
    assert (emb.token_type_embeddings.weight.grad[0] == 0).all()
    assert emb.token_type_embeddings.weight.grad[1].abs().sum() > 0


def test_encoder_outputs_match_the_port_and_padding_comes_from_the_masks(gen):
    port, ours = port_pair("LxmertModel")
    ours.load_state_dict(port.state_dict(), strict=True)
    port.eval()
    ours.eval()
    x, am, vm = inputs(gen)
    p, f = port(**x), ours(**x)
    assert rel(f.language_output[am], p.language_output[am]) < 1e-4
    assert rel(f.vision_output[vm], p.vision_output[vm]) < 1e-4
    assert rel(f.pooled_output, p.pooled_output) < 1e-4
    assert (f.language_output[~am] == 0).all() and (f.vision_output[~vm] == 0).all()
    # changing what sits at padded positions changes nothing real
    y = dict(x)
    y["visual_feats"] = x["visual_feats"].masked_fill(~vm[..., None], 7.0)
    y["input_ids"] = x["input_ids"].masked_fill(~am, 5)
    g = ours(**y)
    assert torch.equal(g.language_output, f.language_output) and torch.equal(g.pooled_output, f.pooled_output)
    # padding_idx=0 on all three tables: padded ids (0), position 0 and type 0 leave row 0 without gradient
    for model in (port, ours):
        model.zero_grad()
        model(**x).language_output.sum().backward()
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        gp = getattr(port.embeddings, name).weight.grad
        gf = getattr(ours.embeddings, name).weight.grad
        assert (gf[0] == 0).all() and (gp[0] == 0).all()
        assert gf[1:].abs().sum() > 0


def test_an_example_without_regions_reads_no_padding(gen):
    """Zero regions: the port's text then attends uniformly to padded rows (garbage that depends on what fills
    them); here the cross attention of that example contributes 0 and nothing depends on the padding."""
    _, ours = port_pair("LxmertModel")
    ours.eval()
    x, am, vm = inputs(gen, img_lens=(5, 0, 3))
    f = ours(**x, output_attentions=True)
    y = dict(x)
    y["visual_feats"] = x["visual_feats"].masked_fill(~vm[..., None], 3.0)
    g = ours(**y)
    assert torch.isfinite(f.language_output).all()
    assert torch.equal(g.language_output[1], f.language_output[1])
    assert all((a[1] == 0).all() for a in f.cross_encoder_attentions)


def test_train_mode_dropout_runs_and_differs(gen):
    _, ours = port_pair("LxmertModel")
    x, _, _ = inputs(gen)
    ours.train()
    a, b = ours(**x).pooled_output, ours(**x).pooled_output
    assert not torch.equal(a, b)


def test_wrong_model_type_checkpoint_is_named():
    from fastvl.models.uniter import UniterConfig, UniterForPretraining

    uniter = UniterForPretraining(UniterConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                               num_attention_heads=2, intermediate_size=32), 12, 5)
    _, ours = port_pair("LxmertForPreTraining")
    with pytest.raises(LxmertCheckpointError, match="looks like a UNITER checkpoint"):
        load_lxmert_state(ours, uniter.state_dict(), source="uniter.pt")
    port, base = port_pair("LxmertModel", vocab_size=61)
    with pytest.raises(LxmertCheckpointError, match="does not fit this config.*word_embeddings"):
        load_lxmert_state(ours, port.state_dict(), source="other.pt")
    # encoder-only weights into the pre-training model: the heads are reported missing (strict refuses)
    with pytest.raises(LxmertCheckpointError, match="missing"):
        load_lxmert_state(ours, ours.lxmert.state_dict())
    missing, unexpected = load_lxmert_state(ours, ours.lxmert.state_dict(), strict=False)
    assert missing and all(not k.startswith("lxmert.") for k in missing) and not unexpected
    # pre-training weights into the encoder: 'lxmert.' stripped, heads ignored only when not strict
    load_lxmert_state(base.__class__(ours.config), ours.state_dict(), strict=False)


def test_bad_padded_input_is_named(gen):
    _, ours = port_pair("LxmertModel")
    x, _, _ = inputs(gen)
    bad = dict(x)
    bad["attention_mask"] = x["attention_mask"].clone()
    bad["attention_mask"][0, 1] = 0
    with pytest.raises(ValueError, match="'attention_mask' must be right-padded"):
        ours(**bad)
    bad = dict(x)
    bad["visual_feats"] = x["visual_feats"][..., :5]
    with pytest.raises(ValueError, match="'visual_feats' must be"):
        ours(**bad)
    bad = dict(x)
    bad["attention_mask"] = torch.zeros_like(x["attention_mask"])
    with pytest.raises(ValueError, match="no token"):
        ours(**bad)


def test_from_pretrained_reads_the_port_save_pretrained_folder(tmp_path, gen):
    port, _ = port_pair("LxmertForPreTraining")
    port.save_pretrained(tmp_path / "port")
    ours = LxmertForPreTraining.from_pretrained(tmp_path / "port").eval()
    port.eval()
    x, am, _ = inputs(gen)
    assert rel(ours(**x).prediction_logits[am], port(**x).prediction_logits[am]) < 1e-4
    assert ours.cls.predictions.decoder.weight is ours.lxmert.embeddings.word_embeddings.weight
    base = LxmertModel.from_pretrained(tmp_path / "port", strict=False)  # heads of the file are left out
    assert torch.equal(base.pooler.dense.weight, ours.lxmert.pooler.dense.weight)


@pytest.mark.slow
def test_packed_encoder_on_the_triton_attention_follows_the_tolerance_rule(triton_device, monkeypatch, gen):
    """Both self masks and the cross mask (an example with no region included) through the fused Triton kernels
    (the interpreter on CPU in fp32, bf16 on a GPU): outputs and parameter gradients vs the float64 reference."""
    from fastvl.batch import PackedVLBatch
    from fastvl.ops.testing import assert_close_to_ref

    dtype = torch.float32 if triton_device.type == "cpu" else torch.bfloat16
    cfg = LxmertConfig(**{**TINY, "hidden_size": 64, "num_attention_heads": 2, "l_layers": 1, "x_layers": 1,
                          "r_layers": 1})
    base = LxmertModel(cfg).eval()
    txt, img = [3, 7, 1], [4, 0, 6]
    b = PackedVLBatch(input_ids=torch.randint(1, cfg.vocab_size, (sum(txt),), generator=gen), txt_lens=txt,
                      img_feat=torch.randn(sum(img), cfg.visual_feat_dim, generator=gen),
                      img_pos=torch.rand(sum(img), 7, generator=gen), img_lens=img).to(triton_device)
    w = torch.randn(sum(txt), cfg.hidden_size, generator=gen).to(triton_device)

    def run(backend: str, dt: torch.dtype):
        monkeypatch.setenv("FASTVL_BACKEND", f"attention={backend}")
        m = LxmertModel(cfg).eval()
        m.load_state_dict(base.state_dict())
        m = m.to(device=triton_device, dtype=dt)
        bb = PackedVLBatch(input_ids=b.input_ids, txt_lens=txt, img_feat=b.img_feat.to(dt), img_pos=b.img_pos.to(dt),
                           img_lens=img)
        out = m.forward_packed(bb)
        loss = (out.language_output * w.to(dt)).sum() + out.vision_output.float().square().sum()
        loss.backward()
        return out, {k: p.grad for k, p in m.named_parameters()}

    ref64, g64 = run("reference", torch.float64)
    low, glow = run("reference", dtype)
    fast, gfast = run("triton", dtype)
    for name in ("language_output", "vision_output", "pooled_output"):
        assert_close_to_ref(getattr(fast, name), getattr(ref64, name), getattr(low, name), name)
    for k in ("encoder.x_layers.0.visual_attention.att.query.weight", "encoder.layer.0.attention.self.value.weight",
              "encoder.r_layers.0.attention.self.key.weight", "embeddings.word_embeddings.weight",
              "encoder.visn_fc.visn_fc.weight"):
        assert_close_to_ref(gfast[k], g64[k], glow[k], k)
