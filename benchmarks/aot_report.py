"""Ahead-of-time compile report: registers, spills and shared memory of every GPU kernel for sm_90 and sm_80,
on a machine without a GPU.

Triton kernels: each launcher of ``fastvl/kernels/triton`` is called with CPU tensors at the shapes the GPU path
sees, with ``JITFunction.run`` intercepted, so the launcher picks its tile configuration exactly as on a GPU and the
launch is recorded instead of run. Each recorded launch is compiled with ``triton.compile`` for
``GPUTarget('cuda', arch, 32)`` with Triton's own argument specialization. Registers and spills come from Triton's
bundled ``ptxas -v`` on the kernel's PTX (``CompiledKernel.n_regs`` is only filled in on a GPU); shared memory is
the compiled kernel's ``metadata.shared``. Every launchable ``@triton.jit`` kernel of the package must be covered
(``--check-coverage`` fails otherwise).

CUDA kernels (``--cuda``): ``csrc/*/*_cuda.cu`` compiled with ``nvcc -Xptxas -v`` for sm_80 and sm_90 (include
paths as setup.py: torch's, ``csrc``, and torch's ``nvidia-*`` wheels for headers the system CUDA lacks).

    python -m benchmarks.aot_report --cuda            # everything -> benchmarks/results/aot_kernels.csv + a table
    python -m benchmarks.aot_report --arch 90 --quick --no-csv --check-coverage   # what the fast test runs

Run it in a process without ``TRITON_INTERPRET`` (the launchers pick interpreter tiles under it).
"""

from __future__ import annotations

