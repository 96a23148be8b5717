"""HERO fine-tuning heads: official state_dict keys (written out), strict loads of official-structure checkpoints
(fp16 -> fp32, 'vocab_padded' skipped), and outputs + gradients against the official formulas
(fastvl.models.hero.reference) on official-format collate dicts (video_qa_collate, violin_collate, the TVC
collate, vcmr_collate), in train (dropout 0) and eval mode; TVC decoding; bad input."""

from __future__ import annotations

import pytest
import torch
from test_hero_model import MAX_FRM, VDIM, VOCAB, H, official_hero_pretraining_keys, official_video_collate, tiny_config
from test_hero_tasks import _compare
from test_hero_vsm import make_vsm_batch
from torch.nn.utils.rnn import pad_sequence

from fastvl.models.hero import (
    HeroForTvc,
    HeroForVcmr,
    HeroForVideoQA,
    HeroForViolin,
    TvcGenerator,
    VideoModelConfig,
)
from fastvl.models.hero.reference import tvc_reference, video_qa_reference, violin_reference, vsm_reference

N_ANS = 5


def _mlp_keys(prefix: str, out: int) -> dict[str, tuple]:
    return {f"{prefix}.linear_1.weight": (2 * H, H), f"{prefix}.linear_1.bias": (2 * H,),
            f"{prefix}.LayerNorm.weight": (2 * H,), f"{prefix}.LayerNorm.bias": (2 * H,),
            f"{prefix}.linear_2.weight": (out, 2 * H), f"{prefix}.linear_2.bias": (out,)}


def official_head_keys(cls_name: str) -> dict[str, tuple]:
    """Keys and shapes of the official heads beyond ``v_encoder.*`` (model/videoQA.py, violin.py, tvc.py)."""
    if cls_name == "HeroForVideoQA":
        return {"qa_pool.weight": (1, H), **_mlp_keys("qa_pred_head", 1), "st_ed_pool.weight": (1, H),
                **_mlp_keys("st_ed_pred_head", 2)}
    if cls_name == "HeroForViolin":
        return {"violin_pool.weight": (1, H), **_mlp_keys("violin_pred_head", 1)}
    keys = {"position_embeddings.weight": (514, H), "emb_LayerNorm.weight": (H,), "emb_LayerNorm.bias": (H,),
            "decoder.tri_mask": (1024, 1024), "loss_func.one_hot": (1, VOCAB)}
    for i in range(2):
        p = f"decoder.layer.{i}."
        for att in ("self_attention", "dec_enc_attention"):
            for w in ("query", "key", "value"):
                keys.update({f"{p}{att}.{w}.weight": (H, H), f"{p}{att}.{w}.bias": (H,)})
        for norm in ("add_norm_1", "add_norm_2"):
            keys.update({f"{p}{norm}.dense.weight": (H, H), f"{p}{norm}.dense.bias": (H,),
                         f"{p}{norm}.LayerNorm.weight": (H,), f"{p}{norm}.LayerNorm.bias": (H,)})
        keys.update({f"{p}intermidiate.dense.weight": (32, H), f"{p}intermidiate.dense.bias": (32,),
                     f"{p}add_norm_3.dense.weight": (H, 32), f"{p}add_norm_3.dense.bias": (H,),
                     f"{p}add_norm_3.LayerNorm.weight": (H,), f"{p}add_norm_3.LayerNorm.bias": (H,)})
    return keys


def _config(train: bool) -> dict:
    raw = tiny_config()
    raw["d_config"] = {**raw["c_config"], "num_hidden_layers": 2}
    if train:  # dropout 0 so the train-mode forward is deterministic
        for block in raw.values():
            block["hidden_dropout_prob"] = block["attention_probs_dropout_prob"] = 0.0
    return raw


