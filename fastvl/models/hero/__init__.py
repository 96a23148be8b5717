"""HERO (video + subtitles), drop-in for linjieli222/HERO: config, encoders, pre-training and fine-tuning models.

API (official constructors, ``state_dict`` keys and collate dicts; ``reference`` holds the plain padded versions):

- ``VideoModelConfig(json_path_or_dict)``: ``f_config`` / ``c_config`` / ``q_config`` / ``d_config`` blocks.
- ``HeroModel(cfg, vfeat_dim, max_frm_seq_len)``: ``model.v_encoder(batch, 'repr')`` -> [B, max_frames, H].
- ``HeroForPretraining(cfg, vfeat_dim, max_frm_seq_len, ...)``: ``model(batch, task, compute_loss)`` for
  ``'mlm'``, ``'mffr'``, ``'mfm-nce'``, ``'fom'``, ``'vsm'`` on the official collate dicts; VSM returns
  (st_ed, neg_ctx, neg_q) weighted losses, scalars in train mode, summed / per-query in eval mode;
  ``set_hard_negative(...)``, ``set_train_st_ed(w)``.
- ``HeroForVcmr``: ``model(batch, 'tvr')`` = VSM on a ``vcmr_collate`` dict; ``get_pred_from_raw_query``.
- ``HeroForVideoQA``: ``model(batch, 'tvqa')`` -> (qa_loss, temporal_loss) or logits [Nq, 5].
- ``HeroForViolin``: ``model(batch, 'violin')`` -> BCE loss or logits [N, 1].
- ``HeroForTvc(cfg, vfeat_dim, max_frm_seq_len, lsr=0.1)``: ``model(batch)`` -> per-token loss or scores
  [N, Lt, V]; ``TvcGenerator(model, max_step, bos, eos).greedy_decode(batch)`` / ``.beam_search(batch, k)``.
- ``HeroForPretraining.from_pretrained(config_file, state_dict, vfeat_dim=..., max_frm_seq_len=...)`` (every class):
  fp16 checkpoints load as fp32, the ``'vocab_padded'`` entry is skipped.
"""

from .config import HeroSubConfig, VideoModelConfig
from .finetune import HeroForVcmr, HeroForVideoQA, HeroForViolin
from .layout import HeroSegmentLayout, TextLayout
from .model import (
    CrossModalTrm,
    HeroForPretraining,
    HeroModel,
    HierarchicalVlModel,
    QueryFeatEncoder,
    TemporalTrm,
    load_hero_state_dict,
)
from .tvc import HeroForTvc, LabelSmoothingLoss, TvcGenerator
from .vsm import gather_across_ranks, mask_logits

__all__ = ["CrossModalTrm", "HeroForPretraining", "HeroForTvc", "HeroForVcmr", "HeroForVideoQA", "HeroForViolin",
           "HeroModel", "HeroSegmentLayout", "HeroSubConfig", "HierarchicalVlModel", "LabelSmoothingLoss",
           "QueryFeatEncoder", "TemporalTrm", "TextLayout", "TvcGenerator", "VideoModelConfig",
           "gather_across_ranks", "load_hero_state_dict", "mask_logits"]
