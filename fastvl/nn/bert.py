"""BERT-style layer pieces on the PACKED layout ([total_tokens, H] + cu_seqlens), with the official module names.

Attribute names (``query``, ``key``, ``value``, ``dense``, ``LayerNorm``, ...) are those of the BERT layers that
UNITER / VILLA / HERO checkpoints were saved from, so ``state_dict`` keys match them exactly. These modules hold
parameters and call ``fastvl.ops``; the only math of their own is linear / LayerNorm / activation / residual.
Dropout is applied as in BERT (hidden dropout after each output projection, attention-probability dropout
inside the attention op). Every dropout rate lives in an ``nn.Dropout`` module, so code that walks the modules
(the official ``set_dropout(model, p)``, ``model.eval()``) controls all of them.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from ..ops import cross_modal_attention

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

LAYER_NORM_EPS = 1e-12  # BERT / UNITER LayerNorm epsilon

ACT2FN = {
    "gelu": lambda x: F.gelu(x),  # exact erf form, as UNITER
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "swish": F.silu,
}


def activation(name: str):
    """The activation function called ``name`` in a BERT config (``hidden_act``)."""
    if name not in ACT2FN:
        raise ValueError(f"fastvl.nn: hidden_act must be one of {sorted(ACT2FN)}, got {name!r}")
    return ACT2FN[name]


class BertSelfAttention(nn.Module):
    """Multi-head self-attention over packed sequences (UNITER: every token sees every token of its example).

    Args:
        hidden_size, num_attention_heads: hidden_size must be a multiple of the head count.
        attention_probs_dropout_prob: dropout on attention probabilities (training only).

    Attributes:
        dropout: ``nn.Dropout`` holding the attention-probability rate (the official module name). The fused
            attention op applies the dropout itself and reads only ``dropout.p`` (and ``self.training``); the
            module is never called on the probabilities. It has no parameters, so ``state_dict`` keys are the
            official ones; setting ``dropout.p`` (e.g. the official ``set_dropout``) changes the rate.
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, attention_probs_dropout_prob: float = 0.0):
        super().__init__()
        if hidden_size % num_attention_heads:
            raise ValueError(f"fastvl.nn.BertSelfAttention: hidden_size ({hidden_size}) must be a multiple of "
                             f"num_attention_heads ({num_attention_heads})")
        self.num_attention_heads = num_attention_heads
        self.attention_head_size = hidden_size // num_attention_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.dropout = nn.Dropout(attention_probs_dropout_prob)

    @property
    def dropout_p(self) -> float:
        """The attention-probability dropout rate (``dropout.p``; applied in training mode only)."""
        return self.dropout.p

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(*x.shape[:-1], self.num_attention_heads, self.attention_head_size)

    def project_q(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The queries of some rows: hidden_states [..., H] -> [..., heads, head_dim] (a view of ``query``'s output).

        For callers that run their own attention core on other row sets than the keys' (retrieval's [CLS]-only
        last layer)."""
        return self._heads(self.query(hidden_states))

    def project_kv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of some rows: hidden_states [..., H] -> (keys, values), each [..., heads, head_dim]."""
        return self._heads(self.key(hidden_states)), self._heads(self.value(hidden_states))

    def qkv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden_states [..., H] -> (queries, keys, values), each [..., heads, head_dim]: the projections
        :meth:`forward` feeds its attention core, for callers with their own core (a key/value cache, a padded view).
        """
        return (self.project_q(hidden_states), *self.project_kv(hidden_states))

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                mask: str = "bidirectional", prefix_lens: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states [T, H], cu_seqlens [B+1] int32, max_seqlen Python int -> context [T, H]."""
        q, k, v = self.qkv(hidden_states)
        ctx = cross_modal_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, mask=mask,
                                    prefix_lens=prefix_lens, dropout_p=self.dropout.p if self.training else 0.0)
        return ctx.reshape(hidden_states.shape[0], -1)


