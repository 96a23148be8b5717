"""Thin nn.Module wrappers over ``fastvl.ops`` with the official (BERT / UNITER) parameter names."""

from .bert import (
    ACT2FN,
    BertAttention,
    BertIntermediate,
    BertLayer,
    BertLMPredictionHead,
    BertOnlyMLMHead,
    BertOutput,
    BertPooler,
    BertPredictionHeadTransform,
    BertSelfAttention,
    BertSelfOutput,
    activation,
)

__all__ = [
    "ACT2FN",
    "BertAttention",
    "BertIntermediate",
    "BertLMPredictionHead",
    "BertLayer",
    "BertOnlyMLMHead",
    "BertOutput",
    "BertPooler",
    "BertPredictionHeadTransform",
    "BertSelfAttention",
    "BertSelfOutput",
    "activation",
]
