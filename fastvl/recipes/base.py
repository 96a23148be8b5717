"""What a fine-tuning recipe is made of: :class:`Recipe`, the run settings, the data bundle, and the helpers every
recipe uses (data paths, model config, loading pre-trained weights).

A recipe is one runnable job (``fastvl finetune --task NAME``): ``build_data`` (settings, rank, world size) ->
:class:`FinetuneData`; ``build_model`` (settings, data, init state_dict or None) -> model (load the weights BEFORE
growing type / word tables); ``build_tasks`` (model, settings, data) -> {source name: task module}; ``evaluate``
(tasks, data, device, settings) -> {metric: float}; ``metric`` (the headline key of evaluate's result); ``chance``
(a float or data -> float: the metric of a model that ignores its input); ``defaults`` (FinetuneSettings fields the
job changes from :data:`GENERIC_DEFAULTS`). ``build_data``'s ``sources`` are the trainer's batch sources keyed like
the task modules; ``val`` is whatever ``evaluate`` reads (None: no validation); ``dims`` the model sizes, saved with
the run so ``fastvl eval`` can rebuild the model. Task-specific settings travel in ``FinetuneSettings.options``
(``--opt key=value``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import BadExampleCounter, find_dbs
from ..data.finetune_data import FinetuneBatchSource, FinetuneDataset
from ..data.finetune_synthetic import FinetuneSynthConfig, finetune_synthetic
from ..models.uniter import UniterConfig, resolve_config
from ..train import checkpoint as ckpt
from ..train.loop import BatchSource

__all__ = ["COMMON_DEFAULTS", "GENERIC_DEFAULTS", "FinetuneData", "FinetuneSettings", "Recipe", "SettingsError",
           "accuracy_eval",
           "build_uniter", "bundle", "data_paths", "get_recipe", "last_losses", "list_recipes", "load_init_state",
           "load_pretrained", "majority_chance", "mean_of", "model_config", "open_split", "register_recipe",
           "run_folder", "save_run", "single_task", "unregister_recipe", "val_batches"]


class SettingsError(ValueError):
    """Settings that cannot work with the given data, weights or run folder (a user error: the message names the
    setting and the path)."""


# ----------------------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FinetuneSettings:
    """Everything a fine-tuning run needs; ``None`` fields take the task's defaults, then the generic ones.

    ``init``: weights to start from: a ``fastvl pretrain`` output folder (its latest checkpoint), a
    ``checkpoints/step_*`` folder, a ``.safetensors`` file or an official ``.pt`` state dict; None = random init.
    ``data``: a folder holding the task's txt_db / img_db (see the task's data class); ``txt_db`` / ``img_db`` /
    ``val_txt_db`` / ``val_img_db`` name them one by one; all empty = the synthetic data of the task.
    ``options``: task-specific settings (e.g. ``variant`` for NLVR2, ``ans2label`` for VQA; see each task).
    """

    task: str = "vqa"
    model: str = "uniter"  # the model family (a recipe is registered per (model, task))
    config: str | None = None  # model config (tiny | base | large | path); None: the --init run's, else tiny
    init: str | None = None
    data: str | None = None
    txt_db: list[str] = field(default_factory=list)
    img_db: list[str] = field(default_factory=list)
    val_txt_db: list[str] = field(default_factory=list)
    val_img_db: list[str] = field(default_factory=list)
    output: str | None = None  # None: runs/finetune-<task>
    steps: int | None = None
    lr: float | None = None
    warmup_steps: int | None = None
    batch_tokens: int | None = None
    grad_accum: int | None = None
    grad_clip: float | None = None
    weight_decay: float | None = None
    head_lr_mult: float | None = None  # learning-rate multiplier of the task head (official VQA: 10)
    dropout: float | None = None  # every dropout of the model (official set_dropout); None: the model config's
    betas: tuple[float, float] = (0.9, 0.98)
    seed: int = 42
    max_txt_len: int | None = None
    val_every: int | None = None
    ckpt_every: int | None = None
    log_every: int | None = None
    val_batches: int | None = None  # validation batches per evaluation (None: the whole validation split)
    precision: str = "auto"
    device: str = "auto"
    resume: bool = False
    skip_bad_examples: bool = False
    progress: bool = True
    adv: dict | None = None  # VILLA adversarial fine-tuning: AdvConfig fields (None = off)
    # CPU intra-op threads per process. None: 1 for models of hidden size <= 256 (too small for threading to pay),
    # torch's default otherwise. OMP_NUM_THREADS, when set, wins.
    threads: int | None = None
    options: dict = field(default_factory=dict)

    def resolved(self, spec: Recipe | None = None) -> FinetuneSettings:
        """A copy with unset fields filled from the task's defaults, then :data:`GENERIC_DEFAULTS`."""
        spec = spec or get_recipe(self.task, self.model)
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                v = spec.defaults.get(f.name, GENERIC_DEFAULTS.get(f.name))
            values[f.name] = v
        values["options"] = {**spec.defaults.get("options", {}), **(self.options or {})}
        if values["output"] is None:
            values["output"] = (f"runs/finetune-{spec.name}" if spec.model == "uniter"
                                else f"runs/finetune-{spec.model}-{spec.name}")
        return FinetuneSettings(**values)


