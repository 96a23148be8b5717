"""The generic training loop: task modules in, a trained model and checkpoints out.

The trainer knows nothing task-specific. A task is an ``nn.Module`` whose ``forward(batch)`` returns
``dict(loss=<scalar>, logs=<dict of floats/tensors>, count=<optional number of loss elements>)``; a
batch source per task yields batches (``next_batch()``) and can save / restore its position
(``state_dict()`` / ``load_state_dict()``). One task is drawn per accumulation cycle by ratio
(drawn on rank 0 and broadcast), as UNITER mixes its pre-training tasks.

Distributed: tasks run inside one DDP-wrapped router (find_unused_parameters, since each task uses
different heads); gradients are all-reduced on the last micro-batch of a cycle only (``no_sync``).
With ``count`` given, every rank's loss is weighted by its share of the global element count, so N
processes with a split batch follow the same loss curve as one process with the whole batch.

Several optimizers (a GAN): ``Trainer(..., optimizers={"discriminator": OptimizerSpec(("discriminator",), lr=4e-4),
"generator": OptimizerSpec(("generator",), lr=1e-4)})``. A step then runs one phase per optimizer, in that order:
``grad_accum`` micro-batches of ``task(batch, phase=<name>)`` (the step's micro-batches are drawn once and every
phase sees the same ones), then clipping and a step of that optimizer only, then every gradient is cleared. Each
optimizer has its own schedule, clipping and checkpointed state. Evaluation only: :meth:`Trainer.evaluate` or
:func:`fastvl.train.evaluation.evaluate` (no optimizer at all).
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from . import checkpoint as ckpt
from . import distributed as D
from .evaluation import evaluate
from .optim import OptimizerSpec, build_optimizer, build_optimizers, set_lr


class BatchSource(Protocol):
    def next_batch(self): ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 5e-5
    warmup_steps: int = 100
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_accum: int = 1
    grad_clip: float = 5.0
    seed: int = 42
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp16 | fp32
    log_every: int = 10
    val_every: int = 0  # 0: validate only at the end
    ckpt_every: int = 0  # 0: checkpoint only at the end
    keep_ckpts: int = 2
    check_finite: bool = True
    progress: bool = True
    lr_mults: dict[str, float] = field(default_factory=dict)


class TaskRouter(nn.Module):
    """One module holding every task (they share the model), so DDP sees a single forward."""

    def __init__(self, tasks: dict[str, nn.Module]):
        super().__init__()
        self.tasks = nn.ModuleDict(tasks)

    def forward(self, task: str, batch, phase: str | None = None) -> dict:
        if phase is None:
            return self.tasks[task](batch)
        return self.tasks[task](batch, phase=phase)


class Trainer:
    """Runs ``cfg.steps`` optimizer steps. See the module docstring for the contracts.

    ``model`` holds every trained parameter (the tasks share it); checkpoints store its state_dict, so a
    pre-training checkpoint loads straight into the model class (official key names). ``optimizers``: named
    optimizer specs for multi-phase steps (None: one AdamW over every parameter, configured by ``cfg``).
    """

    def __init__(self, model: nn.Module, tasks: dict[str, nn.Module], sources: dict[str, BatchSource],
                 mix: dict[str, float], cfg: TrainConfig, output_dir: str | Path, dist_info: D.DistInfo | None = None,
                 validate: Callable[[], dict[str, float]] | None = None, log_fn: Callable[[str], None] = print, *,
                 optimizers: dict[str, OptimizerSpec] | None = None):
        unknown = set(mix) - set(tasks)
        if unknown:
            raise ValueError(f"Trainer: 'mix' names tasks {sorted(unknown)} that are not in 'tasks' {sorted(tasks)}")
        if not mix or any(r < 0 for r in mix.values()) or sum(mix.values()) <= 0:
            raise ValueError(f"Trainer: 'mix' must give non-negative ratios with a positive sum, got {mix}")
        missing = set(mix) - set(sources)
        if missing:
            raise ValueError(f"Trainer: no batch source for tasks {sorted(missing)}")
        self.cfg, self.sources, self.mix = cfg, sources, {k: v for k, v in mix.items() if v > 0}
        self.dist = dist_info or D.DistInfo()
        self.output = Path(output_dir)
        self.validate, self.log = validate, log_fn
        self.model = model.to(self.dist.device)
        self.router = TaskRouter(tasks).to(self.dist.device)
        own = {id(p) for p in self.model.parameters()}
        stray = [n for n, p in self.router.named_parameters() if id(p) not in own]
        if stray:
            raise ValueError(f"Trainer: task parameters {stray[:5]} are not part of 'model' (checkpoints hold the "
                             "model only); register heads on the model")
        self.module = self.router
        if D.active():
            ddp_kw = {"device_ids": [self.dist.device.index]} if self.dist.device.type == "cuda" else {}
            self.module = nn.parallel.DistributedDataParallel(self.router, find_unused_parameters=True, **ddp_kw)
        self.specs = {k: s.resolved(cfg) for k, s in (optimizers or {}).items()}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.optimizer: torch.optim.Optimizer | None = None
        if optimizers is not None:
            self.optimizers = build_optimizers(self.model, self.specs)
        else:
            self.optimizer = build_optimizer(self.router, cfg.lr, cfg.weight_decay, cfg.betas, cfg.eps, cfg.lr_mults)
        self.step = 0
        self.task_rng = random.Random(cfg.seed)
        self.history: list[dict] = []
        self.precision = self._precision()

    # ------------------------------------------------------------------------------------------------------
    def _precision(self) -> torch.dtype | None:
        p = self.cfg.precision
        if p == "auto":
            return torch.bfloat16 if self.dist.device.type == "cuda" else None
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[p]

    def _autocast(self):
        if self.precision is None:
            return contextlib.nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.precision)

    def choose_task(self) -> str:
        names = sorted(self.mix)
        choice = self.task_rng.choices(names, weights=[self.mix[n] for n in names])[0]
        return D.broadcast_object(choice)

    # ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything but the weights that a resumed run needs (several optimizers: ``optimizers`` by name and
        ``optimizer_specs`` instead of ``optimizer``)."""
        if self.optimizers:
            opt = {"optimizers": {k: o.state_dict() for k, o in self.optimizers.items()}}
        else:
            opt = {"optimizer": self.optimizer.state_dict()}
        state = {
            "step": self.step,
            **opt,
            "task_rng": self.task_rng.getstate(),
            "sources": {k: s.state_dict() for k, s in self.sources.items()},
            "rng": ckpt.rng_state(),
            "config": asdict(self.cfg),
        }
        if self.optimizers:
            state["optimizer_specs"] = {k: asdict(s) for k, s in self.specs.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        saved = sorted(state.get("optimizers", {})) or ["<one optimizer>"]
        mine = sorted(self.optimizers) or ["<one optimizer>"]
        if saved != mine:
            raise ValueError(f"Trainer: the checkpoint holds optimizers {saved}, this run has {mine}")
        self.step = state["step"]
        if self.optimizers:
            for k, o in self.optimizers.items():
                o.load_state_dict(state["optimizers"][k])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.task_rng.setstate(state["task_rng"])
        for k, s in state["sources"].items():
            if k in self.sources:
                self.sources[k].load_state_dict(s)
        ckpt.set_rng_state(state["rng"])

    def save(self) -> Path | None:
        if not self.dist.is_main:
            D.barrier()
            return None
        folder = ckpt.save_checkpoint(self.output, self.step, self.model, self.state_dict(), keep=self.cfg.keep_ckpts)
        D.barrier()
        return folder

    def resume(self) -> bool:
        """Continue from the latest complete checkpoint in ``output_dir`` if there is one."""
        folder = ckpt.latest_checkpoint(self.output)
        if folder is None:
            return False
        state = ckpt.load_checkpoint(folder, self.model)
        self.load_state_dict(state)
        self.log(f"resumed from {folder} at step {self.step}")
        return True

    # ------------------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step (``grad_accum`` micro-batches of one task; with several optimizers one phase per
        optimizer, see the module docstring). Returns the step's logs."""
        if self.optimizers:
            return self._phased_step()
        cfg = self.cfg
        task = self.choose_task()
        lr = set_lr(self.optimizer, cfg.lr, self.step, cfg.warmup_steps, cfg.steps)
        self.module.train()
        sum_loss, tokens, logs = self._accumulate(task)
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if cfg.check_finite and not torch.isfinite(grad_norm):
            raise FloatingPointError(f"non-finite gradient norm at step {self.step} (task {task}, loss {sum_loss}); "
                                     "check inputs for NaN features or lower the learning rate")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"step": self.step, "task": task, "loss": sum_loss, f"{task}/loss": sum_loss, "lr": lr,
                "grad_norm": float(grad_norm), "tokens": tokens * self.dist.world_size, **logs}

    def _accumulate(self, task: str, phase: str | None = None, cache: list | None = None
                    ) -> tuple[float, int, dict[str, float]]:
        """Forward/backward ``grad_accum`` micro-batches of ``task`` (gradients accumulate, no optimizer step).

        Micro-batch i is ``cache[i]`` when the cache holds it, else drawn from the task's source (and appended to
        ``cache`` when one is given). Returns (the step's mean loss over all processes, tokens drawn, logs).
        """
        cfg = self.cfg
        sum_loss, sum_count, tokens = 0.0, 0.0, 0
        logs: dict[str, float] = {}
        prefix = task if phase is None else f"{task}/{phase}"
        for micro in range(cfg.grad_accum):
            if cache is not None and micro < len(cache):
                batch = cache[micro]
            else:
                batch = self.sources[task].next_batch()
                batch = batch.to(self.dist.device) if hasattr(batch, "to") else batch
                tokens += getattr(batch, "num_tokens", 0)
                if cache is not None:
                    cache.append(batch)
            last = micro == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if (last or not D.active()) else self.module.no_sync()
            with sync:
                with self._autocast():
                    out = self.module(task, batch) if phase is None else self.module(task, batch, phase=phase)
                loss = out["loss"].float()
                count = torch.as_tensor(out.get("count", 1.0), dtype=torch.float32, device=loss.device)
                global_count = D.all_reduce_sum(count.detach().clone())
                # each rank's share of the global mean; DDP averages gradients over ranks
                scale = count * _world_size() / global_count.clamp_min(1e-12)
                (loss * scale / cfg.grad_accum).backward()
            weighted = D.all_reduce_sum((loss.detach() * count).reshape(1))
            sum_loss += float(weighted) / max(float(global_count), 1e-12) / cfg.grad_accum
            sum_count += float(global_count)
            for k, v in out.get("logs", {}).items():
                logs[f"{prefix}/{k}"] = float(v) if not isinstance(v, float) else v
        return sum_loss, tokens, logs

    def _phased_step(self) -> dict:
        """One step with several optimizers: per optimizer (in order, those whose ``every`` divides the step) the
        task's phase of that name over the step's micro-batches, clipping and a step of that optimizer alone."""
        cfg = self.cfg
        task = self.choose_task()
        self.module.train()
        cache: list = []
        rec: dict = {"step": self.step + 1, "task": task}
        total, tokens, logs = 0.0, 0, {}
        for name, spec in self.specs.items():
            if self.step % spec.every:
                continue
            opt = self.optimizers[name]
            lr = set_lr(opt, spec.lr, self.step, spec.warmup_steps, cfg.steps)
            loss, drawn, phase_logs = self._accumulate(task, name, cache)
            params = [p for g in opt.param_groups for p in g["params"]]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, spec.grad_clip if spec.grad_clip > 0 else math.inf)
            if cfg.check_finite and not torch.isfinite(grad_norm):
                raise FloatingPointError(f"non-finite gradient norm of optimizer {name!r} at step {self.step} "
                                         f"(task {task}, loss {loss}); check inputs or lower its learning rate")
            opt.step()
            self.model.zero_grad(set_to_none=True)  # this phase's gradients on other optimizers' parameters too
            total += loss
            tokens += drawn
            logs.update(phase_logs)
            rec.update({f"loss/{name}": loss, f"{task}/{name}/loss": loss, f"lr/{name}": lr,
                        f"grad_norm/{name}": float(grad_norm)})
        self.step += 1
        return {**rec, "loss": total, f"{task}/loss": total, "tokens": tokens * self.dist.world_size, **logs}

    def evaluate(self, sources: dict[str, BatchSource | Iterable], batches: int | None = None, tag: str = "eval",
                 consume: Callable[[str, object, dict], None] | None = None) -> dict[str, float]:
        """Evaluation only (no gradients, no optimizer state touched): the tasks over ``sources`` (give evaluation
        sources, not the training ones, whose positions would advance), averaged by ``count``; a record tagged
        ``tag`` at the current step goes to metrics.jsonl. See :func:`fastvl.train.evaluation.evaluate`."""
        return evaluate(dict(self.router.tasks.items()), sources, batches=batches, device=self.dist.device,
                        precision=self.precision, output_dir=self.output, step=self.step, tag=tag, consume=consume)

    def fit(self) -> list[dict]:
        """Train to ``cfg.steps``; validate, log and checkpoint on the configured cadence."""
        cfg = self.cfg
        metrics_path = self.output / "metrics.jsonl"
        if self.dist.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
        writer = _tensorboard(self.output) if self.dist.is_main else None
        bar = _progress(cfg.steps, self.step, enabled=cfg.progress and self.dist.is_main)
        self._bar = bar
        last_loss: dict[str, float] = {}
        t0, tok = time.perf_counter(), 0
        while self.step < cfg.steps:
            rec = self.train_step()
            self.history.append(rec)
            last_loss[rec["task"]] = rec["loss"]
            tok += rec["tokens"]
            if bar is not None:
                bar.update(1)
                rate = tok / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix({**{k: f"{v:.3f}" for k, v in sorted(last_loss.items())}, "tok/s": f"{rate:.0f}"})
            if self.dist.is_main and (self.step % cfg.log_every == 0 or self.step == cfg.steps):
                rec["tokens_per_s"] = tok / max(time.perf_counter() - t0, 1e-9)
                _append_jsonl(metrics_path, rec)
                if writer is not None:
                    for k, v in rec.items():
                        if isinstance(v, int | float) and k != "step":
                            writer.add_scalar(f"train/{k}", v, self.step)
            is_last = self.step == cfg.steps
            if self.validate is not None and ((cfg.val_every and self.step % cfg.val_every == 0) or is_last):
                self._run_validation(metrics_path, writer)
            if (cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or is_last:
                self.save()
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
        return self.history

    def run(self, resume: bool = False) -> dict:
        """``resume()`` (when asked) then ``fit()``. Returns {'history', 'seconds', 'tokens_per_s' (all processes),
        'validation': the last validation record of metrics.jsonl (main process; None elsewhere or if none)}."""
        if resume:
            self.resume()
        t0 = time.perf_counter()
        history = self.fit()
        seconds = time.perf_counter() - t0
        tokens = sum(h["tokens"] for h in history)
        validation = None
        metrics = self.output / "metrics.jsonl"
        if self.dist.is_main and metrics.exists():
            vals = [json.loads(x) for x in metrics.read_text().splitlines() if '"val/' in x]
            validation = vals[-1] if vals else None
        return {"history": history, "seconds": seconds, "tokens_per_s": tokens / max(seconds, 1e-9),
                "validation": validation}

    def _run_validation(self, metrics_path: Path, writer) -> None:
        self.module.eval()
        with torch.no_grad(), self._autocast():
            val = self.validate()
        self.module.train()
        if self.dist.is_main:
            rec = {"step": self.step, **{f"val/{k}": v for k, v in val.items()}}
            _append_jsonl(metrics_path, rec)
            msg = "validation step {}: {}".format(self.step, "  ".join(f"{k} {v:.4f}" for k, v in val.items()))
            bar = getattr(self, "_bar", None)
            (bar.write if bar is not None and self.log is print else self.log)(msg)  # a line of its own, not mid-bar
            if writer is not None:
                for k, v in val.items():
                    writer.add_scalar(f"val/{k}", v, self.step)


def _world_size() -> int:
    return torch.distributed.get_world_size() if D.active() else 1


def _append_jsonl(path: Path, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", dynamic_ncols=True)


def _tensorboard(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001  (tensorboard is optional)
        return None
    return SummaryWriter(str(output / "tb"))