def official_state_dict(cls_name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """A random official-structure checkpoint of that class (decoder tied, pads zero, buffers as official)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: s for k, s in official_hero_pretraining_keys().items() if k.startswith("v_encoder.")}
    shapes.update(official_head_keys(cls_name))
    sd = {k: torch.randn(*s, generator=g).mul(0.2).to(dtype) for k, s in shapes.items()}
    for k in sd:
        if k.endswith("LayerNorm.weight"):
            sd[k] = (1 + sd[k]).to(dtype)
        if k.endswith(".pad"):
            sd[k] = torch.zeros_like(sd[k])
    sd["v_encoder.f_encoder.lm_head.decoder.weight"] = sd["v_encoder.f_encoder.embeddings.word_embeddings.weight"]
    if cls_name == "HeroForTvc":
        sd["decoder.tri_mask"] = ((1.0 - torch.tril(torch.ones(1024, 1024))) * -10000.0).to(dtype)
        sd["loss_func.one_hot"] = torch.full((1, VOCAB), 0.1 / (VOCAB - 1)).to(dtype)
    return sd


CLASSES = {"HeroForVideoQA": HeroForVideoQA, "HeroForViolin": HeroForViolin, "HeroForTvc": HeroForTvc}


def _model(cls_name: str, train: bool, **kw) -> torch.nn.Module:
    model = CLASSES[cls_name](VideoModelConfig(_config(train)), VDIM, MAX_FRM, **kw)
    model.load_state_dict(official_state_dict(cls_name, seed=5))
    return model.train(train)


MODES = [pytest.param(False, id="eval"), pytest.param(True, id="train")]
LOSS = [pytest.param(True, id="loss"), pytest.param(False, id="scores")]


# ------------------------------------------------------------------------------------------------------------
# official-format batches
# ------------------------------------------------------------------------------------------------------------


def _videos(g: torch.Generator) -> list:
    """One video with an unmatched frame, a subtitle without frames and an empty subtitle; a one-frame video;
    a video with only empty pseudo-subtitles."""
    def feats(n: int) -> torch.Tensor:
        return torch.randn(n, VDIM, generator=g)

    return [(feats(6), [([5, 9], [0, 1]), ([], [2, 3]), ([7, 8, 11], []), ([12], [5])]),
            (feats(1), [([30, 31], [0])]),
            (feats(8), [([], [0, 1, 2, 3, 4]), ([], [5, 6, 7])])]


def video_qa_collate(seed: int) -> dict:
    """Official data/videoQA.py: every (question, answer) pair is a video row whose segments end with
    ``[</s>] q [</s>] a``; qa_input_ids the same text; targets [Nq, 1], ts_targets [Nq, 2]."""
    g = torch.Generator().manual_seed(seed)
    videos = _videos(g)
    questions = [(0, [40, 41], 2, (1, 3)), (1, [42], 0, (0, 0)), (2, [43, 44, 45], 4, None), (0, [46], -1, (4, 5))]
    rows, qa_ids = [], []
    for vid, q, _, _ in questions:
        feats, subs = videos[vid]
        for a in range(N_ANS):
            ans = [int(t) for t in torch.randint(3, VOCAB, (1 + a % 3,), generator=g)]
            extra = [2] + q + [2] + ans
            rows.append((feats, [(ids + extra, frames) for ids, frames in subs]))
            qa_ids.append(torch.tensor(extra))
    batch = official_video_collate(rows)
    ids = pad_sequence(qa_ids, batch_first=True, padding_value=1)
    batch.update({"qa_input_ids": ids, "qa_pos_ids": torch.arange(ids.shape[1]).unsqueeze(0),
                  "qa_attn_masks": pad_sequence([torch.ones(len(t), dtype=torch.long) for t in qa_ids],
                                                batch_first=True),
                  "targets": torch.tensor([[t] for _, _, t, _ in questions]),
                  "ts_targets": torch.tensor([list(ts) if ts else [-1, -1] for _, _, _, ts in questions])})
    return batch


def violin_collate(seed: int) -> dict:
    """Official data/violin.py: the statement ``[</s>] + ids`` appended to every segment; targets [N, 1]."""
    g = torch.Generator().manual_seed(seed)
    videos = _videos(g)
    statements = [(0, [50, 51, 52], 1), (0, [53], 0), (1, [54, 55], 1), (2, [49], 0)]
    rows, s_ids = [], []
    for vid, s, _ in statements:
        feats, subs = videos[vid]
        rows.append((feats, [(ids + [2] + s, frames) for ids, frames in subs]))
        s_ids.append(torch.tensor([2] + s))
    batch = official_video_collate(rows)
    ids = pad_sequence(s_ids, batch_first=True, padding_value=1)
    batch.update({"q_input_ids": ids, "q_pos_ids": torch.arange(ids.shape[1]).unsqueeze(0),
                  "q_attn_masks": pad_sequence([torch.ones(len(t), dtype=torch.long) for t in s_ids],
                                               batch_first=True),
                  "targets": torch.tensor([[t] for _, _, t in statements])})
    return batch


def tvc_collate(seed: int) -> dict:
    """Official data/tvc.py TvcTrainDataset.collate: input [BOS] + cap, target cap + [EOS] (pad 1 / -1),
    cap_attn_mask ones(ed - st), clip_ranges per video."""
    g = torch.Generator().manual_seed(seed)
    videos = _videos(g)
    ranges = [[(0, 4), (3, 6)], [(0, 1)], [(2, 7)]]
    ins, tgts, masks = [], [], []
    for segs in ranges:
        for st, ed in segs:
            cap = [int(t) for t in torch.randint(3, VOCAB, (int(torch.randint(1, 5, (1,), generator=g)),),
                                                 generator=g)]
            ins.append(torch.tensor([0] + cap))
            tgts.append(torch.tensor(cap + [2]))
            masks.append(torch.ones(ed - st, dtype=torch.long))
    batch = official_video_collate(videos)
    ids = pad_sequence(ins, batch_first=True, padding_value=1)
    batch.update({"cap_input_ids": ids, "cap_pos_ids": torch.arange(ids.shape[1]).unsqueeze(0),
                  "cap_tgt_ids": pad_sequence(tgts, batch_first=True, padding_value=-1),
                  "cap_attn_mask": pad_sequence(masks, batch_first=True), "clip_ranges": tuple(map(tuple, ranges))})
    return batch


# ------------------------------------------------------------------------------------------------------------
# keys and loading
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls_name", list(CLASSES))
def test_state_dict_keys_equal_official(cls_name):
    model = _model(cls_name, False)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {k: s for k, s in official_hero_pretraining_keys().items() if k.startswith("v_encoder.")}
    expected.update(official_head_keys(cls_name))
    assert got == expected


def test_vcmr_has_pretraining_keys():
    model = HeroForVcmr(VideoModelConfig(tiny_config()), VDIM, MAX_FRM)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == official_hero_pretraining_keys()


@pytest.mark.parametrize("cls_name", list(CLASSES))
def test_from_pretrained_strict_fp16_vocab_padded(cls_name, tmp_path):
    sd = official_state_dict(cls_name, seed=3, dtype=torch.float16)
    sd["vocab_padded"] = True
    path = tmp_path / "hero.json"
    path.write_text(__import__("json").dumps(_config(False)))
    model = CLASSES[cls_name].from_pretrained(str(path), sd, vfeat_dim=VDIM, max_frm_seq_len=MAX_FRM)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32, k
        torch.testing.assert_close(v, sd[k].float(), rtol=0, atol=0, msg=k)
    head = next(iter(official_head_keys(cls_name)))
    missing = {k: v for k, v in sd.items() if k != head}
    with pytest.raises(RuntimeError, match=head.replace(".", r"\.")):
        CLASSES[cls_name].from_pretrained(str(path), missing, vfeat_dim=VDIM, max_frm_seq_len=MAX_FRM)


# ------------------------------------------------------------------------------------------------------------
# outputs and gradients against the official formulas
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compute_loss", LOSS)
@pytest.mark.parametrize("train", MODES)
def test_video_qa_matches_official(train, compute_loss, seed):
    model = _model("HeroForVideoQA", train)
    batch = video_qa_collate(seed)
    out, grads = _compare(model, batch, ("c_v_feats", "f_v_feats"), lambda b: model(b, "tvqa", compute_loss),
                          lambda b: video_qa_reference(model, b, compute_loss))
    if compute_loss:
        assert out[0].shape == () and out[1].shape == ()
        assert grads["st_ed_pred_head.linear_2.weight"].abs().sum() > 0
    else:
        assert out[0].shape == (4, N_ANS)
    assert grads["qa_pred_head.linear_2.weight"].abs().sum() > 0
    assert grads["v_encoder.f_encoder.embeddings.word_embeddings.weight"].abs().sum() > 0


@pytest.mark.parametrize("compute_loss", LOSS)
@pytest.mark.parametrize("train", MODES)
def test_violin_matches_official(train, compute_loss, seed):
    model = _model("HeroForViolin", train)
    batch = violin_collate(seed)
    out, grads = _compare(model, batch, ("c_v_feats", "f_v_feats"), lambda b: model(b, "violin", compute_loss),
                          lambda b: violin_reference(model, b, compute_loss))
    assert out[0].shape == (() if compute_loss else (4, 1))
    assert grads["violin_pool.weight"].abs().sum() > 0


@pytest.mark.parametrize("lsr", [pytest.param(0.1, id="lsr0.1"), pytest.param(0.0, id="ce")])
@pytest.mark.parametrize("compute_loss", LOSS)
@pytest.mark.parametrize("train", MODES)
def test_tvc_matches_official(train, compute_loss, lsr, seed):
    model = _model("HeroForTvc", train, lsr=lsr) if lsr else None
    if model is None:
        model = HeroForTvc(VideoModelConfig(_config(train)), VDIM, MAX_FRM, lsr=0.0)
        sd = official_state_dict("HeroForTvc", seed=5)
        del sd["loss_func.one_hot"]
        model.load_state_dict(sd)
        model.train(train)
    batch = tvc_collate(seed)
    out, grads = _compare(model, batch, ("c_v_feats", "f_v_feats"), lambda b: model(b, compute_loss=compute_loss),
                          lambda b: tvc_reference(model, b, compute_loss))
    n_valid = int((batch["cap_tgt_ids"] != -1).sum())
    if compute_loss:
        assert out[0].shape == ((n_valid,) if lsr else (batch["cap_tgt_ids"].numel(),))
    else:
        assert out[0].shape == (*batch["cap_input_ids"].shape, VOCAB)
    assert grads["decoder.layer.1.dec_enc_attention.key.weight"].abs().sum() > 0


def test_vcmr_is_vsm_on_vcmr_collate(seed):
    model = HeroForVcmr(VideoModelConfig(tiny_config()), VDIM, MAX_FRM, lw_neg_ctx=1.0, lw_neg_q=1.0)
    model.load_state_dict({k: v for k, v in official_state_dict("HeroForViolin", seed=5).items()
                           if k.startswith("v_encoder.")}, strict=False)
    model.eval()
    batch = make_vsm_batch(seed)
    with torch.no_grad():
        out = model(batch, "tvr")
        ref = vsm_reference(model, batch)
        for a, b in zip(out, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        frames = model.v_encoder(batch, "repr")
        scores, st, ed = model.get_pred_from_raw_query(frames, batch["c_attn_masks"], batch["query_input_ids"],
                                                       batch["query_pos_ids"], batch["query_attn_masks"], cross=True)
        ref_scores, ref_st, ref_ed = vsm_reference(model, batch, compute_loss=False)
    for a, b in ((scores, ref_scores), (st, ref_st), (ed, ref_ed)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="task"):
        model(batch, "vsm")


# ------------------------------------------------------------------------------------------------------------
# decoding
# ------------------------------------------------------------------------------------------------------------


def test_tvc_greedy_is_the_official_greedy_and_beam_one_agrees(seed):
    model = _model("HeroForTvc", False)
    batch = tvc_collate(seed)
    steps = 5
    gen = TvcGenerator(model, max_step=steps, bos=0, eos=-7)  # an eos never produced: nothing is cut
    out = gen.greedy_decode(batch)
    assert len(out) == 4 and all(len(o) == steps for o in out)
    # the official loop: feed [BOS] + its own argmax outputs; every position's argmax is the next token
    ids = torch.tensor([[0] + o[:-1] for o in out])
    with torch.no_grad():
        scores = tvc_reference(model, dict(batch, cap_input_ids=ids, cap_pos_ids=torch.arange(steps)[None]), False)
    assert scores.argmax(-1).tolist() == out
    beam = TvcGenerator(model, max_step=steps, bos=0, eos=-7).beam_search(batch, beam_size=1)
    assert beam == out
    wide = TvcGenerator(model, max_step=steps, bos=0, eos=out[0][2]).beam_search(batch, beam_size=3)
    assert len(wide) == 4 and all(isinstance(t, int) for seq in wide for t in seq)
    eos = out[0][2]
    assert TvcGenerator(model, max_step=steps, bos=0, eos=eos).greedy_decode(batch)[0] == out[0][:out[0].index(eos)]


# ------------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------------


def test_video_qa_bad_input_names_the_key():
    model = _model("HeroForVideoQA", False)
    batch = video_qa_collate(1)
    batch["f_v_feats"] = torch.zeros(*batch["f_v_feats"].shape[:2], VDIM - 1)
    with pytest.raises(ValueError, match="f_v_feats"):
        model(batch, "tvqa")
    batch = video_qa_collate(1)
    batch["ts_targets"] = batch["ts_targets"].clone()
    batch["ts_targets"][1] = torch.tensor([0, 1])  # question 1 is on the one-frame video
    with pytest.raises(ValueError, match="ts_targets"):
        model(batch, "tvqa")
    batch = video_qa_collate(1)
    del batch["qa_input_ids"]
    with pytest.raises(KeyError, match="qa_input_ids"):
        model(batch, "tvqa")


def test_tvc_clip_range_outside_the_video_and_mask_mismatch():
    model = _model("HeroForTvc", False)
    batch = tvc_collate(1)
    batch["clip_ranges"] = (((0, 4), (3, 6)), ((0, 2),), ((2, 7),))  # video 1 has one frame
    with pytest.raises(ValueError, match="clip_ranges"):
        model(batch)
    batch = tvc_collate(1)
    batch["cap_attn_mask"] = torch.ones_like(batch["cap_attn_mask"])
    with pytest.raises(ValueError, match="cap_attn_mask"):
        model(batch)
    with pytest.raises(ValueError, match="d_config"):
        HeroForTvc(VideoModelConfig(tiny_config()), VDIM, MAX_FRM)
