"""HERO foundation: official state_dict keys / shapes, checkpoint loading, and the packed ``v_encoder`` 'repr'
forward against the plain padded reference on an official-format collate dict."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pad_sequence

from fastvl.models.hero import HeroForPretraining, HeroModel, VideoModelConfig
from fastvl.models.hero.reference import hero_repr_reference

H, VOCAB, VDIM, MAX_FRM, KERNEL = 16, 56, 12, 10, 5


def tiny_config() -> dict:
    """hero_finetune.json layout (vocab padded, 2 type rows; q_config: 0 layers, 1 type row), tiny sizes."""
    common = dict(attention_probs_dropout_prob=0.1, hidden_act="gelu", hidden_dropout_prob=0.1, hidden_size=H,
                  initializer_range=0.02, intermediate_size=32, max_position_embeddings=514, num_attention_heads=2)
    return {"f_config": {**common, "num_hidden_layers": 2, "type_vocab_size": 2, "vocab_size": VOCAB},
            "c_config": {**common, "num_hidden_layers": 2, "type_vocab_size": 2},
            "q_config": {**common, "num_hidden_layers": 0, "type_vocab_size": 1, "vocab_size": VOCAB}}


def _bert_layer_keys(prefix: str, h: int, inter: int) -> dict[str, tuple]:
    out = {}
    for name in ("query", "key", "value"):
        out[f"{prefix}attention.self.{name}.weight"] = (h, h)
        out[f"{prefix}attention.self.{name}.bias"] = (h,)
    out.update({f"{prefix}attention.output.dense.weight": (h, h), f"{prefix}attention.output.dense.bias": (h,),
                f"{prefix}attention.output.LayerNorm.weight": (h,), f"{prefix}attention.output.LayerNorm.bias": (h,)})
    return out


def _ffn_keys(prefix: str, h: int, inter: int) -> dict[str, tuple]:
    return {f"{prefix}intermediate.dense.weight": (inter, h), f"{prefix}intermediate.dense.bias": (inter,),
            f"{prefix}output.dense.weight": (h, inter), f"{prefix}output.dense.bias": (h,),
            f"{prefix}output.LayerNorm.weight": (h,), f"{prefix}output.LayerNorm.bias": (h,)}


def _ln(prefix: str, n: int) -> dict[str, tuple]:
    return {f"{prefix}.weight": (n,), f"{prefix}.bias": (n,)}


def official_hero_pretraining_keys(n_f: int = 2, n_c: int = 2, inter: int = 32) -> dict[str, tuple]:
    """Keys and shapes of the official HeroForPretraining state_dict (model/model.py, encoder.py, embed.py,
    layers.py, pretrain.py), written out from the official module tree for the tiny config."""
    keys: dict[str, tuple] = {"v_encoder.pad": (8, H), "v_encoder.f_encoder.pad": (8, H)}
    f = "v_encoder.f_encoder."
    for i in range(n_f):
        keys.update(_bert_layer_keys(f"{f}encoder.layer.{i}.", H, inter))
        keys.update(_ffn_keys(f"{f}encoder.layer.{i}.", H, inter))
    keys.update({f"{f}embeddings.word_embeddings.weight": (VOCAB, H),
                 f"{f}embeddings.position_embeddings.weight": (514, H),
                 f"{f}embeddings.token_type_embeddings.weight": (2, H),
                 **_ln(f"{f}embeddings.LayerNorm", H),
                 f"{f}img_embeddings.img_linear.weight": (H, VDIM), f"{f}img_embeddings.img_linear.bias": (H,),
                 **_ln(f"{f}img_embeddings.img_LayerNorm", VDIM),
                 f"{f}img_embeddings.position_embeddings.weight": (MAX_FRM, H),
                 f"{f}img_embeddings.mask_embedding.weight": (2, VDIM),
                 **_ln(f"{f}img_embeddings.LayerNorm", H),
                 f"{f}pooler.dense.weight": (H, H), f"{f}pooler.dense.bias": (H,),
                 f"{f}lm_head.dense.weight": (H, H), f"{f}lm_head.dense.bias": (H,), **_ln(f"{f}lm_head.LayerNorm", H),
                 f"{f}lm_head.decoder.weight": (VOCAB, H), f"{f}lm_head.bias": (VOCAB,)})
    v = "v_encoder."
    keys.update({**_ln(f"{v}frame_transform.LayerNorm", VDIM), f"{v}frame_transform.net.1.weight": (H, VDIM),
                 f"{v}frame_transform.net.1.bias": (H,),
                 f"{v}c_encoder.embeddings.position_embeddings.weight": (514, H),
                 **_ln(f"{v}c_encoder.embeddings.LayerNorm", H),
                 f"{v}c_encoder.pooler.dense.weight": (H, H), f"{v}c_encoder.pooler.dense.bias": (H,),
                 f"{v}feat_regress.net.0.weight": (H, H), f"{v}feat_regress.net.0.bias": (H,),
                 **_ln(f"{v}feat_regress.net.2", H), f"{v}feat_regress.net.3.weight": (VDIM, H),
                 f"{v}feat_regress.net.3.bias": (VDIM,), f"{v}mask_embedding.weight": (2, VDIM),
                 f"{v}fom_output.linear_1.weight": (2 * H, H), f"{v}fom_output.linear_1.bias": (2 * H,),
                 **_ln(f"{v}fom_output.LayerNorm", 2 * H), f"{v}fom_output.linear_2.weight": (100, 2 * H),
                 f"{v}fom_output.linear_2.bias": (100,)})
    for i in range(n_c):
        keys.update(_bert_layer_keys(f"{v}c_encoder.encoder.layer.{i}.", H, inter))
        keys.update(_ffn_keys(f"{v}c_encoder.encoder.layer.{i}.", H, inter))
    q = "q_feat_attn."
    keys.update({"video_query_linear.weight": (H, H), "video_query_linear.bias": (H,),
                 "video_st_predictor.weight": (1, 1, KERNEL), "video_ed_predictor.weight": (1, 1, KERNEL),
                 **_ln(f"{q}query_input_proj.LayerNorm", H), f"{q}query_input_proj.net.1.weight": (H, H),
                 f"{q}query_input_proj.net.1.bias": (H,), f"{q}query_pos_embed.position_embeddings.weight": (514, H),
                 **_ln(f"{q}query_pos_embed.LayerNorm", H), f"{q}modular_vector_mapping.weight": (1, H),
                 **_bert_layer_keys(f"{q}query_self_attention.", H, inter)})
    return {k.replace("query_self_attention.attention.", "query_self_attention."): s for k, s in keys.items()}


def official_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """A random official-structure checkpoint (decoder tied: the same tensor as the word embeddings)."""
    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(*s, generator=g).mul(0.2).to(dtype) for k, s in official_hero_pretraining_keys().items()}
    for k in sd:
        if k.endswith("LayerNorm.weight"):
            sd[k] = (1 + sd[k]).to(dtype)
        if k.endswith(".pad"):
            sd[k] = torch.zeros_like(sd[k])
    sd["v_encoder.f_encoder.lm_head.decoder.weight"] = sd["v_encoder.f_encoder.embeddings.word_embeddings.weight"]
    return sd


def official_video_collate(videos: list) -> dict:
    """The official data/data.py VideoFeatSubTokDataset.__getitem__ + video_collate, for in-memory videos.

    videos: list of (v_feat [nf, D], [(sub input ids, matched frame indices), ...]).
    """
    ids_l, feats_l, attn_l, txt_lens, v_lens, c_feats, num_subs, sub2frames = [], [], [], [], [], [], [], []
    for v_feat, subs in videos:
        for sub_ids, frames in subs:
            ids = torch.tensor([2] + list(sub_ids))  # [</s>] + ids
            if frames:
                fv = v_feat[torch.tensor(frames)]
                attn = [1] * (len(ids) + len(frames))
            else:
                fv = torch.zeros(1, v_feat.shape[1], dtype=v_feat.dtype)
                attn = [0] + [1] * len(ids)
            ids_l.append(ids)
            feats_l.append(fv)
            attn_l.append(torch.tensor(attn))
            txt_lens.append(len(ids))
            v_lens.append(fv.shape[0])
        c_feats.append(v_feat)
        num_subs.append(len(subs))
        sub2frames.append([(i, fr) for i, (_, fr) in enumerate(subs)])
    f_ids = pad_sequence(ids_l, batch_first=True, padding_value=1)
    f_pos = torch.arange(f_ids.shape[1]).unsqueeze(0).clamp(max=511)
    f_attn = pad_sequence(attn_l, batch_first=True, padding_value=0)
    f_feats = pad_sequence(feats_l, batch_first=True)
    n_seg, max_vl = f_feats.shape[:2]
    gather = torch.arange(f_attn.shape[1]).unsqueeze(0).repeat(n_seg, 1)
    for i, (tl, nv) in enumerate(zip(txt_lens, v_lens)):
        gather[i, nv:nv + tl] = torch.arange(max_vl, max_vl + tl)
    return {"f_sub_input_ids": f_ids, "f_sub_pos_ids": f_pos, "f_v_feats": f_feats,
            "f_v_pos_ids": torch.arange(max_vl).unsqueeze(0), "f_attn_masks": f_attn, "f_gather_index": gather,
            "f_sub_input_attn_masks": pad_sequence([torch.ones(t, dtype=torch.long) for t in txt_lens],
                                                   batch_first=True),
            "c_v_feats": pad_sequence(c_feats, batch_first=True),
            "c_attn_masks": pad_sequence([torch.ones(len(c), dtype=torch.long) for c in c_feats], batch_first=True),
            "num_subs": num_subs, "sub_idx2frame_idx": sub2frames}


def make_batch(dtype: torch.dtype = torch.float64, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)

    def feats(n: int) -> torch.Tensor:
        return torch.randn(n, VDIM, generator=g, dtype=dtype)

    videos = [
        (feats(7), [([5, 9, 11], [0, 1]), ([7, 8], [2, 3, 4]), ([20, 21, 22, 23, 24], [])]),  # frames 5, 6 unmatched
        (feats(4), [([30], [0, 1, 2, 3])]),
        (feats(6), [([40, 41], [1]), ([], [2, 3]), ([42, 43, 44, 45], [5])]),  # an empty subtitle text
    ]
    return official_video_collate(videos)


@pytest.fixture(scope="module")
def cfg() -> VideoModelConfig:
    return VideoModelConfig(tiny_config())


def test_config_blocks_and_official_file(cfg):
    assert cfg.f_config.hidden_size == H and cfg.c_config.num_hidden_layers == 2 and cfg.q_config.type_vocab_size == 1
    assert cfg.f_config.layer_norm_eps == 1e-12 and cfg.c_config.vocab_size == -1
    with pytest.raises(ValueError, match="c_config"):
        VideoModelConfig({"f_config": tiny_config()["f_config"]})


def test_state_dict_keys_and_shapes_equal_official(cfg):
    model = HeroForPretraining(cfg, VDIM, MAX_FRM)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_hero_pretraining_keys()
    enc = model.v_encoder.f_encoder
    assert enc.lm_head.decoder.weight is enc.embeddings.word_embeddings.weight
    assert float(model.v_encoder.pad.abs().sum()) == 0 and float(enc.pad.abs().sum()) == 0
    # HeroModel holds exactly the v_encoder part
    base = {k for k in HeroModel(cfg, VDIM, MAX_FRM).state_dict()}
    assert base == {k for k in got if k.startswith("v_encoder.")}


def test_strict_load_of_official_structure(cfg):
    sd = official_state_dict()
    model = HeroForPretraining(cfg, VDIM, MAX_FRM)
    model.load_state_dict(sd, strict=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0, msg=k)
    extra = dict(sd, **{"v_encoder.not_official.weight": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="not_official"):
        model.load_state_dict(extra, strict=True)


def test_from_pretrained_fp16_and_vocab_padded(cfg, tmp_path):
    sd = official_state_dict(seed=3, dtype=torch.float16)
    sd["vocab_padded"] = True
    path = tmp_path / "hero.json"
    path.write_text(__import__("json").dumps(tiny_config()))
    model = HeroForPretraining.from_pretrained(str(path), sd, vfeat_dim=VDIM, max_frm_seq_len=MAX_FRM, lw_st_ed=0.5)
    assert model.lw_st_ed == 0.5
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32, k
        torch.testing.assert_close(v, sd[k].float(), rtol=0, atol=0, msg=k)
    emb = model.v_encoder.f_encoder.embeddings.word_embeddings.weight
    assert model.v_encoder.f_encoder.lm_head.decoder.weight is emb
    missing = {k: v for k, v in sd.items() if k != "video_query_linear.bias"}
    with pytest.raises(RuntimeError, match="video_query_linear.bias"):
        HeroForPretraining.from_pretrained(tiny_config(), missing, vfeat_dim=VDIM, max_frm_seq_len=MAX_FRM)


def _loaded_model(cfg, dtype=torch.float64) -> HeroForPretraining:
    model = HeroForPretraining(cfg, VDIM, MAX_FRM)
    model.load_state_dict(official_state_dict(seed=5))
    return model.to(dtype).eval()


def test_v_encoder_repr_matches_padded_reference(cfg):
    model = _loaded_model(cfg)
    batch = make_batch()
    with torch.no_grad():
        out = model.v_encoder(batch, "repr")
        ref = hero_repr_reference(model.v_encoder, batch)
    assert out.shape == (3, 7, H)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_reference_segment_tokens_reach_their_frames_only(cfg):
    """The fusion is real: changing the text of video 0's first subtitle changes video 0, never video 1 or 2."""
    model = _loaded_model(cfg)
    batch = make_batch()
    other = make_batch()
    other["f_sub_input_ids"] = other["f_sub_input_ids"].clone()
    other["f_sub_input_ids"][0, 1] = 17
    with torch.no_grad():
        a, b = model.v_encoder(batch, "repr"), model.v_encoder(other, "repr")
        ra = hero_repr_reference(model.v_encoder, other)
    assert (a[0] - b[0]).abs().max() > 1e-3
    torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=0)
    torch.testing.assert_close(b, ra, rtol=1e-10, atol=1e-10)


