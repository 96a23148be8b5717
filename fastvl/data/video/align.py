"""Subtitle-to-frame alignment as the official HERO preprocessing (``scripts/prepro_sub.py``).

Frame r covers [r * interval, (r + 1) * interval). Subtitle k (start, end seconds; sorted by start) spans frames
floor(start / interval) .. ceil(end / interval) - 1, inside the video; a subtitle that starts at or after the video's
end gets no frame; a last subtitle longer than 16 s keeps only its first 11 frames (official). Each frame goes to
the ONE subtitle spanning it with the highest temporal IoU (ties to the earlier subtitle); frames spanned by no
subtitle are ``unmatched_frames``. So a subtitle can end with no frame (e.g. a short line inside a longer one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["temporal_iou", "align_subtitles", "pseudo_subtitles"]


def temporal_iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    """Intersection over union of two [start, end] intervals (0 when they only touch)."""
    inter = min(a[1], b[1]) - max(a[0], b[0])
    if inter <= 0:
        return 0.0
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))


def align_subtitles(spans: Sequence[tuple[float, float]], nframes: int, interval: float
                    ) -> tuple[list[tuple[int, list[int]]], list[int], list[tuple[int, list[int]]]]:
    """Align subtitles (start, end) in seconds to the frames of a video.

    Returns:
        (unique_sub2frames: [(k, frames)] for every subtitle, each frame in at most one; unmatched_frames;
        sub2frames: [(k, every frame the subtitle spans)]).
    """
    if interval <= 0:
        raise ValueError(f"align_subtitles: 'interval' must be > 0, got {interval}")
    starts = [float(s) for s, _ in spans]
    if starts != sorted(starts):
        raise ValueError("align_subtitles: subtitles must be sorted by start time")
    scaled = [(float(s) / interval, float(e) / interval) for s, e in spans]
    video_end = interval * nframes
    spanned: dict[int, list[int]] = {}
    for k, ((s, e), (ss, se)) in enumerate(zip(spans, scaled)):
        if s >= video_end:
            continue
        frames = list(range(math.floor(ss), math.ceil(se)))
        if k == len(spans) - 1 and min(e, video_end) - s > 16:
            frames = frames[:11]
        spanned[k] = frames
    owner: dict[int, int] = {}
    for f in range(nframes):
        best, best_iou = None, -1.0
        for k, frames in spanned.items():
            if f in frames:
                iou = temporal_iou((f, f + 1), scaled[k])
                if iou > best_iou:
                    best, best_iou = k, iou
        if best is not None:
            owner[f] = best
    unique = [(k, sorted(f for f, o in owner.items() if o == k)) for k in range(len(spans))]
    unmatched = [f for f in range(nframes) if f not in owner]
    sub2frames = [(k, spanned.get(k, [])) for k in range(len(spans))]
    return unique, unmatched, sub2frames


def pseudo_subtitles(nframes: int, chunk: int = 5) -> list[tuple[int, list[int]]]:
    """The empty pseudo-subtitles of a video without subtitles: one per ``chunk`` frames."""
    return [(k, list(range(s, min(s + chunk, nframes)))) for k, s in enumerate(range(0, nframes, chunk))]
