"""Retrieval evaluation: fast exact scoring vs naive per-pair forwards, two-stage vs exact, recall@k vs a plain
reference (ties included), bad input."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastvl.batch import PackedVLBatch
from fastvl.models.uniter import UniterForImageTextRetrieval, UniterForPretraining
from fastvl.models.uniter.testing import tiny_config, to_official_batch
from fastvl.tasks import metrics as M
from fastvl.tasks.retrieval import (
    RetrievalImages,
    RetrievalTexts,
    brute_force_scores,
    evaluate_retrieval,
    format_recall,
    recall_at_k,
    score_matrix,
    shortlist_scores,
    split_batch,
)

TOL = dict(rtol=1e-5, atol=1e-5)  # fp32: the same math on differently composed batches (rounding only)


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: one intra-op thread is as fast, and immune to a busy machine's thread stalls."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _model(kind: str = "itr", **overrides):
    cfg = tiny_config(initializer_range=0.3, **overrides)
    torch.manual_seed(0)
    model = UniterForImageTextRetrieval(cfg, cfg.img_dim) if kind == "itr" else \
        UniterForPretraining(cfg, cfg.img_dim, cfg.img_label_dim)
    with torch.no_grad():  # non-trivial biases so every parameter matters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval(), cfg


def _data(gen, cfg, n: int, m: int, device="cpu"):
    """n texts (lengths 1..12, one of length 1) and m images (1..10 regions, one with 1 region)."""
    tl = torch.randint(1, 13, (n,), generator=gen).tolist()
    il = torch.randint(1, 11, (m,), generator=gen).tolist()
    tl[0], il[-1] = 1, 1
    texts = RetrievalTexts(torch.randint(4, cfg.vocab_size, (sum(tl),), generator=gen), tl)
    images = RetrievalImages(torch.randn(sum(il), cfg.img_dim, generator=gen).abs(),
                             torch.rand(sum(il), 7, generator=gen), il)
    return texts.to(device), images.to(device)


def _pieces(texts: RetrievalTexts, images: RetrievalImages):
    ct = [0] + torch.tensor(texts.lens).cumsum(0).tolist()
    ci = [0] + torch.tensor(images.lens).cumsum(0).tolist()
    txt = [texts.input_ids[ct[t]:ct[t + 1]] for t in range(len(texts))]
    img = [(images.feat[ci[i]:ci[i + 1]], images.pos[ci[i]:ci[i + 1]]) for i in range(len(images))]
    return txt, img


def _pair(txt, img, t: int, i: int) -> PackedVLBatch:
    return PackedVLBatch(input_ids=txt[t], txt_lens=[txt[t].numel()], img_feat=img[i][0], img_pos=img[i][1],
                         img_lens=[img[i][0].shape[0]])


@torch.no_grad()
def _naive_official(model, texts, images, kind: str) -> torch.Tensor:
    """Plain brute force: one forward per pair through the model's OFFICIAL (padded dict) interface."""
    txt, img = _pieces(texts, images)
    out = torch.empty(len(txt), len(img))
    for t, i in itertools.product(range(len(txt)), range(len(img))):
        batch = to_official_batch(_pair(txt, img, t, i), "none")
        if kind == "itr":
            out[t, i] = model(batch, compute_loss=False)[0, 0]
        else:
            logits = model(batch, task="itm", compute_loss=False)[0][0]
            out[t, i] = logits[1] - logits[0]
    return out


# ----------------------------------------------------------------------------------------------------------
# Exact mode
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["itr", "pretrain"])
def test_exact_equals_brute_force(gen, kind):
    """Every variant of the fast path against one forward per pair through the official interface. Equal up to fp32
    rounding: BLAS results depend on the batch shape, so batched and per-pair runs of the same model differ in the
    last bits (as two forwards of the model on differently composed batches do)."""
    model, cfg = _model(kind)
    texts, images = _data(gen, cfg, 7, 5)
    naive = _naive_official(model, texts, images, kind)
    assert float(naive.std()) > 0.1  # the scores really depend on the pair
    t2i = torch.randint(0, 5, (7,), generator=gen)
    for shortcuts, attention in ((False, "auto"), (True, "sdpa"), (True, "fastvl")):
        for max_tokens in (None, 1, 37):  # one chunk; one pair per chunk; tiles of a few pairs
            fast = score_matrix(model, texts, images, shortcuts=shortcuts, attention=attention,
                                max_tokens=max_tokens, progress=False)
            assert fast.shape == (7, 5) and fast.dtype == torch.float32
            torch.testing.assert_close(fast, naive, **TOL)
    torch.testing.assert_close(brute_force_scores(model, texts, images), naive, **TOL)
    if kind == "itr":  # recall identical (no near-ties at this scale: scores differ by >> 1e-5)
        gaps = (naive.reshape(-1, 1) - naive.reshape(1, -1)).abs()
        if float(gaps[gaps > 0].min()) > 1e-4:
            assert recall_at_k(fast, t2i) == recall_at_k(naive, t2i)


