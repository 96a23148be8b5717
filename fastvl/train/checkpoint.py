"""Atomic, resumable checkpoints.

Layout of ``<output>/checkpoints/step_<N>/``: ``model.safetensors`` (weights, tied tensors stored once),
``trainer.pt`` (optimizer, schedule position, data-sampler state, RNG states, step) and ``meta.json``.
A checkpoint is written into a temporary sibling folder, fsynced, then renamed into place; ``latest`` (a
text file naming the folder) is replaced atomically afterwards. A process killed at any point (SIGKILL
included) leaves the previous checkpoint complete and ``latest`` pointing at a complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch


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
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
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
    torch.save(trainer_state, tmp / "trainer.pt")
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


def load_checkpoint(folder: Path, model: torch.nn.Module, map_location="cpu") -> dict:
    """Load weights into ``model`` (strict, ties restored by the model) and return the trainer state."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(folder) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {n for n in missing if _is_tied(model, n, tensors)}
    missing = [n for n in missing if n not in tied]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {folder} does not match the model: missing {missing}, unexpected {unexpected}")
    return torch.load(Path(folder) / "trainer.pt", map_location=map_location, weights_only=False)


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
