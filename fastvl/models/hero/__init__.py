"""HERO (video + subtitles), drop-in for linjieli222/HERO: config, encoders and the pre-training model's weights.

``HeroForPretraining(cfg, vfeat_dim, max_frm_seq_len)`` has the official ``state_dict``; ``model.v_encoder(batch,
'repr')`` runs the official collate dict through the packed encoders. ``reference`` holds the plain padded version.
"""

from .config import HeroSubConfig, VideoModelConfig
from .layout import HeroSegmentLayout
from .model import (
    CrossModalTrm,
    HeroForPretraining,
    HeroModel,
    HierarchicalVlModel,
    QueryFeatEncoder,
    TemporalTrm,
    load_hero_state_dict,
)

__all__ = ["CrossModalTrm", "HeroForPretraining", "HeroModel", "HeroSegmentLayout", "HeroSubConfig",
           "HierarchicalVlModel", "QueryFeatEncoder", "TemporalTrm", "VideoModelConfig", "load_hero_state_dict"]
