"""UNITER (Chen et al., ECCV 2020) as one package: a drop-in, weight-compatible model that runs packed inside.

``from fastvl.models.uniter import UniterConfig, UniterModel, UniterForPretraining, UniterForVisualQuestionAnswering,
...`` replaces the official classes (same constructors, forward signatures and state_dict keys). Modules:

    config      UniterConfig (official JSON / fastvl YAML / size names)
    layout      packed-layout bookkeeping for the official padded interface
    model       embeddings, encoder, UniterModel (official and packed APIs)
    heads       pre-training heads and their losses (fused ops)
    pretrain    UniterForPretraining (MLM, MRFR, MRC, MRC-kl, ITM + WRA)
    finetune    fine-tuning heads (VQA, VE, VCR, RE, retrieval)
    nlvr2       the three NLVR2 heads
    caption     UniterForCaptioning (seq2seq mask, cached decoding)
    reference   a plain padded implementation, the ground truth of the tests
    testing     random batches and comparison helpers for tests and benchmarks
"""

from .caption import CaptionGeneration, CaptionTokens, UniterForCaptioning
from .config import UniterConfig, resolve_config
from .finetune import (
    UniterFinetuneBase,
    UniterForImageTextRetrieval,
    UniterForImageTextRetrievalHardNeg,
    UniterForReferringExpressionComprehension,
    UniterForVisualCommonsenseReasoning,
    UniterForVisualEntailment,
    UniterForVisualQuestionAnswering,
    rank_hinge,
    select_examples,
)
from .layout import PackedLayout, layout_from_lengths, layout_from_official
from .model import (
    POS_DIM,
    UniterEncoder,
    UniterImageEmbeddings,
    UniterModel,
    UniterPreTrainedModel,
    UniterTextEmbeddings,
    assert_finite,
)
from .nlvr2 import AttentionPool, UniterForNlvr2Paired, UniterForNlvr2PairedAttn, UniterForNlvr2Triplet
from .pretrain import PretrainMixin, UniterForPretraining, canonical_task

__all__ = [
    "POS_DIM", "AttentionPool", "CaptionGeneration", "CaptionTokens", "PackedLayout", "PretrainMixin", "UniterConfig",
    "UniterEncoder", "UniterFinetuneBase",
    "UniterForCaptioning", "UniterForImageTextRetrieval", "UniterForImageTextRetrievalHardNeg",
    "UniterForNlvr2Paired", "UniterForNlvr2PairedAttn", "UniterForNlvr2Triplet", "UniterForPretraining",
    "UniterForReferringExpressionComprehension", "UniterForVisualCommonsenseReasoning", "UniterForVisualEntailment",
    "UniterForVisualQuestionAnswering", "UniterImageEmbeddings", "UniterModel", "UniterPreTrainedModel",
    "UniterTextEmbeddings", "assert_finite", "canonical_task",
    "layout_from_lengths", "layout_from_official", "rank_hinge", "resolve_config", "select_examples",
]
