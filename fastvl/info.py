"""``python -m fastvl.info`` (also ``fastvl info``): how fastvl was built and which backend serves each op here.

For every registered op it asks the dispatcher, for two representative inputs — float32 tensors on the
CPU and bfloat16 tensors on CUDA — which backend would be selected and why each other backend would
not. CUDA inputs are fake tensors (no GPU needed), so the CUDA column shows what a GPU machine with this
build would pick.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import platform
import struct
import sys

import torch

import fastvl
from fastvl.ops import _dispatch as D

# Importing these registers their ops in the dispatcher. Modules still to come are skipped quietly.
OP_MODULES = ["attention", "ot", "linear_cross_entropy", "linear_kl", "masked_regression", "sym_kl",
              "bce_soft", "adv_perturb", "spade", "layout_ret"]


def load_ops() -> dict[str, D.Op]:
    for name in OP_MODULES:
        if importlib.util.find_spec(f"fastvl.ops.{name}") is not None:
            importlib.import_module(f"fastvl.ops.{name}")
    return D.OPS


def build_info() -> dict:
    info = {
        "fastvl": fastvl.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "triton": _version("triton"),
        "extension": None,
    }
    if fastvl.HAS_C:
        ext = fastvl._C.build_info()
        info["extension"] = {
            "path": fastvl._C.__file__,
            "cuda_kernels": bool(ext["cuda"]),
            "cuda_archs": [a for a in ext["cuda_archs"].replace(",", ";").split(";") if a],
            "openmp": bool(ext["openmp"]),
            "compiler": ext["compiler"],
            "embedded_sass": embedded_cuda_code(fastvl._C.__file__),
        }
    for peer in ("xformers", "flash_attn", "cupy"):
        info[peer] = _version(peer)
    return info


def embedded_cuda_code(path: str) -> list[str]:
    """Device code actually embedded in a shared library: ['sm_80', 'sm_90', 'compute_90 (PTX)', ...].

    Reads the CUDA fat binaries in the file (magic 0xBA55ED50; per entry: kind 1 = PTX, 2 = SASS/ELF,
    architecture at byte 28 of the entry header), so it needs no CUDA tools.
    """
    data = open(path, "rb").read()
    magic, found, pos = struct.pack("<I", 0xBA55ED50), [], 0
    while (start := data.find(magic, pos)) >= 0:
        _, header, size = struct.unpack_from("<HHQ", data, start + 4)
        entry, end = start + header, start + header + size
        while entry + 32 <= min(end, len(data)):
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", data, entry)
            arch = struct.unpack_from("<I", data, entry + 28)[0]
            found.append(f"sm_{arch}" if kind == 2 else f"compute_{arch} (PTX)")
            if entry_header == 0:
                break
            entry += entry_header + payload
        pos = start + 4
    return sorted(set(found))


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as err:  # noqa: BLE001  (a broken optional install is information, not a crash)
        return f"broken ({type(err).__name__})"


def _probe(op: D.Op, device: str, dtype: torch.dtype) -> dict:
    """Selected backend and every backend's reasons for a representative input on ``device``."""
    if op.example is None:
        return {"selected": None, "reasons": {}, "note": "no example registered"}
    if device == "cuda" and not torch.cuda.is_available():
        from torch._subclasses.fake_tensor import FakeTensorMode

        with FakeTensorMode(allow_non_fake_inputs=True):
            args, kwargs = op.example(device, dtype)
            return _select(op, args, kwargs)
    args, kwargs = op.example(device, dtype)
    return _select(op, args, kwargs)


def _select(op: D.Op, args, kwargs) -> dict:
    reasons = op.reasons(*args, **kwargs)
    try:
        selected = op.select(*args, **kwargs)
    except D.BackendUnavailableError:
        selected = None
    return {"selected": selected, "reasons": reasons}


def report() -> dict:
    ops = load_ops()
    table = {}
    for name, op in sorted(ops.items()):
        table[name] = {
            "doc": op.doc,
            "cpu/float32": _probe(op, "cpu", torch.float32),
            "cuda/bfloat16": _probe(op, "cuda", torch.bfloat16),
        }
    return {"build": build_info(), "ops": table}


def format_report(rep: dict) -> str:
    b = rep["build"]
    lines = [
        f"fastvl {b['fastvl']}  python {b['python']}  torch {b['torch']} (CUDA {b['torch_cuda'] or 'none'})  "
        f"triton {b['triton'] or 'not installed'}",
        f"GPU: {b['gpu'] or 'none visible'}",
    ]
    ext = b["extension"]
    if ext is None:
        lines.append("fastvl._C: NOT BUILT (reference / Triton backends serve every op)")
    else:
        archs = ", ".join(ext["embedded_sass"]) or "-"
        lines.append(f"fastvl._C: {ext['path']}")
        lines.append(f"  CUDA kernels: {'yes' if ext['cuda_kernels'] else 'no'} (device code in the library: {archs}; "
                     f"TORCH_CUDA_ARCH_LIST at build: {';'.join(ext['cuda_archs']) or '-'}); "
                     f"OpenMP: {'yes' if ext['openmp'] else 'no'}; compiler {ext['compiler']}")
    peers = ", ".join(f"{p} {b[p]}" if b[p] else f"{p} -" for p in ("xformers", "flash_attn", "cupy"))
    lines.append(f"peers: {peers}")
    for name, entry in rep["ops"].items():
        lines.append("")
        lines.append(f"op {name}: {entry['doc']}")
        for col in ("cpu/float32", "cuda/bfloat16"):
            probe = entry[col]
            lines.append(f"  {col:<14} -> {probe['selected'] or 'NO BACKEND'}")
            for backend, why in probe["reasons"].items():
                if backend == probe["selected"]:
                    continue
                text = "; ".join(why) if why else "usable (lower priority or selected only when forced)"
                lines.append(f"      {backend:<12} {text}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rep = report()
    print(json.dumps(rep, indent=2, default=str) if "--json" in argv else format_report(rep))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
