"""The VIOLIN baseline (video-and-language inference), drop-in for jimmy646/violin: ``ViolinBase`` with the official
``state_dict`` keys, its BiLSTM / BiDAF parts, the loss, and the frozen BERT text encoder that feeds it."""

from .baseline import ViolinBaseline
from .model import BidafAttn, RNNEncoder, ViolinBase, ViolinConfig, violin_loss, violin_loss_from_probs
from .text import TextEncoderConfig, TextMlmHead, ViolinTextEncoder, load_bert_state_dict

__all__ = ["BidafAttn", "RNNEncoder", "TextEncoderConfig", "TextMlmHead", "ViolinBase", "ViolinBaseline",
           "ViolinConfig", "ViolinTextEncoder", "load_bert_state_dict", "violin_loss", "violin_loss_from_probs"]
