"""The VIOLIN baseline end to end: a frozen text encoder (BERT features) in front of :class:`ViolinBase`.

``ViolinBaseline(text_config, violin_config)`` holds ``text_encoder`` (never trained here: its parameters have
``requires_grad=False`` and it always runs in eval mode without gradient, as the paper's frozen BERT) and ``violin``
(the official ``ViolinBase``, keys under ``violin.``). ``forward(batch, statement='pos' | 'neg')`` takes a padded
batch dict::

    vid_feat [B, Tv, vid_feat_size] float, vid_lens [B]       (frame features, raw: L2-normalised inside)
    sub_ids [B, Ts] long, sub_lens [B]                          (all subtitle tokens of the clip, [CLS] .. [SEP])
    pos_ids [B, Tq] long, pos_lens [B]; neg_ids, neg_lens       (the entailed / contradicted statement)

and returns the pre-sigmoid score [B] of that statement (``torch.sigmoid`` gives the official probability).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .model import ViolinBase, ViolinConfig
from .text import TextEncoderConfig, ViolinTextEncoder

__all__ = ["ViolinBaseline"]


class ViolinBaseline(nn.Module):
    """Frozen text encoder + :class:`ViolinBase` (see the module docstring)."""

    def __init__(self, text_config: TextEncoderConfig, violin_config: ViolinConfig):
        super().__init__()
        if violin_config.embed_size != text_config.hidden_size:
            raise ValueError(f"fastvl.models.violin: violin_config.embed_size ({violin_config.embed_size}) must equal "
                             f"the text encoder's hidden_size ({text_config.hidden_size})")
        self.text_encoder = ViolinTextEncoder(text_config)
        self.violin = ViolinBase(violin_config)
        self.freeze_text_encoder()

    def freeze_text_encoder(self) -> None:
        """No gradient to the text encoder (the paper's frozen BERT features)."""
        for p in self.text_encoder.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> ViolinBaseline:
        super().train(mode)
        self.text_encoder.eval()  # frozen features: never dropout
        return self

    def text_features(self, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
        """[B, T] ids, [B] lengths -> frozen features [B, T, H] (no gradient)."""
        with torch.no_grad():
            return self.text_encoder(ids, lens)

    def forward(self, batch: dict[str, Any], statement: str = "pos") -> torch.Tensor:
        if statement not in ("pos", "neg"):
            raise ValueError(f"fastvl.models.violin: statement must be 'pos' or 'neg', got {statement!r}")
        for key in ("vid_feat", "vid_lens", "sub_ids", "sub_lens", f"{statement}_ids", f"{statement}_lens"):
            if key not in batch:
                raise KeyError(f"fastvl.models.violin: the batch has no {key!r} (see ViolinBaseline's docstring)")
        streams = self.violin.input_streams
        sub = (self.text_features(batch["sub_ids"], batch["sub_lens"]), batch["sub_lens"]) if "sub" in streams \
            else None
        vid = (batch["vid_feat"], batch["vid_lens"]) if "vid" in streams else None
        ids, lens = batch[f"{statement}_ids"], batch[f"{statement}_lens"]
        return self.violin(vid, sub, (self.text_features(ids, lens), lens), return_logits=True).squeeze(-1)
