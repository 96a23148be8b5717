"""One factory for the fused-loss ops (``bce_soft``, ``linear_cross_entropy``, ``linear_kl``, ``masked_regression``,
``symmetric_kl``): from a small :class:`FusedLoss` description, :func:`register_fused_loss` creates the op's backend
table (``triton``, ``torch_chunked``, ``reference``), its ``torch.library`` custom op ``fastvl::<name>``, the op's
fake implementation and its autograd. :func:`linear_loss` describes the "linear layer + loss" ops of
:mod:`fastvl.ops._chunked`.

Every such op has the schema

    ``fastvl::<name>(<inputs>, Tensor? grad_scale, str reduction, SymInt grad_mask, <options>) -> (loss, *grads)``

- ``inputs``: the op's tensors; the first ``len(grad_bits)`` have one gradient output each (a 0-element
  placeholder when not computed);
- ``grad_scale``: None from the public function. The backward of ``reduction='none'`` reruns the op with the
  incoming gradient as ``grad_scale``: per row (:data:`SCALE_PER_ROW`) when the unreduced loss has one value per
  row, else per element (:data:`SCALE_PER_ELEMENT`);
- ``reduction``: ``'none'`` gives the unreduced float32 loss, any other reduction ``sum(loss) * factor``, and the
  forward computes the gradients (scaled by ``factor``) at once: the backward only multiplies them by
  ``grad_output`` (:data:`SCALE_SCALAR`);
- ``grad_mask``: which gradients to compute (``grad_bits``; the linear ops add ``_chunked.DEFER``);
- ``options``: the op's trailing non-tensor arguments.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..kernels.scale_modes import SCALE_PER_ELEMENT, SCALE_PER_ROW, SCALE_SCALAR
from . import _chunked as C
from . import _dispatch as D

Tensors = tuple[torch.Tensor | None, ...]
LINEAR_DOCS = ("eager PyTorch: all logits materialised", "row-chunked PyTorch, gradients in the forward pass",
               "row-chunked: cuBLAS products + one Triton loss/gradient kernel per chunk")


def _always(*_options) -> bool:
    return True


@dataclass(frozen=True)
class FusedLoss:
    """Description of one fused-loss op (module docstring for the schema).

    Attributes:
        name: ``torch.ops.fastvl.<name>`` and the backend table's name. doc: the backend table's doc.
        inputs, options: the schema's leading tensor arguments and trailing options (``"Tensor a, Tensor b"``).
        grad_bits: ``grad_mask`` bit of each differentiable leading input, in order.
        size: ``size(*inputs) -> (rows, width)`` of the unreduced loss.
        factor: ``factor(reduction, inputs, options)``: the scale of a scalar reduction (float or 0-d float32 tensor).
        run: ``run(inputs, options, loss, scale, mode, mask, elementwise) -> grads``: fill ``loss`` (``[rows, width]``
            when ``elementwise`` else ``[rows]``) and return the gradient outputs (placeholders where not computed).
        fake_grads: ``fake_grads(inputs, options, mask) -> grads``: their shapes, for ``register_fake``.
        per_element: ``per_element(*options)``: whether ``reduction='none'`` gives ``[rows, width]`` (else ``[rows]``).
        save, restore: scalar reductions: ``save(inputs, mask, grads)`` picks the tensors the backward needs (default:
            the gradients) and ``restore(saved, grad_output, need, mask, indices)`` turns them into the input
            gradients (default: the gradients times ``grad_output``).
        rows: position of an optional index input (``indices``): the first input's gradient output is then the
            gradient of its ``indices`` rows, which the backward scatters into the whole input.
        backend_docs: docs of the ``reference``, ``torch_chunked`` and ``triton`` backends.
    """

    name: str
    doc: str
    inputs: str
    options: str
    grad_bits: tuple[int, ...]
    size: Callable[..., tuple[int, int]]
    factor: Callable[..., float | torch.Tensor]
    run: Callable[..., Tensors]
    fake_grads: Callable[..., Tensors]
    per_element: Callable[..., bool] = _always
    save: Callable[..., Tensors] | None = None
    restore: Callable[..., Tensors] | None = None
    rows: int | None = None
    backend_docs: tuple[str, str, str] = field(default=LINEAR_DOCS)

    @property
    def n_inputs(self) -> int:
        return len(self.inputs.split(","))

    @property
    def schema(self) -> str:
        outputs = ", ".join(["Tensor"] * (1 + len(self.grad_bits)))
        return (f"({self.inputs}, Tensor? grad_scale, str reduction, SymInt grad_mask, {self.options}) -> "
                f"({outputs})")

    def split(self, args: tuple) -> tuple[tuple, tuple, tuple]:
        """The op's arguments -> (inputs, (grad_scale, reduction, grad_mask), options)."""
        k = self.n_inputs
        return args[:k], args[k:k + 3], args[k + 3:]


