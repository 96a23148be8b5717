"""`python -m fastvl.info` and running without the compiled extension."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastvl
from fastvl import info

ROOT = Path(__file__).resolve().parents[1]


def test_report_lists_ops_and_backends():
    rep = info.report()
    assert rep["build"]["torch"] == torch.__version__
    ipot = rep["ops"]["ipot"]
    assert ipot["cpu/float32"]["selected"] == ("cpu" if fastvl.HAS_C else "reference")
    assert ipot["cuda/bfloat16"]["reasons"]["cpu"] == ["needs cpu tensors, got cuda"]
    text = info.format_report(rep)
    assert "op ipot" in text and "cpu/float32" in text and "cuda/bfloat16" in text


@pytest.mark.skipif(not fastvl.HAS_C, reason="fastvl._C not built")
def test_extension_reports_its_build():
    ext = info.build_info()["extension"]
    assert ext["openmp"] is True
    if ext["cuda_kernels"]:  # the device code really is in the library, for every requested arch
        wanted = {f"sm_{a.replace('.', '')}" for a in ext["cuda_archs"]}
        assert wanted <= set(ext["embedded_sass"])


def test_checkout_without_extension_serves_reference(tmp_path):
    """A copy of the package without _C*.so imports (warning once) and computes with reference backends."""
    shutil.copytree(ROOT / "fastvl", tmp_path / "fastvl", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    code = (
        # an editable install of this checkout maps fastvl.* back to it: simulate a plain checkout without it
        "import sys\n"
        "sys.meta_path = [f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', type(f).__name__)]\n"
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    import fastvl\n"
        "assert not fastvl.HAS_C and any('fastvl._C is not available' in str(x.message) for x in w), w\n"
        "from fastvl.ops import ot\n"
        "t, i = torch.randn(2, 3, 8), torch.randn(2, 4, 8)\n"
        "tp, ip = torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 4, dtype=torch.bool)\n"
        "cost = ot.cosine_cost(t, i)\n"
        "assert ot.IPOT.select(cost, tp, ip, 0.5, 50, 1) == 'reference'\n"
        "d = ot.optimal_transport_dist(t, i, tp, ip)\n"
        "r = ot.optimal_transport_dist_reference(t.double(), i.double(), tp, ip)\n"
        "assert torch.allclose(d.double(), r, rtol=1e-5), (d, r)\n"
        "print('ok', ot.IPOT.reasons(cost, tp, ip, 0.5, 50, 1)['cpu'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert "fastvl._C is not built" in out.stdout