def test_exact_one_layer_model_and_custom_head(gen):
    model, cfg = _model("itr", num_hidden_layers=1)
    texts, images = _data(gen, cfg, 5, 4)
    fast = score_matrix(model, texts, images, progress=False)
    torch.testing.assert_close(fast, _naive_official(model, texts, images, "itr"), **TOL)
    head = lambda pooled: pooled.sum(1)  # noqa: E731
    torch.testing.assert_close(score_matrix(model, texts, images, head=head, progress=False),
                               brute_force_scores(model, texts, images, head=head), **TOL)


def test_lists_as_input_and_training_mode_restored(gen):
    model, cfg = _model("itr")
    texts, images = _data(gen, cfg, 4, 3)
    txt, img = _pieces(texts, images)
    model.train()
    a = score_matrix(model, txt, img, progress=False)
    assert model.training
    torch.testing.assert_close(a, score_matrix(model, texts, images, progress=False), rtol=0, atol=0)


def test_bf16_autocast_close(gen):
    """bf16 scoring follows the whole-model tolerance rule of ``assert_autocast_rule`` (RMS error vs fp32 <= 3 x that
    of the plain per-pair scoring in bf16 + an fp32 floor; the max-error ratio is a tail statistic, up to 2.5 over 60
    seeds, the RMS ratio at most 1.7 over 100) and honours the autocast (a path that ignored it would give the fp32
    scores)."""
    model, cfg = _model("itr")
    texts, images = _data(gen, cfg, 5, 6)
    ref = score_matrix(model, texts, images, progress=False)
    low = score_matrix(model, texts, images, amp="bf16", progress=False)
    plain_low = brute_force_scores(model, texts, images, amp="bf16")
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    rms = lambda d: float(d.pow(2).mean().sqrt())  # noqa: E731
    err, plain_err = rms(low - ref), rms(plain_low - ref)
    assert err <= 3 * plain_err + 1e-5 * float(ref.abs().max()), (err, plain_err)
    assert err >= 0.1 * plain_err > 0, (err, plain_err)  # the bf16 path was taken


# ----------------------------------------------------------------------------------------------------------
# Two-stage mode
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "fastvl"])
def test_two_stage_with_k_covering_everything_is_exact(gen, attention):
    model, cfg = _model("itr")
    texts, images = _data(gen, cfg, 8, 6)
    exact = score_matrix(model, texts, images, progress=False)
    two, info = score_matrix(model, texts, images, mode="two_stage", k=8, attention=attention, progress=False,
                             return_info=True)
    assert info["pairs_scored"] == 48 and bool(info["cross_scored"].all())
    torch.testing.assert_close(two, exact, **TOL)
    t2i = torch.arange(8) % 6
    res = evaluate_retrieval(model, texts, images, t2i, mode="two_stage", k=8, progress=False)
    assert res["exact"] and "note" not in res and res["shortlist_coverage"] == 100.0


