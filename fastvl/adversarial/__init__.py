"""VILLA: embedding-space adversarial training (settings, perturbation state; the K-step loop builds on these).

``AdvConfig`` holds the settings (REFERENCE.md defaults, official VILLA config keys); ``Perturbation`` holds the
text and image deltas of one micro-batch and steps them with the fused ``fastvl.ops.adv_perturb_step_multi``.
"""

from .config import MODALITIES, MODES, AdvConfig
from .perturbation import Delta, Perturbation

__all__ = ["MODALITIES", "MODES", "AdvConfig", "Delta", "Perturbation"]