#: Generic defaults (tiny model on the synthetic data, a few CPU minutes); a task's ``defaults`` override them.
GENERIC_DEFAULTS: dict[str, Any] = dict(steps=1500, lr=1e-3, warmup_steps=100, batch_tokens=1024, grad_accum=1,
                                        grad_clip=2.0, weight_decay=0.01, head_lr_mult=1.0, max_txt_len=60,
                                        val_every=500, ckpt_every=500, log_every=50)


# ----------------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class FinetuneData:
    """What a task's ``build_data`` returns (see the module docstring).

    Attributes:
        sources: trainer batch sources by name (the keys of the task modules ``build_tasks`` returns).
        mix: sampling ratio of each source.
        val: the task's validation data (read by its ``evaluate``), or None.
        dims: model sizes (``img_dim``, ``vocab_size``, task-specific: ``num_answers`` ...); JSON-serialisable.
        bad: a :class:`fastvl.data.BadExampleCounter` of skipped examples (or None).
        info: anything else to report (example counts, data paths); JSON-serialisable.
    """

    sources: dict[str, BatchSource]
    mix: dict[str, float]
    val: Any
    dims: dict[str, Any]
    bad: Any = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """One fine-tuning job (see the module docstring for every callable's contract).

    ``model_config`` (optional): (settings, dims) -> the model's config (an object with ``to_json_file(path)``),
    written to the run folder as ``model_config.json`` and handed back to ``build_model`` as ``settings.config``
    when ``fastvl eval`` rebuilds the model; None: the job's ``build_model`` rebuilds it from settings and dims.
    """

    name: str
    build_data: Callable[[FinetuneSettings, int, int], FinetuneData]
    build_model: Callable[[FinetuneSettings, FinetuneData, dict | None], nn.Module]
    build_tasks: Callable[[nn.Module, FinetuneSettings, FinetuneData], dict[str, nn.Module]]
    evaluate: Callable[[dict[str, nn.Module], FinetuneData, torch.device, FinetuneSettings], dict[str, float]]
    metric: str
    chance: float | Callable[[FinetuneData], float] = 0.0
    defaults: dict[str, Any] = field(default_factory=dict)
    help: str = ""
    model_config: Callable[[FinetuneSettings, dict[str, Any]], Any] | None = None
    model: str = "uniter"  # the model family: ``fastvl finetune --model MODEL --task NAME``

    def chance_level(self, data: FinetuneData) -> float:
        return float(self.chance(data)) if callable(self.chance) else float(self.chance)


# ----------------------------------------------------------------------------------------------------------------
# registry: ``fastvl finetune --model MODEL --task NAME`` runs the recipe registered as (MODEL, NAME)
# ----------------------------------------------------------------------------------------------------------------
_RECIPES: dict[tuple[str, str], Recipe] = {}


def register_recipe(recipe: Recipe, *, replace_existing: bool = False) -> Recipe:
    """Register ``recipe`` under ``(recipe.model, recipe.name)`` (ValueError if taken, unless ``replace_existing``).

    Unknown keys in ``recipe.defaults`` (not FinetuneSettings fields) are an error. Returns ``recipe``.
    """
    if not isinstance(recipe, Recipe):
        raise TypeError(f"register_recipe: argument 'recipe' must be a fastvl.recipes.Recipe, got "
                        f"{type(recipe).__name__}")
    for attr in ("name", "model"):
        value = getattr(recipe, attr)
        if not value or not isinstance(value, str):
            raise ValueError(f"register_recipe: recipe.{attr} must be a non-empty string, got {value!r}")
    known = {f.name for f in fields(FinetuneSettings)}
    unknown = sorted(set(recipe.defaults) - known)
    if unknown:
        raise ValueError(f"register_recipe({recipe.name!r}): defaults {unknown} are not FinetuneSettings fields")
    for name in ("build_data", "build_model", "build_tasks", "evaluate"):
        if not callable(getattr(recipe, name)):
            raise TypeError(f"register_recipe({recipe.name!r}): recipe.{name} must be callable")
    key = (recipe.model, recipe.name)
    if key in _RECIPES and not replace_existing:
        raise ValueError(f"register_recipe: recipe {recipe.name!r} of model {recipe.model!r} is already registered")
    _RECIPES[key] = recipe
    return recipe


