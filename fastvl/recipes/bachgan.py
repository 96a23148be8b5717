"""The BachGAN job: data, model (memory bank filled from the training split), the two-optimiser training run with
PNG sample grids, loading a run back, synthesis from a boxes file.

A run folder holds ``bachgan.json`` (kind, model config, class names, settings), ``checkpoints/step_*`` (the shared
trainer's atomic checkpoints: weights with the memory bank, optimizer states, data position, RNG) and ``samples/``
(PNG grids: layout | retrieved background | generated | real, one row per validation item). Evaluation: a
segmenter trained on real images applied to generated ones, and FID (:func:`evaluate_gan_runs`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import layouts as L
from ..models.bachgan import BachGAN, BachGANConfig, bachgan_preset, vgg_loss_or_none
from ..tasks.gan import BachGANTask
from ..train import checkpoint as ckpt
from ..train.loop import TrainConfig, Trainer
from ..train.optim import OptimizerSpec
from .base import SettingsError

__all__ = ["RUN_FILE", "GanRun", "GanSettings", "LayoutBatchSource", "build_gan_model", "colorize", "evaluate_gan_runs",
           "format_table", "generate_split", "load_gan_run", "open_layout_sets", "palette", "sample_grid",
           "settings_from_dict", "synthesize_boxes", "to_uint8", "train_bachgan"]

RUN_FILE = "bachgan.json"
KIND = "bachgan"
DATASETS = ("synthetic", "cityscapes", "ade20k")


@dataclass
class GanSettings:
    """Everything ``fastvl gan train`` needs (defaults: the synthetic set at 64 x 64 on the CPU, minutes).

    ``size``: (H, W) instead of the preset's; ``model_overrides``: BachGANConfig fields changed from the preset
    (e.g. ``ngf``); ``options``: data knobs (synthetic ``n_train`` / ``n_val``)."""

    output: str = "runs/bachgan"
    data: str = "synthetic"
    data_root: str | None = None
    preset: str = "small"
    retrieval: bool = True
    steps: int = 1000
    batch_size: int = 8
    lr_g: float = 1e-4
    lr_d: float = 4e-4
    betas: tuple[float, float] = (0.0, 0.9)
    seg: bool = False
    vgg: str | None = None
    sample_every: int = 250
    ckpt_every: int = 500
    memory_fraction: float = 0.25
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"
    progress: bool = True
    size: tuple[int, int] | None = None
    model_overrides: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


# -------------------------------------------------------------------------------------------------------------
# data
# -------------------------------------------------------------------------------------------------------------
def open_layout_sets(settings: GanSettings, size: tuple[int, int]) -> tuple[L.LayoutSet, L.LayoutSet]:
    """(train, val) layout sets of ``settings.data`` at ``size`` (H, W)."""
    if settings.data not in DATASETS:
        raise SettingsError(f"--data: unknown dataset {settings.data!r}; choose from {list(DATASETS)}")
    if settings.data == "synthetic":
        if settings.data_root is not None:
            raise SettingsError("--data-root: only for --data cityscapes|ade20k (the synthetic set is generated)")
        opts = {k: int(v) for k, v in settings.options.items() if k in ("n_train", "n_val")}
        conf = L.SyntheticLayoutConfig(seed=settings.seed, size=size, **opts)
        return L.SyntheticLayoutSet("train", conf), L.SyntheticLayoutSet("val", conf)
    if settings.data_root is None:
        raise SettingsError(f"--data-root: required with --data {settings.data} (the dataset's folder)")
    root = Path(settings.data_root)
    if not root.is_dir():
        raise FileNotFoundError(2, "no such dataset folder", str(root))
    cls = L.LAYOUT_SETS[settings.data]
    return cls(root, "train", size=size), cls(root, "val", size=size)


class LayoutBatchSource:
    """Seeded, resumable batches of a layout set: a permutation per epoch (seed, epoch), the last partial batch
    dropped; each epoch also re-draws the set's flips. State: (epoch, position)."""

    def __init__(self, dataset: L.LayoutSet, batch_size: int, seed: int = 0):
        if len(dataset) < batch_size:
            raise SettingsError(f"--batch-size: {batch_size} is larger than the training split ({len(dataset)} "
                                "items)")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order: list[int] | None = None

    def _perm(self) -> list[int]:
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            self._order = torch.randperm(len(self.dataset), generator=g).tolist()
            self.dataset.set_epoch(self.epoch)
        return self._order

    def next_batch(self) -> dict[str, Any]:
        if self.pos + self.batch_size > len(self.dataset):
            self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        idx = self._perm()[self.pos:self.pos + self.batch_size]
        self.pos += self.batch_size
        return L.collate_layouts([self.dataset[i] for i in idx])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos, self._order = int(state["epoch"]), int(state["pos"]), None