def test_two_stage_shortlist_and_rerank(gen):
    model, cfg = _model("itr")
    n, m, k = 10, 8, 2
    texts, images = _data(gen, cfg, n, m)
    exact = score_matrix(model, texts, images, progress=False)
    s0 = shortlist_scores(model, texts, images)
    two, info = score_matrix(model, texts, images, mode="two_stage", k=k, progress=False, return_info=True)
    # candidates: the top-k images of every text and the top-k texts of every image, by the shortlist
    want = torch.zeros(n, m, dtype=torch.bool)
    want.scatter_(1, s0.topk(k, 1).indices, True)
    want.scatter_(0, s0.topk(k, 0).indices, True)
    assert torch.equal(info["cross_scored"], want) and info["pairs_scored"] == int(want.sum())
    torch.testing.assert_close(two[want], exact[want], **TOL)  # re-scored pairs: the cross-encoder's score
    rest = ~want
    assert float(two[rest].max()) < float(two[want].min())  # the rest below every re-scored pair ...
    a, b = two[rest], s0[rest]  # ... in shortlist order
    assert torch.equal(torch.sign(a[:, None] - a[None]), torch.sign(b[:, None] - b[None]))
    # a caller-given shortlist is used as is
    mine = torch.randn(n, m, generator=gen)
    _, info2 = score_matrix(model, texts, images, mode="two_stage", k=1, shortlist=mine, progress=False,
                            return_info=True)
    assert bool(info2["cross_scored"].gather(1, mine.argmax(1, keepdim=True)).all())
    t2i = torch.arange(n) % m
    res = evaluate_retrieval(model, texts, images, t2i, mode="two_stage", k=k, progress=False)
    assert not res["exact"] and "approximates" in res["note"]
    assert res["shortlist_coverage"] == pytest.approx(100.0 * float(want[torch.arange(n), t2i].float().mean()))
    assert "APPROXIMATE" in format_recall(res) and "two_stage" in format_recall(res)


@torch.no_grad()
def test_shortlist_is_cosine_of_unimodal_encodings(gen):
    """Plain reference through the model's official single-modality forwards (text only, image only)."""
    model, cfg = _model("itr")
    texts, images = _data(gen, cfg, 5, 4)
    txt, img = _pieces(texts, images)
    u = model.uniter

    def pooled(h):
        return h[0].mean(0)

    tv = torch.stack([pooled(u(t[None], torch.arange(t.numel())[None], None, None, torch.ones(1, t.numel()),
                               output_all_encoded_layers=False)) for t in txt])
    iv = torch.stack([pooled(u(None, None, f[None], p[None], torch.ones(1, f.shape[0]),
                               output_all_encoded_layers=False)) for f, p in img])
    ref = torch.nn.functional.normalize(tv, dim=1) @ torch.nn.functional.normalize(iv, dim=1).t()
    torch.testing.assert_close(shortlist_scores(model, texts, images), ref, **TOL)
    torch.testing.assert_close(shortlist_scores(model, texts, images, layer=cfg.num_hidden_layers), ref, **TOL)
    # layer 0: the embeddings alone (text type 0, image type 1)
    te = torch.stack([u.embeddings(t, torch.arange(t.numel())).mean(0) for t in txt])
    ie = torch.stack([u.img_embeddings(f, p, u.embeddings.token_type_embeddings.weight[1]).mean(0) for f, p in img])
    ref0 = torch.nn.functional.normalize(te, dim=1) @ torch.nn.functional.normalize(ie, dim=1).t()
    torch.testing.assert_close(shortlist_scores(model, texts, images, layer=0), ref0, **TOL)
    with pytest.raises(ValueError, match="'shortlist_layer' must be an int"):
        shortlist_scores(model, texts, images, layer=cfg.num_hidden_layers + 1)


# ----------------------------------------------------------------------------------------------------------
# Recall@k
# ----------------------------------------------------------------------------------------------------------


def _plain_recall(scores: torch.Tensor, txt2img: list[int], ks=(1, 5, 10)) -> dict[str, dict[str, float]]:
    """Rank by sorting (best first) under EVERY order of the candidates used to break ties: optimistic = best
    case, pessimistic = worst case, expected = average over the orders (what an arbitrary top-k gives on average).
    """
    s = scores.tolist()
    n, m = len(s), len(s[0])
    img2txts = {j: [t for t in range(n) if txt2img[t] == j] for j in range(m)}

    def ranks(values: list[float], gts: list[int]) -> list[int]:
        out = []
        for perm in itertools.permutations(range(len(values))):
            order = sorted(range(len(values)), key=lambda c: (-values[c], perm[c]))
            out.append(min(order.index(g) for g in gts))
        return out

    res = {mode: {} for mode in ("optimistic", "pessimistic", "expected")}
    ir = [ranks(s[t], [txt2img[t]]) for t in range(n)]
    tr = [ranks([s[t][j] for t in range(n)], img2txts[j]) for j in range(m) if img2txts[j]]
    for name, per_query in (("ir", ir), ("tr", tr)):
        for k in ks:
            res["optimistic"][f"{name}_r{k}"] = 100 * sum(min(r) < k for r in per_query) / len(per_query)
            res["pessimistic"][f"{name}_r{k}"] = 100 * sum(max(r) < k for r in per_query) / len(per_query)
            res["expected"][f"{name}_r{k}"] = 100 * sum(sum(x < k for x in r) / len(r) for r in per_query) / \
                len(per_query)
    return res


