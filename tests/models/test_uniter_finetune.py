"""UNITER fine-tuning models: official state_dict keys, strict loading, and every head's outputs / losses against a
plain padded reference (the padded UniterReferenceModel + heads written out below), on both APIs; bad input."""

from __future__ import annotations

import io

import pytest
import torch
from torch.nn import functional as F

from fastvl.batch import PackedVLBatch
from fastvl.models.uniter import (
    UniterForImageTextRetrieval,
    UniterForImageTextRetrievalHardNeg,
    UniterForNlvr2Paired,
    UniterForNlvr2PairedAttn,
    UniterForNlvr2Triplet,
    UniterForReferringExpressionComprehension,
    UniterForVisualCommonsenseReasoning,
    UniterForVisualEntailment,
    UniterForVisualQuestionAnswering,
)
from fastvl.models.uniter.reference import UniterReferenceModel
from fastvl.models.uniter.testing import random_pretrain_batch, tiny_config, to_official_batch

N_ANS = 11
TOL = dict(rtol=1e-4, atol=1e-5)

# ----------------------------------------------------------------------------------------------------------
# Official keys (REFERENCE.md "UNITER model" / "fine-tuning heads" and the official module structure)
# ----------------------------------------------------------------------------------------------------------


def encoder_keys(layers: int) -> list[str]:
    keys = [f"uniter.embeddings.{n}.weight" for n in ("word_embeddings", "position_embeddings",
                                                       "token_type_embeddings")]
    keys += ["uniter.embeddings.LayerNorm.weight", "uniter.embeddings.LayerNorm.bias"]
    for m in ("img_linear", "img_layer_norm", "pos_linear", "pos_layer_norm", "LayerNorm"):
        keys += [f"uniter.img_embeddings.{m}.weight", f"uniter.img_embeddings.{m}.bias"]
    keys.append("uniter.img_embeddings.mask_embedding.weight")
    for i in range(layers):
        p = f"uniter.encoder.layer.{i}."
        for m in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                  "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"):
            keys += [p + m + ".weight", p + m + ".bias"]
    return keys + ["uniter.pooler.dense.weight", "uniter.pooler.dense.bias"]


def wb(*names: str) -> list[str]:
    return [f"{n}.{s}" for n in names for s in ("weight", "bias")]


H = 32  # tiny_config hidden size
HEADS = {  # class, constructor args after (config, img_dim), head key -> shape
    "vqa": (UniterForVisualQuestionAnswering, (N_ANS,), {
        "vqa_output.0.weight": (2 * H, H), "vqa_output.0.bias": (2 * H,), "vqa_output.2.weight": (2 * H,),
        "vqa_output.2.bias": (2 * H,), "vqa_output.3.weight": (N_ANS, 2 * H), "vqa_output.3.bias": (N_ANS,)}),
    "ve": (UniterForVisualEntailment, (), {
        "vqa_output.0.weight": (2 * H, H), "vqa_output.0.bias": (2 * H,), "vqa_output.2.weight": (2 * H,),
        "vqa_output.2.bias": (2 * H,), "vqa_output.3.weight": (3, 2 * H), "vqa_output.3.bias": (3,)}),
    "nlvr2-paired": (UniterForNlvr2Paired, (), {"nlvr2_output.weight": (2, 2 * H), "nlvr2_output.bias": (2,)}),
    "nlvr2-triplet": (UniterForNlvr2Triplet, (), {"nlvr2_output.weight": (2, H), "nlvr2_output.bias": (2,)}),
    "nlvr2-attn": (UniterForNlvr2PairedAttn, (), {
        "attn1.in_proj_weight": (3 * H, H), "attn1.in_proj_bias": (3 * H,), "attn1.out_proj.weight": (H, H),
        "attn1.out_proj.bias": (H,), "attn2.in_proj_weight": (3 * H, H), "attn2.in_proj_bias": (3 * H,),
        "attn2.out_proj.weight": (H, H), "attn2.out_proj.bias": (H,), "fc.0.weight": (H, 2 * H), "fc.0.bias": (H,),
        "attn_pool.fc.0.weight": (1, H), "attn_pool.fc.0.bias": (1,), "nlvr2_output.weight": (2, 2 * H),
        "nlvr2_output.bias": (2,)}),
    "itr": (UniterForImageTextRetrieval, (), {"itm_output.weight": (2, H), "itm_output.bias": (2,),
                                             "rank_output.weight": (1, H), "rank_output.bias": (1,)}),
    "itr-hard": (UniterForImageTextRetrievalHardNeg, (0.2, 4), {
        "itm_output.weight": (2, H), "itm_output.bias": (2,), "rank_output.weight": (1, H), "rank_output.bias": (1,)}),
    "re": (UniterForReferringExpressionComprehension, (), {"re_output.weight": (1, H), "re_output.bias": (1,)}),
    "re-mlp2": (UniterForReferringExpressionComprehension, ("cls", 0.2, 0.3, 2), {
        "re_output.0.weight": (H, H), "re_output.0.bias": (H,), "re_output.2.weight": (H,), "re_output.2.bias": (H,),
        "re_output.3.weight": (1, H), "re_output.3.bias": (1,)}),
    "vcr": (UniterForVisualCommonsenseReasoning, (), {
        "vcr_output.0.weight": (2 * H, H), "vcr_output.0.bias": (2 * H,), "vcr_output.2.weight": (2 * H,),
        "vcr_output.2.bias": (2 * H,), "vcr_output.3.weight": (2, 2 * H), "vcr_output.3.bias": (2,)}),
}


