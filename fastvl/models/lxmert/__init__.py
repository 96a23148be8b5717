"""LXMERT (Tan & Bansal, EMNLP 2019): the two-stream V+L encoder, weight-compatible with the ``transformers`` port.

``from fastvl.models.lxmert import LxmertConfig, LxmertModel, LxmertForPreTraining`` replaces the port's classes (same
config keywords, forward arguments, output fields and state_dict keys); inside, both streams run packed. Modules:

    config      LxmertConfig (the port's config.json keys; size presets tiny / base)
    model       embeddings, language / object-relationship / cross-modality layers, LxmertModel
    pretrain    the pre-training heads and LxmertForPreTraining (the port's losses)
    checkpoint  loading the port's weights strictly; a clear error for another family's checkpoint
"""

from .checkpoint import LxmertCheckpointError, adapt_lxmert_state, load_lxmert_state, read_state_file
from .config import PRESETS, LxmertConfig, resolve_lxmert_config
from .model import (
    LxmertEmbeddings,
    LxmertEncoder,
    LxmertLayer,
    LxmertModel,
    LxmertModelOutput,
    LxmertPackedOutput,
    LxmertXLayer,
    StreamDims,
)
from .pretrain import (
    LxmertForPreTraining,
    LxmertForPreTrainingOutput,
    LxmertPreTrainingHeads,
    LxmertVisualAnswerHead,
    LxmertVisualObjHead,
    visual_loss,
)

__all__ = [
    "PRESETS", "LxmertCheckpointError", "LxmertConfig", "LxmertEmbeddings", "LxmertEncoder", "LxmertForPreTraining",
    "LxmertForPreTrainingOutput", "LxmertLayer", "LxmertModel", "LxmertModelOutput", "LxmertPackedOutput",
    "LxmertPreTrainingHeads", "LxmertVisualAnswerHead", "LxmertVisualObjHead", "LxmertXLayer", "StreamDims",
    "adapt_lxmert_state", "load_lxmert_state", "read_state_file", "resolve_lxmert_config", "visual_loss",
]
