"""UniterForCaptioning: the [img | txt] seq2seq encoder and MLM-style loss against a plain per-example reference
(explicit attention mask), pre-training key compatibility, and decoding: cached steps = recomputation = the plain
reference, beam size 1 = greedy, returned scores = teacher-forced log-probabilities, bad input."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.nn import functional as F

from fastvl.batch import PackedVLBatch
from fastvl.models.uniter import UniterForPretraining
from fastvl.models.uniter.caption import CaptionTokens, UniterForCaptioning, image_first_layout
from fastvl.models.uniter.testing import tiny_config
from fastvl.train.checkpoint import model_tensors

TOK = CaptionTokens(cls=1, sep=2, mask=3)
TOL = dict(rtol=1e-5, atol=1e-5)


def make_model(gen: torch.Generator, scale: float = 0.3) -> UniterForCaptioning:
    """Tiny captioner with weights perturbed well away from init (distinct logits, no near-ties in argmax)."""
    model = UniterForCaptioning(tiny_config()).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model


def image_batch(gen: torch.Generator, img_lens: list[int], img_dim: int = 24) -> PackedVLBatch:
    n = sum(img_lens)
    return PackedVLBatch(input_ids=torch.zeros(0, dtype=torch.long), txt_lens=[0] * len(img_lens),
                         img_feat=torch.randn(n, img_dim, generator=gen), img_pos=torch.rand(n, 7, generator=gen),
                         img_lens=list(img_lens))


def caption_batch(gen: torch.Generator, img_lens: list[int], txt_lens: list[int], vocab: int = 61) -> PackedVLBatch:
    """Texts [CLS] w.. [SEP] with some tokens replaced by [MASK] and labelled (at least one per caption)."""
    ids, labels = [], []
    for t in txt_lens:
        words = torch.randint(4, vocab, (t,), generator=gen)
        words[0], words[-1] = TOK.cls, TOK.sep
        lab = torch.full((t,), -1)
        chosen = torch.rand(t, generator=gen) < 0.4
        chosen[0] = False
        chosen[int(torch.randint(1, t, (1,), generator=gen))] = True
        lab[chosen] = words[chosen]
        words[chosen] = TOK.mask
        ids.append(words)
        labels.append(lab)
    b = image_batch(gen, img_lens)
    labels = torch.cat(labels)
    return PackedVLBatch(input_ids=torch.cat(ids), txt_lens=list(txt_lens), img_feat=b.img_feat, img_pos=b.img_pos,
                         img_lens=b.img_lens, txt_labels=labels, n_txt_masked=int((labels != -1).sum()))


# ----------------------------------------------------------------------------------------------------------
# plain reference: one example at a time, the seq2seq mask written out
# ----------------------------------------------------------------------------------------------------------
def plain_encode(model: UniterForCaptioning, img_feat: torch.Tensor, img_pos: torch.Tensor, ids: torch.Tensor
                 ) -> torch.Tensor:
    """[n_img + L, H]: regions then caption; key j visible to query i iff j < n_img (region) or j <= i."""
    u = model.uniter
    img = u.img_embeddings(img_feat, img_pos, u.embeddings.token_type_embeddings.weight[1])
    txt = u.embeddings(ids, torch.arange(ids.shape[0]))
    x = torch.cat([img, txt])
    length, n_img = x.shape[0], img.shape[0]
    i = torch.arange(length)[:, None]
    j = torch.arange(length)[None, :]
    visible = (j < n_img) | (j <= i)
    for layer in u.encoder.layer:
        att = layer.attention.self
        h, d = att.num_attention_heads, att.attention_head_size
        q, k, v = (lin(x).view(length, h, d).transpose(0, 1) for lin in (att.query, att.key, att.value))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
        ctx = (probs @ v).transpose(0, 1).reshape(length, h * d)
        out = layer.attention.output
        a = out.LayerNorm(out.dense(ctx) + x)
        f = F.gelu(layer.intermediate.dense(a))
        x = layer.output.LayerNorm(layer.output.dense(f) + a)
    return x


def plain_next_logits(model: UniterForCaptioning, img_feat: torch.Tensor, img_pos: torch.Tensor,
                      prefix: list[int]) -> torch.Tensor:
    """Logits [V] of the token after ``prefix`` ([CLS] w..): the MLM head on a [MASK] appended to it."""
    h = plain_encode(model, img_feat, img_pos, torch.tensor(prefix + [TOK.mask]))
    return model.cls(h[-1:])[0]


# ----------------------------------------------------------------------------------------------------------
# layout, encoder, loss
# ----------------------------------------------------------------------------------------------------------
def test_image_first_layout():
    lay = image_first_layout([2, 3, 0], [1, 0, 2], "cpu")
    assert lay.cu_seqlens.tolist() == [0, 3, 6, 8]
    assert lay.img_rows.tolist() == [0, 6, 7]
    assert lay.txt_rows.tolist() == [1, 2, 3, 4, 5]
    # joint row r takes row joint_src[r] of cat([txt (5 rows), img (3 rows)])
    assert lay.joint_src.tolist() == [5, 0, 1, 2, 3, 4, 6, 7]
    with pytest.raises(ValueError, match="img_lens"):
        image_first_layout([1, 2], [1], "cpu")


def test_encoder_and_loss_match_plain_reference(gen):
    model = make_model(gen, 0.1)
    img_lens, txt_lens = [3, 1, 5, 2], [4, 2, 7, 9]
    batch = caption_batch(gen, img_lens, txt_lens)
    lay = model.layout(batch)
    h = model.encode(batch, lay)
    ids, feats, boxes = batch.input_ids.split(txt_lens), batch.img_feat.split(img_lens), batch.img_pos.split(img_lens)
    cu = lay.cu_seqlens.tolist()
    ref_rows = []
    for b in range(len(img_lens)):
        ref = plain_encode(model, feats[b], boxes[b], ids[b])
        torch.testing.assert_close(h[cu[b]:cu[b + 1]], ref, **TOL)
        ref_rows.append(ref[img_lens[b]:])
    ref_txt = torch.cat(ref_rows)
    sel = batch.txt_labels != -1
    ref_loss = F.cross_entropy(model.cls(ref_txt[sel]), batch.txt_labels[sel])
    loss = model(batch)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(model(batch, reduction="none"),
                               F.cross_entropy(model.cls(ref_txt[sel]), batch.txt_labels[sel], reduction="none"), **TOL)
    torch.testing.assert_close(model(batch, compute_loss=False), model.cls(ref_txt[sel]), **TOL)
    # gradients of the fused loss = gradients of the plain one
    g_fast = torch.autograd.grad(loss, [model.uniter.embeddings.word_embeddings.weight,
                                        model.uniter.encoder.layer[0].attention.self.key.weight])
    g_ref = torch.autograd.grad(ref_loss, [model.uniter.embeddings.word_embeddings.weight,
                                           model.uniter.encoder.layer[0].attention.self.key.weight])
    for a, r in zip(g_fast, g_ref):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_caption_is_causal_and_regions_ignore_it(gen):
    model = make_model(gen)
    batch = caption_batch(gen, [3, 2], [6, 5])
    lay = model.layout(batch)
    h0 = model.encode(batch, lay)
    ids = batch.input_ids.clone()
    ids[4] = (ids[4] + 1) % 61  # token 4 of caption 0 (joint row 3 + 4 = 7)
    from dataclasses import replace

    h1 = model.encode(replace(batch, input_ids=ids), lay)
    torch.testing.assert_close(h1[:7], h0[:7], rtol=0, atol=0)  # regions and tokens 0..3 of example 0: unchanged
    assert not torch.allclose(h1[7:9], h0[7:9])  # token 4 and later change
    torch.testing.assert_close(h1[9:], h0[9:], rtol=0, atol=0)  # example 1 untouched


# ----------------------------------------------------------------------------------------------------------
# checkpoint compatibility with pre-training
# ----------------------------------------------------------------------------------------------------------
def test_state_dict_keys_are_the_pretraining_keys():
    cfg = tiny_config()
    cap, pre = UniterForCaptioning(cfg), UniterForPretraining(cfg)
    ck, pk = set(cap.state_dict()), set(pre.state_dict())
    assert ck == {k for k in pk if k.startswith(("uniter.", "cls."))}
    assert {k for k in ck if k.startswith("cls.")} == {
        "cls.predictions.bias", "cls.predictions.transform.dense.weight", "cls.predictions.transform.dense.bias",
        "cls.predictions.transform.LayerNorm.weight", "cls.predictions.transform.LayerNorm.bias",
        "cls.predictions.decoder.weight"}
    assert cap.cls.predictions.decoder.weight is cap.uniter.embeddings.word_embeddings.weight
    # an official-style pre-training state_dict initialises everything; the other heads are unused
    res = cap.load_state_dict(pre.state_dict(), strict=False)
    assert res.missing_keys == []
    assert {k.split(".")[0] for k in res.unexpected_keys} == {"feat_regress", "region_classifier", "itm_output"}
    for k, v in cap.state_dict().items():
        torch.testing.assert_close(v, pre.state_dict()[k], rtol=0, atol=0)
    # a fastvl checkpoint stores tied tensors once: only the tied decoder is absent, and the tie restores it
    saved = model_tensors(pre)
    fresh = UniterForCaptioning(cfg)
    res = fresh.load_state_dict(saved, strict=False)
    assert set(res.missing_keys) <= {"cls.predictions.decoder.weight"}
    torch.testing.assert_close(fresh.cls.predictions.decoder.weight, pre.cls.predictions.decoder.weight)
    # strict round trip of its own state_dict
    buf = io.BytesIO()
    torch.save(cap.state_dict(), buf)
    again = UniterForCaptioning(cfg)
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True), strict=True)
    assert again.cls.predictions.decoder.weight is again.uniter.embeddings.word_embeddings.weight


# ----------------------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_cached_steps_equal_recompute_and_plain(gen):
    model = make_model(gen)
    img_lens = [3, 1, 6, 2]
    batch = image_batch(gen, img_lens)
    steps = 6
    cached = model.start_decoding(batch, steps)
    plain = model.start_decoding(batch, steps, use_cache=False)
    prev = torch.full((4,), TOK.cls)
    history = [[TOK.cls] for _ in img_lens]
    feats, boxes = batch.img_feat.split(img_lens), batch.img_pos.split(img_lens)
    for step in range(steps):
        lc = model.decode_step(cached, prev, step, TOK)
        lr = model.decode_step(plain, prev, step, TOK)
        torch.testing.assert_close(lc, lr, **TOL)
        for b in range(4):
            torch.testing.assert_close(lc[b], plain_next_logits(model, feats[b], boxes[b], history[b]), **TOL)
        prev = torch.randint(4, 61, (4,), generator=gen)  # teacher forcing with arbitrary tokens
        for b in range(4):
            history[b].append(int(prev[b]))
    with pytest.raises(ValueError, match="cache is full"):
        model.decode_step(cached, prev, steps, TOK)


@torch.no_grad()
@pytest.mark.parametrize("beam_size", [1, 3])
def test_generate_cached_equals_uncached(gen, beam_size):
    model = make_model(gen)
    batch = image_batch(gen, [3, 1, 5, 2, 4])
    a = model.generate(batch, TOK, max_len=7, beam_size=beam_size)
    b = model.generate(batch, TOK, max_len=7, beam_size=beam_size, use_cache=False)
    assert a.tokens == b.tokens
    assert a.finished == b.finished
    for x, y in zip(a.scores, b.scores):
        assert x == pytest.approx(y, abs=1e-4)


@torch.no_grad()
def test_beam_one_is_greedy_and_scores_are_log_probs(gen):
    model = make_model(gen)
    img_lens = [2, 4, 1]
    batch = image_batch(gen, img_lens)
    greedy = model.generate(batch, TOK, max_len=6)
    beam1 = model.generate(batch, TOK, max_len=6, beam_size=1)
    beam1_general = model._beam(batch, TOK, 6, 1, 1.0, True)  # the beam-search code path with K = 1
    assert beam1_general.tokens == greedy.tokens == beam1.tokens
    assert beam1_general.finished == greedy.finished
    for x, y in zip(beam1_general.scores, greedy.scores):
        assert x == pytest.approx(y, abs=1e-4)
    beam = model.generate(batch, TOK, max_len=6, beam_size=4, length_penalty=0.0)
    feats, boxes = batch.img_feat.split(img_lens), batch.img_pos.split(img_lens)
    for out in (greedy, beam):
        for b in range(3):
            seq = out.tokens[b] + ([TOK.sep] if out.finished[b] else [])
            prefix, total = [TOK.cls], 0.0
            for t in seq:
                total += float(F.log_softmax(plain_next_logits(model, feats[b], boxes[b], prefix), -1)[t])
                prefix.append(t)
            assert out.scores[b] == pytest.approx(total, abs=1e-4)
            assert TOK.sep not in out.tokens[b] and len(seq) <= 6


@torch.no_grad()
def test_generation_stops_at_sep(gen):
    model = make_model(gen)
    model.cls.predictions.bias[TOK.sep] = 1e4  # [SEP] always wins
    batch = image_batch(gen, [2, 3])
    for k in (1, 2):
        out = model.generate(batch, TOK, max_len=5, beam_size=k)
        assert out.tokens == [[], []] and out.finished == [True, True]
        assert all(abs(s) < 1e-3 for s in out.scores)
    model.cls.predictions.bias[TOK.sep] = -1e4  # never [SEP]: max_len tokens, unfinished
    out = model.generate(batch, TOK, max_len=5, beam_size=2)
    assert [len(t) for t in out.tokens] == [5, 5] and out.finished == [False, False]


def test_generate_restores_training_mode(gen):
    model = make_model(gen).train()
    model.generate(image_batch(gen, [2]), TOK, max_len=3)
    assert model.training


def test_bad_input(gen):
    model = make_model(gen)
    batch = image_batch(gen, [2, 1])
    with pytest.raises(ValueError, match="max_len"):
        model.generate(batch, TOK, max_len=0)
    with pytest.raises(ValueError, match="beam_size"):
        model.generate(batch, TOK, beam_size=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(batch, TOK, max_len=64)
    with pytest.raises(TypeError, match="PackedVLBatch"):
        model.generate({"img_feat": batch.img_feat}, TOK)
    with pytest.raises(ValueError, match="prev_ids"):
        model.decode_step(model.start_decoding(batch, 3), torch.zeros(3, dtype=torch.long), 0, TOK)
    with pytest.raises(ValueError, match="txt_labels"):
        model(caption_batch(gen, [1], [3]).__class__(input_ids=torch.tensor([1, 5, 2]), txt_lens=[3],
                                                     img_feat=batch.img_feat[:1], img_pos=batch.img_pos[:1],
                                                     img_lens=[1]))
    with pytest.raises(ValueError, match="img_dim"):
        model.generate(image_batch(gen, [2], img_dim=5), TOK)


@pytest.mark.cuda
@torch.no_grad()
def test_cached_decoding_on_gpu(seed):
    """On CUDA the attention runs on the fused backend (head_dim 16): cached steps = recomputation, and the
    training loss matches the CPU reference backend."""
    gen = torch.Generator().manual_seed(seed)
    model = UniterForCaptioning(tiny_config(hidden_size=64, intermediate_size=96)).eval()
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    batch = image_batch(gen, [3, 1, 7, 2, 5])
    cpu = model.generate(batch, TOK, max_len=8, beam_size=2)
    model, gpu_batch = model.cuda(), batch.to("cuda")
    cached = model.start_decoding(gpu_batch, 6)
    plain = model.start_decoding(gpu_batch, 6, use_cache=False)
    prev = torch.full((5,), TOK.cls, device="cuda")
    for step in range(6):
        got, want = model.decode_step(cached, prev, step, TOK), model.decode_step(plain, prev, step, TOK)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        prev = torch.randint(4, 61, (5,), generator=gen).cuda()
    for k in (1, 2):
        a = model.generate(gpu_batch, TOK, max_len=8, beam_size=k)
        b = model.generate(gpu_batch, TOK, max_len=8, beam_size=k, use_cache=False)
        assert a.tokens == b.tokens
    assert model.generate(gpu_batch, TOK, max_len=8, beam_size=2).tokens == cpu.tokens
    cb = caption_batch(gen, [3, 1, 7], [5, 9, 4])
    torch.testing.assert_close(model(cb.to("cuda")).cpu(), model.cpu()(cb), rtol=1e-4, atol=1e-5)