def build(name: str, seed: int = 0, **overrides):
    cls, args, _ = HEADS[name]
    cfg = tiny_config(initializer_range=0.3, **overrides)
    torch.manual_seed(seed)
    model = cls(cfg, cfg.img_dim, *args)
    if name.startswith("nlvr2"):
        model.init_type_embedding()
    if name == "vcr":
        model.init_type_embedding()
        model.init_word_embedding(5)
    with torch.no_grad():  # non-trivial biases / LayerNorm parameters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize("name", sorted(HEADS))
def test_state_dict_keys_are_official(name):
    cls, args, head = HEADS[name]
    cfg = tiny_config()
    model = cls(cfg, cfg.img_dim, *args)
    sd = model.state_dict()
    assert sorted(sd) == sorted(encoder_keys(cfg.num_hidden_layers) + list(head))
    for k, shape in head.items():
        assert tuple(sd[k].shape) == shape, k


@pytest.mark.parametrize("name", sorted(HEADS))
def test_strict_load_of_saved_official_structure(name, gen):
    """A checkpoint with the official keys (random values, saved and loaded through torch.save) loads strictly and
    the values land in the right parameters; from_pretrained accepts the same checkpoint."""
    cls, args, head = HEADS[name]
    cfg = tiny_config()
    shapes = {k: tuple(v.shape) for k, v in cls(cfg, cfg.img_dim, *args).state_dict().items()}
    shapes.update(head)
    sd = {k: torch.randn(shapes[k], generator=gen) for k in encoder_keys(cfg.num_hidden_layers) + list(head)}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf)
    model = cls(cfg, cfg.img_dim, *args)
    model.load_state_dict(loaded, strict=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)
    m2 = cls.from_pretrained(cfg, {k: v.half() for k, v in sd.items()}, cfg.img_dim, *args)
    assert m2.loading_info == {"missing_keys": [], "unexpected_keys": []}


