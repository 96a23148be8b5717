"""Tiny official-format HERO batches for the task tests (built with fastvl.data.video's collate functions)."""

from __future__ import annotations

import torch

from fastvl.data.video.collate import (
    MlmSegment,
    VideoInput,
    fom_collate,
    mfm_collate,
    mlm_collate,
    vcmr_collate,
    video_qa_collate,
    violin_collate,
)

H, VOCAB, VDIM, MAX_FRM = 16, 48, 12, 20
SEP, CLS = 2, 0


def tiny_config(dropout: float = 0.0) -> dict:
    common = dict(attention_probs_dropout_prob=dropout, hidden_act="gelu", hidden_dropout_prob=dropout,
                  hidden_size=H, initializer_range=0.02, intermediate_size=24, max_position_embeddings=514,
                  num_attention_heads=2)
    return {"f_config": {**common, "num_hidden_layers": 1, "type_vocab_size": 2, "vocab_size": VOCAB},
            "c_config": {**common, "num_hidden_layers": 1, "type_vocab_size": 2},
            "q_config": {**common, "num_hidden_layers": 0, "type_vocab_size": 1, "vocab_size": VOCAB}}


def make_video(g: torch.Generator, nframes: int, subs: list[tuple[int, list[int]]], extra: list[int] | None = None,
               ) -> tuple[VideoInput, list[torch.Tensor]]:
    """A video of ``nframes`` frames; subs: (n_tokens, frame indices) per subtitle (a subtitle may have none);
    ``extra`` token ids appended to every subtitle (QA / statement text). Returns (VideoInput, subtitle ids)."""
    feats = torch.randn(nframes, VDIM, generator=g)
    ids, fv, attn, s2f, sub_ids = [], [], [], [], []
    for k, (nt, frames) in enumerate(subs):
        toks = torch.randint(4, VOCAB, (nt,), generator=g)
        sub_ids.append(toks)
        seq = torch.cat([torch.tensor([SEP]), toks, torch.tensor(extra or [], dtype=torch.long)])
        ids.append(seq)
        if frames:
            fv.append(feats[frames])
            attn.append(torch.ones(len(frames) + seq.numel(), dtype=torch.long))
        else:
            fv.append(torch.zeros(1, VDIM))
            attn.append(torch.cat([torch.zeros(1, dtype=torch.long), torch.ones(seq.numel(), dtype=torch.long)]))
        s2f.append((k, frames))
    return VideoInput(ids, fv, attn, feats, torch.ones(nframes, dtype=torch.long), len(subs), s2f), sub_ids


def videos(g: torch.Generator, extra: list[int] | None = None) -> list[VideoInput]:
    """Three videos: varied subtitle counts, a one-frame video, a subtitle with no frames, an unmatched frame."""
    return [make_video(g, 7, [(3, [0, 1, 2]), (5, [3, 4]), (2, [])], extra)[0],  # frames 5, 6 unmatched
            make_video(g, 1, [(4, [0])], extra)[0],
            make_video(g, 5, [(2, [0, 1]), (6, [2, 3, 4])], extra)[0]]


def mfm_batch(g: torch.Generator) -> dict:
    vs = videos(g)
    items = []
    for v in vs:
        n = v.c_v_feats.shape[0]
        m = torch.rand(n, generator=g) < 0.4
        m[int(torch.randint(n, (1,), generator=g))] = True
        seg = [m[f].clone() if f else torch.zeros(1, dtype=torch.bool) for _, f in v.sub2frames]
        items.append((v, seg, m))
    return mfm_collate(items)


def fom_batch(g: torch.Generator) -> dict:
    items = []
    for v in videos(g):
        n = v.c_v_feats.shape[0]
        order, target = torch.arange(n), torch.full((n,), -1)
        if n > 2:
            chosen = torch.randperm(n, generator=g)[:3]
            perm = chosen[torch.randperm(3, generator=g)]
            order[chosen] = perm
            target[perm] = chosen
        items.append((v, order, target))
    return fom_collate(items)


def mlm_batch(g: torch.Generator) -> dict:
    segs = []
    for _ in range(2):
        for nt, nf in ((4, 2), (6, 0), (3, 1)):
            toks = torch.randint(4, VOCAB, (nt,), generator=g)
            sel = torch.zeros(nt, dtype=torch.bool)
            sel[int(torch.randint(nt, (1,), generator=g))] = True
            ids = torch.cat([torch.tensor([CLS]), toks.masked_fill(sel, 3)])
            labels = torch.cat([torch.tensor([-1]), torch.where(sel, toks, torch.full_like(toks, -1))])
            feats = torch.randn(max(nf, 1), VDIM, generator=g) * (nf > 0)
            attn = torch.cat([torch.ones(nf, dtype=torch.long) if nf else torch.zeros(1, dtype=torch.long),
                              torch.ones(nt + 1, dtype=torch.long)])
            tgt = torch.cat([torch.zeros(max(nf, 1), dtype=torch.bool), labels != -1])
            segs.append(MlmSegment(ids, feats, attn, tgt, labels))
    return mlm_collate([segs])


def vcmr_batch(g: torch.Generator) -> dict:
    items = []
    for i, v in enumerate(videos(g)):
        n = v.c_v_feats.shape[0]
        qs = []
        for _ in range(2):
            q = torch.cat([torch.tensor([CLS]), torch.randint(4, VOCAB, (int(torch.randint(2, 6, (1,),
                                                                                            generator=g)),),
                                                             generator=g)])
            st = int(torch.randint(n, (1,), generator=g))
            ed = min(n - 1, st + 1)
            qs.append((q, torch.ones_like(q), f"v{i}", torch.tensor([st, ed])))
        items.append((v, f"v{i}", qs))
    return vcmr_collate(items)


def qa_batch(g: torch.Generator, n_answers: int = 5) -> dict:
    items = []
    for v0 in videos(g)[:2]:
        copies, ids, attn = [], [], []
        q = torch.randint(4, VOCAB, (3,), generator=g).tolist()
        subs = [(len(t) - 1, f) for t, (_, f) in zip(v0.f_input_ids, v0.sub2frames)]
        for _ in range(n_answers):
            a = torch.randint(4, VOCAB, (2,), generator=g).tolist()
            text = [SEP] + q + [SEP] + a
            copies.append(make_video(g, v0.c_v_feats.shape[0], subs, text)[0]._replace(c_v_feats=v0.c_v_feats))
            ids.append(torch.tensor(text))
            attn.append(torch.ones(len(text), dtype=torch.long))
        n = v0.c_v_feats.shape[0]
        items.append((copies, ids, attn, ["q"], [torch.tensor([int(torch.randint(n_answers, (1,), generator=g))])],
                      [torch.tensor([0, n - 1])]))
    return video_qa_collate(items)


def violin_batch(g: torch.Generator) -> dict:
    items = []
    for v0 in videos(g):
        subs = [(len(t) - 1, f) for t, (_, f) in zip(v0.f_input_ids, v0.sub2frames)]
        copies, ids, attn, tg = [], [], [], []
        for label in (1, 0):
            text = [SEP] + torch.randint(4, VOCAB, (4,), generator=g).tolist()
            copies.append(make_video(g, v0.c_v_feats.shape[0], subs, text)[0]._replace(c_v_feats=v0.c_v_feats))
            ids.append(torch.tensor(text))
            attn.append(torch.ones(len(text), dtype=torch.long))
            tg.append(torch.tensor([label]))
        items.append((copies, ids, attn, ["s+", "s-"], tg))
    return violin_collate(items)
