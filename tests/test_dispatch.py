"""The backend registry on a toy op: priority, reasons, forcing by argument and environment."""

import pytest
import torch

import fastvl.ops  # noqa: F401  (registers every op: FASTVL_BACKEND's names are checked against them)
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
    monkeypatch.setenv("FASTVL_BACKEND", "ipot=cpu")  # names another op: no effect here
    assert toy.select(x64) == "reference"
    monkeypatch.setenv("FASTVL_BACKEND", "cuda")  # a backend other ops have, this one lacks: no effect
    assert toy.select(x64) == "reference"
    monkeypatch.setenv("FASTVL_BACKEND", "torch_chunked")  # a name only other ops register: no effect
    assert toy.select(x64) == "reference"
    monkeypatch.setenv("FASTVL_BACKEND", "reference")
    assert toy.select(torch.zeros(2)) == "reference"


VALID = r"this op has \['fast', 'reference', 'triton'\]"


@pytest.mark.parametrize("value,match", [
    ("no_such_backend", r"FASTVL_BACKEND='no_such_backend' names no backend of any op; " + VALID),
    ("toy=no_such_backend", r"unknown backend 'no_such_backend' in FASTVL_BACKEND='toy=no_such_backend'; " + VALID),
    ("ipot=cpu,toy=nope", r"unknown backend 'nope' in FASTVL_BACKEND='ipot=cpu,toy=nope'; " + VALID),
    (" toy = nope ", r"unknown backend 'nope'.*" + VALID),
    ("no_such_op=cpu", r"names an unknown op 'no_such_op'; the ops are \[.*'attention'.*'ipot'"),
    ("toy=fast,cpu", r"item 'cpu' is not 'op=backend'"),
    ("toy=", r"item 'toy=' is not 'op=backend'"),
])
def test_unknown_name_in_the_environment_raises(toy, monkeypatch, value, match):
    """A name FASTVL_BACKEND cannot mean is an error naming the valid backends, as backend= is (never ignored)."""
    monkeypatch.setenv("FASTVL_BACKEND", value)
    with pytest.raises(D.BackendUnavailableError, match=match):
        toy.select(torch.zeros(2))
    with pytest.raises(D.BackendUnavailableError, match="unknown backend 'no_such_backend'; " + VALID):
        toy.select(torch.zeros(2), backend="no_such_backend")  # the argument, for comparison


def test_unknown_name_in_the_environment_raises_for_real_ops(monkeypatch):
    from fastvl.ops import fused_linear_cross_entropy

    h, w, t = torch.zeros(3, 4), torch.zeros(5, 4), torch.zeros(3, dtype=torch.long)
    for value in ("no_such_backend", "linear_cross_entropy=no_such_backend"):
        monkeypatch.setenv("FASTVL_BACKEND", value)
        with pytest.raises(D.BackendUnavailableError, match=r"this op has \['reference', 'torch_chunked', 'triton'\]"):
            fused_linear_cross_entropy(h, w, None, t)


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


def test_triton_launch_without_the_triton_device_fixture_fails():
    """tests/conftest.py's runtime guard: a test here that runs a Triton kernel without taking `triton_device`
    fails, whichever device its tensors are on (this one builds them on the right device, without the fixture)."""
    from fastvl.ops import cross_modal_attention
    from fastvl.ops.testing import attention_inputs, triton_test_device

    args = attention_inputs([3, 2], device=triton_test_device())
    with pytest.raises(AssertionError, match="does not take the `triton_device` fixture"):
        cross_modal_attention(*args, backend="triton")


def test_triton_launch_on_another_device_fails(triton_device):
    from fastvl.ops import cross_modal_attention
    from fastvl.ops.testing import attention_inputs

    other = "meta" if triton_device.type == "cpu" else "cpu"
    q, k, v, *rest = attention_inputs([3, 2], device=triton_device)
    from fastvl.kernels.triton.attention import attention_fwd_triton

    with pytest.raises(AssertionError, match=f"launches a Triton kernel on a {other} tensor"):
        attention_fwd_triton(q.to(other), k.to(other), v.to(other), *rest, 0.0, 0.2, None)
    assert cross_modal_attention(q, k, v, *rest, backend="triton").shape == q.shape