def test_grown_tables_and_rank_init():
    cfg = tiny_config()
    torch.manual_seed(0)
    m = UniterForNlvr2Paired(cfg, cfg.img_dim)
    old = m.uniter.embeddings.token_type_embeddings.weight.detach().clone()
    m.init_type_embedding()
    new = m.uniter.embeddings.token_type_embeddings.weight
    assert new.shape == (3, H) and torch.equal(new[:2], old) and torch.equal(new[2], old[1])
    v = UniterForVisualCommonsenseReasoning(cfg, cfg.img_dim)
    old = v.uniter.embeddings.token_type_embeddings.weight.detach().clone()
    words = v.uniter.embeddings.word_embeddings.weight.detach().clone()
    v.init_type_embedding()
    v.init_word_embedding(81)
    new = v.uniter.embeddings.token_type_embeddings.weight
    assert new.shape == (4, H) and torch.equal(new[:2], old) and torch.equal(new[2], old[0]) and \
        torch.equal(new[3], old[0])
    w = v.uniter.embeddings.word_embeddings.weight
    assert w.shape == (cfg.vocab_size + 81, H) and torch.equal(w[:cfg.vocab_size], words)
    assert cfg.type_vocab_size == 2 and v.config.type_vocab_size == 4  # caller's config untouched
    r = UniterForImageTextRetrieval(cfg, cfg.img_dim)
    r.init_output()
    assert torch.equal(r.rank_output.weight, r.itm_output.weight[1:]) and torch.equal(r.rank_output.bias,
                                                                                      r.itm_output.bias[1:])


# ----------------------------------------------------------------------------------------------------------
# Plain padded reference
# ----------------------------------------------------------------------------------------------------------


def reference_encoder(model) -> UniterReferenceModel:
    cfg = model.uniter.config
    ref = UniterReferenceModel(cfg, model.uniter.img_dim)
    ref.load_state_dict({k[len("uniter."):]: v for k, v in model.state_dict().items() if k.startswith("uniter.")},
                        strict=True)
    return ref.eval()


def ref_seq(model, ob: dict) -> torch.Tensor:
    """Last-layer padded states [B, L, H] (0 where attn_masks is 0, like the fast model's padded output)."""
    ref = reference_encoder(model)
    seq = ref(ob["input_ids"], ob["position_ids"], ob["img_feat"], ob["img_pos_feat"], ob["attn_masks"],
              ob["gather_index"], output_all_encoded_layers=False, txt_type_ids=ob.get("txt_type_ids"),
              img_type_ids=ob.get("img_type_ids"))
    return seq * ob["attn_masks"].unsqueeze(-1)


def ref_pooled(model, ob: dict) -> torch.Tensor:
    return torch.tanh(F.linear(ref_seq(model, ob)[:, 0], model.uniter.pooler.dense.weight,
                               model.uniter.pooler.dense.bias))


def two_layer(seq, x, act):
    return F.linear(F.layer_norm(act(F.linear(x, seq[0].weight, seq[0].bias)), seq[2].normalized_shape, seq[2].weight,
                                 seq[2].bias, seq[2].eps), seq[3].weight, seq[3].bias)


def batches(gen, cfg, b, **kw):
    pb = random_pretrain_batch("none", gen, cfg, batch=b, **kw)
    return pb, to_official_batch(pb, "none")


def both(model, pb, ob, compute_loss=True, **kw):
    return model(ob, compute_loss=compute_loss, **kw), model(pb, compute_loss=compute_loss, **kw)


# ----------------------------------------------------------------------------------------------------------
# Heads vs reference
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vqa", "ve"])
def test_vqa_ve_match_reference(name, gen, seed):
    model = build(name, seed)
    a = model.num_answer
    pb, ob = batches(gen, model.config, 5)
    targets = torch.rand(5, a, generator=gen) * (torch.rand(5, a, generator=gen) < 0.3)
    ob["targets"] = pb.targets = targets
    logits = two_layer(model.vqa_output, ref_pooled(model, ob), F.gelu)
    want = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    for got in both(model, pb, ob):
        torch.testing.assert_close(got, want, **TOL)
    for got in both(model, pb, ob, compute_loss=False):
        torch.testing.assert_close(got, logits, **TOL)
    torch.testing.assert_close(model(pb, reduction="mean"), want.mean() * a, **TOL)  # official training loss