def test_v_encoder_gradients_flow_fp32(cfg):
    model = _loaded_model(cfg, torch.float32).train()
    batch = make_batch(torch.float32)
    out = model.v_encoder(batch, "repr")
    out.square().mean().backward()
    enc = model.v_encoder
    assert enc.f_encoder.img_embeddings.img_linear.weight.grad.abs().sum() > 0
    assert enc.f_encoder.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert enc.c_encoder.encoder.layer[0].attention.self.key.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("key", ["f_v_feats", "c_v_feats"])
def test_wrong_frame_feature_dim_names_the_argument(cfg, key):
    model = _loaded_model(cfg)
    batch = make_batch()
    batch[key] = torch.zeros(*batch[key].shape[:-1], VDIM + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=key):
        model.v_encoder(batch, "repr")


def test_inconsistent_subtitle_map_and_unknown_task(cfg):
    model = _loaded_model(cfg)
    batch = make_batch()
    batch["sub_idx2frame_idx"][1] = [(0, [0, 1, 2, 3, 4])]  # more frames than its segment holds
    with pytest.raises(ValueError, match="sub_idx2frame_idx"):
        model.v_encoder(batch, "repr")
    with pytest.raises(ValueError, match="task"):
        model.v_encoder(make_batch(), "fom")
