"""UNITER fine-tuning end to end: settings -> task spec -> data -> model -> task modules -> Trainer, and evaluation.

``fastvl finetune --task vqa`` with no other argument fine-tunes UNITER-tiny on the synthetic VQA data (generated
from the synthetic scenes into the cache on first use); ``--init`` takes the output of ``fastvl pretrain`` (a run
folder, a ``checkpoints/step_*`` folder, or an official ``.pt`` state dict). Pointed at official txt_db / img_db
folders, the same code fine-tunes on real data.

Task registry (public API, stable)
----------------------------------
Every fine-tuning task is a :class:`FinetuneTaskSpec` registered with :func:`register_finetune_task`; the CLI
(``fastvl finetune --task NAME`` / ``fastvl eval --task NAME``) lists whatever is registered. Built-in tasks
(vqa, gqa, ve, nlvr2, itr, re, vcr) live in :mod:`fastvl.train.finetune_tasks`; other modules register their
own, e.g. image captioning in ``fastvl/tasks/caption.py``::

    from fastvl.train.finetune import FinetuneData, FinetuneTaskSpec, register_finetune_task

    register_finetune_task(FinetuneTaskSpec(
        name="caption",
        build_data=my_data,        # (settings, rank, world_size) -> FinetuneData
        build_model=my_model,      # (settings, data, init_state) -> nn.Module  (init_state: pre-trained
                                   #   state_dict or None; load it BEFORE growing type / word tables)
        build_tasks=my_tasks,      # (model, settings, data) -> {source name: task module}
        evaluate=my_eval,          # (tasks, data, device, settings) -> {metric: float}
        metric="cider",            # the headline key of evaluate's result
        chance=0.0,                # float, or (data) -> float: the metric of a model that ignores the input
        defaults=dict(steps=1500, lr=5e-4),  # FinetuneSettings fields this task changes from the generic ones
        help="image captioning (BLEU-4, CIDEr)",
    ))

Contracts: ``build_data`` returns a :class:`FinetuneData` whose ``sources`` are the trainer's batch sources
(``next_batch`` / ``state_dict`` / ``load_state_dict``) keyed like the task modules ``build_tasks`` returns, and
whose ``mix`` gives the ratio of each; ``val`` is whatever ``evaluate`` reads (``None``: no validation).
``dims`` carries the sizes the model needs (``img_dim``, ``vocab_size``, task-specific ones such as
``num_answers``); it is saved in the run folder, so ``evaluate_finetune`` can rebuild the model with
``init_state=None`` and load the fine-tuned weights. Task modules follow :mod:`fastvl.tasks`
(``forward(batch) -> dict(loss, logs, count)``) and must hold the model as ``.model``; with ``adv`` set, each is
wrapped in :class:`fastvl.adversarial.AdversarialTask`, which needs the task's adversarial view
(:func:`fastvl.adversarial.consistency.adversarial_view`). Task-specific settings travel in
``FinetuneSettings.options`` (``--opt key=value`` on the command line).

Helpers for spec authors: :func:`model_config` (the UNITER config for a run: from the ``--init`` run folder, else
``settings.config``, with the data's vocabulary / feature sizes), :func:`load_init_state`,
:func:`load_pretrained` (non-strict load that reports missing / unexpected keys).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..models.uniter.config import UniterConfig, resolve_config
from . import checkpoint as ckpt
from . import distributed as D
from .loop import BatchSource, TrainConfig, Trainer
from .pretrain import _last_losses

__all__ = ["FinetuneData", "FinetuneSettings", "FinetuneTaskSpec", "evaluate_finetune", "finetune",
           "get_finetune_task", "list_finetune_tasks", "load_init_state", "load_pretrained", "model_config",
           "register_finetune_task"]

#: Modules that register fine-tuning tasks when imported (a missing one is skipped).
PLUGINS = ("fastvl.train.finetune_tasks", "fastvl.tasks.caption")


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

    def resolved(self, spec: FinetuneTaskSpec | None = None) -> FinetuneSettings:
        """A copy with unset fields filled from the task's defaults, then :data:`GENERIC_DEFAULTS`."""
        spec = spec or get_finetune_task(self.task)
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                v = spec.defaults.get(f.name, GENERIC_DEFAULTS.get(f.name))
            values[f.name] = v
        values["options"] = {**spec.defaults.get("options", {}), **(self.options or {})}
        if values["output"] is None:
            values["output"] = f"runs/finetune-{spec.name}"
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
class FinetuneTaskSpec:
    """One fine-tuning task (see the module docstring for every callable's contract)."""

    name: str
    build_data: Callable[[FinetuneSettings, int, int], FinetuneData]
    build_model: Callable[[FinetuneSettings, FinetuneData, dict | None], nn.Module]
    build_tasks: Callable[[nn.Module, FinetuneSettings, FinetuneData], dict[str, nn.Module]]
    evaluate: Callable[[dict[str, nn.Module], FinetuneData, torch.device, FinetuneSettings], dict[str, float]]
    metric: str
    chance: float | Callable[[FinetuneData], float] = 0.0
    defaults: dict[str, Any] = field(default_factory=dict)
    help: str = ""

    def chance_level(self, data: FinetuneData) -> float:
        return float(self.chance(data)) if callable(self.chance) else float(self.chance)


