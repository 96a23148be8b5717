"""Random HERO batches in the official collate format, for benchmarks and tests: ``video_collate`` (official
data/data.py) of random videos, plus the VSM (data/vsm.py) and FOM (data/fom.py) keys.

Lengths follow the official data: frames per video drawn from a range (<= 100), each subtitle matched to a run of
consecutive frames (each frame to at most one subtitle), some frames unmatched, some subtitles without frames,
subtitle texts drawn from a token range (``[</s>] + ids``).
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

__all__ = ["official_video_collate", "random_pretrain_batch", "random_videos"]


def _rint(g: torch.Generator, lo: int, hi: int) -> int:
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def random_videos(g: torch.Generator, n_videos: int, vfeat_dim: int, vocab: int, frames: tuple[int, int] = (1, 100),
                  tokens: tuple[int, int] = (1, 60), run: tuple[int, int] = (1, 4), p_unmatched: float = 0.1,
                  p_no_frame: float = 0.05) -> list:
    """-> [(v_feat [nf, D], [(sub ids, matched frame indices), ...]), ...] (ids in 3..vocab-1)."""
    videos = []
    for _ in range(n_videos):
        n_frames = _rint(g, *frames)
        subs = []
        f = 0
        while f < n_frames:
            if float(torch.rand((), generator=g)) < p_unmatched:
                f += 1
                continue
            n = min(_rint(g, *run), n_frames - f)
            subs.append((torch.randint(3, vocab, (_rint(g, *tokens),), generator=g).tolist(), list(range(f, f + n))))
            f += n
            if float(torch.rand((), generator=g)) < p_no_frame:
                subs.append((torch.randint(3, vocab, (_rint(g, *tokens),), generator=g).tolist(), []))
        if not any(fr for _, fr in subs):
            subs.append(([], [n_frames - 1]))
        videos.append((torch.randn(n_frames, vfeat_dim, generator=g), subs))
    return videos


def official_video_collate(videos: list) -> dict:
    """Official ``VideoFeatSubTokDataset.__getitem__`` + ``video_collate`` for in-memory videos (see
    :func:`random_videos`): segments ``[frames ; [</s>] + ids]`` (one zero frame with attention 0 when a subtitle has
    no frames), pad id 1, positions clipped at 511, ``gather_index``, the clip-level keys and the Python lists."""
    ids_l, feats_l, attn_l, txt_lens, v_lens, c_feats, num_subs, sub2frames = [], [], [], [], [], [], [], []
    for v_feat, subs in videos:
        for sub_ids, frames in subs:
            ids = torch.tensor([2] + list(sub_ids))
            if frames:
                fv = v_feat[torch.tensor(frames)]
                attn = torch.ones(len(ids) + len(frames), dtype=torch.long)
            else:
                fv = v_feat.new_zeros(1, v_feat.shape[1])
                attn = torch.ones(len(ids) + 1, dtype=torch.long)
                attn[0] = 0
            ids_l.append(ids)
            feats_l.append(fv)
            attn_l.append(attn)
            txt_lens.append(len(ids))
            v_lens.append(fv.shape[0])
        c_feats.append(v_feat)
        num_subs.append(len(subs))
        sub2frames.append([(i, fr) for i, (_, fr) in enumerate(subs)])
    f_ids = pad_sequence(ids_l, batch_first=True, padding_value=1)
    f_attn = pad_sequence(attn_l, batch_first=True, padding_value=0)
    f_feats = pad_sequence(feats_l, batch_first=True)
    n_seg, max_vl = f_feats.shape[:2]
    gather = torch.arange(f_attn.shape[1]).unsqueeze(0).repeat(n_seg, 1)
    for i, (tl, nv) in enumerate(zip(txt_lens, v_lens)):
        gather[i, nv:nv + tl] = torch.arange(max_vl, max_vl + tl)
    c = pad_sequence(c_feats, batch_first=True)
    return {"f_sub_input_ids": f_ids, "f_sub_pos_ids": torch.arange(f_ids.shape[1]).clamp(max=511).unsqueeze(0),
            "f_v_feats": f_feats, "f_v_pos_ids": torch.arange(max_vl).unsqueeze(0), "f_attn_masks": f_attn,
            "f_gather_index": gather,
            "f_sub_input_attn_masks": pad_sequence([torch.ones(t, dtype=torch.long) for t in txt_lens],
                                                   batch_first=True),
            "c_v_feats": c, "c_pos_ids": torch.arange(c.shape[1]).unsqueeze(0).repeat(c.shape[0], 1),
            "c_attn_masks": pad_sequence([torch.ones(len(x), dtype=torch.long) for x in c_feats], batch_first=True),
            "num_subs": num_subs, "sub_idx2frame_idx": sub2frames}


def random_pretrain_batch(g: torch.Generator, n_videos: int, vfeat_dim: int, vocab: int, query_per_video: int = 5,
                          fom_prob: float = 0.15, device: str | torch.device = "cpu", **video_kw) -> dict:
    """A ``vsm_collate`` dict (query subtitles' text removed from their segments, queries ``[<s>] + ids``, targets,
    ``q_vidx``) that also carries the ``fom_collate`` keys (``shuffled_orders``, ``targets`` renamed
    ``fom_targets``), on ``device``."""
    videos = random_videos(g, n_videos, vfeat_dim, vocab, **video_kw)
    seg_videos, q_ids, targets, q_vidx = [], [], [], []
    for v, (feats, subs) in enumerate(videos):
        matched = [i for i, (_, fr) in enumerate(subs) if fr]
        pick = torch.randperm(len(matched), generator=g)[:query_per_video].tolist()
        chosen = {matched[i] for i in pick}
        seg_videos.append((feats, [([] if i in chosen else ids, fr) for i, (ids, fr) in enumerate(subs)]))
        items = []
        for i, (ids, fr) in enumerate(subs):
            if i in chosen:
                st = fr[0]
                items.append((torch.tensor([0] + list(ids)), torch.tensor([st, min(max(st + 1, fr[-1]),
                                                                                   feats.shape[0] - 1)])))
        while len(items) < query_per_video:
            items.append(items[-1])
        for ids, tgt in items:
            q_ids.append(ids)
            targets.append(tgt)
            q_vidx.append(v)
    batch = official_video_collate(seg_videos)
    ids = pad_sequence(q_ids, batch_first=True, padding_value=1)
    batch.update({"query_input_ids": ids, "query_pos_ids": torch.arange(ids.shape[1]).unsqueeze(0),
                  "query_attn_masks": pad_sequence([torch.ones(len(t), dtype=torch.long) for t in q_ids],
                                                   batch_first=True),
                  "targets": torch.stack(targets), "q_vidx": torch.tensor(q_vidx)})
    n_vid, n_frm = batch["c_v_feats"].shape[:2]
    orders = torch.arange(n_frm).unsqueeze(0).repeat(n_vid, 1)
    fom_t = torch.full((n_vid, n_frm), -1, dtype=torch.long)
    for v, (feats, _) in enumerate(videos):
        n = feats.shape[0]
        sel = [i for i in range(n) if float(torch.rand((), generator=g)) < fom_prob]
        if len(sel) < 2 and n >= 2:
            sel = torch.randperm(n, generator=g)[:2].tolist()
        perm = [sel[i] for i in torch.randperm(len(sel), generator=g).tolist()]
        for pos, new in zip(sel, perm):
            orders[v, pos] = new
            fom_t[v, new] = pos
    batch.update({"shuffled_orders": orders, "fom_targets": fom_t})
    return {k: (t.to(device) if isinstance(t, torch.Tensor) else t) for k, t in batch.items()}