class BertSelfOutput(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual)."""

    def __init__(self, hidden_size: int, hidden_dropout_prob: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """hidden_states, input_tensor: [..., H] -> [..., H]."""
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertAttention(nn.Module):
    """Self-attention (``self``) followed by its output projection (``output``)."""

    def __init__(self, hidden_size: int, num_attention_heads: int, attention_probs_dropout_prob: float = 0.0,
                 hidden_dropout_prob: float = 0.0):
        super().__init__()
        self.self = BertSelfAttention(hidden_size, num_attention_heads, attention_probs_dropout_prob)
        self.output = BertSelfOutput(hidden_size, hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, **mask_kw
                ) -> torch.Tensor:
        """hidden_states [T, H] -> [T, H]."""
        return self.output(self.self(hidden_states, cu_seqlens, max_seqlen, **mask_kw), hidden_states)


class BertIntermediate(nn.Module):
    """act(dense(x)): H -> intermediate_size."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str = "gelu"):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)
        self.intermediate_act_fn = activation(hidden_act)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., intermediate_size]."""
        return self.intermediate_act_fn(self.dense(hidden_states))


class BertOutput(nn.Module):
    """LayerNorm(dropout(dense(x)) + residual): intermediate_size -> H."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_dropout_prob: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(intermediate_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        """hidden_states [..., intermediate_size], input_tensor [..., H] -> [..., H]."""
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class BertLayer(nn.Module):
    """One post-LN transformer layer on packed tokens.

    Args: a config object with hidden_size, num_attention_heads, intermediate_size, hidden_act,
    hidden_dropout_prob and attention_probs_dropout_prob attributes.
    """

    def __init__(self, config):
        super().__init__()
        self.attention = BertAttention(config.hidden_size, config.num_attention_heads,
                                       config.attention_probs_dropout_prob, config.hidden_dropout_prob)
        self.intermediate = BertIntermediate(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.output = BertOutput(config.hidden_size, config.intermediate_size, config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, **mask_kw
                ) -> torch.Tensor:
        """hidden_states [T, H], cu_seqlens [B+1] int32, max_seqlen Python int -> [T, H].

        = ``post_attention(attention.self(hidden_states, ...), hidden_states)``: callers with their own attention
        core (a key/value cache, a padded view, queries on some rows only) take the projections from
        ``attention.self.qkv`` / ``project_q`` / ``project_kv`` and finish the layer with :meth:`post_attention`."""
        return self.feed_forward(self.attention(hidden_states, cu_seqlens, max_seqlen, **mask_kw))

    def post_attention(self, context: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        """The layer after its attention core: output projection + residual LayerNorm, then :meth:`feed_forward`.

        Args:
            context: [..., H] the attention core's output (heads merged), for some rows of the layer input.
            hidden_states: [..., H] the layer input at those rows (the residual).
        Returns:
            [..., H] the layer output at those rows.
        """
        return self.feed_forward(self.attention.output(context, hidden_states))

    def feed_forward(self, attention_output: torch.Tensor) -> torch.Tensor:
        """The feed-forward block: attention_output [..., H] -> LayerNorm(FFN(x) + x) [..., H]."""
        return self.output(self.intermediate(attention_output), attention_output)


class BertPooler(nn.Module):
    """tanh(dense(first token)).

    ``forward`` takes either padded states [B, L, H] (the official call ``pooler(sequence_output)``; position 0 of
    each row is used) or the first tokens already selected, [B, H].
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.activation = nn.Tanh()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, L, H] or [B, H] -> [B, H]."""
        first = hidden_states[:, 0] if hidden_states.dim() == 3 else hidden_states
        return self.activation(self.dense(first))


class BertPredictionHeadTransform(nn.Module):
    """LayerNorm(act(dense(x)))."""

    def __init__(self, hidden_size: int, hidden_act: str = "gelu"):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.transform_act_fn = activation(hidden_act)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=LAYER_NORM_EPS)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[..., H] -> [..., H]."""
        return self.LayerNorm(self.transform_act_fn(self.dense(hidden_states)))


class BertLMPredictionHead(nn.Module):
    """transform, then the decoder whose weight is TIED to the word embedding table, plus an output bias.

    Args:
        embedding_weight: the word-embedding Parameter [V, H] shared with the decoder.
    """

    def __init__(self, hidden_size: int, hidden_act: str, embedding_weight: nn.Parameter):
        super().__init__()
        self.transform = BertPredictionHeadTransform(hidden_size, hidden_act)
        vocab, hidden = embedding_weight.shape
        self.decoder = nn.Linear(hidden, vocab, bias=False)
        self.decoder.weight = embedding_weight
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, H] -> logits [n, V]."""
        return self.decoder(self.transform(hidden_states)) + self.bias


class BertOnlyMLMHead(nn.Module):
    """The MLM head as checkpoints name it: ``cls.predictions.*``."""

    def __init__(self, hidden_size: int, hidden_act: str, embedding_weight: nn.Parameter):
        super().__init__()
        self.predictions = BertLMPredictionHead(hidden_size, hidden_act, embedding_weight)

    def forward(self, sequence_output: torch.Tensor) -> torch.Tensor:
        """[n, H] -> logits [n, V]."""
        return self.predictions(sequence_output)
