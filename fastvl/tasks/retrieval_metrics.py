"""Retrieval metrics: IR / TR recall@k over a [N texts, M images] score matrix (the official protocol, ties handled
as :func:`recall_at_k` says) and the one-line log format of :func:`fastvl.tasks.retrieval.evaluate_retrieval`'s result.

Re-exported by :mod:`fastvl.tasks.retrieval` (``from fastvl.tasks.retrieval import recall_at_k, format_recall``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["TIES", "format_recall", "recall_at_k"]

TIES = ("optimistic", "pessimistic", "expected")
_FN = "fastvl.tasks.retrieval"  # errors name the public entry point


def _check_txt2img(txt2img, n: int, m: int) -> torch.Tensor:
    t2i = torch.as_tensor(txt2img).long().reshape(-1).cpu()
    if t2i.numel() != n:
        raise ValueError(f"{_FN}.recall_at_k: 'txt2img' must have one image per text ({n}), got {t2i.numel()}")
    if n and (int(t2i.min()) < 0 or int(t2i.max()) >= m):
        bad = int(((t2i < 0) | (t2i >= m)).nonzero()[0])
        raise ValueError(f"{_FN}.recall_at_k: 'txt2img[{bad}]' = {int(t2i[bad])} is not an image index in [0, {m})")
    return t2i


def _check_img2txts(img2txts, t2i: torch.Tensor, m: int) -> None:
    """img2txts must be the inverse of txt2img (list of M lists, or a dict image -> texts)."""
    items = img2txts.items() if isinstance(img2txts, Mapping) else enumerate(img2txts)
    given: dict[int, set[int]] = {}
    for j, txts in items:
        if not 0 <= int(j) < m:
            raise ValueError(f"{_FN}.recall_at_k: 'img2txts' names image {j}, outside [0, {m})")
        given[int(j)] = {int(x) for x in txts}
    expect: dict[int, set[int]] = {}
    for t, j in enumerate(t2i.tolist()):
        expect.setdefault(j, set()).add(t)
    for j in set(given) | set(expect):
        if given.get(j, set()) != expect.get(j, set()):
            raise ValueError(f"{_FN}.recall_at_k: 'img2txts' disagrees with 'txt2img' for image {j}: img2txts gives "
                             f"texts {sorted(given.get(j, set()))}, txt2img gives {sorted(expect.get(j, set()))}")


def _hit_prob(higher: torch.Tensor, tied: torch.Tensor, gt_tied: torch.Tensor, k: int, ties: str) -> torch.Tensor:
    """P(some ground truth is within the top k) given ``higher`` candidates strictly above the best ground truth,
    ``tied`` candidates (ground truths included) at its score, ``gt_tied`` of them ground truths. float64."""
    higher, tied, gt_tied = higher.double(), tied.double(), gt_tied.double()
    if ties == "optimistic":
        return (higher < k).double()
    if ties == "pessimistic":
        return (higher + tied - gt_tied < k).double()
    slots = (k - higher).clamp(min=0)  # top-k places left for the tied group (random order within it)
    miss = torch.ones_like(higher)
    for j in range(k):
        f = ((tied - gt_tied - j) / (tied - j).clamp(min=1)).clamp(min=0)
        miss = torch.where(slots > j, miss * f, miss)
    return 1.0 - miss


def recall_at_k(scores: torch.Tensor, txt2img, img2txts=None, ks: Sequence[int] = (1, 5, 10),
                ties: str = "expected", chunk: int = 1024) -> dict[str, float]:
    """IR (text -> image) and TR (image -> text) recall@k in percent, the official protocol.

    IR: for text t, a hit at k when image ``txt2img[t]`` is among the k best images. TR: for image j, a hit when
    ANY text of image j is among the k best texts (images without a text are not queries).

    Ties (equal scores around the ground truth): ``'optimistic'`` ranks the ground truth first among its ties
    (= :func:`fastvl.tasks.metrics.retrieval_recall`), ``'pessimistic'`` last, ``'expected'`` (default) gives the
    expected hit rate under a uniformly random order of the tied candidates (what an arbitrary top-k does on
    average; a model that scores everything equal gets chance, not 100%).

    Args:
        scores: [N, M] (texts x images), higher = better match. txt2img: [N] ints, the image of each text.
        img2txts: optional, the texts of each image (list of M lists, or dict image -> texts); it must be the
            inverse of txt2img (checked) and is accepted for parity with the official signature.
        ks: cut-offs. chunk: rows compared at a time (memory bound).
    Returns:
        ``{'tr_r1', 'tr_r5', 'tr_r10', 'ir_r1', 'ir_r5', 'ir_r10', 'tr_mean', 'ir_mean', 'r_mean', 'n_txt', 'n_img'}``
        (recalls in percent; r_mean = mean of the six recalls).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        got = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"{_FN}.recall_at_k: 'scores' must be a [N texts, M images] tensor, got {got}")
    if ties not in TIES:
        raise ValueError(f"{_FN}.recall_at_k: 'ties' must be one of {TIES}, got {ties!r}")
    ks = [int(k) for k in ks]
    if not ks or min(ks) < 1:
        raise ValueError(f"{_FN}.recall_at_k: 'ks' must be positive ints, got {ks}")
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"{_FN}.recall_at_k: 'scores' contains NaN")
    n, m = scores.shape
    t2i = _check_txt2img(txt2img, n, m)
    if img2txts is not None:
        _check_img2txts(img2txts, t2i, m)
    s = scores.detach().float().cpu()
    # IR: one ground truth per text
    gt = s.gather(1, t2i[:, None])  # [N, 1]
    ir_hi = torch.cat([(s[a:a + chunk] > gt[a:a + chunk]).sum(1) for a in range(0, n, chunk)]) if n else \
        torch.zeros(0, dtype=torch.long)
    ir_eq = torch.cat([(s[a:a + chunk] == gt[a:a + chunk]).sum(1) for a in range(0, n, chunk)]) if n else \
        torch.zeros(0, dtype=torch.long)
    # TR: best ground-truth text of each image
    best = torch.full((m,), float("-inf")).scatter_reduce(0, t2i, gt[:, 0], reduce="amax", include_self=True)
    has = torch.zeros(m, dtype=torch.bool).index_fill_(0, t2i, True)
    tr_hi = torch.zeros(m, dtype=torch.long)
    tr_eq = torch.zeros(m, dtype=torch.long)
    for a in range(0, n, chunk):
        blk = s[a:a + chunk]
        tr_hi += (blk > best[None]).sum(0)
        tr_eq += (blk == best[None]).sum(0)
    gt_eq = torch.zeros(m, dtype=torch.long).index_add_(0, t2i, (gt[:, 0] == best[t2i]).long())
    tr_hi, tr_eq, gt_eq = tr_hi[has], tr_eq[has], gt_eq[has]
    out: dict[str, float] = {}
    for k in ks:
        out[f"tr_r{k}"] = 100.0 * float(_hit_prob(tr_hi, tr_eq, gt_eq, k, ties).mean()) if tr_hi.numel() else 0.0
    for k in ks:
        ir = _hit_prob(ir_hi, ir_eq, torch.ones_like(ir_eq), k, ties)
        out[f"ir_r{k}"] = 100.0 * float(ir.mean()) if n else 0.0
    out["tr_mean"] = sum(out[f"tr_r{k}"] for k in ks) / len(ks)
    out["ir_mean"] = sum(out[f"ir_r{k}"] for k in ks) / len(ks)
    out["r_mean"] = (out["tr_mean"] + out["ir_mean"]) / 2
    out["n_txt"] = n
    out["n_img"] = int(has.sum())
    return out


def format_recall(res: Mapping) -> str:
    """One log line: ``itr[exact] IR R@1/5/10 a/b/c  TR R@1/5/10 d/e/f  R-mean g  (pairs, seconds)``."""
    tag = res.get("mode", "?") + ("" if res.get("k") is None else f", k={res['k']}")
    line = (f"itr[{tag}] IR R@1/5/10 {res['ir_r1']:.2f}/{res['ir_r5']:.2f}/{res['ir_r10']:.2f}  "
            f"TR R@1/5/10 {res['tr_r1']:.2f}/{res['tr_r5']:.2f}/{res['tr_r10']:.2f}  R-mean {res['r_mean']:.2f}")
    if "pairs_scored" in res:
        line += f"  ({res['pairs_scored']}/{res['pairs_total']} pairs cross-encoded, {res.get('seconds', 0):.1f} s)"
    if res.get("mode") == "two_stage" and not res.get("exact"):
        line += f"  APPROXIMATE (shortlist coverage {res.get('shortlist_coverage', float('nan')):.1f}%)"
    return line
