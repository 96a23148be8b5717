"""The VIOLIN baseline's text encoder: a BERT (``BertModel`` keys: ``embeddings.*``, ``encoder.layer.N.*``) run
without gradient, whose token outputs are the statement / subtitle features.

The paper uses frozen BERT-base. Its weights cannot be bundled, so :func:`load_bert_state_dict` reads a user's BERT
state_dict file (HuggingFace ``pytorch_model.bin`` / ``.safetensors``, with or without the ``bert.`` prefix, old
``gamma`` / ``beta`` names accepted; MLM / pooler / NSP heads ignored); without one, a recipe pre-trains a small
encoder of this class on its own corpus (masked language modelling with :class:`TextMlmHead`) and freezes it.
Layers run packed (``fastvl.nn.BertLayer``: no FLOP on padding).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ...nn import BertLayer, BertOnlyMLMHead

__all__ = ["TextEncoderConfig", "TextMlmHead", "ViolinTextEncoder", "load_bert_state_dict"]


@dataclass
class TextEncoderConfig:
    """A BERT config (the official ``config.json`` keys). Defaults: bert-base-uncased."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02

    @classmethod
    def from_json_file(cls, path: str | Path) -> TextEncoderConfig:
        """Read a BERT ``config.json`` (unknown keys ignored)."""
        raw = json.loads(Path(path).read_text())
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in raw.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)


class _Embeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)


class _Encoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg) for _ in range(cfg.num_hidden_layers)])


class ViolinTextEncoder(nn.Module):
    """BERT token features on padded ids.

    forward(input_ids [B, L] long, lengths [B] (each >= 1)) -> [B, L, H] (rows past a length are 0).
    """

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Encoder(config)
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            m.weight.data.normal_(0.0, self.config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            m.bias.data.zero_()

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | Sequence[int]) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"fastvl.models.violin: input_ids must be [B, L], got {tuple(input_ids.shape)}")
        b, width = input_ids.shape
        lens = torch.as_tensor(lengths).reshape(-1).to("cpu", torch.long)
        if lens.numel() != b or (b and (int(lens.min()) < 1 or int(lens.max()) > width)):
            raise ValueError(f"fastvl.models.violin: text lengths must be {b} values in [1, {width}], got "
                             f"{lens.tolist()}")
        if width > self.config.max_position_embeddings:
            raise ValueError(f"fastvl.models.violin: text of {width} tokens exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        dev = input_ids.device
        valid = torch.arange(width, device=dev)[None, :] < lens.to(dev)[:, None]
        flat = valid.reshape(-1).nonzero().squeeze(1)  # packed rows in [B * L]
        pos = torch.arange(width, device=dev).expand(b, width).reshape(-1)[flat]
        e = self.embeddings
        ids = input_ids.reshape(-1)[flat]
        h = e.word_embeddings(ids) + e.position_embeddings(pos) + e.token_type_embeddings(torch.zeros_like(ids))
        h = e.dropout(e.LayerNorm(h))
        cu = torch.zeros(b + 1, dtype=torch.int32, device=dev)
        cu[1:] = torch.cumsum(lens, 0).to(dev, torch.int32)
        max_len = int(lens.max()) if b else 0
        for layer in self.encoder.layer:
            h = layer(h, cu, max_len)
        out = h.new_zeros(b * width, h.shape[-1]).index_copy(0, flat, h)
        return out.view(b, width, -1)


class TextMlmHead(nn.Module):
    """Masked-LM head on the encoder's word table (``cls.predictions.*``); used to pre-train a small encoder."""

    def __init__(self, encoder: ViolinTextEncoder):
        super().__init__()
        c = encoder.config
        self.cls = BertOnlyMLMHead(c.hidden_size, c.hidden_act, encoder.embeddings.word_embeddings.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, H] -> vocabulary scores [n, V]."""
        return self.cls(hidden)


def load_bert_state_dict(encoder: ViolinTextEncoder, path: str | Path) -> list[str]:
    """Load a BERT state_dict file into ``encoder``; returns the ignored keys (heads, pooler, position ids).

    Raises ValueError naming the file and the keys when an encoder weight is missing or has another shape.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"fastvl.models.violin: BERT state_dict file {p} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p))
    else:
        state = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"fastvl.models.violin: {p} is not a state_dict (name -> tensor)")
    clean, ignored = {}, []
    own = encoder.state_dict()
    for key, value in state.items():
        k = key[5:] if key.startswith("bert.") else key
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if k in own and isinstance(value, torch.Tensor):
            clean[k] = value.float() if value.is_floating_point() else value
        else:
            ignored.append(key)
    missing = sorted(set(own) - set(clean))
    if missing:
        raise ValueError(f"fastvl.models.violin: BERT state_dict {p} lacks {len(missing)} encoder weight(s), e.g. "
                         f"{missing[:3]} (the text encoder config must match the checkpoint)")
    wrong = [f"{k}: {tuple(clean[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if clean[k].shape != v.shape]
    if wrong:
        raise ValueError(f"fastvl.models.violin: BERT state_dict {p} has other shapes than the config: {wrong[:3]}")
    encoder.load_state_dict(clean, strict=True)
    return ignored
