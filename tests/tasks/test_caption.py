"""Captioning task: BLEU / CIDEr-D against hand-computed values, caption masking, the task module, the caption data
(official dbs of a small synthetic corpus), evaluation plumbing, and `fastvl finetune --task caption` end to end."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from fastvl.batch import PackedVLBatch
from fastvl.data import SyntheticConfig, synthetic_corpus
from fastvl.data.caption_data import CaptionEvalData, mask_caption
from fastvl.data.errors import DataError
from fastvl.data.lmdb_db import ImageDB, TxtDB
from fastvl.models.uniter.caption import CaptionGeneration, CaptionTokens, UniterForCaptioning
from fastvl.models.uniter.testing import tiny_config
from fastvl.recipes.caption import RECIPE as CAPTION_RECIPE
from fastvl.tasks import build_task
from fastvl.tasks.caption import CaptionDecoder, CaptionTask, evaluate_captions, most_frequent_caption
from fastvl.tasks.caption_metrics import caption_words, cider_d, corpus_bleu


def w(s: str) -> list[str]:
    return s.split()


# ----------------------------------------------------------------------------------------------------------
# BLEU (hand-computed)
# ----------------------------------------------------------------------------------------------------------
def test_bleu_single_sentence_by_hand():
    out = corpus_bleu([w("a b c d e")], [[w("a b c d f")]])
    # matches / totals: 1-grams 4/5, 2-grams 3/4, 3-grams 2/3, 4-grams 1/2; equal lengths: BP = 1
    assert out["precisions"] == pytest.approx([4 / 5, 3 / 4, 2 / 3, 1 / 2])
    assert out["bp"] == 1.0
    assert out["bleu4"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    assert out["bleu1"] == pytest.approx(4 / 5)
    assert out["bleu2"] == pytest.approx(math.sqrt(4 / 5 * 3 / 4))


def test_bleu_clipping_and_zero_precision():
    # Papineni et al.'s example: 7 x "the" against a reference holding "the" twice -> unigram precision 2/7
    out = corpus_bleu([w("the the the the the the the")], [[w("the cat is on the mat")]])
    assert out["precisions"][0] == pytest.approx(2 / 7)
    assert out["precisions"][1] == 0.0 and out["bleu4"] == 0.0  # no smoothing
    # clipping uses the reference with the most occurrences of each n-gram
    out = corpus_bleu([w("the the the the the the the")], [[w("the cat is on the mat"), w("the the the mat")]])
    assert out["precisions"][0] == pytest.approx(3 / 7)


def test_bleu_brevity_penalty_closest_reference():
    out = corpus_bleu([w("a b c d")], [[w("a b c d e f"), w("x a b c d e f g")]])
    assert out["precisions"] == pytest.approx([1.0] * 4)
    assert out["ref_len"] == 6 and out["hyp_len"] == 4  # closest reference: length 6
    assert out["bp"] == pytest.approx(math.exp(1 - 6 / 4))
    assert out["bleu4"] == pytest.approx(math.exp(-0.5))
    # tie between reference lengths 4 and 6 for a 5-word hypothesis: the shorter one -> c > r, BP = 1
    out = corpus_bleu([w("a b c d e")], [[w("a b c d e f"), w("a b c d")]])
    assert out["ref_len"] == 4 and out["bp"] == 1.0


def test_bleu_is_corpus_level():
    hyps = [w("a b c d"), w("x y z w v")]
    refs = [[w("a b c d")], [w("a b c d e")]]
    out = corpus_bleu(hyps, refs)
    # statistics summed over the corpus: 1-grams (4 + 0) / (4 + 5), 2-grams 3/7, 3-grams 2/5, 4-grams 1/3; c = r = 9
    assert out["precisions"] == pytest.approx([4 / 9, 3 / 7, 2 / 5, 1 / 3])
    assert out["bleu4"] == pytest.approx((4 / 9 * 3 / 7 * 2 / 5 * 1 / 3) ** 0.25)
    assert corpus_bleu([w("a b c d")], [[w("a b c d")]])["bleu4"] == pytest.approx(1.0)
    assert corpus_bleu([[]], [[w("a b")]])["bleu4"] == 0.0


def test_metric_bad_input():
    with pytest.raises(ValueError, match="reference sets"):
        corpus_bleu([w("a")], [])
    with pytest.raises(TypeError, match="lists of words"):
        cider_d(["a b"], [[w("a b")]])
    with pytest.raises(ValueError, match="no reference"):
        cider_d([w("a")], [[]])


# ----------------------------------------------------------------------------------------------------------
# CIDEr-D (hand-computed)
# ----------------------------------------------------------------------------------------------------------
def test_cider_d_exact_match_disjoint_images():
    # 2 images, no shared n-gram: idf = log 2 everywhere; per image cosine 1 for n = 1, 2 and nothing for n = 3, 4
    out = cider_d([w("a b"), w("c d")], [[w("a b")], [w("c d")]])
    assert out["per_image"] == pytest.approx([5.0, 5.0])  # 10 * mean(1, 1, 0, 0)
    assert out["cider"] == pytest.approx(5.0)


def test_cider_d_by_hand():
    hyps = [w("a b"), w("d")]
    refs = [[w("a b"), w("a c")], [w("a d")]]
    # df: 'a' is in both images' references -> idf 0; every other n-gram in one image -> idf log 2 (= L).
    # image 0: vs "a b": n=1 vectors {a: 0, b: L} on both sides -> L^2 / (L * L) = 1; n=2 {ab: L} -> 1.
    #          vs "a c": n=1 the only weighted hypothesis word 'b' is absent -> 0; n=2 0. Same lengths: no penalty.
    #          10 * mean_n (sum over refs) / 2 refs = 10 * ((1 + 1) / 4) / 2 = 2.5
    # image 1: "d" vs "a d": n=1 {d: L} . {a: 0, d: L} -> 1; n=2: empty hypothesis -> 0. Bigram counts 0 vs 1:
    #          penalty exp(-1 / 72). 10 * exp(-1/72) / 4
    out = cider_d(hyps, refs)
    assert out["per_image"] == pytest.approx([2.5, 2.5 * math.exp(-1 / 72)])
    assert out["cider"] == pytest.approx((2.5 + 2.5 * math.exp(-1 / 72)) / 2)


def test_cider_d_clipping_and_length_penalty():
    # hypothesis repeats 'b': tf 2 vs 1 in the reference; min() clips its weight to the reference's
    out = cider_d([w("b b"), w("c")], [[w("b a")], [w("c")]])
    # image 0, n=1: hyp {b: 2L}, ref {b: L, a: L} (L = log 2): min(2L, L) * L / (2L * sqrt(2) L) = 1 / (2 sqrt 2);
    # n=2: (b, b) vs (b, a) -> 0; one bigram each: no penalty. image 1: exact one-word match -> 10 / 4
    assert out["per_image"] == pytest.approx([10 * (1 / (2 * math.sqrt(2))) / 4, 10 / 4])
    # length penalty: "x" (0 bigrams) vs "x q q q q q q q" (7 bigrams): n=1 {x: L} . {x: L, q: 7L}
    # -> L^2 / (L * sqrt(50) L); times exp(-7^2 / (2 * 6^2))
    out = cider_d([w("x"), w("c")], [[w("x q q q q q q q")], [w("c")]])
    assert out["per_image"][0] == pytest.approx(10 * math.exp(-49 / 72) / math.sqrt(50) / 4)


def test_caption_words():
    assert caption_words("A small Red cup , at the top left .") == ["a", "small", "red", "cup", "at", "the", "top",
                                                                   "left"]
    assert caption_words("left-of the cup.") == ["left", "of", "the", "cup"]


# ----------------------------------------------------------------------------------------------------------
# masking and the task module
# ----------------------------------------------------------------------------------------------------------
def test_mask_caption_recipe():
    rng = np.random.default_rng(0)
    cls, sep, mask, v_range = 101, 102, 103, (200, 300)
    chosen = kinds = 0
    counts: Counter = Counter()
    for _ in range(3000):
        ids = np.concatenate([[cls], rng.integers(200, 300, 10), [sep]])
        out, labels = mask_caption(ids, rng, 0.15, mask, v_range)
        assert labels[0] == -1 and out[0] == cls  # [CLS] is never chosen
        sel = labels != -1
        assert sel.sum() >= 1
        np.testing.assert_array_equal(labels[sel], ids[sel])
        np.testing.assert_array_equal(out[~sel], ids[~sel])
        chosen += int(sel.sum())
        kinds += 11
        counts["sep"] += int(sel[-1])
        counts["mask"] += int((out[sel] == mask).sum())
        counts["same"] += int((out[sel] == ids[sel]).sum())
    # p = 0.15 per token, plus one forced choice when none of the 11 was drawn (probability 0.85 ** 11)
    assert abs(chosen / kinds - (0.15 + 0.85 ** 11 / 11)) < 0.008
    assert counts["sep"] > 0.1 * 3000  # [SEP] is a target too (learn to stop)
    assert abs(counts["mask"] / chosen - 0.8) < 0.02
    assert 0.08 < counts["same"] / chosen < 0.13  # 10% kept (+ random draws that hit the same id)
    with pytest.raises(ValueError, match="prob"):
        mask_caption(np.array([1, 2]), rng, 0.0, 3, (4, 5))
    with pytest.raises(ValueError, match="at least 2"):
        mask_caption(np.array([1]), rng, 0.5, 3, (4, 5))


def test_task_module(gen):
    model = UniterForCaptioning(tiny_config())
    tokens = CaptionTokens(cls=1, sep=2, mask=3)
    task = build_task("caption", model=model, tokens=tokens, max_len=4)
    assert isinstance(task, CaptionTask)
    ids = torch.tensor([1, 7, 3, 9, 2, 1, 3, 11, 2])  # [CLS] w [MASK] w [SEP] | [CLS] [MASK] w [SEP]
    labels = torch.full((9,), -1)
    labels[2], labels[6] = 8, 12
    batch = PackedVLBatch(input_ids=ids, txt_lens=[5, 4], img_feat=torch.randn(5, 24, generator=gen),
                          img_pos=torch.rand(5, 7, generator=gen), img_lens=[2, 3], txt_labels=labels, n_txt_masked=2)
    out = task(batch)
    assert out["count"] == batch.n_txt_masked
    torch.testing.assert_close(out["loss"], model(batch))
    assert set(out["logs"]) == {"caption_loss"} and not out["logs"]["caption_loss"].requires_grad
    out["loss"].backward()
    assert model.uniter.embeddings.word_embeddings.weight.grad is not None
    gen_out = task.generate(PackedVLBatch(input_ids=torch.zeros(0, dtype=torch.long), txt_lens=[0, 0],
                                          img_feat=torch.randn(3, 24, generator=gen), img_pos=torch.rand(3, 7),
                                          img_lens=[2, 1]))
    assert len(gen_out.tokens) == 2 and all(len(t) <= 4 for t in gen_out.tokens)
    with pytest.raises(TypeError, match="UniterForCaptioning"):
        CaptionTask(torch.nn.Linear(2, 2), tokens)
    with pytest.raises(TypeError, match="PackedVLBatch"):
        task({"input_ids": None})


# ----------------------------------------------------------------------------------------------------------
# data + evaluation on a small synthetic corpus (official dbs)
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    cfg = SyntheticConfig(n_train_images=64, n_val_images=12, seed=3)
    return synthetic_corpus(tmp_path_factory.mktemp("caption_corpus"), cfg)


def test_eval_data_and_perfect_captions(corpus):
    txt, img = TxtDB(corpus.txt_val, -1), ImageDB(corpus.img_db)
    data = CaptionEvalData([(txt, img)], batch_size=5)
    assert len(data) == 12 and all(len(im.refs) == 2 for im in data.images)
    batches = list(data.batches())
    assert [b.batch_size for b, _ in batches] == [5, 5, 2]
    assert len(list(data.batches(max_batches=2))) == 2
    decoder = CaptionDecoder(corpus.vocab_file)
    # the decoder turns ids back into the corpus caption's words
    first_id = txt.img2txts[data.images[0].img_fname][0]
    assert decoder.words(txt.input_ids(first_id)) == caption_words(txt[first_id]["sent"])

    class Oracle:  # "generates" each image's first reference caption
        def generate(self, batch, **kw):
            toks = [data.images[names.index(n)].refs[0] for n in batch.img_fnames]
            return CaptionGeneration(toks, [0.0] * len(toks), [True] * len(toks))

    names = [im.img_fname for im in data.images]
    out = evaluate_captions(Oracle(), data, decoder, examples=2)
    assert out["bleu4"] == pytest.approx(1.0) and out["finished"] == 1.0 and out["images"] == 12
    hyps = [decoder.words(im.refs[0]) for im in data.images]
    refs = [[decoder.words(r) for r in im.refs] for im in data.images]
    assert out["cider"] == pytest.approx(cider_d(hyps, refs)["cider"])
    assert len(out["examples"]) == 2
    words, n = most_frequent_caption([txt], decoder)
    assert n >= 1 and words


def test_eval_data_bad_input(corpus, tmp_path):
    import shutil

    bad_txt = tmp_path / "val.db"
    shutil.copytree(corpus.txt_val, bad_txt)
    img2txts = json.loads((bad_txt / "img2txts.json").read_text())
    img2txts["missing_image.npz"] = list(img2txts.values())[0]
    (bad_txt / "img2txts.json").write_text(json.dumps(img2txts))
    pairs = [(TxtDB(bad_txt, -1), ImageDB(corpus.img_db))]
    with pytest.raises(DataError, match="missing_image"):
        CaptionEvalData(pairs)
    data = CaptionEvalData(pairs, skip_bad_examples=True)
    assert len(data) == 12 and data.bad.total == 1
    with pytest.raises(ValueError, match="batch_size"):
        CaptionEvalData(pairs, batch_size=0)


def test_finetune_caption_end_to_end(corpus, tmp_path):
    from fastvl.recipes import FinetuneSettings, evaluate_finetune, finetune, list_recipes

    assert "caption" in list_recipes()
    assert CAPTION_RECIPE.metric == "cider"
    s = FinetuneSettings(task="caption", data=str(corpus.root), output=str(tmp_path / "run"), steps=6,
                         batch_tokens=256, val_every=0, ckpt_every=0, log_every=2, progress=False, device="cpu",
                         options={"max_len": 6, "eval_batch_size": 6})
    res = finetune(s, log=lambda *_: None)
    assert res["metric_name"] == "cider" and res["metric"] is not None
    val = res["validation"]
    assert {"bleu4", "cider", "baseline_bleu4", "baseline_cider", "finished"} <= set(val)
    assert res["chance"] == pytest.approx(val["baseline_cider"])
    again = evaluate_finetune(tmp_path / "run", "caption", {"device": "cpu"}, log=lambda *_: None)
    assert again["metric"] == pytest.approx(res["metric"])
    beam = evaluate_finetune(tmp_path / "run", "caption", {"options": {"beam_size": 2}}, log=lambda *_: None)
    assert beam["metrics"]["images"] == 12


def test_adversarial_caption_from_the_cli(corpus, tmp_path, capsys):
    """`fastvl finetune --task caption --adv` (VILLA) runs end to end and logs the consistency term."""
    import json

    from fastvl import cli

    out = tmp_path / "adv"
    code = cli.main(["finetune", "--task", "caption", "--data", str(corpus.root), "--output", str(out), "--steps", "3",
                     "--batch-tokens", "256", "--val-every", "0", "--ckpt-every", "0", "--log-every", "1",
                     "--no-progress", "--opt", "max_len=4", "--opt", "eval_batch_size=6", "--adv", "--adv-steps", "2",
                     "--adv-modality", "both"])
    text = capsys.readouterr()
    assert code == 0, text.out + text.err
    assert "adversarial fine-tuning (VILLA)" in text.out
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("caption/adv_kl", 0) > 0 for r in recs)
