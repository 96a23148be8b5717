"""Conditional masking per task, packed batches, determinism (resume, world size, workers), bad data."""

import numpy as np
import pytest
import torch

from fastvl.batch import PackedVLBatch
from fastvl.data import DataError, ImageDB, ImageDBWriter, TxtDB, TxtDBWriter, build_pretrain_data, parse_tasks
from fastvl.data.collate import to_official
from fastvl.data.lmdb_db import dumps_msgpack, img_db_name, release_db
from fastvl.data.pretrain_data import mask_regions, mask_text

ALL = ["mlm", "mrfr", "mrc", "mrc-kl", "itm"]


def _data(corpus, **kw):
    kw.setdefault("tasks", ALL)
    kw.setdefault("max_tokens", 400)
    return build_pretrain_data(corpus.txt_train, corpus.img_db, **kw)


def _split(t: torch.Tensor, lens):
    return list(t.split(list(lens)))


def test_mask_text_rule(seed):
    rng = np.random.default_rng(seed)
    ids = np.concatenate([[101], rng.integers(200, 300, 200_000), [102]])
    out, labels = mask_text(ids, rng, 0.15, 103, (104, 300))
    chosen = labels != -1
    assert labels[0] == labels[-1] == -1 and out[0] == 101 and out[-1] == 102
    assert abs(chosen.mean() - 0.15) < 0.005
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    np.testing.assert_array_equal(out[~chosen], ids[~chosen])
    masked, kept = (out[chosen] == 103).mean(), (out[chosen] == ids[chosen]).mean()
    rand = 1 - masked - kept
    assert abs(masked - 0.8) < 0.01 and abs(kept - 0.1) < 0.01 and abs(rand - 0.1) < 0.01
    assert out[chosen].min() >= 103 and out[chosen].max() < 300
    for _ in range(50):  # at least one, and only interior tokens
        short = np.array([101, 250, 251, 102])
        o, lab = mask_text(short, rng, 1e-9, 103, (104, 300))
        assert (lab != -1).sum() == 1 and lab[0] == lab[-1] == -1 and (o == 103).sum() == 1


def test_mask_regions_rule(seed):
    rng = np.random.default_rng(seed)
    assert abs(np.mean([mask_regions(1000, rng, 0.15).mean() for _ in range(20)]) - 0.15) < 0.01
    assert all(mask_regions(3, rng, 1e-9).sum() == 1 for _ in range(20))


def test_mlm_batch(tiny_corpus, seed):
    data = _data(tiny_corpus, tasks=["mlm"], seed=seed)
    txt = TxtDB(tiny_corpus.txt_train)
    for _ in range(3):
        b = data.sources["mlm"].next_batch()
        assert isinstance(b, PackedVLBatch) and b.img_masks is None and b.itm_targets is None
        assert all(isinstance(n, int) for n in b.txt_lens + b.img_lens)
        assert b.n_txt_masked == int((b.txt_labels != -1).sum())
        for id_, ids, lab in zip(b.ids, _split(b.input_ids, b.txt_lens), _split(b.txt_labels, b.txt_lens)):
            orig = torch.tensor([101] + txt[id_]["input_ids"] + [102])
            m = lab != -1
            assert m.any() and not m[0] and not m[-1]
            assert torch.equal(lab[m], orig[m]) and torch.equal(ids[~m], orig[~m])