# -------------------------------------------------------------------------------------------------------------
# model and run folder
# -------------------------------------------------------------------------------------------------------------
def build_gan_model(settings: GanSettings, train: L.LayoutSet | None = None, config: BachGANConfig | None = None
                    ) -> BachGAN:
    """A BachGAN for ``settings`` (its config from the preset and the data, or ``config``); with ``train`` and
    retrieval on, the memory bank is filled from a random ``memory_fraction`` of the training split."""
    if config is None:
        if train is None:
            raise ValueError("build_gan_model: give 'train' or 'config'")
        mem = max(1, min(len(train), int(round(settings.memory_fraction * len(train))))) if settings.retrieval else 0
        h, w = train.size
        over = {"label_nc": train.num_classes, "foreground": tuple(train.foreground_classes), "height": h,
                "width": w, "retrieval": settings.retrieval, "memory_size": mem, **settings.model_overrides}
        try:
            config = bachgan_preset(_preset_name(settings), **over)
        except (TypeError, ValueError) as e:
            raise SettingsError(f"--preset {settings.preset}: {e}") from None
    model = BachGAN(config)
    if config.retrieval and train is not None:
        maps, index = L.memory_bank_labels(train, settings.memory_fraction, seed=settings.seed,
                                           progress=settings.progress)
        model.memory.fill(maps, index)
    return model


def _preset_name(settings: GanSettings) -> str:
    """``official`` means the ADE20K sizes (256 x 256, 5 up-samplings) with ``--data ade20k``."""
    return "official-ade20k" if settings.preset == "official" and settings.data == "ade20k" else settings.preset


def _preset_size(settings: GanSettings) -> tuple[int, int]:
    if settings.size is not None:
        return int(settings.size[0]), int(settings.size[1])
    try:
        cfg = bachgan_preset(_preset_name(settings))
    except ValueError as e:
        raise SettingsError(f"--preset: {e}") from None
    return cfg.height, cfg.width


@dataclass
class GanRun:
    """A trained BachGAN read back from its run folder: the model (eval mode) and what the folder says of it."""

    model: BachGAN
    class_names: list[str]
    settings: dict[str, Any]
    folder: Path
    step: int


