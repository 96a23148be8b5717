"""``UniterForPretraining.forward``: the official batch-dict API and the native packed API, task by task.

Official batch dicts (keys as the official collates build them):

- every task: ``input_ids`` [B, Lt], ``position_ids`` [1 or B, Lt], ``img_feat`` [B, Li, D], ``img_pos_feat``
  [B, Li, 7], ``attn_masks`` [B, L], ``gather_index`` [B, L];
- ``mlm``: ``txt_labels`` [B, Lt] (-1 = not masked);
- ``mrfr`` / ``mrc`` / ``mrc-kl``: ``img_masks`` [B, Li], ``img_mask_tgt`` [B, L] (True at masked regions'
  joint positions), ``feat_targets`` [n, D] (mrfr) / ``label_targets`` [n, C] (mrc);
- ``itm``: ``targets`` [B], optional ``ot_inputs`` {``ot_scatter`` [B, L], ``scatter_max`` int, ``txt_pad``
  [B, Lt], ``img_pad`` [B, Li]} for word-region alignment.

Returns (as official): per-element losses with ``compute_loss`` (mlm [n], mrfr [n, D], mrc [n], mrc-kl [n, C],
itm ``(loss [B], (ot_pos_dist, ot_neg_dist) or None)``), else the predictions (mlm / mrc logits, mrfr features,
itm ``(scores [B, 2], ot)``). ``reduction='mean'`` gives the official training reduction instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
from torch import nn

from ...batch import PackedVLBatch
from ...nn.bert import BertOnlyMLMHead
from ...ops import optimal_transport_dist
from . import heads as H
from .config import UniterConfig
from .layout import PackedLayout
from .model import UniterModel, UniterPreTrainedModel

__all__ = ["TASKS", "PretrainMixin", "UniterForPretraining", "canonical_task"]

TASKS = ("mlm", "mrfr", "mrc", "mrc-kl", "itm")
_MRM = ("mrfr", "mrc", "mrc-kl")
_COMMON = ("input_ids", "position_ids", "img_feat", "img_pos_feat", "attn_masks", "gather_index")
_DOC = {
    "txt_labels": "[B, Lt] long, -1 where not masked",
    "img_masks": "[B, Li] bool, masked regions",
    "img_mask_tgt": "[B, L] bool, masked regions' joint positions",
    "feat_targets": "[n_masked, img_dim] original features",
    "label_targets": "[n_masked, img_label_dim] detector soft labels",
    "targets": "[B] long, 1 = matched pair",
}


def canonical_task(task: str) -> str:
    """``mlm``/``mrfr``/``itm``, or ``mrc`` / ``mrc-kl`` (any name starting with 'mrc'; 'kl' in it selects KL)."""
    if task in ("mlm", "mrfr", "itm"):
        return task
    if isinstance(task, str) and task.startswith("mrc"):
        return "mrc-kl" if "kl" in task else "mrc"
    raise ValueError(f"UniterForPretraining: unknown task {task!r}; expected one of {TASKS}")


class PretrainMixin:
    """The task dispatch of :class:`~fastvl.models.uniter.UniterForPretraining` (needs ``uniter``, ``cls``,
    ``feat_regress``, ``region_classifier``, ``itm_output``)."""

    # ------------------------------------------------------------------------------------------ shared heads
    def _head_loss(self, task: str, hidden: torch.Tensor, targets: torch.Tensor | None, compute_loss: bool,
                   reduction: str) -> torch.Tensor:
        """Masked rows' hidden states [n, H] -> predictions, or the task's loss against ``targets``."""
        if task == "mlm":
            return H.mlm_loss(self.cls, hidden, targets, reduction) if compute_loss else self.cls(hidden)
        if task == "mrfr":
            return H.mrfr_loss(self.feat_regress, hidden, targets, reduction) if compute_loss else \
                self.feat_regress(hidden)
        if not compute_loss:
            return self.region_classifier(hidden)
        fn = H.mrc_kl_loss if task == "mrc-kl" else H.mrc_loss
        return fn(self.region_classifier, hidden, targets, reduction)

    def _check_targets(self, task: str, targets: torch.Tensor | None, n: int, name: str) -> None:
        if targets is None:
            return
        width = self.uniter.img_dim if task == "mrfr" else self.img_label_dim
        what = "img_dim" if task == "mrfr" else "img_label_dim"
        if targets.dim() != 2 or targets.shape[1] != width:
            raise ValueError(f"UniterForPretraining({task}): '{name}' must have shape [n_masked, {width}] ({what}), "
                             f"got {list(targets.shape)}")
        if targets.shape[0] != n:
            raise ValueError(f"UniterForPretraining({task}): '{name}' has {targets.shape[0]} rows but {n} regions are "
                             f"masked")

    # ------------------------------------------------------------------------------------------ dispatch
    def forward(self, batch: Mapping | PackedVLBatch, task: str, compute_loss: bool = True, reduction: str = "none",
                **kwargs):
        """Official batch dict (see module doc) or a PackedVLBatch (-> :meth:`forward_packed`, ``kwargs`` to it)."""
        if isinstance(batch, PackedVLBatch):
            return self.forward_packed(batch, task, compute_loss, reduction, **kwargs)
        if not isinstance(batch, Mapping):
            raise TypeError(f"UniterForPretraining: argument 'batch' must be a dict or PackedVLBatch, got "
                            f"{type(batch).__name__}")
        return self.forward_official(batch, task, compute_loss, reduction, **kwargs)

    # ------------------------------------------------------------------------------------------ official dicts
    def _require(self, batch: Mapping, task: str, compute_loss: bool) -> None:
        need = list(_COMMON)
        if task == "mlm":
            need.append("txt_labels")
        elif task in _MRM:
            need += ["img_masks", "img_mask_tgt"]
            if compute_loss:
                need.append("feat_targets" if task == "mrfr" else "label_targets")
        elif compute_loss or batch.get("ot_inputs") is not None:
            need.append("targets")
        for key in need:
            if key not in batch:
                doc = f" ({_DOC[key]})" if key in _DOC else ""
                raise KeyError(f"UniterForPretraining(task={task!r}): batch is missing key '{key}'{doc}")
            if key not in ("img_feat", "img_pos_feat", "gather_index", "input_ids", "position_ids") and \
                    batch[key] is None:
                raise ValueError(f"UniterForPretraining(task={task!r}): batch['{key}'] is None")

    def forward_official(self, batch: Mapping, task: str, compute_loss: bool = True, reduction: str = "none",
                         check_finite: bool | None = None):
        """The official pre-training forward on an official batch dict (see module doc)."""
        task = canonical_task(task)
        self._require(batch, task, compute_loss)
        ids, img_feat, attn = batch["input_ids"], batch["img_feat"], batch["attn_masks"]
        args = (ids, batch["position_ids"], img_feat, batch["img_pos_feat"], attn, batch["gather_index"])
        if task == "mlm":
            labels = batch["txt_labels"]
            if ids is None or labels.shape != ids.shape:
                raise ValueError(f"UniterForPretraining(mlm): 'txt_labels' must have the shape of 'input_ids' "
                                 f"{None if ids is None else list(ids.shape)}, got {list(labels.shape)}")
            sel = labels != -1
            outs, layout, (n,) = self.uniter.forward_official_packed(*args, counts=[sel.sum()],
                                                                     check_finite=check_finite)
            pos = torch.nonzero_static(sel, size=n)
            hidden = outs[-1][layout.cu_seqlens.long()[pos[:, 0]] + pos[:, 1]]
            return self._head_loss(task, hidden, labels[pos[:, 0], pos[:, 1]], compute_loss, reduction)
        if task in _MRM:
            tgt = batch["img_mask_tgt"]
            if tgt.shape != attn.shape:
                raise ValueError(f"UniterForPretraining({task}): 'img_mask_tgt' must have the shape of 'attn_masks' "
                                 f"{list(attn.shape)}, got {list(tgt.shape)}")
            sel = tgt.bool()
            outs, layout, (n,) = self.uniter.forward_official_packed(*args, img_masks=batch["img_masks"],
                                                                     counts=[sel.sum()], check_finite=check_finite)
            name = "feat_targets" if task == "mrfr" else "label_targets"
            targets = batch.get(name) if compute_loss else None
            self._check_targets(task, targets, n, name)
            self.uniter.check_inputs_finite(check_finite, **{name: targets})
            pos = torch.nonzero_static(sel, size=n)
            hidden = outs[-1][layout.cu_seqlens.long()[pos[:, 0]] + pos[:, 1]]
            return self._head_loss(task, hidden, targets, compute_loss, reduction)
        # itm
        outs, layout, _ = self.uniter.forward_official_packed(*args, check_finite=check_finite)
        h = outs[-1]
        pooled = self.uniter.pool_packed(h, layout)
        targets = batch.get("targets")
        if targets is not None and tuple(targets.shape) != (attn.shape[0],):
            raise ValueError(f"UniterForPretraining(itm): 'targets' must have shape [{attn.shape[0]}], got "
                             f"{list(targets.shape)}")
        ot = None
        if batch.get("ot_inputs") is not None:
            dist = self._official_ot_dist(h, layout, ids, img_feat, attn, batch["ot_inputs"])
            ot = (dist.masked_select(targets == 1), dist.masked_select(targets == 0))
        if compute_loss:
            return H.itm_loss(self.itm_output, pooled, targets, reduction), ot
        return self.itm_output(pooled), ot

    def _official_ot_dist(self, h: torch.Tensor, layout: PackedLayout, input_ids: torch.Tensor,
                          img_feat: torch.Tensor, attn: torch.Tensor, ot_inputs: Mapping) -> torch.Tensor:
        """Scatter packed outputs to the official [txt padded | img padded] layout given by ``ot_scatter``, then
        the OT distance [B] (float32, cast back to the hidden dtype as official)."""
        for key in ("ot_scatter", "scatter_max", "txt_pad", "img_pad"):
            if key not in ot_inputs:
                raise KeyError(f"UniterForPretraining(itm): batch['ot_inputs'] is missing key '{key}'")
        if input_ids is None or img_feat is None:
            raise ValueError("UniterForPretraining(itm): 'ot_inputs' needs both 'input_ids' and 'img_feat'")
        scatter, txt_pad, img_pad = ot_inputs["ot_scatter"], ot_inputs["txt_pad"], ot_inputs["img_pad"]
        b, width = attn.shape
        tl, il = input_ids.shape[1], img_feat.shape[1]
        for name, t, shape in (("ot_scatter", scatter, (b, width)), ("txt_pad", txt_pad, (b, tl)),
                               ("img_pad", img_pad, (b, il))):
            if tuple(t.shape) != shape:
                raise ValueError(f"UniterForPretraining(itm): ot_inputs['{name}'] must have shape {list(shape)}, got "
                                 f"{list(t.shape)}")
        max_l = max(int(ot_inputs["scatter_max"]) + 1, tl + il)
        seg = layout.seq_of_row
        within = torch.arange(layout.total, device=h.device) - layout.cu_seqlens.long()[seg]
        dest = seg * max_l + scatter.reshape(-1)[seg * width + within]
        ctx = h.new_zeros(b * max_l, h.shape[-1]).index_copy(0, dest, h).view(b, max_l, -1)
        txt_emb, img_emb = ctx[:, :tl], ctx[:, tl:tl + il]
        dist = optimal_transport_dist(txt_emb.float(), img_emb.float(), txt_pad.bool(), img_pad.bool())
        return dist.to(h.dtype)

    # ------------------------------------------------------------------------------------------ packed batches
    def _require_packed(self, batch: PackedVLBatch, task: str, compute_loss: bool) -> None:
        need = {"mlm": ["txt_labels"], "mrfr": ["img_masks"] + (["feat_targets"] if compute_loss else []),
                "mrc": ["img_masks"] + (["soft_labels"] if compute_loss else []),
                "itm": ["itm_targets"] if compute_loss else []}[task.replace("-kl", "")]
        for name in need:
            if getattr(batch, name) is None:
                raise ValueError(f"UniterForPretraining(task={task!r}): PackedVLBatch field '{name}' is None")
        n_txt, n_img = sum(batch.txt_lens), sum(batch.img_lens)
        for name, shape in (("txt_labels", (n_txt,)), ("img_masks", (n_img,)), ("itm_targets", (batch.batch_size,))):
            t = getattr(batch, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"UniterForPretraining(task={task!r}): PackedVLBatch field '{name}' must have shape "
                                 f"{list(shape)}, got {list(t.shape)}")

    def forward_packed(self, batch: PackedVLBatch, task: str, compute_loss: bool = True, reduction: str = "none",
                       with_ot: bool = True, layout: PackedLayout | None = None, check_finite: bool | None = None,
                       txt_delta: torch.Tensor | None = None, img_delta: torch.Tensor | None = None):
        """The native API on a packed batch; no host synchronisation (see below).

        Returns as :meth:`forward_official`, except for ``itm``: ``(itm loss [B] or scores [B, 2], ot_dist [B] or
        None)`` -- the per-example OT distances (float32) instead of the (positive, negative) split, which would
        need a host sync; positives are ``ot_dist[itm_targets == 1]``.

        Masked rows: MRFR / MRC take their count from ``feat_targets`` / ``soft_labels`` rows; MLM from
        ``batch.n_txt_masked`` when the collate sets it (else one device read).

        Args:
            batch: PackedVLBatch with the task's fields (mlm: txt_labels; mrfr: img_masks, feat_targets; mrc /
                mrc-kl: img_masks, soft_labels; itm: itm_targets).
            task, compute_loss, reduction: as :meth:`forward`.
            with_ot: itm only: also compute the word-region alignment distances.
            layout: precomputed ``UniterModel.layout(batch)``.
            check_finite: check features, deltas and targets for NaN/inf, and the masked counts (reads the device).
            txt_delta [T_txt, H], img_delta [T_img, img_dim]: VILLA perturbations (see UniterModel.forward_packed).
        """
        task = canonical_task(task)
        if not isinstance(batch, PackedVLBatch):
            raise TypeError(f"UniterForPretraining.forward_packed: 'batch' must be a PackedVLBatch, got "
                            f"{type(batch).__name__}")
        self._require_packed(batch, task, compute_loss)
        if task not in _MRM and batch.img_masks is not None:
            batch = replace(batch, img_masks=None)  # MRM only: other tasks see unmasked regions (official)
        layout = layout if layout is not None else self.uniter.layout(batch)
        h = self.uniter.forward_packed(batch, layout=layout, txt_delta=txt_delta, img_delta=img_delta,
                                       check_finite=check_finite)
        check = self.uniter.check_finite if check_finite is None else check_finite
        if task == "mlm":
            sel = batch.txt_labels != -1
            n = batch.n_txt_masked
            if n is None:
                n = int(sel.sum())
            elif check and int(sel.sum()) != n:
                raise ValueError(f"UniterForPretraining(mlm): batch.n_txt_masked is {n} but txt_labels marks "
                                 f"{int(sel.sum())} tokens")
            idx = torch.nonzero_static(sel, size=n).squeeze(1)
            return self._head_loss(task, h[layout.txt_rows[idx]], batch.txt_labels[idx], compute_loss, reduction)
        if task in _MRM:
            name = "feat_targets" if task == "mrfr" else "soft_labels"
            targets = getattr(batch, name)
            sel = batch.img_masks.bool()
            n = targets.shape[0] if targets is not None else int(sel.sum())
            self._check_targets(task, targets if compute_loss else None, n, name)
            if check:
                assert_count(sel, n, task, name)
                self.uniter.check_inputs_finite(True, **{name: targets})
            idx = torch.nonzero_static(sel, size=n).squeeze(1)
            hidden = h[layout.img_rows[idx]]
            return self._head_loss(task, hidden, targets if compute_loss else None, compute_loss, reduction)
        pooled = self.uniter.pool_packed(h, layout)
        dist = None
        if with_ot:
            dist = H.wra_distance(h[layout.txt_rows], h[layout.img_rows], layout.cu_txt, layout.cu_img,
                                  layout.max_txt, layout.max_img)
        if compute_loss:
            return H.itm_loss(self.itm_output, pooled, batch.itm_targets, reduction), dist
        return self.itm_output(pooled), dist


def assert_count(sel: torch.Tensor, n: int, task: str, name: str) -> None:
    """Raise if the mask ``sel`` does not select exactly ``n`` rows (reads the device)."""
    got = int(sel.sum())
    if got != n:
        raise ValueError(f"UniterForPretraining({task}): img_masks marks {got} regions but '{name}' has {n} rows")


# ----------------------------------------------------------------------------------------------------------
# UniterForPretraining
# ----------------------------------------------------------------------------------------------------------


class UniterForPretraining(PretrainMixin, UniterPreTrainedModel):
    """UNITER with the MLM, MRFR, MRC(-kl) and ITM(+WRA) heads. ``UniterForPretraining(config, img_dim,
    img_label_dim)`` as the official class; ``forward(batch, task, compute_loss=True)`` accepts the official batch
    dict or a :class:`~fastvl.batch.PackedVLBatch` (see :class:`~PretrainMixin`)."""

    def __init__(self, config: UniterConfig, img_dim: int | None = None, img_label_dim: int | None = None):
        super().__init__(config)
        img_dim = config.img_dim if img_dim is None else int(img_dim)
        self.img_label_dim = config.img_label_dim if img_label_dim is None else int(img_label_dim)
        self.uniter = UniterModel(config, img_dim)
        self.cls = BertOnlyMLMHead(config.hidden_size, config.hidden_act,
                                   self.uniter.embeddings.word_embeddings.weight)
        self.feat_regress = H.RegionFeatureRegression(config.hidden_size, img_dim,
                                                      self.uniter.img_embeddings.img_linear.weight)
        self.region_classifier = H.RegionClassification(config.hidden_size, self.img_label_dim)
        self.itm_output = nn.Linear(config.hidden_size, 2)
        self.apply(self.init_weights)

    def grow_word_embeddings(self, num_special_tokens: int) -> nn.Embedding:
        """Grow the word table (see :meth:`UniterModel.grow_word_embeddings`), re-tie the MLM decoder and extend its
        output bias with zeros."""
        new = self.uniter.grow_word_embeddings(num_special_tokens)
        pred = self.cls.predictions
        pred.decoder.weight = new.weight
        pred.decoder.out_features = new.num_embeddings
        old_bias = pred.bias.data
        pred.bias = nn.Parameter(torch.cat([old_bias, old_bias.new_zeros(num_special_tokens)]))
        self.config = self.uniter.config
        return new

    def init_type_embedding(self, task: str) -> None:
        """Grow the type table as the official fine-tuning models do (see :meth:`UniterModel.init_type_embedding`)."""
        self.uniter.init_type_embedding(task)
        self.config = self.uniter.config