@pytest.mark.parametrize("task", ["mrfr", "mrc", "mrc-kl"])
def test_region_masking_batches(tiny_corpus, seed, task):
    data = _data(tiny_corpus, tasks=[task], seed=seed)
    img = ImageDB(tiny_corpus.img_db)
    b = data.sources[task].next_batch()
    assert b.txt_labels is None
    feats, masks = _split(b.img_feat, b.img_lens), _split(b.img_masks, b.img_lens)
    targets = []
    for name, f, m in zip(b.img_fnames, feats, masks):
        rec = img.get(name, soft_labels=True)
        assert m.dtype == torch.bool and m.any()
        assert torch.all(f[m] == 0)
        assert torch.equal(f[~m], torch.from_numpy(rec.feat)[~m])
        targets.append(torch.from_numpy(rec.feat if task == "mrfr" else rec.soft_labels)[m])
    got = b.feat_targets if task == "mrfr" else b.soft_labels
    assert torch.equal(got, torch.cat(targets))
    assert (b.soft_labels is None) == (task == "mrfr") and (b.feat_targets is None) == (task != "mrfr")


def test_itm_negatives(tiny_corpus, seed):
    data = _data(tiny_corpus, tasks=["itm"], seed=seed, train=False)
    txt, img = TxtDB(tiny_corpus.txt_train), ImageDB(tiny_corpus.img_db)
    n = pos = 0
    for b in data.batches("itm"):
        feats = _split(b.img_feat, b.img_lens)
        for id_, name, t, f in zip(b.ids, b.img_fnames, b.itm_targets.tolist(), feats):
            assert (name == txt.txt2img[id_]) == (t == 1)
            assert torch.equal(f, torch.from_numpy(img.get(name).feat))
            n, pos = n + 1, pos + t
    assert n == len(txt) and 0.25 < pos / n < 0.75


def test_resume_gives_the_same_batches(tiny_corpus, seed):
    a = _data(tiny_corpus, seed=seed)
    for task in ALL:
        for _ in range(2):
            a.sources[task].next_batch()
    states = {t: s.state_dict() for t, s in a.sources.items()}
    expect = {t: [a.sources[t].next_batch() for _ in range(3)] for t in ALL}
    b = _data(tiny_corpus, seed=seed)
    for t, s in b.sources.items():
        s.load_state_dict(states[t])
    for t in ALL:
        for want in expect[t]:
            got = b.sources[t].next_batch()
            for f in ("input_ids", "img_feat", "img_pos", "txt_labels", "img_masks", "feat_targets", "soft_labels",
                      "itm_targets"):
                x, y = getattr(want, f), getattr(got, f)
                assert (x is None and y is None) or torch.equal(x, y), (t, f)


def test_epochs_roll_over(tiny_corpus, seed):
    data = _data(tiny_corpus, tasks=["mlm"], seed=seed, max_tokens=1000)
    src = data.sources["mlm"]
    n = src.sampler.num_batches(0)
    seen = [tuple(src.next_batch().ids) for _ in range(n + 2)]
    assert src.epoch == 1 and src.pos == 2 and seen[n] != seen[0]