def _nlvr2_paired_batch(gen, cfg, n):
    """2n sequences: the same text twice with a left (type 1) and a right (type 2) image."""
    tl = torch.randint(1, 9, (n,), generator=gen).repeat_interleave(2).tolist()
    pb = random_pretrain_batch("none", gen, cfg, batch=2 * n, txt_lens=tl,
                               img_lens=torch.randint(1, 8, (2 * n,), generator=gen).tolist())
    ct = [0] + torch.tensor(tl).cumsum(0).tolist()
    ids = pb.input_ids.clone()
    for i in range(0, 2 * n, 2):  # right sequence repeats the left's text
        ids[ct[i + 1]:ct[i + 2]] = ids[ct[i]:ct[i + 1]]
    types = torch.cat([torch.full((k,), 1 + (i % 2)) for i, k in enumerate(pb.img_lens)])
    pb = PackedVLBatch(input_ids=ids, txt_lens=tl, img_feat=pb.img_feat, img_pos=pb.img_pos, img_lens=pb.img_lens,
                       img_type_ids=types)
    ob = to_official_batch(pb, "none")
    it = torch.zeros(2 * n, max(pb.img_lens), dtype=torch.long)
    for i, k in enumerate(pb.img_lens):
        it[i, :k] = 1 + (i % 2)
    ob["img_type_ids"] = it
    return pb, ob


