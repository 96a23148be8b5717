"""The scoring of the five VALUE probes, on plain arrays (one example's maps, or collected feature matrices).

Shapes: ``attn`` is one example's attention [layers, heads, n, n] over its joint sequence (text first: [CLS], the
words' tokens, [SEP]; then its regions), ``txt_len`` the number of text tokens; ``t2i`` / ``i2t`` / ``i2i`` are its
text -> region, region -> text and region -> region blocks (a two-stream model's cross and vision maps).
scikit-learn (the ``probe`` extra) is imported inside the functions that need it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bin_values", "box_pair_features", "cross_modal_flags", "fusion_nmi", "joint_blocks", "linear_probe",
           "modality_mass", "nmi", "phrase_region_features", "region_pair_features", "relation_slot_features",
           "require_sklearn"]


def require_sklearn():
    """The ``sklearn`` module, or an ImportError saying how to get it."""
    try:
        import sklearn
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("fastvl.probe needs scikit-learn for its linear probes and k-means: "
                          "pip install 'fastvl[probe]' (or pip install scikit-learn)") from e
    return sklearn


def nmi(labels_a: Sequence[int], labels_b: Sequence[int]) -> float:
    """Normalised mutual information of two labelings (arithmetic-mean normalisation; 1 = identical partitions,
    0 = independent)."""
    require_sklearn()
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(np.asarray(labels_a), np.asarray(labels_b)))


def fusion_nmi(tokens: np.ndarray, modality: np.ndarray, seed: int = 0) -> float:
    """Probe 1, multimodal fusion degree of one layer: k-means (k = 2) on the token outputs ``tokens`` [n, H], NMI of
    the clusters against ``modality`` [n] (0 text, 1 region). Lower = more fused."""
    require_sklearn()
    from sklearn.cluster import KMeans

    tokens = np.asarray(tokens, np.float64)
    if len(tokens) < 2 or len(np.unique(modality)) < 2:
        raise ValueError(f"fusion_nmi: need >= 2 tokens of both modalities, got {len(tokens)} tokens with modalities "
                         f"{sorted(set(np.asarray(modality).tolist()))}")
    clusters = KMeans(n_clusters=2, n_init=10, random_state=seed).fit_predict(tokens)
    return nmi(modality, clusters)


def modality_mass(attn: np.ndarray, txt_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Probe 2, modality importance of one example: the [CLS] query's attention mass on text keys and on region keys,
    each [layers, heads]."""
    cls_row = np.asarray(attn)[:, :, 0, :]
    return cls_row[..., :txt_len].sum(-1), cls_row[..., txt_len:].sum(-1)