def list_recipes(model: str | None = None) -> list[str]:
    """Registered task names (of ``model`` when given), sorted, each once."""
    return sorted({name for m, name in _RECIPES if model is None or m == model})


def list_models() -> list[str]:
    """Model families with at least one registered recipe, sorted."""
    return sorted({m for m, _ in _RECIPES})


def get_recipe(name: str, model: str = "uniter") -> Recipe:
    """The recipe registered as (``model``, ``name``) (ValueError naming the registered ones otherwise)."""
    if (model, name) not in _RECIPES:
        if model not in list_models():
            raise ValueError(f"fastvl finetune: unknown model {model!r}; models with recipes: {list_models()}")
        raise ValueError(f"fastvl finetune: model {model!r} has no task {name!r}; its tasks: {list_recipes(model)}")
    return _RECIPES[(model, name)]


def unregister_recipe(name: str, model: str = "uniter") -> None:
    """Remove the recipe registered as (``model``, ``name``) (nothing if there is none)."""
    _RECIPES.pop((model, name), None)


# ----------------------------------------------------------------------------------------------------------------
# helpers for task specs
# ----------------------------------------------------------------------------------------------------------------
def run_folder(path: Path) -> Path | None:
    """The run folder (holding model_config.json) of a run folder or one of its checkpoint folders."""
    for p in (path, path.parent.parent):
        if (p / "model_config.json").is_file():
            return p
    return None