def ref_paired_attn(model, ob):
    """The official PairedAttn computation on padded tensors with torch's nn.MultiheadAttention."""
    seq = ref_seq(model, ob)
    bs, L, d = seq.shape
    left, right = seq.reshape(bs // 2, 2 * L, d).chunk(2, dim=1)
    lm, rm = (ob["attn_masks"] == 0).reshape(bs // 2, 2 * L).chunk(2, dim=1)
    l2r = model.attn1(left.transpose(0, 1), right.transpose(0, 1), right.transpose(0, 1), key_padding_mask=rm)[0]
    r2l = model.attn2(right.transpose(0, 1), left.transpose(0, 1), left.transpose(0, 1), key_padding_mask=lm)[0]
    left = model.fc(torch.cat([l2r.transpose(0, 1), left], -1))
    right = model.fc(torch.cat([r2l.transpose(0, 1), right], -1))

    def pool(x, m):
        s = F.relu(model.attn_pool.fc[0](x)).squeeze(-1) + m.float() * -1e4
        return torch.softmax(s, 1).unsqueeze(1).matmul(x).squeeze(1)

    return model.nlvr2_output(torch.cat([pool(left, lm), pool(right, rm)], -1))


@pytest.mark.parametrize("name", ["nlvr2-paired", "nlvr2-attn"])
def test_nlvr2_paired_match_reference(name, gen, seed):
    model = build(name, seed)
    pb, ob = _nlvr2_paired_batch(gen, model.config, 3)
    targets = torch.tensor([0, 1, 1])
    ob["targets"] = pb.targets = targets
    if name == "nlvr2-paired":
        scores = model.nlvr2_output(ref_pooled(model, ob).reshape(3, -1))
    else:
        scores = ref_paired_attn(model, ob)
    want = F.cross_entropy(scores, targets, reduction="none")
    for got in both(model, pb, ob, compute_loss=False):
        torch.testing.assert_close(got, scores, **TOL)
    for got in both(model, pb, ob):
        torch.testing.assert_close(got, want, **TOL)
    head = [p for n, p in model.named_parameters() if not n.startswith("uniter.")]
    g_ref = torch.autograd.grad(want.sum(), head)
    g_fast = torch.autograd.grad(model(pb).sum(), head)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, **TOL)


def test_nlvr2_triplet_matches_reference(gen, seed):
    model = build("nlvr2-triplet", seed)
    pb, ob = batches(gen, model.config, 4, img_lens=torch.randint(2, 9, (4,), generator=gen).tolist())
    types = torch.cat([torch.arange(k) % 2 + 1 for k in pb.img_lens])  # regions alternate between two images
    pb.img_type_ids = types
    it = torch.zeros(4, max(pb.img_lens), dtype=torch.long)
    for i, k in enumerate(pb.img_lens):
        it[i, :k] = torch.arange(k) % 2 + 1
    ob["img_type_ids"] = it
    targets = torch.tensor([1, 0, 0, 1])
    ob["targets"] = pb.targets = targets
    scores = model.nlvr2_output(ref_pooled(model, ob))
    for got in both(model, pb, ob):
        torch.testing.assert_close(got, F.cross_entropy(scores, targets, reduction="none"), **TOL)


def test_itr_matches_reference(gen, seed):
    model = build("itr", seed)
    pb, ob = batches(gen, model.config, 6)
    ob["sample_size"] = pb.sample_size = 3
    s = model.rank_output(ref_pooled(model, ob))
    sig = torch.sigmoid(s).reshape(2, 3)
    want = torch.clamp(0.2 + sig[:, 1:] - sig[:, :1], min=0)
    for got in both(model, pb, ob):
        torch.testing.assert_close(got, want, **TOL)
    for got in both(model, pb, ob, compute_loss=False):
        torch.testing.assert_close(got, s, **TOL)


def test_itr_hard_negatives_rerun_the_top_scored(gen, seed):
    """Train mode + loss: the positive and the 4 highest-scored of 9 negatives (shared text), re-run."""
    model = build("itr-hard", seed)
    pb, ob = batches(gen, model.config, 10, txt_lens=[5] * 10)
    pb.input_ids = pb.input_ids[:5].repeat(10)
    ob = to_official_batch(pb, "none")
    ob["input_ids"] = ob["input_ids"][:1]  # official: the shared text once
    s = model.rank_output(ref_pooled(model, to_official_batch(pb, "none"))).squeeze(-1)
    top = s[1:].topk(4).indices + 1
    sig = torch.sigmoid(s)
    want = torch.clamp(0.2 + sig[top].sort().values - sig[0], min=0)
    model.train()
    for got in (model(ob), model(pb)):
        assert got.shape == (1, 4) and model.training
        torch.testing.assert_close(got.reshape(-1).sort().values, want, **TOL)
    model.eval()
    torch.testing.assert_close(model(ob, compute_loss=False).squeeze(-1), s, **TOL)


@pytest.mark.parametrize("sample_from", ["t", "i", "packed"])
def test_itr_hard_negatives_send_no_gradient_to_inputs(sample_from, gen, seed):
    """The official builds the hard batch inside torch.no_grad: inputs that require grad get none (parameters do)."""
    model = build("itr-hard", seed).train()
    model.margin = 10.0  # every hinge active: the parameters get a gradient whatever the scores
    pb, _ = batches(gen, model.config, 10, txt_lens=[5] * 10, img_lens=[6] * 10)
    pb.input_ids = pb.input_ids[:5].repeat(10)
    if sample_from == "i":
        pb.img_feat, pb.img_pos = pb.img_feat[:6].repeat(10, 1), pb.img_pos[:6].repeat(10, 1)
    ob = to_official_batch(pb, "none")
    if sample_from == "packed":
        feat, pos = pb.img_feat.clone().requires_grad_(), pb.img_pos.clone().requires_grad_()
        pb.img_feat, pb.img_pos = feat, pos
        loss = model(pb)
    else:
        shared = 1 if sample_from == "i" else None  # the official gives the shared side once
        feat = ob["img_feat"][:shared].clone().requires_grad_()
        pos = ob["img_pos_feat"][:shared].clone().requires_grad_()
        ob.update(img_feat=feat, img_pos_feat=pos)
        if sample_from == "t":
            ob["input_ids"] = ob["input_ids"][:1]
        loss = model(ob, sample_from=sample_from[0])
    assert loss.shape == (1, 4)
    (loss.sum() + 1.0).backward()
    assert feat.grad is None and pos.grad is None, "gradient reached the input features"
    assert model.rank_output.weight.grad is not None and model.rank_output.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mlp", [1, 2])
def test_re_matches_reference(mlp, gen, seed):
    model = build("re" if mlp == 1 else "re-mlp2", seed)
    pb, ob = batches(gen, model.config, 5, img_lens=torch.randint(2, 9, (5,), generator=gen).tolist())
    nbb, tl = pb.img_lens, pb.txt_lens
    obj = torch.arange(max(nbb))[None] >= torch.tensor(nbb)[:, None]
    targets = torch.tensor([int(torch.randint(n, (1,), generator=gen)) for n in nbb])
    ob.update(obj_masks=obj, txt_lens=tl, num_bbs=nbb, targets=targets[:, None])
    pb.targets = targets
    seq = ref_seq(model, ob)
    img_h = torch.zeros(5, max(nbb), H)
    for i in range(5):
        img_h[i, :nbb[i]] = seq[i, tl[i]:tl[i] + nbb[i]]
    head = model.re_output if mlp == 1 else (lambda x: two_layer(model.re_output, x, F.gelu))
    scores = head(img_h).squeeze(-1).masked_fill(obj, -1e4)
    for got in both(model, pb, ob, compute_loss=False):
        torch.testing.assert_close(got, scores, **TOL)
    for got in both(model, pb, ob):
        torch.testing.assert_close(got, F.cross_entropy(scores, targets, reduction="none"), **TOL)
    model.loss, model.hard_ratio = "rank", 1.0  # hard negative: the best-scored other region
    neg = scores.scatter(1, targets[:, None], float("-inf")).argmax(1)
    sig = torch.sigmoid(scores)
    want = torch.clamp(0.2 + sig.gather(1, neg[:, None]) - sig.gather(1, targets[:, None]), min=0).squeeze(1)
    for got in both(model, pb, ob):
        torch.testing.assert_close(got, want, **TOL)
    model.hard_ratio = 0.0  # easy negatives: always a real region other than the target
    for _ in range(5):
        neg = model.sample_neg_ix(scores, targets, nbb)
        assert bool((neg != targets).all()) and bool((neg < torch.tensor(nbb)).all())


def test_vcr_matches_reference(gen, seed):
    model = build("vcr", seed)
    pb, ob = batches(gen, model.config, 8)
    types = torch.randint(0, 4, (pb.input_ids.shape[0],), generator=gen)
    pb.txt_type_ids = types
    ob = to_official_batch(pb, "none")
    tt = torch.zeros_like(ob["input_ids"])
    ct = [0] + torch.tensor(pb.txt_lens).cumsum(0).tolist()
    for i in range(8):
        tt[i, :pb.txt_lens[i]] = types[ct[i]:ct[i + 1]]
    ob["txt_type_ids"] = tt
    targets = torch.tensor([0, 1, 0, 0, 0, 0, 1, 0])
    ob["targets"], pb.targets = targets[:, None], targets
    scores = two_layer(model.vcr_output, ref_pooled(model, ob), F.relu)
    torch.testing.assert_close(model(ob), F.cross_entropy(scores, targets), **TOL)  # official: mean
    torch.testing.assert_close(model(pb), F.cross_entropy(scores, targets, reduction="none"), **TOL)
    for got in both(model, pb, ob, compute_loss=False):
        torch.testing.assert_close(got, scores[:, 1:], **TOL)


@pytest.mark.parametrize("name", ["vqa", "vcr", "re", "nlvr2-attn", "itr"])
def test_head_on_the_encoder_output_is_the_forward(name, gen, seed):
    """The public keyword-only ``head`` on ``uniter.forward_packed``'s output returns exactly what ``forward_packed``
    returns (predictions and both loss reductions); it rejects positional flags, a bad reduction, missing targets."""
    model = build(name, seed)
    if name == "nlvr2-attn":
        pb, _ = _nlvr2_paired_batch(gen, model.config, 2)
        targets = torch.tensor([0, 1])
    else:
        pb = random_pretrain_batch("none", gen, model.config, batch=4, img_lens=[3, 2, 5, 4])
        targets = {"vqa": torch.rand(4, N_ANS, generator=gen), "vcr": torch.tensor([0, 1, 1, 0]),
                   "re": torch.tensor([2, 0, 4, 1]), "itr": 2}[name]
        if name == "re":
            pb.obj_masks = torch.zeros(4, 5, dtype=torch.bool)
            pb.obj_masks[2, 3] = True
    setattr(pb, "targets" if name != "itr" else "sample_size", targets)
    layout = model.uniter.layout(pb)
    h = model.uniter.forward_packed(pb, layout=layout)
    torch.testing.assert_close(model.head(h, layout, batch=pb), model(pb, compute_loss=False), rtol=0, atol=0)
    for red in ("none", "mean"):
        got = model.head(h, layout, targets=targets, compute_loss=True, reduction=red, batch=pb)
        torch.testing.assert_close(got, model(pb, compute_loss=True, reduction=red), rtol=0, atol=0)
    with pytest.raises(TypeError):
        model.head(h, layout, targets, True)  # keyword-only
    with pytest.raises(ValueError, match="'reduction' must be one of"):
        model.head(h, layout, targets=targets, compute_loss=True, reduction="sum")
    with pytest.raises(ValueError, match="'targets' is required with compute_loss=True"):
        model.head(h, layout, compute_loss=True)


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def test_bad_input_errors(gen):
    cfg = tiny_config()
    vqa = UniterForVisualQuestionAnswering(cfg, cfg.img_dim, N_ANS)
    pb, ob = batches(gen, cfg, 3)
    with pytest.raises(KeyError, match="missing key 'targets'"):
        vqa(ob)
    with pytest.raises(ValueError, match=r"PackedVLBatch.targets is required"):
        vqa(pb)
    pb.targets = torch.rand(3, N_ANS + 1)
    with pytest.raises(ValueError, match=rf"shape \[3, {N_ANS}\]"):
        vqa(pb)
    pb.targets = torch.rand(3, N_ANS) + 1.0
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        vqa(pb)
    with pytest.raises(TypeError, match="dict or PackedVLBatch"):
        vqa([1, 2])
    with pytest.raises(ValueError, match="'num_answer' must be a positive int"):
        UniterForVisualQuestionAnswering(cfg, cfg.img_dim, 0)
    with pytest.raises(ValueError, match="'mlp' must be 1 or 2"):
        UniterForReferringExpressionComprehension(cfg, cfg.img_dim, mlp=3)
    with pytest.raises(ValueError, match="'loss' must be 'cls' or 'rank'"):
        UniterForReferringExpressionComprehension(cfg, cfg.img_dim, loss="ce")


def test_nlvr2_missing_image_and_odd_batch(gen):
    model = build("nlvr2-attn")
    pb, ob = _nlvr2_paired_batch(gen, model.config, 2)
    ob["targets"] = torch.tensor([0, 1])
    for k in ("img_feat", "img_pos_feat", "img_type_ids"):
        ob[k] = ob[k][:3]
    for k in ("input_ids", "attn_masks", "gather_index"):
        ob[k] = ob[k][:3]
    with pytest.raises(ValueError, match="odd number of sequences"):
        model(ob)
    tl = [3, 3]
    empty = PackedVLBatch(input_ids=torch.randint(4, 50, (6,)), txt_lens=tl, img_feat=torch.randn(4, 24),
                          img_pos=torch.rand(4, 7), img_lens=[4, 0], targets=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"example\(s\) \[0\] have an image with 0 regions"):
        model(empty)


def test_re_and_itr_bad_input(gen):
    model = build("re")
    pb, ob = batches(gen, model.config, 3, img_range=(2, 5))
    ob.update(targets=torch.zeros(3, dtype=torch.long), num_bbs=[n + 1 for n in pb.img_lens])
    with pytest.raises(ValueError, match=r"batch\['num_bbs'\]"):
        model(ob)
    ob["num_bbs"] = pb.img_lens
    ob["obj_masks"] = torch.zeros(3, 1, dtype=torch.bool)
    with pytest.raises(ValueError, match="'obj_masks' must have shape"):
        model(ob)
    itr = build("itr")
    pb, ob = batches(gen, itr.config, 5)
    with pytest.raises(KeyError, match="'sample_size'"):
        itr(ob)
    ob["sample_size"] = 2
    with pytest.raises(ValueError, match="must be >= 2 and divide the batch size"):
        itr(ob)
    hard = build("itr-hard").train()
    pb, ob = batches(gen, hard.config, 3)
    with pytest.raises(ValueError, match="hard_size=4 needs >= 5"):
        hard(pb)
    with pytest.raises(ValueError, match="'sample_from'"):
        hard(pb, sample_from="x")
