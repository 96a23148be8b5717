"""Behaviour the official UNITER code gives through module walks and key rules, written out here from the official
sources and compared with fastvl: ``from_pretrained``'s key rule (gamma/beta renaming, the ``bert.`` prefix) and the
training scripts' ``set_dropout(model, p)``."""

from __future__ import annotations

import torch
from torch import nn

from fastvl.models.uniter import UniterForPretraining, UniterModel
from fastvl.models.uniter.testing import random_pretrain_batch, tiny_config

# ----------------------------------------------------------------------------------------------------------
# from_pretrained: the official key rule
# ----------------------------------------------------------------------------------------------------------


def official_loaded_keys(model: nn.Module, ckpt: dict) -> dict[str, str]:
    """model key -> checkpoint key, for every tensor the official ``from_pretrained`` copies (written out).

    Official: a key containing 'gamma' becomes key.replace('gamma', 'weight'); one containing 'beta' becomes
    key.replace('beta', 'bias') (from the original key). Then, if the model has no ``bert`` attribute and some
    renamed key starts with 'bert.', every module loads from prefix 'bert.' + its path: model tensor ``n`` reads
    key 'bert.' + n. Otherwise tensor ``n`` reads key ``n``. Keys not read are ignored.
    """
    renamed = {}
    for key in ckpt:
        new = None
        if "gamma" in key:
            new = key.replace("gamma", "weight")
        if "beta" in key:
            new = key.replace("beta", "bias")
        renamed[new or key] = key
    start = "bert." if not hasattr(model, "bert") and any(k.startswith("bert.") for k in renamed) else ""
    return {n: renamed[start + n] for n in model.state_dict() if start + n in renamed}


def _source(seed: int) -> UniterForPretraining:
    torch.manual_seed(seed)
    src = UniterForPretraining(tiny_config(), 24, 13)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p))
    return src


def _official_names(sd: dict) -> dict:
    return {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
            for k, v in sd.items()}


def test_from_pretrained_strips_bert_prefix_as_official(seed):
    """Every key prefixed 'bert.' (bert.uniter.embeddings..., bert.cls...): the official rule strips the prefix and
    loads the whole checkpoint."""
    src = _source(seed)
    ckpt = {"bert." + k: v.half() for k, v in _official_names(src.state_dict()).items()}
    torch.manual_seed(seed + 1)
    model = UniterForPretraining.from_pretrained(tiny_config(), dict(ckpt), 24, 13)
    official = official_loaded_keys(model, ckpt)
    assert set(official) == set(model.state_dict()), "the official rule loads every tensor of this checkpoint"
    for n, v in model.state_dict().items():
        torch.testing.assert_close(v, ckpt[official[n]].float(), rtol=0, atol=0, msg=n)
    assert model.loading_info == {"missing_keys": [], "unexpected_keys": []}
    # an encoder-only model with a 'bert.'-prefixed encoder checkpoint: also the official rule
    enc_ckpt = {"bert." + k: v for k, v in _official_names(src.uniter.state_dict()).items()}
    enc = UniterModel.from_pretrained(tiny_config(), enc_ckpt, 24)
    official = official_loaded_keys(enc, enc_ckpt)
    assert set(official) == set(enc.state_dict())
    for n, v in enc.state_dict().items():
        assert torch.equal(v, enc_ckpt[official[n]]), n


def test_from_pretrained_bert_init_only_where_official_loads_nothing(seed):
    """BERT-style keys (bert.embeddings..., mapped to uniter.*) load only into tensors the official rule leaves
    missing; every tensor the official rule loads has the official value."""
    src, other = _source(seed), _source(seed + 7)
    ckpt = {"bert." + k: v for k, v in _official_names(src.state_dict()).items()
            if not k.startswith("uniter.pooler.")}
    # BERT-style duplicates: one for a tensor the official rule loads (must lose), one for the pooler it misses
    ckpt["bert.embeddings.word_embeddings.weight"] = other.uniter.embeddings.word_embeddings.weight.detach()
    ckpt["bert.pooler.dense.weight"] = other.uniter.pooler.dense.weight.detach()
    model = UniterForPretraining.from_pretrained(tiny_config(), dict(ckpt), 24, 13)
    official = official_loaded_keys(model, ckpt)
    sd = model.state_dict()
    for n, key in official.items():
        assert torch.equal(sd[n], ckpt[key]), f"{n}: not the official value (from {key})"
    assert "uniter.pooler.dense.weight" not in official
    assert torch.equal(sd["uniter.pooler.dense.weight"], other.uniter.pooler.dense.weight)
    assert model.loading_info["missing_keys"] == ["uniter.pooler.dense.bias"]
    assert model.loading_info["unexpected_keys"] == ["bert.embeddings.word_embeddings.weight"]


# ----------------------------------------------------------------------------------------------------------
# set_dropout: every dropout is an nn.Dropout
# ----------------------------------------------------------------------------------------------------------


def official_set_dropout(model: nn.Module, p: float) -> None:
    """The official training scripts' set_dropout (written out): p on every nn.Dropout module."""
    for _, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.p != p:
            module.p = p


def test_official_set_dropout_controls_every_dropout(gen, seed):
    cfg = tiny_config(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.3)
    torch.manual_seed(seed)
    model = UniterModel(cfg, cfg.img_dim)
    keys = set(model.state_dict())
    batch = random_pretrain_batch("none", gen, cfg, batch=4, txt_range=(4, 12), img_range=(4, 10))
    model.eval()
    want = model.forward_packed(batch)
    model.train()
    assert not torch.equal(model.forward_packed(batch), want), "dropout 0.1 / 0.3 must change a train-mode pass"
    official_set_dropout(model, 0.0)
    model.train()
    for _ in range(2):
        torch.testing.assert_close(model.forward_packed(batch), want, rtol=0, atol=0)
    official_set_dropout(model, 0.3)  # and back: the attention dropout follows the module's p
    layer = model.encoder.layer[0].attention.self
    assert isinstance(layer.dropout, nn.Dropout) and layer.dropout_p == 0.3
    assert set(model.state_dict()) == keys
