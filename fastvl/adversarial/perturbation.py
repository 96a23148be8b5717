"""The adversarial perturbations of one micro-batch: a text delta of the word-embedding shape and an image delta
of the raw region-feature shape, with the positions that are real (padding never moves).

Two layouts, matching the model's two interfaces:
    packed (fastvl's native :class:`~fastvl.batch.PackedVLBatch`, ``UniterModel.forward_packed(txt_delta=,
        img_delta=)``): text [T_txt, H] and image [T_img, img_dim] with ``cu_seqlens`` (no padding stored);
    padded (the official layout): text [B, L_txt, H] and image [B, L_img, img_dim] with bool masks
        (True = real position).

Typical use inside an adversarial step (the loop lives in the trainer)::

    pert = Perturbation.packed(cfg, batch, hidden_size=768)        # zero init unless cfg.adv_init_mag > 0
    for k in range(cfg.adv_steps):
        for modalities in cfg.passes:
            txt_delta, img_delta = pert.deltas(modalities)          # leaf tensors that require grad, or None
            loss = task_and_kl(model(batch, txt_delta=txt_delta, img_delta=img_delta)) * cfg.loss_scale
            loss.backward()                                         # parameter grads accumulate (FreeLB)
        if k < cfg.adv_steps - 1:
            pert.step()                                             # one fused call updates every delta

Costs: the deltas are allocated once per micro-batch and updated in place by the fused op
(``fastvl.ops.adv_perturb_step_multi``: both modalities in one call, one kernel launch per phase on GPU); a
modality a pass does not perturb gets no tensor at all (``None``, not a zero tensor added to the embeddings);
gradients are released after every step so that autograd hands the next one over without a copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..batch import PackedVLBatch
from ..ops.adv_perturb import adv_perturb_init, adv_perturb_step_multi
from .config import MODALITIES, AdvConfig

__all__ = ["Delta", "Perturbation"]


@dataclass
class Delta:
    """One modality's perturbation.

    Attributes:
        modality: 'text' or 'image'.
        tensor: leaf tensor (requires grad): padded [B, L, D] or packed [T, D].
        mask: padded: bool [B, L] (True = real position); packed: cu_seqlens [B+1] int32.
        max_seqlen: packed: Python int >= every length; padded: L.
        lr: ascent step size.
    """

    modality: str
    tensor: torch.Tensor
    mask: torch.Tensor
    max_seqlen: int
    lr: float

    @property
    def packed(self) -> bool:
        return self.tensor.dim() == 2


class Perturbation:
    """Text and image deltas of one micro-batch (see the module docstring).

    Args:
        config: the adversarial settings (mode, norm, step sizes, init, projection).
        text, image: the modalities' deltas (None for a modality the mode does not perturb).
        backend: force a backend of the fused ops (``reference``, ``cpu``, ``cuda``, ``triton``).
    """

    def __init__(self, config: AdvConfig, text: Delta | None = None, image: Delta | None = None, *,
                 backend: str | None = None):
        self.config = config
        self.text = text
        self.image = image
        self.backend = backend
        for name in config.modalities:
            if self._get(name) is None:
                raise ValueError(f"fastvl.adversarial.Perturbation: mode {config.mode!r} perturbs {name} but no "
                                 f"'{name}' delta was given")

    # ------------------------------------------------------------------------------------------ construction
    @classmethod
    def packed(cls, config: AdvConfig, batch: PackedVLBatch, hidden_size: int, *, dtype: torch.dtype = torch.float32,
               generator: torch.Generator | None = None, backend: str | None = None) -> Perturbation:
        """Deltas for a packed batch: text [T_txt, hidden_size], image [T_img, img_dim] on the batch's device.

        Args:
            config: the adversarial settings. batch: the micro-batch (lengths as Python ints).
            hidden_size: width of the word embeddings. dtype: of the deltas (float32 by default: the ascent
                steps are small, and the model adds them in the embeddings' precision anyway).
            generator: for the random init (``config.adv_init_mag > 0``).
        """
        device = batch.input_ids.device
        text = image = None
        if "text" in config.modalities:
            text = cls._make(config, "text", (batch.input_ids.shape[0], hidden_size), batch.cu_seqlens("txt"),
                             max(batch.txt_lens, default=0), dtype, device, generator, backend)
        if "image" in config.modalities:
            image = cls._make(config, "image", tuple(batch.img_feat.shape), batch.cu_seqlens("img"),
                              max(batch.img_lens, default=0), dtype, device, generator, backend)
        return cls(config, text, image, backend=backend)

    @classmethod
    def padded(cls, config: AdvConfig, txt_mask: torch.Tensor | None, img_mask: torch.Tensor | None,
               hidden_size: int, img_dim: int = 2048, *, dtype: torch.dtype = torch.float32,
               generator: torch.Generator | None = None, backend: str | None = None) -> Perturbation:
        """Deltas for the official padded layout.

        Args:
            txt_mask: [B, L_txt] bool, True at real text tokens (needed when the mode perturbs text).
            img_mask: [B, L_img] bool, True at real regions (needed when the mode perturbs the image).
            hidden_size: width of the word embeddings. img_dim: raw region feature size (2048 for UNITER).
            dtype, generator, backend: as in :meth:`packed`.
        Returns:
            text delta [B, L_txt, hidden_size], image delta [B, L_img, img_dim]; 0 at padding.
        """
        text = image = None
        for name, mask, dim in (("text", txt_mask, hidden_size), ("image", img_mask, img_dim)):
            if name not in config.modalities:
                continue
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 2:
                got = f"{mask.dtype} {list(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
                arg = "txt_mask" if name == "text" else "img_mask"
                raise ValueError(f"fastvl.adversarial.Perturbation.padded: argument '{arg}' must be a bool [B, L] "
                                 f"tensor (True = real position) for mode {config.mode!r}, got {got}")
            delta = cls._make(config, name, (*mask.shape, dim), mask, mask.shape[1], dtype, mask.device, generator,
                              backend)
            text, image = (delta, image) if name == "text" else (text, delta)
        return cls(config, text, image, backend=backend)

    @staticmethod
    def _make(config: AdvConfig, modality: str, shape: tuple[int, ...], mask: torch.Tensor, max_seqlen: int,
              dtype: torch.dtype, device: torch.device, generator: torch.Generator | None,
              backend: str | None) -> Delta:
        tensor = adv_perturb_init(shape, mask, config.adv_init_mag, config.adv_init_dist, config.norm, generator,
                                  max_seqlen=max_seqlen if len(shape) == 2 else None, dtype=dtype, device=device,
                                  backend=backend)
        return Delta(modality, tensor.requires_grad_(), mask, max_seqlen, config.lr(modality))

    # ------------------------------------------------------------------------------------------ use
    def _get(self, modality: str) -> Delta | None:
        if modality not in MODALITIES:
            raise ValueError(f"fastvl.adversarial.Perturbation: modality must be one of {MODALITIES}, got "
                             f"{modality!r}")
        return self.text if modality == "text" else self.image

    def deltas(self, modalities: Sequence[str] = MODALITIES) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(text delta, image delta) for a forward pass that perturbs ``modalities``; None for the others.

        The tensors are the leaves themselves (no copy): the model adds them to its embeddings and backward
        accumulates their gradients (alternating passes accumulate into the same leaves).
        """
        for m in modalities:
            if self._get(m) is None:
                raise ValueError(f"fastvl.adversarial.Perturbation.deltas: no '{m}' delta (mode "
                                 f"{self.config.mode!r})")
        text = self.text.tensor if self.text is not None and "text" in modalities else None
        image = self.image.tensor if self.image is not None and "image" in modalities else None
        return text, image

    @property
    def active(self) -> list[Delta]:
        return [d for d in (self.text, self.image) if d is not None]

    @torch.no_grad()
    def step(self) -> None:
        """One ascent step of every delta that received a gradient, in one fused call; the gradients are released.

        delta += lr * grad / max(||grad||, 1e-8) per example, then the projection to ``adv_max_norm`` (see
        ``fastvl.ops.adv_perturb``). A delta without a gradient (no pass used it yet) is left as it is.
        """
        todo = [d for d in self.active if d.tensor.grad is not None]
        if not todo:
            return
        adv_perturb_step_multi([d.tensor for d in todo], [d.tensor.grad for d in todo], [d.mask for d in todo],
                               [d.lr for d in todo], self.config.norm, [self.config.adv_max_norm] * len(todo),
                               max_seqlens=[d.max_seqlen for d in todo], backend=self.backend)
        for d in todo:
            d.tensor.grad = None

    def zero_grad(self) -> None:
        """Release the deltas' gradients without stepping."""
        for d in self.active:
            d.tensor.grad = None
