"""VILLA: embedding-space adversarial training (settings, perturbation state, the K-step loop as a task module).

``AdvConfig`` holds the settings (REFERENCE.md defaults, official VILLA config keys); ``Perturbation`` holds the
text and image deltas of one micro-batch and steps them with the fused ``fastvl.ops.adv_perturb_step_multi``;
``AdversarialTask(task, config)`` runs the whole adversarial step of any task that offers an adversarial view
(:class:`fastvl.tasks.base.AdvView`) and is itself a task module for the generic trainer. Nothing here names a
concrete task.
"""

from ..tasks.base import AdvOutput, AdvView, consistency_loss
from .config import MODALITIES, MODES, AdvConfig
from .loop import AdversarialTask, adversarial_tasks, adversarial_view, has_active_dropout
from .perturbation import Delta, Perturbation

__all__ = ["MODALITIES", "MODES", "AdvConfig", "AdvOutput", "AdvView", "AdversarialTask", "Delta", "Perturbation",
           "adversarial_tasks", "adversarial_view", "consistency_loss", "has_active_dropout"]