def load_init_state(path: str | Path) -> tuple[dict[str, torch.Tensor], Path | None]:
    """(state_dict, run folder or None) of ``path``: a pretrain/finetune run folder (latest checkpoint), a
    ``checkpoints/step_*`` folder, a ``.safetensors`` file, or a ``.pt`` / ``.bin`` state dict (official)."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"fastvl finetune: --init {p} does not exist")
    if p.is_dir():
        folder = ckpt.latest_checkpoint(p) if (p / "checkpoints").is_dir() else p
        if folder is None or not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"fastvl finetune: --init {p} holds no complete checkpoint (model.safetensors)")
        return _safetensors(load_file, folder / "model.safetensors"), run_folder(folder)
    if p.suffix == ".safetensors":
        return _safetensors(load_file, p), run_folder(p.parent)
    try:  # tensors only: a pickled object in a file someone handed over is refused, never run
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (UnpicklingError, RuntimeError of a corrupt zip, EOFError ...)
        raise ckpt.CheckpointError(f"--init {p}: not a loadable state dict of tensors ({' '.join(str(e).split())[:160]}"
                                   ")") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ckpt.CheckpointError(f"--init {p}: not a state dict (name -> tensor)")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, None


def _safetensors(load_file: Callable, path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error type)
        raise ckpt.CheckpointError(f"--init {path}: not a readable .safetensors file ({e})") from None


def model_config(settings: FinetuneSettings, dims: dict[str, Any]) -> UniterConfig:
    """The UNITER config of a fine-tuning run, BEFORE any task-specific growth of the type / word tables.

    ``settings.config`` a size name (tiny / base / large): that config, with the data's feature size and (synthetic
    data, ``dims['synthetic']``) vocabulary; a path: that file as is. None: the ``--init`` run's
    ``model_config.json`` when there is one, else tiny as for a size name. Raises ValueError when the data does
    not fit the config (vocabulary too small, other feature size).
    """
    config = settings.config
    if config is None and settings.init:
        p = Path(settings.init)
        run = run_folder(p if p.is_dir() else p.parent)
        if run is not None:
            config = str(run / "model_config.json")
    config = config or "tiny"
    is_path = "/" in config or Path(config).suffix in (".json", ".yaml", ".yml")
    cfg = resolve_config(config)
    if not is_path:
        vocab = dims.get("vocab_size", cfg.vocab_size)
        vocab = vocab if dims.get("synthetic") else max(vocab, cfg.vocab_size)
        cfg = cfg.replace(vocab_size=vocab, img_dim=dims.get("img_dim", cfg.img_dim))
    if "vocab_size" in dims and cfg.vocab_size < dims["vocab_size"]:
        raise SettingsError(f"fastvl finetune: the model vocabulary ({cfg.vocab_size}, config {config}) is smaller "
                            f"than the data's v_range end ({dims['vocab_size']}); the txt_db was tokenised with "
                            "another vocabulary")
    if "img_dim" in dims and cfg.img_dim != dims["img_dim"]:
        raise SettingsError(f"fastvl finetune: the model's img_dim is {cfg.img_dim} (config {config}) but the img_db "
                            f"features have {dims['img_dim']} dims")
    return cfg


def load_pretrained(model: nn.Module, state: dict[str, torch.Tensor] | None, log: Callable[[str], None] = print
                    ) -> tuple[list[str], list[str]]:
    """Load ``state`` into ``model`` non-strictly (as official ``from_pretrained``); shapes must match.

    Returns (missing, unexpected) key lists and logs their counts (heads are expected to be missing).
    """
    if state is None:
        return [], []
    own = model.state_dict()
    bad = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if bad:
        shapes = [(list(state[k].shape), list(own[k].shape)) for k in bad[:4]]
        raise SettingsError(f"fastvl finetune: the pre-trained weights do not fit the model: {bad[:4]} have shapes "
                            f"(checkpoint, model) {shapes}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a weight tied to a loaded one (e.g. an MLM decoder tied to the word embeddings) is not missing
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in state if k in params}
    tied = [k for k in missing if k in params and params[k].data_ptr() in loaded]
    missing = [k for k in missing if k not in tied]
    log(f"init: loaded {len(state) - len(unexpected)} tensors; {len(missing)} missing (new heads: "
        f"{sorted({k.split('.')[0] for k in missing})}), {len(unexpected)} unused"
        + (f", {len(tied)} tied to loaded weights" if tied else ""))
    return list(missing), list(unexpected)


def save_run(s: FinetuneSettings, data: FinetuneData, recipe: Recipe) -> None:
    """settings.json, finetune.json (task, data sizes) and, when the recipe has one, model_config.json (for UNITER:
    the config before task growth)."""
    out = Path(s.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(asdict(s), indent=2))
    meta = {"task": s.task, "model": s.model, "dims": data.dims, "info": data.info}
    (out / "finetune.json").write_text(json.dumps(meta, indent=2, default=str))
    if recipe.model_config is not None:
        recipe.model_config(s, data.dims).to_json_file(out / "model_config.json")


def last_losses(history: list[dict]) -> dict[str, float]:
    """The last logged loss of every task in a training history."""
    out: dict[str, float] = {}
    for rec in history:
        out[rec["task"]] = rec["loss"]
    return dict(sorted(out.items()))


#: The defaults most jobs share (UNITER-tiny on the synthetic data, a few CPU minutes from a short pre-training run).
COMMON_DEFAULTS: dict[str, Any] = dict(steps=1500, lr=1e-3, warmup_steps=100, batch_tokens=1024, val_every=500,
                                       ckpt_every=500)


# ----------------------------------------------------------------------------------------------------------------
# data and evaluation helpers shared by the recipes
# ----------------------------------------------------------------------------------------------------------------
def data_paths(s: FinetuneSettings, task: str) -> dict[str, Any]:
    """train / val txt_db and img_db paths of a run, and whether they are the synthetic data."""
    if s.txt_db:
        if len(s.txt_db) != len(s.img_db):
            raise SettingsError(f"fastvl finetune: --txt-db has {len(s.txt_db)} paths but --img-db has "
                                f"{len(s.img_db)}")
        val_img = s.val_img_db or (s.img_db[:1] * len(s.val_txt_db))
        return dict(train_txt=list(s.txt_db), train_img=list(s.img_db), val_txt=list(s.val_txt_db),
                    val_img=list(val_img), synthetic=False, source=str(s.txt_db), root=None)
    if s.data:
        lay = find_dbs(s.data)
        return dict(train_txt=lay.train_txt, train_img=lay.train_img, val_txt=lay.val_txt, val_img=lay.val_img,
                    synthetic=False, source=str(s.data), root=Path(s.data))
    syn = finetune_synthetic(config=FinetuneSynthConfig(
        n_train_images=int(s.options.get("synthetic_images", FinetuneSynthConfig.n_train_images)),
        n_val_images=int(s.options.get("synthetic_val_images", FinetuneSynthConfig.n_val_images))))
    val_txt, val_img = [syn.txt_db(task, "val")], [syn.img_db]
    if s.val_txt_db:  # other validation data for a model trained on the synthetic data
        val_txt, val_img = list(s.val_txt_db), list(s.val_img_db or [syn.img_db] * len(s.val_txt_db))
    return dict(train_txt=[syn.txt_db(task, "train")], train_img=[syn.img_db], val_txt=val_txt, val_img=val_img,
                synthetic=True, source=f"synthetic ({syn.root})", root=syn.root / task, syn=syn)


def bundle(s: FinetuneSettings, paths: dict, train: dict[str, FinetuneDataset], val: dict[str, FinetuneDataset],
           rank: int, world: int, counter: BadExampleCounter, **dims: Any) -> FinetuneData:
    """The :class:`FinetuneData` of train / val datasets: one resumable batch source per training dataset (mixed 1:1),
    one fixed-order source per validation dataset, the model sizes of the data plus ``dims``."""
    sources = {k: FinetuneBatchSource(d, s.batch_tokens, seed=s.seed + j, train=True, rank=rank, world_size=world)
               for j, (k, d) in enumerate(train.items())}
    val_src = {k: FinetuneBatchSource(d, s.batch_tokens, seed=0, train=False) for k, d in val.items()}
    first = next(iter(train.values()))
    info = {"source": paths["source"], "train_examples": {k: len(d) for k, d in train.items()},
            "val_examples": {k: len(d) for k, d in val.items()}}
    return FinetuneData(sources=sources, mix={k: 1.0 for k in sources}, val=val_src or None,
                        dims={"img_dim": first.img_dim, "vocab_size": first.vocab_size,
                              "synthetic": paths["synthetic"], **dims}, bad=counter, info=info)


def open_split(cls: type, s: FinetuneSettings, paths: dict, counter: BadExampleCounter, **kw: Any
               ) -> tuple[FinetuneDataset, FinetuneDataset | None]:
    """(train dataset, validation dataset or None) of class ``cls`` over :func:`data_paths`' paths."""
    common = dict(max_txt_len=s.max_txt_len, skip_bad_examples=s.skip_bad_examples, counter=counter, **kw)
    train = cls(paths["train_txt"], paths["train_img"], **common)
    val = cls(paths["val_txt"], paths["val_img"], **common) if paths["val_txt"] else None
    return train, val


