"""Every layer's attention probabilities and hidden states of a model, in the official padded order, for probing.

:func:`probe_forward` runs a UNITER encoder layer by layer on the packed layout (the same embeddings and layers as
its ``forward``) with the attention op's ``return_probs`` path, and scatters the per-example probabilities back to
the official gathered order (text then regions, width of ``attn_masks``). The model is put in eval mode for the
pass and restored module by module afterwards; no hook is installed, no weight changes.

:func:`write_maps` streams the maps of a whole dataset to disk (one shard per batch, each example cut to its own
length) and :func:`read_maps` reads them back one example at a time, so a dataset never sits in memory at once.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..models.uniter import UniterModel, layout_from_official
from ..ops import cross_modal_attention, unpack

__all__ = ["ProbeOutputs", "attention_maps", "encoder_of", "eval_mode", "hidden_states", "probe_forward",
           "read_maps", "uniter_example_maps", "write_maps"]

#: keys of the official collate dict that the probes read (any other key is ignored)
BATCH_KEYS = ("input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks", "gather_index")


@dataclass
class ProbeOutputs:
    """Per-layer views of one official batch.

    attentions: [layers, B, heads, L, L] (L = ``attn_masks`` width; row q of example i sums to 1 over its
        ``txt_lens[i] + img_lens[i]`` valid keys; 0 at padding rows and columns).
    hidden_states: [layers + 1, B, L, H] (index 0: the joint embeddings; 0 at padding).
    txt_lens, img_lens: per-example Python ints (text includes [CLS] and [SEP]).
    """

    attentions: torch.Tensor
    hidden_states: torch.Tensor
    txt_lens: list[int]
    img_lens: list[int]


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode inside the block; every module's own ``training`` flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def encoder_of(model: nn.Module) -> UniterModel:
    """The UniterModel inside ``model`` (itself, or its ``uniter`` attribute as every UNITER head model has)."""
    enc = getattr(model, "uniter", model)
    if not isinstance(enc, UniterModel):
        raise TypeError(f"fastvl.probe: argument 'model' must be a UniterModel or a model with a 'uniter' "
                        f"UniterModel (UniterForPretraining, ...), got {type(model).__name__}")
    return enc


def _check_batch(batch: Mapping) -> None:
    if not isinstance(batch, Mapping):
        raise TypeError(f"fastvl.probe: argument 'batch' must be the official collate dict, got {type(batch).__name__}")
    missing = [k for k in BATCH_KEYS if batch.get(k) is None]
    if missing:
        raise ValueError(f"fastvl.probe: argument 'batch' lacks {missing} (the official dict has {list(BATCH_KEYS)})")


@torch.no_grad()
def probe_forward(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> ProbeOutputs:
    """Attention probabilities and hidden states of every layer of a UNITER model on an official padded batch.

    Args:
        model: a UniterModel or a model holding one as ``.uniter``.
        batch: the official collate dict: input_ids [B, Lt], position_ids [1 or B, Lt], img_feat [B, Li, D],
            img_pos_feat [B, Li, 7], attn_masks [B, L], gather_index [B, L] (optional txt_type_ids / img_type_ids;
            any other key is ignored).
    Returns:
        :class:`ProbeOutputs`. The model's modes, weights and hooks are as before the call.
    """
    enc = encoder_of(model)
    _check_batch(batch)
    ids, pos, feat, box = batch["input_ids"], batch["position_ids"], batch["img_feat"], batch["img_pos_feat"]
    attn_masks, gather = batch["attn_masks"], batch["gather_index"]
    enc.validate_images(feat, box, "img_feat", "img_pos_feat")
    for name in ("input_ids", "img_feat", "gather_index"):
        if batch[name].shape[0] != attn_masks.shape[0]:
            raise ValueError(f"fastvl.probe: batch '{name}' has batch size {batch[name].shape[0]} but 'attn_masks' "
                             f"has {attn_masks.shape[0]}")
    if gather.shape != attn_masks.shape:
        raise ValueError(f"fastvl.probe: batch 'gather_index' has shape {list(gather.shape)} but 'attn_masks' has "
                         f"{list(attn_masks.shape)}")
    layout, _ = layout_from_official(ids, feat, attn_masks, gather)
    b, width = attn_masks.shape
    ttype, itype = batch.get("txt_type_ids"), batch.get("img_type_ids")
    with eval_mode(model):
        h = enc.embed_packed(layout, ids.reshape(-1)[layout.txt_src],
                             pos.expand(b, -1).reshape(-1)[layout.txt_src],
                             feat.reshape(-1, feat.shape[-1])[layout.img_src],
                             box.reshape(-1, box.shape[-1])[layout.img_src], None,
                             None if ttype is None else ttype.reshape(-1)[layout.txt_src],
                             None if itype is None else itype.reshape(-1)[layout.img_src], zero_masked=False)
        cu, max_len = layout.cu_seqlens, layout.max_seqlen
        hidden, probs = [unpack(h, cu, width)[0]], []
        for layer in enc.encoder.layer:
            q, k, v = layer.attention.self.qkv(h)
            ctx, p = cross_modal_attention(q, k, v, cu, cu, max_len, max_len, return_probs=True)
            full = p.new_zeros(b, p.shape[1], width, width)
            full[:, :, :max_len, :max_len] = p
            probs.append(full)
            h = layer.post_attention(ctx.reshape(h.shape[0], -1), h)
            hidden.append(unpack(h, cu, width)[0])
    return ProbeOutputs(torch.stack(probs), torch.stack(hidden), list(layout.txt_lens), list(layout.img_lens))


def attention_maps(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every layer x head attention of a UNITER model on an official batch: [layers, B, heads, L, L] in the official
    gathered order (text then regions); rows sum to 1 over valid keys, 0 at padding. See :func:`probe_forward`."""
    return probe_forward(model, batch).attentions


