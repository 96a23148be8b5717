"""``fastvl finetune --task itr``: image-text retrieval (hinge on in-batch negatives; ``--opt hard_neg=true`` for
in-batch hard negatives); evaluation: IR / TR recall over the validation text x image matrix, exact
(:func:`fastvl.tasks.retrieval.evaluate_retrieval`); ``--opt rerank_k=K`` adds the two-stage figures."""

from __future__ import annotations

from ..data import BadExampleCounter
from ..data.finetune_data import ITRDataset
from ..models.uniter import UniterForImageTextRetrieval
from ..tasks.itr import ITRTask
from ..tasks.retrieval import evaluate_retrieval, split_batch
from .base import COMMON_DEFAULTS, Recipe, build_uniter, bundle, data_paths, model_config, open_split

__all__ = ["RECIPE"]


def _itr_data(s, rank, world):
    paths = data_paths(s, "itr")
    counter = BadExampleCounter()
    train, val = open_split(ITRDataset, s, paths, counter)
    data = bundle(s, paths, {"itr": train}, {"itr": val} if val else {}, rank, world, counter)
    data.info["eval_images"] = int(s.options.get("eval_images", 100))
    return data


def _itr_model(s, data, init):
    model = build_uniter(UniterForImageTextRetrieval, s, data, init, margin=float(s.options.get("margin", 0.2)))
    if init is not None and "itm_output.weight" in init:
        model.init_output()
    return model


def _itr_tasks(model, s, data):
    return {"itr": ITRTask(model, num_neg=int(s.options.get("num_neg", 1)), hard_neg=s.options.get("hard_neg", False))}


def _itr_eval(tasks, data, device, s):
    """IR / TR recall over the validation text x image matrix (the first ``eval_images`` images and their texts),
    exact: every pair cross-encoded by :func:`fastvl.tasks.retrieval.evaluate_retrieval` (embeddings once, pairs
    packed). ``--opt rerank_k=K`` adds the approximate two-stage figures under ``itr2s_*`` keys."""
    ds: ITRDataset = data.val["itr"].dataset
    keep, _ = _itr_subset(ds, int(s.options.get("eval_images", 100)))
    batch = ds.make_batch(keep)
    if batch is None:
        return {}
    texts, images, txt2img = split_batch(batch, batch.img_fnames)
    model = tasks["itr"].model
    amp = "bf16" if device.type == "cuda" else None
    res = evaluate_retrieval(model, texts, images, txt2img, mode="exact", amp=amp, progress=False)
    out = {k: float(v) for k, v in res.items() if k.startswith(("ir_", "tr_", "r_"))}
    out["n_images"] = float(len(images))
    if "rerank_k" in s.options:
        two = evaluate_retrieval(model, texts, images, txt2img, mode="two_stage", k=int(s.options["rerank_k"]),
                                 amp=amp, progress=False)
        out.update({f"itr2s_{k}": float(v) for k, v in two.items() if k.startswith(("ir_", "tr_", "r_"))})
    return out


def _itr_subset(ds: ITRDataset, n_images: int) -> tuple[list[int], list[str]]:
    images: list[str] = []
    keep = []
    for i, (p, id_) in enumerate(ds.items):
        name = f"{p}/{ds.pairs[p][0].txt2img.get(id_)}"
        if name not in images:
            if len(images) >= n_images:
                continue
            images.append(name)
        keep.append(i)
    return keep, images


def _itr_chance(data):
    if not data.val:
        return 0.0
    n = len(_itr_subset(data.val["itr"].dataset, 10**9)[1])
    return 100.0 / max(1, min(n, int(data.info["eval_images"])))


RECIPE = Recipe(model_config=model_config,
                name="itr", build_data=_itr_data, build_model=_itr_model, build_tasks=_itr_tasks, evaluate=_itr_eval,
                metric="ir_r1", chance=_itr_chance,
                defaults=dict(COMMON_DEFAULTS, val_every=0),  # the exact val matrix is the slow part: at the end only
                help="image-text retrieval (hinge on in-batch negatives; IR/TR R@1/5/10)")
