"""Backend registry and selection for fastvl's fused ops.

Every op keeps a table of backends (``reference``, ``cpu``, ``cuda``, ``triton`` and optional ``peer``
libraries). A backend declares what it supports through a function that receives the op's arguments and
returns the list of reasons it cannot take them (empty = it can). :meth:`Op.select` walks the op's
priority list and takes the first backend with no reasons; if none fits, the error lists every backend
with its reasons. ``backend=`` on the call, or the environment variable ``FASTVL_BACKEND``, forces one
backend and errors (with its reasons) when it cannot serve the input.

``FASTVL_BACKEND`` is either one name (``FASTVL_BACKEND=cpu``: every op that has a ``cpu`` backend must
use it; ops without one select as usual) or per-op pairs (``FASTVL_BACKEND=ipot=cpu,attention=triton``).
A name that no op has, an unknown op, or an op paired with a backend it lacks raises, naming the valid backends.

Selection only reads tensor metadata (device, dtype, shape), never tensor values, so it adds no host
synchronisation and is traced away by ``torch.compile``.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Reasons = list[str]
SupportsFn = Callable[..., Reasons]

KINDS = ("reference", "cpu", "cuda", "triton", "peer")


class BackendUnavailableError(RuntimeError):
    """No backend (or not the forced one) can serve the given inputs; the message lists why."""


@dataclass
class Backend:
    """One implementation of an op.

    Attributes:
        name: unique within the op (``reference``, ``cpu``, ``cuda``, ``triton``, or a peer's name).
        kind: one of :data:`KINDS`.
        supports: ``supports(*args, **kwargs) -> list[str]`` over the op's arguments.
        auto: whether automatic selection may pick it. Triton on CPU tensors runs only in the interpreter
            (~1000x slower), so it is served only when forced.
        doc: one line for ``python -m fastvl.info``.
    """

    name: str
    kind: str
    supports: SupportsFn
    doc: str = ""


@dataclass
class Op:
    """The backend table of one op. Create with :func:`register_op`."""

    name: str
    priority: list[str]
    doc: str = ""
    backends: dict[str, Backend] = field(default_factory=dict)
    example: Callable[[str, torch.dtype], tuple[tuple, dict]] | None = None

    def backend(self, name: str, kind: str | None = None, doc: str = "") -> Callable[[SupportsFn], SupportsFn]:
        """Decorator: register ``fn`` as the ``supports`` function of backend ``name``."""
        kind = kind or name
        if kind not in KINDS:
            raise ValueError(f"backend kind must be one of {KINDS}, got {kind!r}")

        def deco(fn: SupportsFn) -> SupportsFn:
            self.backends[name] = Backend(name, kind, fn, doc)
            if name not in self.priority:
                self.priority.append(name)
            return fn

        return deco

    def reasons(self, *args, **kwargs) -> dict[str, Reasons]:
        """For every backend in priority order, the reasons it cannot take these inputs ([] = it can)."""
        return {name: list(self.backends[name].supports(*args, **kwargs)) for name in self.priority
                if name in self.backends}

    def select(self, *args, backend: str | None = None, **kwargs) -> str:
        """Name of the backend that serves these inputs (see module docstring for the rules)."""
        forced = backend or _forced_from_env(self)
        if forced is not None:
            if forced not in self.backends:
                raise BackendUnavailableError(
                    f"fastvl.ops.{self.name}: unknown backend {forced!r}; this op has {sorted(self.backends)}"
                )
            why = self.backends[forced].supports(*args, **kwargs)
            if why:
                raise BackendUnavailableError(
                    f"fastvl.ops.{self.name}: backend {forced!r} was forced "
                    f"({'backend=' if backend else 'FASTVL_BACKEND'}) but cannot serve these inputs: {'; '.join(why)}"
                )
            return forced
        for name in self.priority:  # stop at the first usable backend; the full table only for the error
            b = self.backends.get(name)
            if b is not None and not _auto_excluded(b, args, kwargs) and not b.supports(*args, **kwargs):
                return name
        table = self.reasons(*args, **kwargs)
        lines = "\n".join(f"  {n}: {'; '.join(r) or 'selected only when forced'}" for n, r in table.items())
        raise BackendUnavailableError(f"fastvl.ops.{self.name}: no backend can serve these inputs:\n{lines}")


OPS: dict[str, Op] = {}


def register_op(name: str, priority: Sequence[str], doc: str = "") -> Op:
    """Create (once) and return the backend table of op ``name``."""
    if name in OPS:
        raise ValueError(f"op {name!r} is already registered")
    OPS[name] = Op(name, list(priority), doc)
    return OPS[name]


def _known_backend_names() -> set[str]:
    """Every backend name some registered op has, and every backend kind (``cuda`` stays a known name on a
    build whose ops register no CUDA backend)."""
    return set(KINDS).union(*(op.backends for op in OPS.values()))


def _forced_from_env(op: Op) -> str | None:
    """The backend ``FASTVL_BACKEND`` forces on ``op`` (None: it forces none).

    Raises :class:`BackendUnavailableError` for a value that names nothing: a plain name that is no backend of any
    op, an ``op=name`` pair naming an unknown op, a backend ``op`` lacks, or an item that is not ``op=name``."""
    value = os.environ.get("FASTVL_BACKEND", "").strip()
    if not value:
        return None
    if "=" not in value:
        if value in op.backends:
            return value
        if value in _known_backend_names():
            return None  # a backend of other ops (``FASTVL_BACKEND=cpu``): this op selects as usual
        raise BackendUnavailableError(
            f"fastvl.ops.{op.name}: FASTVL_BACKEND={value!r} names no backend of any op; this op has "
            f"{sorted(op.backends)} (or use FASTVL_BACKEND=op=name,op2=name)")
    forced = None
    for item in value.split(","):
        key, sep, name = (part.strip() for part in item.partition("="))
        if not sep or not key or not name:
            raise BackendUnavailableError(
                f"fastvl.ops.{op.name}: FASTVL_BACKEND={value!r}: item {item.strip()!r} is not 'op=backend'")
        if key == op.name:
            if name not in op.backends:
                raise BackendUnavailableError(
                    f"fastvl.ops.{op.name}: unknown backend {name!r} in FASTVL_BACKEND={value!r}; this op has "
                    f"{sorted(op.backends)}")
            forced = name
        elif key not in OPS:
            raise BackendUnavailableError(
                f"fastvl.ops.{op.name}: FASTVL_BACKEND={value!r} names an unknown op {key!r}; the ops are "
                f"{sorted(OPS)}")
    return forced


def _first_tensor(args, kwargs) -> torch.Tensor | None:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def _auto_excluded(backend: Backend, args, kwargs) -> bool:
    t = _first_tensor(args, kwargs)
    return backend.kind == "triton" and t is not None and t.device.type == "cpu"


# ----------------------------------------------------------------------------------------------------------
# Helpers that supports() functions compose. Each returns a list of reasons.
# ----------------------------------------------------------------------------------------------------------


def needs_extension(op_name: str) -> Reasons:
    """The compiled extension is loaded and registers ``torch.ops.fastvl.<op_name>``."""
    import fastvl

    if not fastvl.HAS_C:
        return ["fastvl._C is not built (pip install --no-build-isolation -e .)"]
    if not hasattr(torch.ops.fastvl, op_name):
        return [f"fastvl._C has no kernel {op_name!r} (rebuild the extension)"]
    return []


def needs_cuda_kernels(op_name: str, t: torch.Tensor) -> Reasons:
    """A CUDA input, an extension built with CUDA kernels, and a kernel registered for the CUDA key."""
    import fastvl

    why = needs_device(t, "cuda")
    if why:
        return why
    why = needs_extension(op_name)
    if why:
        return why
    if not fastvl._C.build_info()["cuda"]:
        return ["fastvl._C was built without CUDA kernels (FASTVL_BUILD_CUDA=0 or no nvcc at build time)"]
    return []


def needs_device(t: torch.Tensor, device_type: str) -> Reasons:
    return [] if t.device.type == device_type else [f"needs {device_type} tensors, got {t.device.type}"]


def needs_dtype(t: torch.Tensor, dtypes: Sequence[torch.dtype]) -> Reasons:
    if t.dtype in dtypes:
        return []
    names = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
    return [f"supports dtypes {{{names}}}, got {str(t.dtype).removeprefix('torch.')}"]


def needs_module(module: str) -> Reasons:
    return [] if importlib.util.find_spec(module) is not None else [f"{module} is not installed"]


def triton_reasons(t: torch.Tensor) -> Reasons:
    """Triton is importable and can run on ``t``'s device (CPU only through TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed"]
    if t.device.type == "cuda":
        return []
    if t.device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return []
        return ["CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter, for tests)"]
    return [f"Triton does not run on {t.device.type} tensors"]
