"""Every Triton kernel of fastvl compiles ahead of time for real GPUs without one (benchmarks/aot_report.py).

Triton's bundled ptxas builds each launcher's kernels for sm_90 (and, in the slow test, sm_80 in every dtype) at
the tile configurations the GPU path picks, so a kernel that only works in the interpreter, needs too much shared
memory or spills registers in a hot path fails here. A subprocess, since this process runs Triton in interpreter
mode.
"""

import os
import subprocess
import sys

import pytest

SMEM = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}


def _run_report(tmp_path, *args) -> list[dict]:
    import csv

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    out = tmp_path / "aot.csv"
    res = subprocess.run([sys.executable, "-m", "benchmarks.aot_report", "--check-coverage", "--csv", str(out), *args],
                         env=env, capture_output=True, text=True, timeout=900,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "every launchable kernel covered" in res.stdout
    with open(out, newline="") as f:
        return list(csv.DictReader(f))


def _check(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        where = f"{r['kernel']} {r['case']} {r['dtype']} {r['arch']}"
        assert 0 < int(r["regs"]) <= 255, where
        assert int(r["shared_bytes"]) <= SMEM[r["arch"]], where
        # Hot paths must not spill (the keep-mask kernel is a test-only helper).
        if r["kernel"] != "_keep_mask_kernel":
            assert int(r["spill_stores"]) == 0 and int(r["spill_loads"]) == 0, f"{where} spills"


def test_every_triton_kernel_compiles_for_sm90(tmp_path):
    rows = _run_report(tmp_path, "--arch", "90", "--quick")
    _check(rows)
    kernels = {r["kernel"] for r in rows}
    assert {"_ipot_kernel", "_ipot_tiled_kernel", "_attn_fwd", "_attn_bwd", "_stats_kernel", "_update_kernel",
            "_init_kernel", "_cross_entropy_rows_kernel", "_kl_rows_kernel"} <= kernels


@pytest.mark.slow
def test_every_triton_kernel_compiles_for_sm90_and_sm80_in_every_dtype(tmp_path):
    rows = _run_report(tmp_path)
    _check(rows)
    assert {r["arch"] for r in rows} == {"sm_90", "sm_80"}
    assert {r["dtype"] for r in rows} >= {"fp32", "bf16", "fp16"}