import argparse
import csv
import glob
import importlib
import os
import pkgutil
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
COLUMNS = ["kind", "kernel", "case", "dtype", "arch", "config", "regs", "spill_stores", "spill_loads", "stack",
           "shared_bytes", "source"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Launch:
    fn: object  # triton JITFunction
    args: tuple
    kwargs: dict


def _record_launches(call: Callable[[], object]) -> list[Launch]:
    """Run ``call`` (a launcher call on CPU tensors) with every Triton launch recorded instead of run."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    real = JITFunction.run

    def fake_run(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs))

    JITFunction.run = fake_run
    try:
        call()
    finally:
        JITFunction.run = real
    return launches


def _launcher(name: str):
    """A launcher by name from whichever module of fastvl.kernels.triton defines it (modules may be renamed)."""
    import fastvl.kernels.triton as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        if hasattr(mod, name):
            return getattr(mod, name)
    raise LookupError(f"no launcher {name!r} in fastvl.kernels.triton")


def launchable_kernels() -> set[str]:
    """Names of the package's @triton.jit functions that no other jit function calls (the ones launched)."""
    from triton.runtime.jit import JITFunction

    import fastvl.kernels.triton as pkg

    fns = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for obj in vars(mod).values():
            if isinstance(obj, JITFunction) and obj.__module__ == mod.__name__:
                fns[obj.__name__] = obj
    called = {n for n in fns for other in fns.values() if other.__name__ != n and re.search(rf"\b{n}\(", other.src)}
    return set(fns) - called


# ---------------------------------------------------------------------------------------------------------------
# The cases: each launcher at the shapes the GPU path sees (UNITER-base: hidden 768, 12 heads of 64; WRA 60 x 100)
# ---------------------------------------------------------------------------------------------------------------


def _ot(n: int, m: int):
    def call():
        cost = torch.zeros(4, n, m)
        _launcher("ipot_plan_triton")(cost, torch.zeros(4, n, dtype=torch.bool), torch.zeros(4, m, dtype=torch.bool),
                                      0.5, 50, 1)
    return call


def _adv_step(dt, norm: str, packed: bool):
    def call():
        txt, img = torch.zeros(8, 40, 768, dtype=dt), torch.zeros(8, 36, 768, dtype=dt)
        masks = [torch.ones(8, 40, dtype=torch.bool), torch.ones(8, 36, dtype=torch.bool)]
        if packed:
            txt, img = txt.view(-1, 768), img.view(-1, 768)
            masks = [torch.arange(0, 321, 40, dtype=torch.int32), torch.arange(0, 289, 36, dtype=torch.int32)]
        _launcher("adv_perturb_step_triton")([txt, img], [txt.clone(), img.clone()], masks, [1e-3, 1e-3], norm,
                                             [0.5, 0.5], [40, 36])
    return call


def _adv_init(dt, norm: str):
    def call():
        _launcher("adv_perturb_init_triton")(torch.zeros(8, 40, 768, dtype=dt), torch.ones(8, 40, dtype=torch.bool),
                                             0.1, norm, 40)
    return call


def _loss(name: str, dt, width: int, **kw):
    def call():
        n = 64
        x = torch.zeros(n, width, dtype=dt)
        loss, scale = torch.zeros(n), torch.tensor(1.0 / n)
        if name == "cross_entropy_rows":
            _launcher(name)(x, torch.zeros(n, dtype=torch.int64), loss, scale, 0, True, -100)
        elif name == "symmetric_kl_rows":
            _launcher(name)(x, x.clone(), loss, torch.zeros_like(x), torch.zeros_like(x), scale, 0, False)
        elif name == "regression_rows":
            _launcher(name)(x, x.clone(), loss, scale, 0, True, kw.get("l2", False), False)
        else:  # kl_rows, bce_rows
            _launcher(name)(x, x.clone(), loss, scale, 0, True, False)
    return call


def _attention(dt, hd: int, seq: int, mask: str, dropout: float):
    def call():
        lens = [seq, seq // 2, 7]
        cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
        q = torch.zeros(sum(lens), 12, hd, dtype=dt)
        seed = torch.zeros(2, dtype=torch.int64)
        prefix = torch.tensor([2, 2, 2], dtype=torch.int32) if mask == "seq2seq" else None
        fwd, bwd = _launcher("attention_fwd_triton"), _launcher("attention_bwd_triton")
        out, lse = fwd(q, q, q, cu, cu, seq, seq, mask, prefix, dropout, hd ** -0.5, seed)
        bwd(out, q, q, q, out, lse, cu, cu, seq, seq, mask, prefix, dropout, hd ** -0.5, seed)
    return call


def _spade(dt, shape: tuple[int, int, int, int], instance: bool):
    """SPADE norm forward + backward (training statistics) at a SPADE block's size."""
    def call():
        x = torch.zeros(shape, dtype=dt)
        fwd, bwd = _launcher("spade_norm_fwd_triton"), _launcher("spade_norm_bwd_triton")
        out, mean, var = fwd(x, x, x, None, None, instance, 1e-5)
        bwd(out, x, x, mean, var, instance, True, 1e-5)
    return call


def _layout_retrieval(n_q: int, n_cls: int, n_maps: int, hw: int, mem_dtype: torch.dtype):
    """BachGAN retrieval intersections: n_q queries (n_cls classes) against a chunk of n_maps maps of hw pixels."""
    def call():
        words = torch.zeros(n_q, (n_cls + 31) // 32, hw, dtype=torch.int32)
        _launcher("layout_intersections_triton")(words, torch.zeros(n_maps, hw, 1, dtype=mem_dtype))
    return call


def _keep_mask():
    cu = torch.tensor([0, 40, 60], dtype=torch.int32)
    return lambda: _launcher("dropout_keep_mask")(torch.zeros(2, dtype=torch.int64), cu, cu, 40, 40, 12, 0.1)


def cases(quick: bool = False) -> list[tuple[str, str, Callable[[], object]]]:
    """(case, dtype, launcher call). ``quick``: every kernel once, in its training dtype (bf16 where it has one)."""
    out = [("ot 20x36 (register 32x64)", "fp32", _ot(20, 36)),
           ("ot 60x100 (register 64x128)", "fp32", _ot(60, 100)),
           ("ot 200x100 (tiled 64x64)", "fp32", _ot(200, 100))]
    dts = ["bf16"] if quick else list(DTYPES)
    for d in dts:
        dt = DTYPES[d]
        out += [(f"adv step l2 padded {d}", d, _adv_step(dt, "l2", False)),
                (f"adv init l2 {d}", d, _adv_init(dt, "l2"))]
        if not quick:
            out += [(f"adv step linf packed {d}", d, _adv_step(dt, "linf", True)),
                    (f"adv init linf {d}", d, _adv_init(dt, "linf"))]
        out += [("mlm cross-entropy V=28996", d, _loss("cross_entropy_rows", dt, 28996)),
                ("mrc-kl C=1601", d, _loss("kl_rows", dt, 1601)),
                ("mrfr regression D=2048", d, _loss("regression_rows", dt, 2048)),
                ("vqa bce A=3129", d, _loss("bce_rows", dt, 3129)),
                ("villa symmetric kl C=3129", d, _loss("symmetric_kl_rows", dt, 3129))]
        if not quick:
            out += [("mrfr regression l2 D=2048", d, _loss("regression_rows", dt, 2048, l2=True))]
        out += [("spade batch norm 4x64x64x64 (two-phase)", d, _spade(dt, (4, 64, 64, 64), False)),
                ("spade batch norm 4x1024x8x8 (single)", d, _spade(dt, (4, 1024, 8, 8), False))]
        if not quick:
            out += [("spade instance norm 2x64x32x32 (single)", d, _spade(dt, (2, 64, 32, 32), True))]
    out.append(("layout retrieval Q=64 C=35 4096 maps 64x64", "uint8", _layout_retrieval(64, 35, 4096, 4096,
                                                                                             torch.uint8)))
    if not quick:
        out.append(("layout retrieval Q=8 C=300 512 maps 32x32", "int16", _layout_retrieval(8, 300, 512, 1024,
                                                                                               torch.int16)))
    attn = [("bf16", 64, 160, "bidirectional", 0.1)] if quick else [
        ("bf16", 64, 160, "bidirectional", 0.1), ("bf16", 64, 160, "seq2seq", 0.0), ("fp16", 80, 1024, "cross", 0.0),
        ("bf16", 128, 512, "bidirectional", 0.0), ("fp32", 64, 160, "cross", 0.1)]
    for d, hd, seq, mask, p in attn:
        out.append((f"attention d={hd} L={seq} {mask}{' dropout' if p else ''}", d,
                    _attention(DTYPES[d], hd, seq, mask, p)))
    out.append(("dropout keep-mask (tests only)", "-", _keep_mask()))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------------------------------


def _ptxas() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


def parse_ptxas(text: str) -> list[dict]:
    """Per entry function of ``ptxas -v`` output: name, arch, regs, spills, stack, static smem."""
    out, cur = [], None
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            cur = dict(name=m.group(1), arch=m.group(2), regs=0, spill_stores=0, spill_loads=0, stack=0, smem=0)
            out.append(cur)
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            cur["smem"] = int(s.group(1)) if s else 0
    return out


def _ptxas_v(ptx: str, arch: int) -> dict:
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        Path(src).write_text(ptx)
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        res = subprocess.run([_ptxas(), "-v", f"--gpu-name={gpu}", src, "-o", os.path.join(d, "k.o")],
                             capture_output=True, text=True, timeout=300)
    if res.returncode:
        raise RuntimeError(f"ptxas failed: {res.stderr[-2000:]}")
    return parse_ptxas(res.stderr)[0]


def compile_launch(launch: Launch, arch: int):
    """triton.compile of one recorded launch for GPUTarget('cuda', arch, 32), as JITFunction.run would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn, kwargs = launch.fn, dict(launch.kwargs)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def triton_rows(archs: list[int], quick: bool) -> tuple[list[dict], set[str]]:
    rows, seen, done = [], set(), set()
    for case, dtype, call in cases(quick):
        for launch in _record_launches(call):
            name = launch.fn.__name__
            consts = {k: v for k, v in launch.kwargs.items() if k.isupper() or k.startswith("num_")}
            config = " ".join(f"{k}={v}" for k, v in sorted(consts.items()) if k.startswith(("BLOCK", "num_", "MAX")))
            key = (name, dtype, config, tuple(sorted(map(str, consts.items()))))
            if key in done:
                continue
            done.add(key)
            seen.add(name)
            for arch in archs:
                kern = compile_launch(launch, arch)
                assert kern.asm.get("cubin"), f"{name}: no cubin for sm_{arch}"
                res = _ptxas_v(kern.asm["ptx"], arch)
                rows.append(dict(kind="triton", kernel=name, case=case, dtype=dtype, arch=f"sm_{arch}", config=config,
                                 regs=res["regs"], spill_stores=res["spill_stores"], spill_loads=res["spill_loads"],
                                 stack=res["stack"], shared_bytes=kern.metadata.shared,
                                 source=launch.fn.__module__))
                print(_fmt(rows[-1]), flush=True)
    return rows, seen


def _demangle(names: list[str]) -> list[str]:
    if not shutil.which("c++filt"):
        return names
    res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return res.stdout.splitlines() if res.returncode == 0 else names


def cuda_rows(archs: list[int]) -> list[dict]:
    import torch.utils.cpp_extension as ext

    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    site = str(Path(torch.__file__).resolve().parent.parent)
    incs = [*ext.include_paths(device_type="cuda"), str(ROOT / "csrc" / "include"), str(ROOT / "csrc"),
            sysconfig.get_paths()["include"], os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include")]
    wheels = sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    rows = []
    for src in sorted(glob.glob(str(ROOT / "csrc" / "*" / "*_cuda.cu"))):
        with tempfile.TemporaryDirectory() as d:
            cmd = [nvcc, "-c", src, "-o", os.path.join(d, "k.o"), "-std=c++20", "-O3", "-DFASTVL_WITH_CUDA",
                   "--expt-relaxed-constexpr", "-Xptxas", "-v", *(f"-I{i}" for i in incs),
                   *(x for w in wheels for x in ("-isystem", w)),
                   *(f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs)]
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if res.returncode:
            raise RuntimeError(f"nvcc {src} failed:\n{res.stderr[-3000:]}")
        rows += nvcc_rows(res.stderr, os.path.relpath(src, ROOT))
    return rows


def nvcc_rows(ptxas_log: str, source: str) -> list[dict]:
    """Rows of the entry functions in an ``nvcc -Xptxas -v`` log (demangled; the template argument is the dtype)."""
    rows = []
    entries = parse_ptxas(ptxas_log)
    for e, pretty in zip(entries, _demangle([e["name"] for e in entries])):
        sig = re.sub(r"\(anonymous namespace\)::|fastvl::|c10::", "", pretty).split("(")[0].split(" ")[-1]
        targ = re.search(r"<(.+)>", sig)
        dtype = {"float": "fp32", "BFloat16": "bf16", "Half": "fp16"}.get(targ.group(1) if targ else "float", "?")
        rows.append(dict(kind="cuda", kernel=re.sub(r"<.*>", "", sig), case="all sizes", dtype=dtype,
                         arch=e["arch"], config="", regs=e["regs"], spill_stores=e["spill_stores"],
                         spill_loads=e["spill_loads"], stack=e["stack"], shared_bytes=e["smem"], source=source))
        print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(r: dict) -> str:
    return (f"{r['kind']:>6} {r['arch']:>5} {r['kernel']:<28} {r['dtype']:>4} regs={r['regs']:<3} "
            f"spills={r['spill_stores']}/{r['spill_loads']} smem={r['shared_bytes']:<6} {r['case']} [{r['config']}]")


def markdown(rows: list[dict]) -> str:
    """The README table: one line per (kernel, case, dtype), sm_90 and sm_80 side by side."""
    by = {}
    for r in rows:
        by.setdefault((r["kind"], r["kernel"], r["case"], r["dtype"], r["config"]), {})[r["arch"]] = r
    lines = ["| kernel | case | dtype | config | sm_90 regs / spills / smem | sm_80 regs / spills / smem |",
             "|---|---|---|---|---|---|"]
    for (kind, kernel, case, dtype, config), archs in by.items():
        cell = lambda a: (f"{archs[a]['regs']} / {archs[a]['spill_stores']} / {archs[a]['shared_bytes']}"
                          if a in archs else "-")
        lines.append(f"| {kind} `{kernel}` | {case} | {dtype} | {config} | {cell('sm_90')} | {cell('sm_80')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, action="append", help="90 and/or 80 (default both)")
    p.add_argument("--quick", action="store_true", help="every kernel once, training dtype only")
    p.add_argument("--cuda", action="store_true", help="also the CUDA kernels (nvcc -Xptxas -v; slow)")
    p.add_argument("--csv", type=Path, default=RESULTS / "aot_kernels.csv")
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--markdown", action="store_true", help="print the README table")
    p.add_argument("--check-coverage", action="store_true", help="fail unless every launchable kernel compiled")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("run without TRITON_INTERPRET=1 (the launchers would pick the interpreter's tiles)")
    archs = a.arch or [90, 80]
    rows, seen = triton_rows(archs, a.quick)
    missing = launchable_kernels() - seen
    print(f"compiled {len(seen)} Triton kernels for {', '.join(f'sm_{x}' for x in archs)}"
          + (f"; NOT COVERED: {sorted(missing)}" if missing else "; every launchable kernel covered"))
    if a.cuda:
        rows += cuda_rows(archs)
    if not a.no_csv:
        a.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {len(rows)} rows to {a.csv}")
    if a.markdown:
        print(markdown(rows))
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    for r in spilling:
        print("SPILLS", _fmt(r))
    return 1 if (a.check_coverage and missing) else 0


if __name__ == "__main__":
    sys.exit(main())