def hidden_states(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Every layer's output of a UNITER model on an official batch: [layers + 1, B, L, H] (0: embeddings; 0 at
    padding). See :func:`probe_forward`."""
    return probe_forward(model, batch).hidden_states


def uniter_example_maps(model: nn.Module, batch: Mapping[str, torch.Tensor], hidden: bool = True,
                        dtype: torch.dtype = torch.float16) -> list[dict]:
    """Per example of an official batch: ``attentions`` [layers, heads, n, n] and (with ``hidden``) ``hidden_states``
    [layers + 1, n, H] cut to its n = text + region tokens and stored as ``dtype``, with ``txt_len``, ``img_len`` and
    ``id`` (the batch's ``ids`` entry when present)."""
    out = probe_forward(model, batch)
    ids = batch.get("ids") or [None] * len(out.txt_lens)
    items = []
    for i, (t, n) in enumerate(zip(out.txt_lens, out.img_lens)):
        s = t + n
        item = {"id": ids[i], "txt_len": t, "img_len": n,
                "attentions": out.attentions[:, i, :, :s, :s].to(dtype).clone()}
        if hidden:
            item["hidden_states"] = out.hidden_states[:, i, :s].to(dtype).clone()
        items.append(item)
    return items


def write_maps(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], folder: str | os.PathLike,
               hidden: bool = True, dtype: torch.dtype = torch.float16,
               example_maps: Callable[..., list[dict]] = uniter_example_maps) -> Path:
    """Stream the maps of ``batches`` to ``folder``, one ``shard_<k>.pt`` per batch holding ``example_maps(model,
    batch, hidden, dtype)`` (default :func:`uniter_example_maps`; LXMERT:
    :func:`fastvl.probe.extract_lxmert.lxmert_example_maps`), written atomically; ``index.json`` lists the shards.
    Only one batch's maps are in memory at a time. Returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, batch in enumerate(batches):
        items = example_maps(model, batch, hidden, dtype)
        name = f"shard_{k:06d}.pt"
        tmp = folder / (name + ".tmp")
        torch.save(items, tmp)
        os.replace(tmp, folder / name)
        shards.append(name)
        del items
    (folder / "index.json").write_text(json.dumps({"shards": shards}))
    return folder


def read_maps(folder: str | os.PathLike) -> Iterator[dict]:
    """The examples :func:`write_maps` wrote, one at a time (one shard in memory)."""
    folder = Path(folder)
    index = folder / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"fastvl.probe.read_maps: {folder} has no index.json (not written by write_maps)")
    for name in json.loads(index.read_text())["shards"]:
        yield from torch.load(folder / name, weights_only=True)