_SPECS: dict[str, FinetuneTaskSpec] = {}
_loaded = False


def register_finetune_task(spec: FinetuneTaskSpec, *, replace_existing: bool = False) -> FinetuneTaskSpec:
    """Register ``spec`` under ``spec.name`` (ValueError if the name is taken, unless ``replace_existing``).

    Unknown keys in ``spec.defaults`` (not FinetuneSettings fields) are an error. Returns ``spec``.
    """
    if not isinstance(spec, FinetuneTaskSpec):
        raise TypeError(f"register_finetune_task: argument 'spec' must be a FinetuneTaskSpec, got "
                        f"{type(spec).__name__}")
    if not spec.name or not isinstance(spec.name, str):
        raise ValueError(f"register_finetune_task: spec.name must be a non-empty string, got {spec.name!r}")
    known = {f.name for f in fields(FinetuneSettings)}
    unknown = sorted(set(spec.defaults) - known)
    if unknown:
        raise ValueError(f"register_finetune_task({spec.name!r}): defaults {unknown} are not FinetuneSettings fields")
    for name in ("build_data", "build_model", "build_tasks", "evaluate"):
        if not callable(getattr(spec, name)):
            raise TypeError(f"register_finetune_task({spec.name!r}): spec.{name} must be callable")
    if spec.name in _SPECS and not replace_existing:
        raise ValueError(f"register_finetune_task: task {spec.name!r} is already registered")
    _SPECS[spec.name] = spec
    return spec


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    import importlib

    for mod in PLUGINS:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as err:  # the plugin is not part of this build
            if err.name is None or not mod.startswith(err.name):
                raise


def list_finetune_tasks() -> list[str]:
    """Registered fine-tuning task names, sorted."""
    _load_plugins()
    return sorted(_SPECS)


def get_finetune_task(name: str) -> FinetuneTaskSpec:
    """The spec registered as ``name`` (ValueError naming the registered tasks otherwise)."""
    _load_plugins()
    if name not in _SPECS:
        raise ValueError(f"fastvl finetune: unknown task {name!r}; registered: {sorted(_SPECS)}")
    return _SPECS[name]