def cross_modal_flags(attn: np.ndarray, txt_len: int, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Probe 3, cross-modal heads of one example: ``(img2txt, txt2img)`` bool [layers, heads], True where some region
    query puts more than ``threshold`` of its attention on text keys (resp. some text query on region keys)."""
    a = np.asarray(attn)
    img_q = a[:, :, txt_len:, :txt_len].sum(-1)  # [layers, heads, n_img]
    txt_q = a[:, :, :txt_len, txt_len:].sum(-1)  # [layers, heads, n_txt]
    img2txt = (img_q > threshold).any(-1) if img_q.shape[-1] else np.zeros(a.shape[:2], bool)
    txt2img = (txt_q > threshold).any(-1) if txt_q.shape[-1] else np.zeros(a.shape[:2], bool)
    return img2txt, txt2img


def phrase_region_features(t2i: np.ndarray, i2t: np.ndarray, tokens: tuple[int, int], region: int) -> np.ndarray:
    """Probe 3, visual coreference: the per-head attention between a phrase (text tokens ``tokens`` = [start, end))
    and region ``region``, both directions: phrase -> region (mean over the phrase's tokens) then region -> phrase
    (summed over them); [2 * layers * heads].

    Args:
        t2i: text -> region attention [layers, heads, tl, n]; i2t: region -> text attention [layers, heads, n, tl]
            (for a single-stream model, blocks of the joint map: see :func:`joint_blocks`).
    """
    s, e = tokens
    return np.concatenate([np.asarray(t2i)[:, :, s:e, region].mean(-1).ravel(),
                           np.asarray(i2t)[:, :, region, s:e].sum(-1).ravel()])


def region_pair_features(i2i: np.ndarray, subject: int, obj: int) -> np.ndarray:
    """Probe 4, visual relations: per-head attention subject -> object then object -> subject, from the region ->
    region attention ``i2i`` [layers, heads, n, n]; [2 * layers * heads]."""
    a = np.asarray(i2i)
    return np.concatenate([a[:, :, subject, obj].ravel(), a[:, :, obj, subject].ravel()])


def relation_slot_features(t2i: np.ndarray, i2t: np.ndarray, slot: int, subject: int, obj: int) -> np.ndarray:
    """Probe 4, the text <-> region side of a stated relation: per head, the attention between the relation's text
    slot (token ``slot``: its predicate words replaced by one [MASK], see
    :func:`fastvl.probe.dataset.mask_stated_relations`) and the subject and object regions, in the order slot ->
    subject, slot -> object, subject -> slot, object -> slot; [4 * layers * heads] (for one slot token this is
    :func:`phrase_region_features` of the subject then of the object).

    The predicate words themselves are masked because their identity would leak the label: 'left' and 'above' are
    different queries, so even random weights attend differently from them whatever the image shows."""
    span = (slot, slot + 1)
    return np.concatenate([phrase_region_features(t2i, i2t, span, subject).reshape(2, -1),
                           phrase_region_features(t2i, i2t, span, obj).reshape(2, -1)])[[0, 2, 1, 3]].ravel()


def box_pair_features(pos: np.ndarray, subject: int, obj: int) -> np.ndarray:
    """Probe 4's floor: the model's INPUT position features of the subject then the object region (``pos`` [n, 7]:
    x1, y1, x2, y2, w, h, w * h); [14]. The same linear probe on these says how much of a spatial relation the raw
    boxes already give, with no attention at all."""
    p = np.asarray(pos)
    return np.concatenate([p[subject], p[obj]])


def joint_blocks(attn: np.ndarray, txt_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(text -> region, region -> text, region -> region) blocks of a joint attention [layers, heads, n, n] whose
    first ``txt_len`` rows / columns are text."""
    a = np.asarray(attn)
    return a[:, :, :txt_len, txt_len:], a[:, :, txt_len:, :txt_len], a[:, :, txt_len:, txt_len:]


def bin_values(values: Sequence[str], bins: int = 3) -> list[str]:
    """Integer-valued properties with more than 2 * ``bins`` distinct values (a sentence length) -> ``bins``
    quantile bins named 'q0', 'q1', ...; anything else unchanged."""
    try:
        nums = np.asarray([int(v) for v in values])
    except (TypeError, ValueError):
        return list(values)
    if len(np.unique(nums)) <= 2 * bins:
        return list(values)
    edges = np.quantile(nums, np.linspace(0, 1, bins + 1)[1:-1])
    return [f"q{int(k)}" for k in np.searchsorted(edges, nums, side="right")]


def linear_probe(features: np.ndarray, labels: Sequence, groups: Sequence | None = None, seed: int = 0,
                 folds: int = 5) -> dict:
    """A cross-validated linear probe (standardised features, multinomial logistic regression).

    Folds are stratified by label and, with ``groups`` (e.g. the image of each row), keep a group in one fold; the
    split is fixed by ``seed``. Returns {'accuracy' (mean over folds), 'std', 'majority' (accuracy of predicting the
    training folds' most common label, over the same folds), 'n', 'classes', 'folds'}; or {'skipped': reason, ...}
    when the labels have one class or too few rows per class for two folds."""
    require_sklearn()
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X = np.asarray(features, np.float64)
    y = np.asarray([str(v) for v in labels])
    if X.ndim != 2 or X.shape[0] != len(y):
        raise ValueError(f"linear_probe: 'features' must be [n, d] with n = len(labels) = {len(y)}, got "
                         f"{list(X.shape)}")
    classes, counts = np.unique(y, return_counts=True)
    out = {"n": int(len(y)), "classes": {str(c): int(k) for c, k in zip(classes, counts)}}
    if len(classes) < 2:
        return {**out, "skipped": "one class only"}
    k = min(folds, int(counts.min()))
    if groups is not None:
        k = min(k, len(set(groups)))
    if k < 2:
        return {**out, "skipped": f"too few rows per class for 2 folds (smallest class {int(counts.min())})"}
    if groups is not None:
        splits = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(X, y, np.asarray(groups))
    else:
        splits = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(X, y)
    acc, maj = [], []
    for train, test in splits:
        if len(np.unique(y[train])) < 2:
            vals, cnt = np.unique(y[train], return_counts=True)
            pred = np.full(len(test), vals[cnt.argmax()])
        else:
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            pred = clf.fit(X[train], y[train]).predict(X[test])
        acc.append(float((pred == y[test]).mean()))
        vals, cnt = np.unique(y[train], return_counts=True)
        maj.append(float((y[test] == vals[cnt.argmax()]).mean()))
    return {**out, "accuracy": float(np.mean(acc)), "std": float(np.std(acc)), "majority": float(np.mean(maj)),
            "folds": k}
