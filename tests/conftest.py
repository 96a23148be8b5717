"""Test configuration: Triton's interpreter on CPU-only machines, the one device Triton tests run on, a printed seed
per test, poisoned allocations, and the `cuda` / `needs_c` markers."""

import os
from pathlib import Path

import torch

# Must be set before triton is imported anywhere (fastvl imports it lazily, inside backends).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastvl  # noqa: E402
from fastvl.ops.testing import fresh_seed, poisoned_allocations, triton_test_device  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
NO_EXTENSION = "fastvl._C not built: the C++ 'cpu' backend is unavailable (pip install --no-build-isolation -e .)"
# Tests under these paths may launch a Triton kernel only through the `triton_device` fixture (see _TritonGuard).
GUARDED = ("tests/ops/", "tests/test_dispatch.py")
_ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_c: needs the compiled extension fastvl._C (skipped, with the reason, "
                                       "without it)")


def _guarded(item) -> bool:
    path = Path(str(item.path)).resolve()
    return path.is_relative_to(_ROOT) and path.relative_to(_ROOT).as_posix().startswith(GUARDED)


def pytest_collection_modifyitems(config, items):
    # A test parametrized with the Triton backend must build its tensors on the Triton device (on a GPU machine
    # the dispatcher refuses CPU tensors for Triton): it takes `triton_device` (or `device`, which uses it).
    bad = [item.nodeid for item in items if _guarded(item) and "triton" in getattr(
        getattr(item, "callspec", None), "params", {}).values() and "triton_device" not in item.fixturenames]
    if bad:
        raise pytest.UsageError("parametrized with backend 'triton' but not taking the `triton_device` fixture: "
                                + ", ".join(bad))
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on one)")
    skip_c = pytest.mark.skip(reason=NO_EXTENSION)
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)
        if "needs_c" in item.keywords and not fastvl.HAS_C:
            item.add_marker(skip_c)


# ----------------------------------------------------------------------------------------------------------
# The Triton device
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def triton_device() -> torch.device:
    """THE device of every test that runs a Triton backend: ``cuda`` where a GPU is present, else ``cpu`` under
    ``TRITON_INTERPRET=1`` (there only float32). Build every tensor such a test passes to the op on it."""
    return triton_test_device()


@pytest.fixture
def device(request, triton_device) -> torch.device:
    """The device of a test parametrized by ``backend``: ``triton_device`` for ``backend='triton'``, the GPU for
    ``'cuda'``, the CPU for the others (``cpu``, ``reference``, ``torch_chunked``)."""
    params = getattr(request.node, "callspec", None)
    backend = params.params.get("backend") if params is not None else None
    if backend == "triton":
        return triton_device
    return torch.device("cuda" if backend == "cuda" else "cpu")


class _TritonGuard:
    """Fails a guarded test that launches a Triton kernel without having asked for ``triton_device`` (directly or
    through ``device``) or with a tensor on another device: on a GPU machine such a test would hand the
    dispatcher CPU tensors, which it refuses without the interpreter."""

    nodeid: str | None = None
    allowed = False

    @classmethod
    def check(cls, args, kwargs) -> None:
        if cls.nodeid is None:
            return
        assert cls.allowed, (f"{cls.nodeid} launches a Triton kernel but does not take the `triton_device` "
                             "fixture (tests/conftest.py): its tensors are not built on the Triton device")
        want = triton_test_device().type
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                assert a.device.type == want, (f"{cls.nodeid} launches a Triton kernel on a {a.device.type} tensor; "
                                               f"the Triton device here is {want}")

    @classmethod
    def install(cls) -> None:
        try:
            from triton.runtime import interpreter, jit
        except ImportError:
            return
        for klass in (jit.KernelInterface, interpreter.InterpretedFunction):
            original = klass.__getitem__
            if getattr(original, "_fastvl_guard", False):
                continue

            def getitem(self, grid, _original=original):
                launch = _original(self, grid)

                def guarded(*args, **kwargs):
                    cls.check(args, kwargs)
                    return launch(*args, **kwargs)

                return guarded

            getitem._fastvl_guard = True
            klass.__getitem__ = getitem


_TritonGuard.install()


@pytest.fixture(autouse=True)
def _triton_guard(request):
    if _guarded(request.node):
        _TritonGuard.nodeid, _TritonGuard.allowed = request.node.nodeid, "triton_device" in request.fixturenames
    yield
    _TritonGuard.nodeid, _TritonGuard.allowed = None, False


# ----------------------------------------------------------------------------------------------------------
# Poisoned outputs, seeds
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def poisoned():
    """Every tensor allocated during the test starts as NaN (see ``fastvl.ops.testing.poisoned_allocations``);
    assert ``poisoned.covers(out)`` to show the poison reached an output."""
    with poisoned_allocations() as state:
        yield state


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test (FASTVL_TEST_SEED pins it); reported with the test's outcome on failure."""
    value = fresh_seed()
    torch.manual_seed(value)
    request.node.user_properties.append(("seed", value))
    print(f"[seed] {request.node.nodeid}: FASTVL_TEST_SEED={value}")
    return value


@pytest.fixture
def gen(seed) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        seeds = [v for k, v in item.user_properties if k == "seed"]
        if seeds:
            report.sections.append(("seed", f"reproduce with FASTVL_TEST_SEED={seeds[0]}"))