@pytest.mark.parametrize("values", ["ties", "continuous", "constant"])
def test_recall_against_plain_reference(gen, values):
    n, m = 7, 6  # 7! tie orders per TR query, 6! per IR query
    if values == "ties":
        scores = torch.randint(0, 3, (n, m), generator=gen).float()
    elif values == "continuous":
        scores = torch.randn(n, m, generator=gen)
    else:
        scores = torch.zeros(n, m)
    txt2img = torch.randint(0, m, (n,), generator=gen).tolist()
    txt2img[:2] = [0, 0]  # image 0 has several texts; some images may have none (not TR queries)
    ref = _plain_recall(scores, txt2img, ks=(1, 2, 5))
    for ties, want in ref.items():
        got = recall_at_k(scores, txt2img, ks=(1, 2, 5), ties=ties, chunk=3)
        for key, val in want.items():
            assert got[key] == pytest.approx(val, abs=1e-9), (ties, key)
        assert got["r_mean"] == pytest.approx(sum(want.values()) / len(want))
    # optimistic ties = the project's metric (fastvl.tasks.metrics.retrieval_recall)
    old = M.retrieval_recall(scores, torch.tensor(txt2img), ks=(1, 2, 5))
    got = recall_at_k(scores, txt2img, ks=(1, 2, 5), ties="optimistic")
    assert all(got[key] == pytest.approx(old[key]) for key in old)
    if values == "constant":  # a collapsed model is at chance, not at 100%
        assert recall_at_k(scores, txt2img, ks=(1,))["ir_r1"] == pytest.approx(100 / m)


def test_recall_official_topk_protocol_without_ties(gen):
    """Without ties every mode equals the official top-10 protocol (IR: gt image in the row's top k; TR: any of
    the image's texts in the column's top k), written here with topk as upstream evaluates it."""
    n, m = 40, 13
    scores = torch.randn(n, m, generator=gen)
    txt2img = torch.randint(0, m, (n,), generator=gen)
    rank_txt = scores.topk(10, dim=1).indices
    rank_img = scores.topk(10, dim=0).indices
    img2txts = [[t for t in range(n) if int(txt2img[t]) == j] for j in range(m)]
    queries = [j for j in range(m) if img2txts[j]]
    for k in (1, 5, 10):
        ir = 100 * sum(int(txt2img[t]) in rank_txt[t, :k].tolist() for t in range(n)) / n
        tr = 100 * sum(any(t in rank_img[:k, j].tolist() for t in img2txts[j]) for j in queries) / len(queries)
        for ties in ("optimistic", "pessimistic", "expected"):
            got = recall_at_k(scores, txt2img, img2txts, ties=ties)
            assert got[f"ir_r{k}"] == pytest.approx(ir) and got[f"tr_r{k}"] == pytest.approx(tr)
    assert recall_at_k(scores, txt2img)["n_img"] == len(queries)


def test_recall_bad_input():
    s = torch.randn(4, 3)
    with pytest.raises(ValueError, match="'txt2img' must have one image per text"):
        recall_at_k(s, [0, 1, 2])
    with pytest.raises(ValueError, match=r"'txt2img\[2\]' = 3 is not an image index"):
        recall_at_k(s, [0, 1, 3, 2])
    with pytest.raises(ValueError, match="disagrees with 'txt2img' for image 1"):
        recall_at_k(s, [0, 1, 1, 2], img2txts=[[0], [1], [2, 3]])
    with pytest.raises(ValueError, match="'ties' must be one of"):
        recall_at_k(s, [0, 1, 1, 2], ties="random")
    with pytest.raises(ValueError, match="contains NaN"):
        recall_at_k(torch.full((4, 3), float("nan")), [0, 1, 1, 2])
    with pytest.raises(ValueError, match=r"\[N texts, M images\]"):
        recall_at_k(torch.randn(4), [0, 1, 1, 2])
    assert recall_at_k(s, [0, 1, 1, 2], img2txts={0: [0], 1: [1, 2], 2: [3]})["n_img"] == 3