def _run_root(path: Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for a run folder or a ``checkpoints/step_*`` folder."""
    if (path / RUN_FILE).is_file():
        folder = ckpt.latest_checkpoint(path)
        if folder is None:
            raise ckpt.CheckpointError(f"run folder {path} has no complete checkpoint (checkpoints/latest)")
        return path, folder
    if (path / "model.safetensors").is_file() and (path.parent.parent / RUN_FILE).is_file():
        return path.parent.parent, path
    raise ckpt.CheckpointError(f"{path} is not a BachGAN run (no {RUN_FILE} in it or two folders above a "
                               "checkpoints/step_* folder); train one with 'fastvl gan train'")


def load_gan_run(path: str | Path, device: str | torch.device = "cpu") -> GanRun:
    """Load a BachGAN run folder (its latest checkpoint) or one ``checkpoints/step_*`` folder of it.

    Raises FileNotFoundError for a missing path and :class:`CheckpointError` for anything that is not a BachGAN
    run (another model's checkpoint included)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(2, "no such checkpoint or run folder", str(path))
    root, folder = _run_root(path)
    try:
        doc = json.loads((root / RUN_FILE).read_text())
    except json.JSONDecodeError as e:
        raise ckpt.CheckpointError(f"{root / RUN_FILE} is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind") != KIND:
        raise ckpt.CheckpointError(f"{root / RUN_FILE} does not describe a BachGAN run (kind {doc.get('kind')!r})")
    cfg = BachGANConfig.from_dict(doc["config"])
    model = BachGAN(cfg)
    ckpt.load_checkpoint(folder, model, trainer_state=False)
    meta = folder / "meta.json"
    step = int(json.loads(meta.read_text()).get("step", 0)) if meta.is_file() else 0
    return GanRun(model.to(device).eval(), list(doc["class_names"]), dict(doc.get("settings", {})), folder, step)


# -------------------------------------------------------------------------------------------------------------
# images
# -------------------------------------------------------------------------------------------------------------
def palette(num_classes: int) -> np.ndarray:
    """A fixed colour per class id, uint8 [C + 1, 3]; the last row (no class) is black."""
    rng = np.random.default_rng(12345)
    colours = rng.integers(40, 256, size=(num_classes + 1, 3)).astype(np.uint8)
    colours[-1] = 0
    return colours


def colorize(onehot: torch.Tensor, colours: np.ndarray) -> np.ndarray:
    """[N, C, H, W] maps (box masks, pasted maps) -> uint8 [N, H, W, 3]: the colour of the highest channel where
    any channel is positive, black elsewhere."""
    x = onehot.detach().float().cpu()
    cls = x.argmax(dim=1)
    cls = torch.where(x.amax(dim=1) > 0, cls, x.shape[1])
    return colours[cls.numpy()]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> uint8 [N, H, W, 3]."""
    x = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def sample_grid(model: BachGAN, batch: dict[str, Any], path: Path, colours: np.ndarray) -> Path:
    """Write a PNG grid, one row per item: layout | retrieved background (top-1, boxes pasted) | generated | real.
    The model runs in eval mode (running statistics). Returns the path."""
    from PIL import Image

    image, inp = model.synthesize(batch["box_mask"])
    cols = [colorize(inp.box_map, colours)]
    if inp.retrieved is not None:
        cols.append(colorize(inp.retrieved[:, 0], colours))
    else:
        cols.append(np.full_like(cols[0], 96))  # the ablation retrieves nothing: grey
    cols += [to_uint8(image), to_uint8(batch["image"])]
    rows = [np.concatenate([c[i] for c in cols], axis=1) for i in range(image.shape[0])]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(np.concatenate(rows, axis=0)).save(tmp)
    tmp.replace(path)
    return path


def synthesize_boxes(run: GanRun, boxes: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Image [3, H, W] in [-1, 1] (and the generator input) for user boxes [n, 5] (class, x0, y0, x1, y1)."""
    cfg = run.model.cfg
    mask = L.boxes_to_mask(boxes, cfg.label_nc, (cfg.height, cfg.width))
    image, inp = run.model.synthesize(mask[None])
    return image[0], inp


# -------------------------------------------------------------------------------------------------------------
# training
# -------------------------------------------------------------------------------------------------------------
def _write_run_file(out: Path, cfg: BachGANConfig, class_names: list[str], settings: GanSettings) -> None:
    doc = {"kind": KIND, "config": cfg.to_dict(), "class_names": list(class_names), "settings": asdict(settings)}
    out.mkdir(parents=True, exist_ok=True)
    path = out / RUN_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("kind") != KIND or old.get("config") != doc["config"]:
            raise SettingsError(f"--output: {out} holds a different run ({RUN_FILE} differs: other model config); "
                                "choose a new folder")
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def train_bachgan(settings: GanSettings, resume: bool = True, log=print) -> dict[str, Any]:
    """Train BachGAN (or, with ``retrieval=False``, the no-retrieval ablation) with the shared Trainer: two
    optimizers (discriminator lr_d, then generator lr_g; Adam betas (0, 0.9), no weight decay, linear decay to 0),
    bf16 autocast on GPU, checkpoints every ``ckpt_every`` steps and a PNG grid every ``sample_every`` steps.

    Resumes from the run folder's latest checkpoint when there is one. Returns {'history', 'seconds', 'final'
    (the last step's losses), 'grid' (the last PNG), 'output'}."""
    torch.manual_seed(settings.seed)
    train, val = open_layout_sets(settings, _preset_size(settings))
    out = Path(settings.output)
    model = build_gan_model(settings, train)
    _write_run_file(out, model.cfg, list(train.class_names), settings)
    vgg = vgg_loss_or_none(settings.vgg, log=log)
    task = BachGANTask(model, vgg=vgg, seg=settings.seg)
    specs = {"discriminator": OptimizerSpec(("discriminator",), lr=settings.lr_d),
             "generator": OptimizerSpec(("generator",), lr=settings.lr_g)}
    cfg = TrainConfig(steps=settings.steps, lr=settings.lr_g, warmup_steps=0, weight_decay=0.0,
                      betas=tuple(settings.betas), eps=1e-8, grad_clip=0.0, seed=settings.seed,
                      precision=settings.precision, log_every=10, val_every=settings.sample_every,
                      ckpt_every=settings.ckpt_every, progress=settings.progress)
    sample = L.collate_layouts([val[i] for i in range(min(8, len(val)))])
    colours = palette(model.cfg.label_nc)
    grids: list[Path] = []

    def validate() -> dict[str, float]:
        path = out / "samples" / f"step_{trainer.step:08d}.png"
        grids.append(sample_grid(model, sample, path, colours))
        with torch.no_grad():
            image, _ = model.synthesize(sample["box_mask"])
        return {"sample_l1": float((image.cpu() - sample["image"]).abs().mean())}

    source = LayoutBatchSource(train, settings.batch_size, settings.seed)
    from ..train.distributed import DistInfo

    trainer = Trainer(model, {"bachgan": task}, {"bachgan": source}, {"bachgan": 1.0}, cfg, out,
                      DistInfo(device=torch.device(settings.device)), validate=validate, log_fn=log,
                      optimizers=specs)
    result = trainer.run(resume=resume)
    final = {k: v for k, v in (result["history"][-1] if result["history"] else {}).items()
             if k.startswith("bachgan/") or k.startswith("loss/")}
    return {"history": result["history"], "seconds": result["seconds"], "final": final,
            "grid": grids[-1] if grids else None, "output": out, "model": model}


def settings_from_dict(d: dict[str, Any]) -> GanSettings:
    """GanSettings from a dict (unknown keys ignored: a run file of a newer version still loads)."""
    names = {f.name for f in fields(GanSettings)}
    return GanSettings(**{k: v for k, v in d.items() if k in names})


# -------------------------------------------------------------------------------------------------------------
# evaluation
# -------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate_split(run: GanRun, dataset: L.LayoutSet, batch_size: int = 32, progress: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(generated [N, 3, H, W], real [N, 3, H, W], labels [N, H, W]) over a whole (validation) split, in eval mode;
    retrieval excludes nothing (a validation layout is not in the training bank)."""
    from tqdm.auto import tqdm

    fake, real, labels = [], [], []
    for s in tqdm(range(0, len(dataset), batch_size), desc="generate", disable=not progress, leave=False):
        batch = L.collate_layouts([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
        image, _ = run.model.synthesize(batch["box_mask"])
        fake.append(image.float().cpu())
        real.append(batch["image"])
        labels.append(batch["label"])
    return torch.cat(fake), torch.cat(real), torch.cat(labels)


def evaluate_gan_runs(runs: dict[str, GanRun], feature_file: str | None = None, segmenter_steps: int = 400,
                      progress: bool = True, log=print) -> list[dict[str, Any]]:
    """The evaluation table of one or more runs over the same data (the first run's validation split).

    A segmenter is trained on the REAL training images (:func:`fastvl.tasks.gan_metrics.train_segmenter`) and
    applied to the real validation images and to each run's images generated from the validation layouts (pixel
    accuracy, mIoU against the real class maps). FID of each run against the real validation images uses the
    feature net of ``feature_file`` (e.g. the user's Inception, TorchScript) or, by default, the segmenter's own
    features, labelled as such. Returns rows ``{name, pixel_acc, miou, ratio_to_real, fid, fid_label, n}``.
    """
    from ..tasks import gan_metrics as M

    if not runs:
        raise ValueError("evaluate_gan_runs: no runs given")
    first = next(iter(runs.values()))
    cfgs = {name: (r.model.cfg.label_nc, r.model.cfg.height, r.model.cfg.width) for name, r in runs.items()}
    if len(set(cfgs.values())) != 1:
        raise SettingsError(f"--checkpoint: the runs work on different data (classes, H, W): {cfgs}")
    settings = settings_from_dict(first.settings)
    train, val = open_layout_sets(settings, (first.model.cfg.height, first.model.cfg.width))
    log(f"segmenter: training on {len(train)} real {settings.data} images ({segmenter_steps} steps)")
    segmenter = M.train_segmenter(train, M.SegmenterConfig(steps=segmenter_steps, seed=settings.seed),
                                  progress=progress)
    feature_net = M.load_feature_net(feature_file) if feature_file else M.segmenter_feature_net(segmenter)
    rows: list[dict[str, Any]] = []
    real_scores = None
    for name, run in runs.items():
        fake, real, labels = generate_split(run, val, progress=progress)
        if real_scores is None:
            real_scores = M.segmentation_scores(segmenter, real, labels, val.num_classes)
            rows.append({"name": "real images", "pixel_acc": real_scores["pixel_acc"], "miou": real_scores["miou"],
                         "ratio_to_real": 1.0, "fid": None, "fid_label": feature_net.label, "n": len(val)})
        scores = M.segmentation_scores(segmenter, fake, labels, val.num_classes)
        f = M.fid(feature_net, real, fake)
        rows.append({"name": name, "pixel_acc": scores["pixel_acc"], "miou": scores["miou"],
                     "ratio_to_real": scores["pixel_acc"] / max(real_scores["pixel_acc"], 1e-12),
                     "fid": f["fid"], "fid_label": f["label"], "n": len(val)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """The evaluation rows as an aligned text table (the FID column is headed by its feature net's label)."""
    label = rows[0]["fid_label"] if rows else "FID"
    head = f"{'images':<28} {'pixel acc':>9} {'mIoU':>7} {'acc/real':>8} {label:>26}"
    lines = [head, "-" * len(head)]
    for r in rows:
        fid_s = "-" if r["fid"] is None else f"{r['fid']:.3f}"
        lines.append(f"{r['name']:<28} {r['pixel_acc']:>9.4f} {r['miou']:>7.4f} {r['ratio_to_real']:>8.3f} "
                     f"{fid_s:>26}")
    return "\n".join(lines)
