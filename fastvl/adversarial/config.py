"""VILLA adversarial-training settings (REFERENCE.md, VILLA) and their mapping to the official config keys.

Official VILLA training configs carry ``adv_training``, ``adv_modality`` (a list: ``["text"]``, ``["image"]``,
``["image", "text"]`` = both, anything containing ``"alter"`` = alternating), ``adv_lr_txt``, ``adv_lr_img``,
``adv_steps``, ``norm_type``, ``adv_max_norm`` and ``adv_kl_weight``; :meth:`AdvConfig.from_official` reads
them. Upstream perturbs only the modalities named in the list even in ``alter`` mode (so ``["alter"]`` alone
trains against zero perturbations); fastvl's ``alter`` always perturbs both, one modality per pass.

Modes, per adversarial step (K = ``adv_steps`` steps per micro-batch):
    text:  one pass with the text delta             loss scale 1 / K
    image: one pass with the image delta            loss scale 1 / K
    both:  one pass with both deltas                loss scale 1 / K
    alter: a text-only pass and an image-only pass  loss scale 1 / (2K)
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..ops.adv_perturb import DISTS, NORMS

__all__ = ["MODALITIES", "MODES", "AdvConfig"]

MODES = ("text", "image", "both", "alter")
MODALITIES = ("text", "image")
_PASSES = {"text": (("text",),), "image": (("image",),), "both": (("text", "image"),),
           "alter": (("text",), ("image",))}


def _err(name: str, msg: str) -> str:
    return f"fastvl.adversarial.AdvConfig: '{name}' {msg}"


@dataclass(frozen=True)
class AdvConfig:
    """Settings of VILLA's adversarial training (defaults: REFERENCE.md and the official VQA config).

    Attributes:
        mode: 'text', 'image', 'both' or 'alter' (see the module docstring).
        norm: 'l2' or 'linf': the norm that normalises the delta's gradient and bounds the delta.
        adv_steps: K, adversarial forward/backward passes per micro-batch (>= 1).
        adv_lr_txt, adv_lr_img: ascent step sizes of the text and image deltas.
        adv_init_mag: 0 = zero init (VILLA); > 0 = FreeLB's scaled random init (``fastvl.ops.adv_perturb_init``).
        adv_init_dist: 'uniform' or 'normal' noise for the random init.
        adv_max_norm: projection radius of the delta (0 = no projection).
        adv_kl_weight: weight of the symmetric-KL consistency term.
        kl_clean_grad: True (VILLA): the consistency term's gradient also flows through the clean predictions.
            False (opt-in approximation): the clean predictions are a constant target (stop-gradient), so the
            clean pass needs one ordinary backward instead of an input-gradient pass plus a deferred full one:
            9 instead of 10 forward-equivalents per micro-batch at K = 3 (see :mod:`fastvl.adversarial.loop`).
            The parameter gradient then lacks the consistency term's share through the clean branch.
    """

    mode: str = "text"
    norm: str = "l2"
    adv_steps: int = 3
    adv_lr_txt: float = 1e-3
    adv_lr_img: float = 1e-3
    adv_init_mag: float = 0.0
    adv_init_dist: str = "uniform"
    adv_max_norm: float = 0.0
    adv_kl_weight: float = 1.5
    kl_clean_grad: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(_err("mode", f"must be one of {MODES}, got {self.mode!r}"))
        if self.norm not in NORMS:
            raise ValueError(_err("norm", f"must be one of {NORMS}, got {self.norm!r}"))
        if self.adv_init_dist not in DISTS:
            raise ValueError(_err("adv_init_dist", f"must be one of {DISTS}, got {self.adv_init_dist!r}"))
        if not isinstance(self.kl_clean_grad, bool):
            raise ValueError(_err("kl_clean_grad", f"must be True or False, got {self.kl_clean_grad!r}"))
        steps = self.adv_steps
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
            raise ValueError(_err("adv_steps", f"must be an int >= 1, got {steps!r}"))
        object.__setattr__(self, "adv_steps", int(steps))
        for name in ("adv_lr_txt", "adv_lr_img", "adv_init_mag", "adv_max_norm", "adv_kl_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0 or math.isinf(value):
                raise ValueError(_err(name, f"must be a finite number >= 0, got {value!r}"))
            object.__setattr__(self, name, float(value))  # JSON gives ints such as "adv_max_norm": 0

    # ------------------------------------------------------------------------------------------ derived
    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities that get a delta: ('text',), ('image',) or ('text', 'image')."""
        return tuple(m for m in MODALITIES if any(m in p for p in self.passes))

    @property
    def passes(self) -> tuple[tuple[str, ...], ...]:
        """The perturbed forward passes of one adversarial step, each naming the modalities it perturbs."""
        return _PASSES[self.mode]

    @property
    def loss_scale(self) -> float:
        """Factor of every perturbed pass's loss: 1 / (K x passes per step) (FreeLB gradient accumulation)."""
        return 1.0 / (self.adv_steps * len(self.passes))

    def lr(self, modality: str) -> float:
        """The ascent step size of 'text' or 'image'."""
        if modality not in MODALITIES:
            raise ValueError(_err("modality", f"must be one of {MODALITIES}, got {modality!r}"))
        return self.adv_lr_txt if modality == "text" else self.adv_lr_img

    # ------------------------------------------------------------------------------------------ conversion
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> AdvConfig:
        """From fastvl's own keys (YAML); ``adv_lr`` sets both step sizes. Unknown keys are an error."""
        values = dict(values)
        if "adv_lr" in values:
            lr = values.pop("adv_lr")
            values.setdefault("adv_lr_txt", lr)
            values.setdefault("adv_lr_img", lr)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"fastvl.adversarial.AdvConfig: unknown keys {unknown}; known: {sorted(known)} and "
                             "'adv_lr'")
        return cls(**values)

    @classmethod
    def from_official(cls, opts: Mapping[str, Any]) -> AdvConfig | None:
        """From an official VILLA training config (JSON dict); None when ``adv_training`` is off or absent.

        Missing adversarial keys take the official script's defaults where REFERENCE.md gives none of its own.
        The delta starts at zero, as in every official script: none of them reads an ``adv_init_mag`` key (their
        config loader sets it on the options and nothing uses it), so one in ``opts`` is ignored here too. A
        random init stays available by name: ``AdvConfig(adv_init_mag=...)`` / :meth:`from_dict`.
        """
        if not opts.get("adv_training", False):
            return None
        values: dict[str, Any] = {"mode": mode_from_official(opts.get("adv_modality", ["text"]))}
        for key in ("adv_lr_txt", "adv_lr_img", "adv_steps", "adv_max_norm", "adv_kl_weight"):
            if key in opts:
                values[key] = opts[key]
        if "norm_type" in opts:
            values["norm"] = opts["norm_type"]
        return cls(**values)

    def to_official(self) -> dict[str, Any]:
        """The official keys (``adv_init_mag``, ``adv_init_dist`` and ``kl_clean_grad`` have no official counterpart
        and are left out)."""
        modality = {"text": ["text"], "image": ["image"], "both": ["text", "image"],
                    "alter": ["text", "image", "alter"]}[self.mode]
        return dict(adv_training=True, adv_modality=modality, adv_lr_txt=self.adv_lr_txt, adv_lr_img=self.adv_lr_img,
                    adv_steps=self.adv_steps, norm_type=self.norm, adv_max_norm=self.adv_max_norm,
                    adv_kl_weight=self.adv_kl_weight)


def mode_from_official(adv_modality: str | Sequence[str]) -> str:
    """Official ``adv_modality`` (a list, or one string) -> fastvl mode."""
    items = [adv_modality] if isinstance(adv_modality, str) else list(adv_modality)
    names = set(items)
    bad = sorted(names - {"text", "image", "alter"})
    if bad or not names:
        raise ValueError(_err("adv_modality", f"must list 'text', 'image' and/or 'alter', got {adv_modality!r}"))
    if "alter" in names:
        return "alter"
    if names == {"text", "image"}:
        return "both"
    return items[0]