def register_fused_loss(spec: FusedLoss) -> tuple[D.Op, torch.library.CustomOpDef]:
    """Create the backend table and the custom op (with fake and autograd) that ``spec`` describes."""
    table = _register_backends(spec)

    def forward(*args):
        inputs, (grad_scale, reduction, grad_mask), options = spec.split(args)
        n, width = spec.size(*inputs)
        per_element = spec.per_element(*options)
        elementwise = reduction == "none" and grad_scale is None and per_element
        device = inputs[0].device
        loss = torch.empty((n, width) if elementwise else (n,), dtype=torch.float32, device=device)
        if grad_scale is not None:
            scale, mode, mask = grad_scale, (SCALE_PER_ELEMENT if per_element else SCALE_PER_ROW), grad_mask
        else:
            factor = spec.factor(reduction, inputs, options)
            scale = factor if isinstance(factor, torch.Tensor) else C.scale_tensor(factor, device)
            mode, mask = SCALE_SCALAR, (grad_mask if reduction != "none" else 0)
        grads = spec.run(inputs, options, loss, scale, mode, mask, elementwise)
        if reduction != "none" and grad_scale is None:
            loss = loss.sum() * factor
        return (loss, *grads)

    op = torch.library.custom_op(f"fastvl::{spec.name}", forward, mutates_args=(), schema=spec.schema)

    @op.register_fake
    def _(*args):
        inputs, (grad_scale, reduction, grad_mask), options = spec.split(args)
        n, width = spec.size(*inputs)
        if grad_scale is not None:
            shape, mask = (n,), grad_mask
        elif reduction == "none":
            shape, mask = ((n, width) if spec.per_element(*options) else (n,)), 0
        else:
            shape, mask = (), grad_mask
        return (inputs[0].new_empty(shape, dtype=torch.float32), *spec.fake_grads(inputs, options, mask))

    _register_autograd(op, spec)
    return table, op


def _register_backends(spec: FusedLoss) -> D.Op:
    table = D.register_op(spec.name, ["triton", "torch_chunked", "reference"], doc=spec.doc)
    first = spec.inputs.split(",")[0].split()[-1]

    def any_input(*args, **kwargs) -> D.Reasons:
        return []

    def triton(*args, **kwargs) -> D.Reasons:
        t = args[0] if args else kwargs[first]
        allowed = C.TRITON_DTYPES if t.device.type == "cuda" else (torch.float32,)
        return D.triton_reasons(t) + D.needs_dtype(t, allowed)

    ref_doc, chunked_doc, triton_doc = spec.backend_docs
    table.backend("reference", doc=ref_doc)(any_input)
    table.backend("torch_chunked", kind="reference", doc=chunked_doc)(any_input)
    table.backend("triton", doc=triton_doc)(triton)
    return table


