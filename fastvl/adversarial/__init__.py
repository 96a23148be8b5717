"""VILLA: embedding-space adversarial training (settings, perturbation state, the K-step loop as a task module).

``AdvConfig`` holds the settings (REFERENCE.md defaults, official VILLA config keys); ``Perturbation`` holds the
text and image deltas of one micro-batch and steps them with the fused ``fastvl.ops.adv_perturb_step_multi``;
``AdversarialTask(task, config)`` runs the whole adversarial step of any task with an adversarial view (the
UNITER pre-training tasks; see ``consistency``) and is itself a task module for the generic trainer.
"""

from .config import MODALITIES, MODES, AdvConfig
from .consistency import AdvOutput, AdvView, PretrainView, VQAView, adversarial_view, consistency_loss
from .loop import AdversarialTask, adversarial_tasks
from .perturbation import Delta, Perturbation

__all__ = ["MODALITIES", "MODES", "AdvConfig", "AdvOutput", "AdvView", "AdversarialTask", "Delta", "Perturbation",
           "PretrainView", "VQAView", "adversarial_tasks", "adversarial_view", "consistency_loss"]