def build_uniter(cls: type, s: FinetuneSettings, data: FinetuneData, init: dict | None, *args: Any, **kw: Any
                 ) -> nn.Module:
    """``cls(config, img_dim, *args, **kw)`` with the run's UNITER config, ``init`` loaded non-strictly."""
    cfg = model_config(s, data.dims)
    model = cls(cfg, cfg.img_dim, *args, **kw)
    load_pretrained(model, init)
    return model


def val_batches(data: FinetuneData, key: str, s: FinetuneSettings) -> Any:
    """The validation batches of source ``key`` (the first ``s.val_batches``, or all)."""
    return data.val[key].iter_epoch(0, s.val_batches)


def mean_of(values: list[torch.Tensor]) -> float:
    """Mean of concatenated per-example values (0 for none)."""
    return float(torch.cat(values).float().mean()) if values else 0.0


def accuracy_eval(tasks: dict[str, nn.Module], data: FinetuneData, device: torch.device, s: FinetuneSettings
                  ) -> dict[str, float]:
    """``{'accuracy'}``: the mean of the task's per-example ``evaluate(batch)['accuracy']`` over the validation data."""
    key = next(iter(data.val))
    return {"accuracy": mean_of([tasks[key].evaluate(b.to(device))["accuracy"].cpu()
                               for b in val_batches(data, key, s)])}


def majority_chance(data: FinetuneData) -> float:
    """Accuracy of always answering the most frequent validation label."""
    if not data.val:
        return 0.0
    key = next(iter(data.val))
    t = torch.cat([b.targets for b in data.val[key].iter_epoch(0)])
    t = t.argmax(1) if t.dim() == 2 else t  # SNLI-VE: soft targets [n, 3]
    return float(torch.bincount(t).max()) / max(t.numel(), 1)


def single_task(cls: type, **kw: Any) -> Callable[[nn.Module, FinetuneSettings, FinetuneData], dict[str, nn.Module]]:
    """``build_tasks`` of a job with one batch source: ``{source name: cls(model, **kw)}``."""

    def build(model: nn.Module, s: FinetuneSettings, data: FinetuneData) -> dict[str, nn.Module]:
        return {next(iter(data.sources)): cls(model, **kw)}

    return build