# ----------------------------------------------------------------------------------------------------------------
# helpers for task specs
# ----------------------------------------------------------------------------------------------------------------
def _run_folder(path: Path) -> Path | None:
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
        return load_file(str(folder / "model.safetensors")), _run_folder(folder)
    if p.suffix == ".safetensors":
        return load_file(str(p)), _run_folder(p.parent)
    state = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, None


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
        run = _run_folder(p if p.is_dir() else p.parent)
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
        raise ValueError(f"fastvl finetune: the model vocabulary ({cfg.vocab_size}, config {config}) is smaller than "
                         f"the data's v_range end ({dims['vocab_size']}); the txt_db was tokenised with another "
                         "vocabulary")
    if "img_dim" in dims and cfg.img_dim != dims["img_dim"]:
        raise ValueError(f"fastvl finetune: the model's img_dim is {cfg.img_dim} (config {config}) but the img_db "
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
        raise ValueError(f"fastvl finetune: the pre-trained weights do not fit the model: {bad[:4]} have shapes "
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


def _save_run(s: FinetuneSettings, data: FinetuneData) -> None:
    """settings.json, finetune.json (task, data sizes) and model_config.json (the config before task growth)."""
    out = Path(s.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "settings.json").write_text(json.dumps(asdict(s), indent=2))
    (out / "finetune.json").write_text(json.dumps({"task": s.task, "dims": data.dims, "info": data.info}, indent=2,
                                                  default=str))
    model_config(s, data.dims).to_json_file(out / "model_config.json")


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------
def _cpu_threads(threads: int | None, model: nn.Module, device: torch.device) -> int | None:
    """Apply the CPU thread setting (see :attr:`FinetuneSettings.threads`); returns the threads in use on CPU."""
    if threads is None:
        hidden = getattr(getattr(getattr(model, "uniter", None), "config", None), "hidden_size", None)
        threads = 1 if hidden is not None and hidden <= 256 else None
    return D.set_cpu_threads(threads, device)


def finetune(settings: FinetuneSettings, log: Callable[[str], None] = print) -> dict:
    """Run fine-tuning; returns {'history', 'validation', 'metric', 'chance', 'checkpoint', 'seconds', ...}."""
    spec = get_finetune_task(settings.task)
    s = settings.resolved(spec)
    info = D.init_distributed(s.device)
    torch.manual_seed(s.seed)
    data = spec.build_data(s, info.rank, info.world_size)
    init_state = load_init_state(s.init)[0] if s.init else None
    model = spec.build_model(s, data, init_state)
    tasks = spec.build_tasks(model, s, data)
    plain_tasks = dict(tasks)
    chance = spec.chance_level(data)
    threads = _cpu_threads(s.threads, model, info.device)
    if info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        log(f"fastvl finetune {spec.name}: {type(model).__name__} ({n_params / 1e6:.2f}M parameters), data "
            f"{data.info.get('source', 'synthetic')}, sources {data.mix}, {s.steps} steps, init "
            f"{s.init or 'random'}, {info.world_size} process(es) on {info.device}"
            + (f" ({threads} thread(s) each)" if threads else "") + f"; metric {spec.metric} (chance {chance:.4f})")
    if s.adv is not None:  # VILLA: every task under the K-step adversarial loop
        from ..adversarial import AdvConfig, adversarial_tasks

        adv_cfg = AdvConfig(**s.adv)
        tasks = adversarial_tasks(tasks, adv_cfg)
        if info.is_main:
            log(f"adversarial fine-tuning (VILLA): {adv_cfg}")
    heads = sorted({n.split(".")[0] for n, _ in model.named_parameters() if not n.startswith("uniter.")})
    lr_mults = {h: s.head_lr_mult for h in heads} if s.head_lr_mult != 1.0 else {}
    cfg = TrainConfig(steps=s.steps, lr=s.lr, warmup_steps=s.warmup_steps, weight_decay=s.weight_decay,
                      betas=tuple(s.betas), grad_accum=s.grad_accum, grad_clip=s.grad_clip, seed=s.seed,
                      precision=s.precision, log_every=s.log_every, val_every=s.val_every, ckpt_every=s.ckpt_every,
                      progress=s.progress, lr_mults=lr_mults)
    validate = None
    if data.val is not None:
        validate = lambda: spec.evaluate(plain_tasks, data, info.device, s)  # noqa: E731
    trainer = Trainer(model, tasks, data.sources, data.mix, cfg, s.output, info, validate, log)
    if info.is_main:
        _save_run(s, data)
    run = trainer.run(resume=s.resume)
    last_val = run["validation"]
    validation = {k.removeprefix("val/"): v for k, v in last_val.items() if k.startswith("val/")} if last_val \
        else None
    result = {**run, "task": spec.name, "metric_name": spec.metric, "chance": chance, "validation": validation,
              "metric": validation.get(spec.metric) if validation else None,
              "bad_examples": data.bad.as_dict() if data.bad is not None else {},
              "checkpoint": str(ckpt.latest_checkpoint(Path(s.output)))}
    if info.is_main:
        log(f"trained {len(run['history'])} steps in {run['seconds']:.1f} s ({run['tokens_per_s']:.0f} tokens/s); "
            "final loss: " + ", ".join(f"{k} {v:.3f}" for k, v in _last_losses(run["history"]).items()))
        if result["metric"] is not None:
            log(f"{spec.name}: {spec.metric} {result['metric']:.4f} (chance {chance:.4f})")
        if result["bad_examples"]:
            log(f"skipped bad examples: {result['bad_examples']}")
    D.cleanup()
    return result


def evaluate_finetune(checkpoint: str | Path, task: str | None = None, overrides: dict[str, Any] | None = None,
                      log: Callable[[str], None] = print) -> dict:
    """Evaluate a fine-tuned checkpoint (a ``fastvl finetune`` output folder or one of its ``checkpoints/step_*``).

    The run's settings and data sizes are read from its folder; ``overrides`` replace settings (e.g. other
    ``val_txt_db`` / ``val_img_db``, ``device``, ``val_batches``). Returns {'task', 'metric', 'chance', 'metrics'}.
    """
    folder = Path(checkpoint)
    run = folder if (folder / "checkpoints").is_dir() or (folder / "finetune.json").is_file() else folder.parent.parent
    if not (run / "finetune.json").is_file():
        raise FileNotFoundError(f"fastvl eval: {checkpoint} is not a fastvl finetune run (no finetune.json in {run})")
    saved = json.loads((run / "settings.json").read_text())
    saved["betas"] = tuple(saved.get("betas", (0.9, 0.98)))
    meta = json.loads((run / "finetune.json").read_text())
    name = task or meta["task"]
    if name != meta["task"]:
        raise ValueError(f"fastvl eval: {run} was fine-tuned for task {meta['task']!r}, not {name!r}")
    spec = get_finetune_task(name)
    known = {f.name for f in fields(FinetuneSettings)}
    s = FinetuneSettings(**{k: v for k, v in saved.items() if k in known})
    overrides = dict(overrides or {})
    if "options" in overrides:
        overrides["options"] = {**s.options, **overrides["options"]}
    s = replace(s, resume=False, progress=False, **overrides)
    if folder == run:
        folder = ckpt.latest_checkpoint(run)
        if folder is None:
            raise FileNotFoundError(f"fastvl eval: no complete checkpoint under {run}")
    device = torch.device("cuda" if s.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if s.device == "auto" else s.device))
    data = spec.build_data(s, 0, 1)
    data.dims = {**data.dims, **meta["dims"]}
    s = replace(s, init=None, config=str(run / "model_config.json"))
    model = spec.build_model(s, data, None)
    ckpt.load_checkpoint(folder, model)
    model.to(device).eval()
    tasks = spec.build_tasks(model, s, data)
    if data.val is None:
        raise ValueError(f"fastvl eval: task {name} built no validation data")
    with torch.no_grad():
        metrics = spec.evaluate(tasks, data, device, s)
    return {"task": name, "checkpoint": str(folder), "metric_name": spec.metric, "metric": metrics.get(spec.metric),
            "chance": spec.chance_level(data), "metrics": metrics}