@pytest.mark.parametrize("task", ["mlm", "mrc", "itm"])
def test_world_size_does_not_change_the_examples(tiny_corpus, seed, task):
    one = _data(tiny_corpus, tasks=[task], seed=seed, max_tokens=800)
    ranks = [_data(tiny_corpus, tasks=[task], seed=seed, max_tokens=400, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        full = one.sources[task].next_batch()
        parts = [r.sources[task].next_batch() for r in ranks]
        per_example = {}
        for p in [full] + parts:
            rows = zip(p.ids, _split(p.input_ids, p.txt_lens), _split(p.img_feat, p.img_lens),
                       p.img_fnames)
            for id_, ids, feat, name in rows:
                per_example.setdefault(id_, []).append((ids, feat, name))
        assert sorted(per_example) == sorted(full.ids)
        for views in per_example.values():
            assert len(views) == 2
            (i1, f1, n1), (i2, f2, n2) = views
            assert torch.equal(i1, i2) and torch.equal(f1, f2) and n1 == n2


def test_workers_give_the_same_batches(tiny_corpus, seed):
    plain = _data(tiny_corpus, tasks=["mlm"], seed=seed)
    pooled = _data(tiny_corpus, tasks=["mlm"], seed=seed, num_workers=1)
    for _ in range(3):
        a, b = plain.sources["mlm"].next_batch(), pooled.sources["mlm"].next_batch()
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.txt_labels, b.txt_labels)
    assert pooled.sources["mlm"].state_dict() == plain.sources["mlm"].state_dict()


def test_mlm_words_masks_one_content_word(tiny_corpus):
    words = tiny_corpus.content_token_ids
    data = build_pretrain_data(tiny_corpus.txt_val, tiny_corpus.img_db, tasks=["mlm-words"], train=False,
                               max_tokens=800, eval_word_ids=words)
    n = 0
    for b in data.batches("mlm-words"):
        for ids, lab in zip(_split(b.input_ids, b.txt_lens), _split(b.txt_labels, b.txt_lens)):
            m = lab != -1
            assert m.sum() == 1 and ids[m].item() == 103 and lab[m].item() in words
            n += 1
    assert n == len(TxtDB(tiny_corpus.txt_val))


@pytest.mark.parametrize("task", ALL)
def test_to_official_layout(tiny_corpus, seed, task):
    b = _data(tiny_corpus, tasks=[task], seed=seed).sources[task].next_batch()
    d = to_official(b, task)
    bsz, max_tl = d["input_ids"].shape
    assert bsz == b.batch_size and max_tl == max(b.txt_lens)
    # gather_index over [txt padded | img padded] reproduces each example's packed [txt | img] rows
    tokens = torch.cat([d["input_ids"].float().unsqueeze(-1).expand(-1, -1, 2),
                        d["img_pos_feat"][..., :2]], dim=1)
    joint = torch.gather(tokens, 1, d["gather_index"].unsqueeze(-1).expand(-1, -1, 2))
    txt, pos = _split(b.input_ids, b.txt_lens), _split(b.img_pos, b.img_lens)
    for i in range(bsz):
        tl, nbb = b.txt_lens[i], b.img_lens[i]
        assert d["attn_masks"][i].sum() == tl + nbb
        assert torch.equal(joint[i, :tl, 0], txt[i].float()) and torch.equal(joint[i, tl:tl + nbb], pos[i][:, :2])
    if task == "mlm":
        assert torch.equal(d["txt_labels"][d["txt_labels"] != -1], b.txt_labels[b.txt_labels != -1])
    if task in ("mrfr", "mrc", "mrc-kl"):
        assert d["img_mask_tgt"].sum() == d["img_masks"].sum() == b.img_masks.sum()
    if task == "itm":
        ot = d["ot_inputs"]
        assert ot["scatter_max"] == int(ot["ot_scatter"].max())
        assert torch.equal((~ot["txt_pad"]).sum(1), torch.tensor(b.txt_lens))
        assert torch.equal((~ot["img_pad"]).sum(1), torch.tensor(b.img_lens))


def test_parse_tasks():
    assert parse_tasks("itm:3,mlm:4") == {"itm": 3.0, "mlm": 4.0}
    assert parse_tasks(["mlm", "mrc"]) == {"mlm": 1.0, "mrc": 1.0}
    with pytest.raises(ValueError, match="unknown tasks"):
        parse_tasks("vqa:1")
    with pytest.raises(ValueError, match="positive sum"):
        parse_tasks({"mlm": 0})


# ------------------------------------------------------------------------------------------------ bad data
META = {"CLS": 101, "SEP": 102, "MASK": 103, "UNK": 100, "v_range": [104, 300], "tokenizer": "test"}
BAD = {"nan.npz": "nonfinite_feature", "wide.npz": "wrong_dim", "broken.npz": "corrupt_record",
       "empty": "empty_caption"}


@pytest.fixture
def bad_dbs(tmp_path, seed):
    rng = np.random.default_rng(seed)

    def image(n, d=8):
        return {"features": rng.normal(size=(n, d)).astype(np.float32), "norm_bb": rng.uniform(size=(n, 6)).astype(
            np.float32), "conf": np.full(n, 0.9, np.float32), "soft_labels": rng.dirichlet(np.ones(4), n).astype(
                np.float32)}

    good = [f"g{i}.npz" for i in range(6)]
    with ImageDBWriter(tmp_path / "img", conf_th=0.2, max_bb=10, min_bb=1, compress=False) as w:
        for name in good + ["broken.npz"]:
            w.put(name, image(3))
        nan = image(3)
        nan["features"][2, 1] = np.nan
        w.put("nan.npz", nan)
        w.put("wide.npz", image(3, d=9))
    db_path = tmp_path / "img" / img_db_name(0.2, 10, 1, compress=False)
    release_db(db_path)
    import lmdb

    env = lmdb.open(str(db_path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        txn.put(b"broken.npz", dumps_msgpack(image(3))[:30])
    env.close()
    with TxtDBWriter(tmp_path / "txt.db", META) as w:
        for i, name in enumerate(good * 3):
            w.put(f"ok{i}", {"img_fname": name, "input_ids": rng.integers(104, 300, 5).tolist()})
        for name in ("nan.npz", "wide.npz", "broken.npz"):
            w.put(name, {"img_fname": name, "input_ids": [200, 201]})
        w.put("empty", {"img_fname": good[0], "input_ids": []})
        w.put("lost", {"img_fname": "missing.npz", "input_ids": [200]})
    return tmp_path / "txt.db", tmp_path / "img"


def test_text_referencing_a_missing_image(bad_dbs):
    with pytest.raises(DataError, match="missing.npz.*referenced by text 'lost'") as e:
        build_pretrain_data(*bad_dbs, tasks=["mlm"], max_tokens=200, size_multiple=1)
    assert e.value.reason == "missing_image" and "img" in e.value.db


@pytest.mark.parametrize("key", sorted(BAD))
def test_bad_example_raises_naming_db_and_key(bad_dbs, key):
    txt, img = bad_dbs
    data = build_pretrain_data(txt, img, tasks=["mlm"], max_tokens=200, size_multiple=1, train=False,
                               skip_bad_examples=True)
    data.examples.skip = False  # strict from here on: building a batch holding the bad example raises
    i = next(k for k, (_, id_, _) in enumerate(data.examples.items) if id_ == key)
    with pytest.raises(DataError, match=key) as e:
        data.make_batch("mlm", 0, 0, [i])
    assert e.value.reason == BAD[key]


def test_skip_bad_examples_counts_and_continues(bad_dbs):
    data = build_pretrain_data(*bad_dbs, tasks=["mlm", "mrc"], max_tokens=200, size_multiple=1, train=False,
                               skip_bad_examples=True)
    assert data.bad.as_dict() == {"missing_image": 1}
    seen = [i for b in data.batches("mlm") for i in b.ids]
    assert sorted(seen) == sorted(f"ok{i}" for i in range(18))
    counts = data.bad.as_dict()
    assert counts == {"missing_image": 1, "nonfinite_feature": 1, "wrong_dim": 1, "corrupt_record": 1,
                      "empty_caption": 1}
    assert data.bad.total == 5


def test_all_bad_data_errors_instead_of_hanging(tmp_path):
    with ImageDBWriter(tmp_path / "img", conf_th=0.2, max_bb=10, min_bb=1) as w:
        w.put("a.npz", {"features": np.full((2, 4), np.nan, np.float32), "norm_bb": np.zeros((2, 6), np.float32),
                        "conf": np.ones(2, np.float32)})
    with TxtDBWriter(tmp_path / "txt.db", META) as w:
        w.put("t", {"img_fname": "a.npz", "input_ids": [200]})
    data = build_pretrain_data(tmp_path / "txt.db", tmp_path / "img", tasks=["mlm"], max_tokens=100,
                               size_multiple=1, train=False, skip_bad_examples=True)
    with pytest.raises(DataError, match="every example"):
        data.sources["mlm"].next_batch()
