"""The VIOLIN baseline (Liu et al., CVPR 2020), drop-in for jimmy646/violin ``model/ViolinBase.py``: same
constructor options, forward signature and ``state_dict`` keys (``lstm_raw.rnn.*``, ``lstm_mature_vid.rnn.*``,
``bert_fc.1.*``, ``video_fc.1.*``, ``vid_ctx_rnn.rnn.*``, ``sub_ctx_rnn.rnn.*``, ``final_fc.{0,3}.*``).

Streams: video features -> Dropout 0.5 -> Linear(feat, embed) -> Tanh -> BiLSTM(hsize1); text features (frozen BERT
outputs, embed-d) -> Dropout 0.5 -> Linear(embed, 2 hsize1) -> Tanh (shared by statement and subtitles). BiDAF
(dot similarity) attends from every statement token to the video and to the subtitle; with both streams the
statement, both attended contexts and their products [s, u_v, u_s, s*u_v, s*u_s] go through one BiLSTM(hsize2)
whose final hidden state feeds Linear(2 hsize2, hsize2) -> ReLU -> Dropout 0.5 -> Linear(hsize2, 1) -> Sigmoid.
Training pairs every video with one entailed and one contradicted statement: loss -log p(pos) - log(1 - p(neg)).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = ["BidafAttn", "RNNEncoder", "ViolinBase", "ViolinConfig", "lengths_tensor", "violin_loss",
           "violin_loss_from_probs"]

STREAMS = ("vid", "sub")


@dataclass
class ViolinConfig:
    """Options of the official ``ViolinBase(opt)`` (``opt.vid_feat_size`` ...); defaults are the paper's.

    ``normalize_video``: L2-normalise each frame feature before the video stream (the official data loader does it;
    here the model does, so raw features may be passed).
    """

    vid_feat_size: int = 2048
    embed_size: int = 768
    hsize1: int = 150
    hsize2: int = 300
    input_streams: tuple[str, ...] = STREAMS
    normalize_video: bool = True

    def __post_init__(self) -> None:
        self.input_streams = tuple(self.input_streams)
        bad = [s for s in self.input_streams if s not in STREAMS]
        if bad:
            raise ValueError(f"fastvl.models.violin: input_streams must be a subset of {STREAMS}, got {bad}")
        for name in ("vid_feat_size", "embed_size", "hsize1", "hsize2"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"fastvl.models.violin: {name} must be a positive int, got {v!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input_streams"] = list(self.input_streams)
        return d


def lengths_tensor(name: str, lengths: torch.Tensor | Sequence[int], batch: int, max_len: int) -> torch.Tensor:
    """``lengths`` as an int64 CPU tensor [batch], each in [1, max_len] (ValueError naming ``name`` otherwise)."""
    lens = torch.as_tensor(lengths).reshape(-1).to("cpu", torch.long)
    if lens.numel() != batch:
        raise ValueError(f"fastvl.models.violin: {name} lengths must have {batch} entries, got {lens.numel()}")
    if batch and (int(lens.min()) < 1 or int(lens.max()) > max_len):
        raise ValueError(f"fastvl.models.violin: {name} lengths must be in [1, {max_len}] (the padded length), got "
                         f"{lens.tolist()}")
    return lens


class RNNEncoder(nn.Module):
    """A batch-first (Bi)LSTM over padded sequences of given lengths (official ``model/rnn.py``: key ``rnn.*``).

    forward(inputs [B, T, D], lengths [B]) -> (outputs [B, T, dirs * H] (0 past each length), last hidden state of
    the top layer [B, dirs * H]).
    """

    def __init__(self, word_embedding_size: int, hidden_size: int, bidirectional: bool = True, dropout_p: float = 0,
                 n_layers: int = 1, rnn_type: str = "lstm"):
        super().__init__()
        if rnn_type.lower() not in ("lstm", "gru", "rnn"):
            raise ValueError(f"fastvl.models.violin: rnn_type must be lstm, gru or rnn, got {rnn_type!r}")
        self.rnn_type = rnn_type.lower()
        self.n_dirs = 2 if bidirectional else 1
        self.rnn = getattr(nn, self.rnn_type.upper())(word_embedding_size, hidden_size, n_layers, batch_first=True,
                                                      bidirectional=bidirectional, dropout=dropout_p)

    def forward(self, inputs: torch.Tensor, lengths: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        lens = lengths_tensor("RNNEncoder", lengths, inputs.shape[0], inputs.shape[1])
        packed = pack_padded_sequence(inputs, lens, batch_first=True, enforce_sorted=False)
        out, hidden = self.rnn(packed)
        outputs, _ = pad_packed_sequence(out, batch_first=True, total_length=inputs.shape[1])
        if self.rnn_type == "lstm":
            hidden = hidden[0]
        hidden = hidden[-self.n_dirs:].transpose(0, 1).reshape(inputs.shape[0], -1)
        return outputs, hidden


class BidafAttn(nn.Module):
    """BiDAF context-to-query attention with dot similarity (the official ``BidafAttn(.., method='dot')``).

    forward(s1 [B, T1, D], l1 [B], s2 [B, T2, D], l2 [B]) -> (u [B, T1, D], None): u[b, i] = sum_j
    softmax_j(s1[b, i] . s2[b, j]) s2[b, j] over j < l2[b]; rows i >= l1[b] are 0.
    """

    def __init__(self, channel_size: int, method: str = "dot"):
        super().__init__()
        if method != "dot":
            raise ValueError(f"fastvl.models.violin: BidafAttn supports method='dot' (the VIOLIN baseline's), got "
                             f"{method!r}")
        self.method = method
        self.channel_size = channel_size

    def forward(self, s1: torch.Tensor, l1: torch.Tensor | Sequence[int], s2: torch.Tensor,
                l2: torch.Tensor | Sequence[int]) -> tuple[torch.Tensor, None]:
        b = s1.shape[0]
        l1 = lengths_tensor("BidafAttn l1", l1, b, s1.shape[1]).to(s1.device)
        l2 = lengths_tensor("BidafAttn l2", l2, b, s2.shape[1]).to(s1.device)
        valid = (torch.arange(s1.shape[1], device=s1.device)[None, :, None] < l1[:, None, None]) & \
                (torch.arange(s2.shape[1], device=s1.device)[None, None, :] < l2[:, None, None])
        s = torch.bmm(s1, s2.transpose(1, 2)).masked_fill(~valid, float("-inf"))
        a = torch.softmax(s, dim=2).masked_fill(~valid, 0.0)
        return torch.bmm(a, s2), None


class ViolinBase(nn.Module):
    """The official baseline (see the module docstring). ``opt``: a :class:`ViolinConfig` or any object with its
    attribute names (an official argparse namespace works).

    forward(vid_input=(vid_feat [B, Tv, vid_feat_size], vid_lens [B]), sub_input=(sub_hidden [B, Ts, embed_size],
    sub_lens [B]), state_input=(state_hidden [B, Tq, embed_size], state_lens [B])) -> p(entailed) [B, 1] (sigmoid).
    ``return_logits=True`` returns the pre-sigmoid score [B, 1] instead (for a stable loss).
    """

    def __init__(self, opt: ViolinConfig):
        super().__init__()
        h1, h2, emb = opt.hsize1, opt.hsize2, opt.embed_size
        self.input_streams = tuple(opt.input_streams)
        self.normalize_video = bool(getattr(opt, "normalize_video", False))
        self.vid_feat_size = opt.vid_feat_size
        self.embed_size = emb
        self.lstm_raw = RNNEncoder(emb, h1, bidirectional=True, dropout_p=0, n_layers=1, rnn_type="lstm")
        self.lstm_mature_vid = RNNEncoder(h1 * 2 * 5, h2, bidirectional=True, dropout_p=0, n_layers=1,
                                          rnn_type="lstm")
        self.bert_fc = nn.Sequential(nn.Dropout(0.5), nn.Linear(emb, h1 * 2), nn.Tanh())
        if "vid" in self.input_streams:
            self.video_fc = nn.Sequential(nn.Dropout(0.5), nn.Linear(opt.vid_feat_size, emb), nn.Tanh())
            self.vid_ctx_rnn = RNNEncoder(h1 * 2 * 3, h2, bidirectional=True, dropout_p=0, n_layers=1,
                                          rnn_type="lstm")
        if "sub" in self.input_streams:
            self.sub_ctx_rnn = RNNEncoder(h1 * 2 * 3, h2, bidirectional=True, dropout_p=0, n_layers=1,
                                          rnn_type="lstm")
        head_in = h2 * 2 if self.input_streams else h1 * 2
        if self.input_streams:
            self.bidaf = BidafAttn(h1 * 2, method="dot")
        self.final_fc = nn.Sequential(nn.Linear(head_in, h2), nn.ReLU(), nn.Dropout(0.5), nn.Linear(h2, 1),
                                      nn.Sigmoid())

    def _check(self, name: str, x: torch.Tensor, dim: int) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"fastvl.models.violin: {name} must be [B, T, {dim}], got {shape}")

    def forward(self, vid_input: tuple[torch.Tensor, torch.Tensor] | None,
                sub_input: tuple[torch.Tensor, torch.Tensor] | None,
                state_input: tuple[torch.Tensor, torch.Tensor], return_logits: bool = False) -> torch.Tensor:
        state_hidden, state_lens = state_input
        self._check("state_input[0] (statement features)", state_hidden, self.embed_size)
        state_lens = lengths_tensor("state", state_lens, state_hidden.shape[0], state_hidden.shape[1])
        s = self.bert_fc(state_hidden)
        vectors, attended = [], {}
        if "vid" in self.input_streams:
            vid_feat, vid_lens = vid_input
            self._check("vid_input[0] (video features)", vid_feat, self.vid_feat_size)
            if self.normalize_video:
                vid_feat = F.normalize(vid_feat, dim=-1)
            vid_enc, _ = self.lstm_raw(self.video_fc(vid_feat), vid_lens)
            u_v, _ = self.bidaf(s, state_lens, vid_enc, vid_lens)
            attended["vid"] = u_v
            if len(self.input_streams) == 1:
                vectors.append(self.vid_ctx_rnn(torch.cat([s, u_v, s * u_v], dim=-1), state_lens)[1])
        if "sub" in self.input_streams:
            sub_hidden, sub_lens = sub_input
            self._check("sub_input[0] (subtitle features)", sub_hidden, self.embed_size)
            u_s, _ = self.bidaf(s, state_lens, self.bert_fc(sub_hidden), sub_lens)
            attended["sub"] = u_s
            if len(self.input_streams) == 1:
                vectors.append(self.sub_ctx_rnn(torch.cat([s, u_s, s * u_s], dim=-1), state_lens)[1])
        if not self.input_streams:  # statement only: max over its valid tokens
            valid = torch.arange(s.shape[1], device=s.device)[None, :] < state_lens.to(s.device)[:, None]
            vectors.append(s.masked_fill(~valid[..., None], float("-inf")).amax(1))
        if len(self.input_streams) == 2:
            u_v, u_s = attended["vid"], attended["sub"]
            fused = torch.cat([s, u_v, u_s, s * u_v, s * u_s], dim=-1)
            vectors = [self.lstm_mature_vid(fused, state_lens)[1]]
        vec = torch.cat(vectors, dim=1)
        return self.final_fc[:-1](vec) if return_logits else self.final_fc(vec)


def violin_loss(logit_pos: torch.Tensor, logit_neg: torch.Tensor) -> torch.Tensor:
    """mean(-log sigmoid(z_pos) - log(1 - sigmoid(z_neg))) from pre-sigmoid scores [B] (or [B, 1]); stable form of
    the official ``mean(-log(1 - p_neg) - log(p_pos))``."""
    return (F.softplus(-logit_pos.float()) + F.softplus(logit_neg.float())).mean()


def violin_loss_from_probs(p_pos: torch.Tensor, p_neg: torch.Tensor) -> torch.Tensor:
    """The official form on probabilities: mean(-log(1 - p_neg) - log(p_pos))."""
    return torch.mean(-torch.log(1.0 - p_neg) - torch.log(p_pos), dim=0)