def _register_autograd(op: torch.library.CustomOpDef, spec: FusedLoss) -> None:
    """``reduction='none'``: the backward reruns the op with ``grad_scale = grad_output``. Scalar reductions: the
    forward already returned the gradients; the backward scales them (``spec.restore``)."""
    n_grads = len(spec.grad_bits)

    def setup_context(ctx, inputs, output):
        tensors, (_, reduction, mask), options = spec.split(inputs)
        ctx.reduction, ctx.mask, ctx.options, ctx.n_all = reduction, mask, options, tensors[0].shape[0]
        ctx.set_materialize_grads(False)  # the gradient outputs are never used: no zero-filled grads for them
        if reduction == "none":
            ctx.save_for_backward(*tensors)
            return
        saved = spec.save(tensors, mask, output[1:]) if spec.save is not None else output[1:]
        ctx.save_for_backward(*saved, *((tensors[spec.rows],) if spec.rows is not None else ()))

    def backward(ctx, g_loss, *_unused):
        need = ctx.needs_input_grad
        saved = ctx.saved_tensors
        if ctx.reduction == "none":
            mask = sum(bit for bit, wanted in zip(spec.grad_bits, need) if wanted)
            grads = list(op(*saved, g_loss.float().contiguous(), "none", mask, *ctx.options)[1:])
            indices = saved[spec.rows] if spec.rows is not None else None
        else:
            if spec.rows is not None:
                saved, indices = saved[:-1], saved[-1]
            else:
                indices = None
            if spec.restore is not None:
                grads = list(spec.restore(saved, g_loss, need, ctx.mask, indices))
            else:
                grads = [t * g_loss if t.numel() else t for t in saved]
        if need[0] and indices is not None:
            grads[0] = C.scatter_rows(grads[0], indices, ctx.n_all)
        grads = [g if wanted else None for g, wanted in zip(grads, need)]
        return (*grads, *([None] * (len(need) - n_grads)))

    op.register_autograd(backward, setup_context=setup_context)


def linear_loss(name: str, doc: str, target: str, steps: Mapping[str, C.RowStep],
                factor: Callable[..., float | torch.Tensor], *, options: str = "",
                per_element: Callable[..., bool] = _always, weight: str = "weight", transposed: bool = False,
                backend_docs: tuple[str, str, str] = LINEAR_DOCS) -> FusedLoss:
    """Describe a "linear layer + loss" op of :mod:`fastvl.ops._chunked`.

    Its inputs are ``(hidden, <weight>, bias, <target>, indices)`` and its options ``(chunk_rows, backend,
    *options)``. ``steps`` maps a backend to its row step, called as ``step(logits, data, loss, scale, mode,
    compute, elementwise=..., **options)``. ``factor(reduction, target, width, *options)`` scales a scalar reduction;
    ``per_element(*options)`` tells whether ``reduction='none'`` is per element. ``transposed``: ``weight`` is
    [H, V] (the regression op's ``weight_t``).
    """
    names = [o.split()[-1] for o in options.split(",") if o.strip()]

    def size(hidden, w, bias, tgt, indices) -> tuple[int, int]:
        return tgt.shape[0], (tgt.shape[1] if tgt.dim() == 2 else w.shape[1] if transposed else w.shape[0])

    def run(inputs, opts, loss, scale, mode, mask, elementwise) -> Tensors:
        hidden, w, bias, tgt, indices = inputs
        chunk_rows, backend, *extra = opts
        step = functools.partial(steps[backend], elementwise=elementwise, **dict(zip(names, extra)))
        gh, gw, gb = C.chunked_linear_loss(hidden, w, bias, indices, [tgt], step, loss=loss, scale=scale,
                                           scale_mode=mode, mask=mask, chunk_rows=chunk_rows, transposed=transposed)
        return C.empty_grads(hidden, w, bias, gh, gw, gb)

    def fake_grads(inputs, opts, mask) -> Tensors:
        hidden, w, bias, tgt, _ = inputs
        return C.fake_grads(hidden, w, bias, mask, tgt.shape[0], transposed)

    def save(inputs, mask, grads) -> Tensors:
        hidden, w = inputs[:2]
        return (grads[0], hidden, w) if mask & C.DEFER else grads

    def restore(saved, g_loss, need, mask, indices) -> Tensors:
        if not mask & C.DEFER:
            return tuple(t * g_loss if t.numel() else t for t in saved)
        dlogits, hidden, w = saved
        return C.deferred_grads(dlogits * g_loss, hidden, w, indices, need, transposed)

    return FusedLoss(
        name, doc, inputs=f"Tensor hidden, Tensor {weight}, Tensor? bias, Tensor {target}, Tensor? indices",
        options=", ".join(["SymInt chunk_rows", "str backend", *([options] if options else [])]),
        grad_bits=(C.GRAD_HIDDEN, C.GRAD_WEIGHT, C.GRAD_BIAS), size=size,
        factor=lambda reduction, inputs, opts: factor(reduction, inputs[3], size(*inputs)[1], *opts[2:]),
        run=run, fake_grads=fake_grads, per_element=lambda *opts: per_element(*opts[2:]), save=save,
        restore=restore, rows=4, backend_docs=backend_docs)
