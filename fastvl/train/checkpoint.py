"""Atomic, resumable checkpoints.

Layout of ``<output>/checkpoints/step_<N>/``: ``model.safetensors`` (weights, tied tensors stored once),
``trainer.pt`` (optimizer, schedule position, data-sampler state, RNG states, step) and ``meta.json``.
``trainer.pt`` holds tensors and plain Python values only (numpy's RNG state is stored as a tensor) and is read with
``torch.load(weights_only=True)``: a run folder someone else made cannot execute code when it is resumed or evaluated
(a ``trainer.pt`` holding any other pickled object is refused with :class:`CheckpointError`).
A checkpoint is written into a temporary sibling folder, fsynced, then renamed into place; ``latest`` (a
text file naming the folder) is replaced atomically afterwards. A process killed at any point (SIGKILL
included) leaves the previous checkpoint complete and ``latest`` pointing at a complete one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "load_trainer_state", "model_tensors",
           "plain_state", "rng_state", "save_checkpoint", "set_rng_state"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not a fastvl checkpoint, unsafe to unpickle, corrupt, or of another model."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain values (numpy's MT19937 key as an int64
    tensor), so that :func:`load_trainer_state` reads them with ``weights_only=True``."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (also the numpy tuple of checkpoints written before the plain format)."""
    random.setstate(state["python"])
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = (npy["kind"], np.asarray(npy["keys"].numpy(), dtype=np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """state_dict with tied tensors stored once (safetensors refuses shared storage)."""
    out, seen = {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen and t.numel() > 0:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def save_checkpoint(output: Path, step: int, model: torch.nn.Module, trainer_state: dict, meta: dict | None = None,
                    keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically; keep the newest ``keep`` ones. Returns its folder."""
    from safetensors.torch import save_file

    root = Path(output) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file(model_tensors(model), str(tmp / "model.safetensors"))
    with open(tmp / "model.safetensors", "rb+") as f:
        os.fsync(f.fileno())
    torch.save(plain_state(trainer_state), tmp / "trainer.pt")
    with open(tmp / "trainer.pt", "rb+") as f:
        os.fsync(f.fileno())
    _write_file(tmp / "meta.json", json.dumps({"step": step, **(meta or {})}, indent=2).encode())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    pointer = root / f".latest.{os.getpid()}"
    _write_file(pointer, final.name.encode())
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp_step_*"):  # left by a killed writer
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def latest_checkpoint(output: Path) -> Path | None:
    """The folder ``latest`` names, or None when there is no complete checkpoint."""
    root = Path(output) / "checkpoints"
    pointer = root / "latest"
    if not pointer.exists():
        return None
    folder = root / pointer.read_text().strip()
    return folder if (folder / "model.safetensors").exists() and (folder / "trainer.pt").exists() else None


def load_checkpoint(folder: Path, model: torch.nn.Module, map_location="cpu", trainer_state: bool = True
                    ) -> dict | None:
    """Load weights into ``model`` (strict, ties restored by the model) and return the trainer state
    (:func:`load_trainer_state`; None with ``trainer_state=False``, which does not open ``trainer.pt``).

    Raises :class:`CheckpointError` when a file is missing, unreadable or unsafe, or the weights do not fit."""
    from safetensors.torch import load_file

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder}: no model.safetensors in it (not a fastvl checkpoint folder)")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # noqa: BLE001  (safetensors raises its own error type for a corrupt header)
        raise CheckpointError(f"checkpoint file {path} cannot be read: {e}") from e
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {n for n in missing if _is_tied(model, n, tensors)}
    missing = [n for n in missing if n not in tied]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {folder} does not match the model ({type(model).__name__}): missing "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                              f"{' ...' if len(unexpected) > 5 else ''}")
    return load_trainer_state(folder, map_location) if trainer_state else None


#: Types a legacy ``trainer.pt`` (written before numpy's RNG state was stored as a tensor) may hold besides tensors
#: and plain values: numpy's array reconstruction, which builds arrays and dtypes only.
def _legacy_numpy_globals() -> list:
    names = [("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct")]
    out: list = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for module, name in names:
        try:
            mod = __import__(module, fromlist=[name])
            out.append(getattr(mod, name))
        except (ImportError, AttributeError):
            continue
    return out


def load_trainer_state(folder: Path, map_location="cpu") -> dict:
    """The trainer state of checkpoint ``folder``, read with ``torch.load(weights_only=True)``: tensors and plain
    Python values only, never arbitrary pickled objects (a file holding one is refused with
    :class:`CheckpointError` naming it, before any of its code runs)."""
    path = Path(folder) / "trainer.pt"
    if not path.is_file():
        raise CheckpointError(f"checkpoint {folder}: no trainer.pt in it (not a fastvl checkpoint folder)")
    safe = getattr(torch.serialization, "safe_globals", None)
    try:
        with safe(_legacy_numpy_globals()) if safe is not None else contextlib.nullcontext():
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001  (pickle.UnpicklingError, RuntimeError of a corrupt zip, EOFError ...)
        detail = " ".join(str(e).split())
        found = re.search(r"GLOBAL ([\w.]+)", detail)
        reason = f"it pickles {found.group(1)}" if found else detail[-200:]
        raise CheckpointError(f"refusing to load {path}: it is not a plain fastvl trainer state (tensors and plain "
                              f"values only; {reason}). fastvl never unpickles other objects from a checkpoint, "
                              "since that could run arbitrary code") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a fastvl trainer state (no 'step')")
    return state


_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)


def plain_state(value: Any, where: str = "trainer_state") -> Any:
    """``value`` with numpy scalars made Python scalars, checked to hold only what ``weights_only=True`` reads back
    (tensors, dicts, lists, tuples, str / int / float / bool / None); raises TypeError naming the entry otherwise."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {k: plain_state(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, list | tuple) and type(value) in (list, tuple):
        out = [plain_state(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return out if isinstance(value, list) else tuple(out)
    raise TypeError(f"save_checkpoint: {where} is a {type(value).__module__}.{type(value).__qualname__}; a "
                    "checkpoint's trainer state holds tensors and plain Python values only (convert it)")


def _is_tied(model: torch.nn.Module, name: str, tensors: dict) -> bool:
    """Whether parameter ``name`` shares storage with a parameter that the checkpoint holds."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = dict(model.named_buffers(remove_duplicate=False))
    t = params.get(name, buffers.get(name))
    if t is None:
        return False
    for other, p in {**params, **buffers}.items():
        if other != name and other in tensors and p.data_ptr() == t.data_ptr():
            return True
    return False
