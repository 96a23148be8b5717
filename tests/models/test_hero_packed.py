"""The packed HERO encoder (all segments in one varlen pass, index-add fusion, packed temporal transformer) equals
the official padded path (gather_index compaction, -10000 masks, per-subtitle fusion loop) in outputs and
gradients, on random batches with varied segment counts, frame runs, subtitle lengths, unmatched frames, subtitles
without frames and empty subtitle texts; a subtitle aligned past its video raises."""

from __future__ import annotations

import pytest
import torch
from test_hero_model import MAX_FRM, VDIM, VOCAB, official_video_collate
from test_hero_tasks import _compare, _model

from fastvl.models.hero.reference import hero_repr_reference


def random_videos(g: torch.Generator, n_videos: int) -> list:
    """Videos of 1..12 frames; frames covered by runs of 1..4 (one subtitle each, at most MAX_FRM) or left
    unmatched; extra subtitles without frames; texts of 0..7 tokens."""
    def rint(lo: int, hi: int) -> int:
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    videos = []
    for _ in range(n_videos):
        n_frames = rint(1, 12)
        subs, f = [], 0
        while f < n_frames:
            if rint(0, 3) == 0:  # unmatched frame
                f += 1
                continue
            run = min(rint(1, 4), n_frames - f, MAX_FRM)
            subs.append((torch.randint(3, VOCAB, (rint(0, 7),), generator=g).tolist(), list(range(f, f + run))))
            f += run
        for _ in range(rint(0, 2)):  # subtitles without frames, anywhere in the list
            subs.insert(rint(0, len(subs)), (torch.randint(3, VOCAB, (rint(0, 5),), generator=g).tolist(), []))
        if not subs:
            subs = [([], list(range(min(n_frames, MAX_FRM))))]
        videos.append((torch.randn(n_frames, VDIM, generator=g), subs))
    return videos


@pytest.mark.parametrize("n_videos", [1, 3, 5])
@pytest.mark.parametrize("train", [pytest.param(False, id="eval"), pytest.param(True, id="train")])
def test_packed_repr_equals_padded(train, n_videos, gen):
    model = _model(train)
    batch = official_video_collate(random_videos(gen, n_videos))
    out, grads = _compare(model, batch, ("c_v_feats", "f_v_feats"), lambda b: model.v_encoder(b, "repr"),
                          lambda b: hero_repr_reference(model.v_encoder, b))
    assert out[0].shape == (n_videos, batch["c_v_feats"].shape[1], 16)
    assert grads["c_v_feats"].abs().sum() > 0


def test_packed_repr_equals_padded_when_no_subtitle_has_frames():
    """Every frame unmatched: the padded path never runs the subtitle encoder, the packed one must give it zero
    gradients (a case the random batches reach only by chance)."""
    model = _model(True)
    g = torch.Generator().manual_seed(0)
    batch = official_video_collate([(torch.randn(1, VDIM, generator=g), [([29, 42, 52], []), ([23], [])])])
    _, grads = _compare(model, batch, ("c_v_feats", "f_v_feats"), lambda b: model.v_encoder(b, "repr"),
                        lambda b: hero_repr_reference(model.v_encoder, b))
    assert grads["c_v_feats"].abs().sum() > 0
    assert grads["f_v_feats"].abs().sum() == 0


def test_subtitle_aligned_past_its_video_raises():
    model = _model(False)
    g = torch.Generator().manual_seed(0)
    videos = [(torch.randn(7, VDIM, generator=g), [([5], [0, 1])]), (torch.randn(3, VDIM, generator=g), [([6], [1])])]
    batch = official_video_collate(videos)
    batch["sub_idx2frame_idx"][1] = [(0, [4])]  # inside the padded grid (7 slots), past video 1's 3 frames
    with pytest.raises(ValueError, match="sub_idx2frame_idx"):
        model.v_encoder(batch, "repr")
