"""The backend registry on a toy op: priority, reasons, forcing by argument and environment."""

import pytest
import torch

from fastvl.ops import _dispatch as D


@pytest.fixture
def toy():
    op = D.Op("toy", ["fast", "triton", "reference"], doc="toy op")
    op.backend("fast", kind="cpu")(lambda x: D.needs_dtype(x, [torch.float32]))
    op.backend("triton")(lambda x: D.triton_reasons(x))
    op.backend("reference")(lambda x: [])
    return op


def test_priority_and_reasons(toy):
    x32, x64 = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    assert toy.select(x32) == "fast"
    assert toy.select(x64) == "reference"
    assert toy.reasons(x64)["fast"] == ["supports dtypes {float32}, got float64"]


def test_triton_is_never_auto_selected_for_cpu_tensors(toy, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    op = D.Op("toy2", ["triton", "reference"])
    op.backend("triton")(lambda x: D.triton_reasons(x))
    op.backend("reference")(lambda x: [])
    assert op.reasons(torch.zeros(1))["triton"] == []
    assert op.select(torch.zeros(1)) == "reference"
    assert op.select(torch.zeros(1), backend="triton") == "triton"


def test_forcing(toy, monkeypatch):
    x64 = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(D.BackendUnavailableError, match=r"backend 'fast' was forced \(backend=\).*float64"):
        toy.select(x64, backend="fast")
    monkeypatch.setenv("FASTVL_BACKEND", "toy=fast")
    with pytest.raises(D.BackendUnavailableError, match=r"\(FASTVL_BACKEND\)"):
        toy.select(x64)
    monkeypatch.setenv("FASTVL_BACKEND", "other=fast")  # names another op: no effect here
    assert toy.select(x64) == "reference"
    monkeypatch.setenv("FASTVL_BACKEND", "cuda")  # a plain name this op lacks: no effect
    assert toy.select(x64) == "reference"
    monkeypatch.setenv("FASTVL_BACKEND", "reference")
    assert toy.select(torch.zeros(2)) == "reference"


def test_no_backend_lists_every_reason():
    op = D.Op("picky", ["a", "b"])
    op.backend("a", kind="cpu")(lambda x: ["needs a"])
    op.backend("b", kind="cuda")(lambda x: ["needs b", "and c"])
    with pytest.raises(D.BackendUnavailableError) as err:
        op.select(torch.zeros(1))
    assert "a: needs a" in str(err.value) and "b: needs b; and c" in str(err.value)


def test_register_op_rejects_duplicates_and_bad_kinds():
    with pytest.raises(ValueError, match="already registered"):
        D.register_op("ipot", ["reference"])
    op = D.Op("x", [])
    with pytest.raises(ValueError, match="backend kind"):
        op.backend("weird", kind="gpu")
