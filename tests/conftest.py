"""Test configuration: Triton's interpreter on CPU-only machines, a printed seed per test, the `cuda` marker."""

import os

import torch

# Must be set before triton is imported anywhere (fastvl imports it lazily, inside backends).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastvl.ops._testing import fresh_seed  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run benchmarks/gpu_check.sh on one)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


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