def test_score_matrix_bad_input(gen):
    model, cfg = _model("itr")
    texts, images = _data(gen, cfg, 3, 2)
    with pytest.raises(ValueError, match="'mode' must be one of"):
        score_matrix(model, texts, images, mode="fast", progress=False)
    with pytest.raises(ValueError, match="'k' must be >= 1"):
        score_matrix(model, texts, images, mode="two_stage", k=0, progress=False)
    with pytest.raises(ValueError, match=r"'shortlist' must have shape \[3, 2\]"):
        score_matrix(model, texts, images, mode="two_stage", shortlist=torch.zeros(2, 3), progress=False)
    with pytest.raises(ValueError, match="img_dim"):
        score_matrix(model, texts, RetrievalImages(torch.zeros(2, cfg.img_dim + 1), torch.zeros(2, 7), [1, 1]),
                     progress=False)
    with pytest.raises(ValueError, match="'RetrievalTexts.lens' must be >= 1"):
        RetrievalTexts(torch.zeros(2, dtype=torch.long), [2, 0])
    with pytest.raises(ValueError, match=r"'pos' must have shape \[3, 7\]"):
        RetrievalImages(torch.zeros(3, 4), torch.zeros(3, 6), [3])
    with pytest.raises(ValueError, match="head='rank' needs model.rank_output"):
        score_matrix(_model("pretrain")[0], texts, images, head="rank", progress=False)
    with pytest.raises(ValueError, match="'attention' must be one of"):
        score_matrix(model, texts, images, attention="flash", progress=False)


def test_split_batch_shares_images_by_key(gen):
    model, cfg = _model("itr")
    texts, images = _data(gen, cfg, 4, 3)
    txt, img = _pieces(texts, images)
    # 5 pairs: captions 0, 1 of image 'a'; 2 of 'b'; 3 of 'a' again (same features); 4... of 'c'
    pairs = [(0, 0), (1, 0), (2, 1), (3, 0), (0, 2)]
    keys = ["a", "a", "b", "a", "c"]
    b = PackedVLBatch(input_ids=torch.cat([txt[t] for t, _ in pairs]), txt_lens=[txt[t].numel() for t, _ in pairs],
                      img_feat=torch.cat([img[i][0] for _, i in pairs]),
                      img_pos=torch.cat([img[i][1] for _, i in pairs]), img_lens=[img[i][0].shape[0] for _, i in pairs])
    t_, i_, t2i = split_batch(b, keys)
    assert t2i.tolist() == [0, 0, 1, 0, 2] and len(t_) == 5 and len(i_) == 3
    for j, src in enumerate([0, 1, 2]):
        assert torch.equal(RetrievalImages.from_list([img[src]]).feat, _pieces(t_, i_)[1][j][0])
    t_, i_, t2i = split_batch(b)
    assert t2i.tolist() == list(range(5)) and len(i_) == 5


@pytest.mark.cuda
@pytest.mark.parametrize("shortcuts", [False, True])
def test_exact_equals_brute_force_cuda(gen, shortcuts):
    model, cfg = _model("itr")
    model.cuda()
    texts, images = _data(gen, cfg, 9, 7, device="cuda")
    naive = brute_force_scores(model, texts, images)
    fast = score_matrix(model, texts, images, shortcuts=shortcuts, max_tokens=50, progress=False)
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-4)  # GPU fp32 matmuls may use TF32-free paths
    low = score_matrix(model, texts, images, amp="bf16", shortcuts=shortcuts, progress=False)
    assert float((low - naive).abs().max()) <= 0.05 * float(naive.abs().max()) + 0.05
    two = score_matrix(model, texts, images, mode="two_stage", k=9, shortcuts=shortcuts, progress=False)
    torch.testing.assert_close(two, naive, rtol=1e-4, atol=1e-4)
