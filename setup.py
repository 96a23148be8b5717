"""Build fastvl._C: C++ CPU kernels always, CUDA kernels when nvcc and a CUDA build of torch are present.

Knobs (environment):
  FASTVL_BUILD_CUDA=auto|0|1   auto (default): build CUDA kernels when possible; 1: fail if impossible; 0: never.
  TORCH_CUDA_ARCH_LIST         default "8.0;9.0" (A100 and H100/H200 both get SASS).
  MAX_JOBS                     parallel compile jobs; default from cores and free memory (~2 GiB per nvcc job).
  FASTVL_DEBUG=1               -O0 -g.
"""

import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _default_max_jobs() -> int:
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        free_gib = int(info["MemAvailable"].split()[0]) / 2**20
    except (OSError, KeyError, ValueError):
        free_gib = 8.0
    return max(1, min(cores, int(free_gib // 2)))


def _nvidia_wheel_includes() -> list[str]:
    """Include dirs of torch's `nvidia-*` wheels: they carry headers (cusparse.h, …) a system CUDA may lack."""
    dirs = []
    for site in sys.path:
        dirs += sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _want_cuda(cuda_home) -> bool:
    import torch

    mode = os.environ.get("FASTVL_BUILD_CUDA", "auto").lower()
    problems = []
    if torch.version.cuda is None:
        problems.append("torch is a CPU-only build")
    if cuda_home is None:
        problems.append("nvcc / CUDA_HOME not found")
    if mode in ("0", "false", "no", "off"):
        return False
    if mode in ("1", "true", "yes", "on") and problems:
        raise RuntimeError(f"FASTVL_BUILD_CUDA=1 but CUDA kernels cannot be built: {'; '.join(problems)}")
    if problems:
        print(f"fastvl: building CPU kernels only ({'; '.join(problems)})")
    return not problems


def _find_cuda_home() -> None:
    """Point CUDA_HOME at the real toolkit when nvcc is a symlink (e.g. /usr/local/bin/nvcc -> /usr/local/cuda)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    for home in [*candidates, "/usr/local/cuda"]:  # nvcc may be a wrapper script outside the toolkit
        if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            os.environ["CUDA_HOME"] = home
            return


def extensions():
    _find_cuda_home()
    from torch.utils.cpp_extension import CUDA_HOME, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    debug = os.environ.get("FASTVL_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/*/*_cpu.cpp"))
    cxx = [*opt, "-std=c++20", "-fopenmp"]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
                  extra_link_args=["-fopenmp"])
    if _want_cuda(CUDA_HOME):
        sources += sorted(glob.glob("csrc/*/*_cuda.cu"))
        # Searched after the system CUDA's own headers: only what it lacks is taken from the wheels.
        wheels = _nvidia_wheel_includes()
        fallback = [f"-idirafter{d}" for d in wheels]
        nvcc = [*opt, "-std=c++20", "-lineinfo", *(f for d in wheels for f in ("-isystem", d))]
        defs = ["-DFASTVL_WITH_CUDA", f"-DFASTVL_CUDA_ARCHS=\"{os.environ['TORCH_CUDA_ARCH_LIST']}\""]
        cxx += [*defs, *fallback]
        nvcc += defs
        return [CUDAExtension("fastvl._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)]
    return [CppExtension("fastvl._C", sources, extra_compile_args={"cxx": cxx}, **kwargs)]


def cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=extensions(), cmdclass=cmdclass())
