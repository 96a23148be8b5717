"""trainer.pt is read with weights_only=True: a pickled object is refused (naming the file) and never runs; what
fastvl writes is tensors and plain values only, so a normal save -> resume still works."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from fastvl.train import checkpoint as ckpt
from fastvl.train.loop import TrainConfig, Trainer


class _Payload:
    """Unpickling this runs code that writes ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _checkpoint(tmp_path, state):
    model = torch.nn.Linear(3, 2)
    folder = ckpt.save_checkpoint(tmp_path / "run", 1, model, {"step": 1})
    torch.save(state, folder / "trainer.pt")  # replaced by someone else's file
    return folder, model


def test_pickled_object_in_trainer_pt_is_refused(tmp_path):
    marker = tmp_path / "side_effect"
    folder, model = _checkpoint(tmp_path, {"step": 1, "payload": _Payload(marker)})
    with pytest.raises(ckpt.CheckpointError, match=r"refusing to load .*trainer\.pt.*pickles .*exec"):
        ckpt.load_checkpoint(folder, model)
    assert not marker.exists()


def test_trainer_resume_refuses_a_pickled_object(tmp_path):
    marker = tmp_path / "side_effect"
    folder, model = _checkpoint(tmp_path, {"step": 1, "payload": _Payload(marker)})

    class Source:
        def next_batch(self):
            return torch.ones(1, 3)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    class Task(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, batch):
            return {"loss": self.model(batch).sum()}

    tr = Trainer(model, {"t": Task(model)}, {"t": Source()}, {"t": 1.0}, TrainConfig(steps=1, progress=False),
                 tmp_path / "run", log_fn=lambda s: None)
    with pytest.raises(ckpt.CheckpointError, match=str(folder / "trainer.pt")):
        tr.resume()
    assert not marker.exists()


def test_written_state_is_plain(tmp_path):
    """What fastvl writes loads with plain torch.load(weights_only=True) (numpy's RNG state included)."""
    state = {"step": 4, "rng": ckpt.rng_state(), "task_rng": random.Random(1).getstate(),
             "config": {"betas": (0.9, 0.98)}}
    folder = ckpt.save_checkpoint(tmp_path, 4, torch.nn.Linear(2, 2), state)
    loaded = torch.load(folder / "trainer.pt", weights_only=True)
    assert loaded["step"] == 4 and isinstance(loaded["rng"]["numpy"]["keys"], torch.Tensor)


def test_rng_state_round_trip(tmp_path):
    np.random.seed(5)
    random.seed(5)
    torch.manual_seed(5)
    folder = ckpt.save_checkpoint(tmp_path, 1, torch.nn.Linear(2, 2), {"step": 1, "rng": ckpt.rng_state()})
    expected = (np.random.rand(4), random.random(), torch.rand(3))
    ckpt.set_rng_state(ckpt.load_trainer_state(folder)["rng"])
    got = (np.random.rand(4), random.random(), torch.rand(3))
    assert np.array_equal(expected[0], got[0]) and expected[1] == got[1] and torch.equal(expected[2], got[2])


def test_legacy_numpy_rng_state_still_loads(tmp_path):
    """Checkpoints written before the plain format hold numpy's state as an ndarray: still readable (numpy arrays
    only), and restored."""
    np.random.seed(9)
    legacy = {"step": 1, "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                 "torch": torch.get_rng_state()}}
    folder, model = _checkpoint(tmp_path, legacy)
    expected = np.random.rand(3)
    ckpt.set_rng_state(ckpt.load_checkpoint(folder, model)["rng"])
    assert np.array_equal(np.random.rand(3), expected)


def test_non_plain_state_is_not_written(tmp_path):
    with pytest.raises(TypeError, match=r"trainer_state\['bad'\] is a .*_Payload"):
        ckpt.save_checkpoint(tmp_path, 1, torch.nn.Linear(2, 2), {"step": 1, "bad": _Payload(tmp_path / "m")})
    buf = io.BytesIO()
    torch.save(ckpt.plain_state({"n": np.int64(3)}), buf)
    assert torch.load(io.BytesIO(buf.getvalue()), weights_only=True) == {"n": 3}


def test_eval_does_not_open_trainer_pt(tmp_path):
    marker = tmp_path / "side_effect"
    folder, model = _checkpoint(tmp_path, {"step": 1, "payload": _Payload(marker)})
    assert ckpt.load_checkpoint(folder, model, trainer_state=False) is None
    assert not marker.exists()
