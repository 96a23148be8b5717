"""BachGAN background retrieval: rank a memory bank of class maps by their overlap with per-class box layouts.

For a query q (one binary box mask per class, boxes of different classes may overlap) and a memory class map m:

    F(q)        = the classes whose query channel is non-empty
    score(q, m) = sum_{c in F} |q_c & m_c| / sum_{c in F} (|q_c| + |m_c| - |q_c & m_c|)

where m_c = the pixels of m labelled c. Classes the query does not name never enter the score (BachGAN's
background classes), and memory pixels at ``ignore_index`` belong to no class. Every query needs at least one box
pixel, so the denominator is >= sum_c |q_c| > 0. The ``k`` best maps per query are returned best first; equal
scores go to the LOWER memory index. Scores are ranked in float64 (exact integer counts, one correctly rounded
division, so both backends produce the same values and the same tie order) and returned as float32.

Backends (``fastvl.ops.layout_ret.LAYOUT_RETRIEVAL``):

- ``cpu`` (the default for CPU tensors; C++ in fastvl._C, ``csrc/layout_retrieval/``): chunks and running top-k as
  ``torch_chunked`` below; per block of 64 queries a per-pixel table of 64-bit query masks for every named class
  (:func:`query_tables`), so each memory pixel costs one lookup and one increment per query it hits; parallel over
  the maps of a chunk.
- ``torch_chunked`` (pure PyTorch; the CPU default without fastvl._C): walks the memory in chunks of
  ``chunk_size`` maps with a fixed buffer, keeping a running top-k. Intersections are per-class matrix products
  (float32 0/1 values, exact while H W <= 2**24, else float64) restricted to the pixels some query box of that class
  covers; the per-map class areas |m_c| come from a :class:`LayoutMemory`, which counts them once per memory bank
  (pass one to reuse the counts across calls; a plain tensor is counted on each call).
- ``triton`` (the default for GPU tensors; CPU only under the interpreter): the same chunks and running top-k, the
  intersections counted exactly by a Triton kernel from per-pixel class bit words of the queries (one program per
  block of queries x block of maps, see ``fastvl/kernels/triton/layout_ret.py``); the areas from the
  :class:`LayoutMemory` counts.
- ``reference``: plain PyTorch with every one-hot map materialised ([M, C, H, W]), written for clarity; the ground
  truth of the tests.

The module is not named after the function (``fastvl.ops.layout_retrieval`` is the function).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch

from . import _dispatch as D

__all__ = ["LAYOUT_RETRIEVAL", "LayoutMemory", "layout_retrieval", "layout_retrieval_reference", "query_tables",
           "class_counts"]

_OP = "layout_retrieval"
MEMORY_DTYPES = (torch.uint8, torch.int16)
BUFFER_ELEMENTS = 1 << 22  # default chunk: about this many memory pixels per chunk (16 MiB of float32 work buffer)
KERNEL_BUFFER_ELEMENTS = 1 << 24  # the triton and cpu backends' default chunk (4096 maps at 64 x 64)
_EXACT_F32 = 1 << 24  # 0/1 dot products of up to this many pixels are exact in float32


def _err(name: str, msg: str) -> str:
    return f"fastvl.ops.{_OP}: argument '{name}' {msg}"


def default_chunk_size(height: int, width: int, buffer_elements: int = BUFFER_ELEMENTS) -> int:
    """Maps per chunk: about ``buffer_elements`` pixels (default :data:`BUFFER_ELEMENTS`, the ``torch_chunked``
    backend's), at least 1."""
    return max(1, buffer_elements // max(1, height * width))


# ----------------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------------


def layout_retrieval_scores_reference(query: torch.Tensor, memory: torch.Tensor, ignore_index: int = 255
                                      ) -> torch.Tensor:
    """All scores, plain PyTorch (module docstring).

    Args:
        query: [Q, C, H, W] bool box masks. memory: [M, H, W] integer class maps. ignore_index: label of no class.
    Returns:
        [Q, M] float64 scores in [0, 1].
    """
    num_classes = query.shape[1]
    classes = torch.arange(num_classes, device=memory.device)
    labelled = memory != ignore_index  # [M, H, W]
    m_onehot = (memory.long()[:, None] == classes[None, :, None, None]) & labelled[:, None]  # [M, C, H, W]
    q = query.double()
    m = m_onehot.double()
    named = query.flatten(2).any(-1).double()  # [Q, C]: F(q) as 0/1
    q_area = q.flatten(2).sum(-1)  # [Q, C]
    m_area = m.flatten(2).sum(-1)  # [M, C]
    inter = torch.einsum("qchw,mchw->qmc", q, m)  # [Q, M, C]
    union = q_area[:, None, :] + m_area[None, :, :] - inter  # [Q, M, C]
    num = (inter * named[:, None, :]).sum(-1)
    den = (union * named[:, None, :]).sum(-1)
    return num / den


def layout_retrieval_reference(query: torch.Tensor, memory: torch.Tensor, k: int = 3,
                               exclude: torch.Tensor | None = None, ignore_index: int = 255
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k retrieval, plain PyTorch: all [Q, M] scores, the excluded entry set to -inf, a stable descending sort.

    Args:
        query: [Q, C, H, W] bool. memory: [M, H, W] uint8 / int16 class maps. k: maps kept per query.
        exclude: [Q] int64 memory index removed per query (-1: none), or None. ignore_index: label of no class.
    Returns:
        (scores [Q, k] float32, index [Q, k] int64), best first, equal scores to the lower index.
    """
    scores = layout_retrieval_scores_reference(query, memory, ignore_index)
    if exclude is not None:
        hit = exclude[:, None] == torch.arange(memory.shape[0], device=memory.device)[None, :]
        scores = scores.masked_fill(hit, float("-inf"))
    ranked, order = torch.sort(scores, dim=1, descending=True, stable=True)
    return ranked[:, :k].float(), order[:, :k]


# ----------------------------------------------------------------------------------------------------------
# The memory bank with its class areas
# ----------------------------------------------------------------------------------------------------------


def _check_maps(maps: torch.Tensor, num_classes: int, name: str = "memory") -> None:
    if not isinstance(maps, torch.Tensor):
        raise TypeError(_err(name, f"must be a tensor [M, H, W] or a LayoutMemory, got {type(maps).__name__}"))
    if maps.dim() != 3:
        raise ValueError(_err(name, f"must be 3-d [M, H, W] class maps, got shape {list(maps.shape)}"))
    if maps.dtype not in MEMORY_DTYPES:
        raise TypeError(_err(name, f"must be uint8 (int16 when C > 255) class maps, got {maps.dtype}"))
    if num_classes > 255 and maps.dtype != torch.int16:
        raise TypeError(_err(name, f"must be int16 when C = {num_classes} > 255 (uint8 holds ids up to 255), got "
                                   f"{maps.dtype}"))
    if maps.shape[0] == 0:
        raise ValueError(_err(name, f"is empty: needs at least one map, got shape {list(maps.shape)}"))


def _bad_id(maps: torch.Tensor, index: int, value: int, num_classes: int, ignore_index: int) -> ValueError:
    """The error for class id ``value`` in map ``index`` (located at its first pixel)."""
    w = maps.shape[2]
    pix = int((maps[index].flatten().long() == value).nonzero()[0, 0])
    return ValueError(_err("memory", f"map {index} has class id {value} at pixel ({pix // w}, {pix % w}): ids must "
                                     f"be in [0, C) = [0, {num_classes}) or ignore_index ({ignore_index})"))


def class_counts(maps: torch.Tensor, num_classes: int, ignore_index: int, chunk_size: int,
                 use_kernel: bool | None = None) -> torch.Tensor:
    """[M, C] int32 pixel count per class of every map; raises (naming 'memory') on a class id outside [0, C) that
    is not ``ignore_index``. Works through ``chunk_size`` maps at a time: CPU maps through the C++ kernel when
    fastvl._C is built (one pass per map, bad ids counted in an extra column); otherwise uint8 maps through one
    256-bin histogram per map (every id counted, then the ids outside [0, C) checked), int16 maps through C + 1 bins
    (ids checked first). ``use_kernel``: force the C++ path (True) or the PyTorch one (False); default: C++ where it
    can run."""
    m, h, w = maps.shape
    hw, c = h * w, num_classes
    counts = torch.zeros(m, c, dtype=torch.int32, device=maps.device)
    if use_kernel is None:
        use_kernel = maps.device.type == "cpu" and c <= 32768 and not D.needs_extension("layout_class_counts_kernel")
    if use_kernel:
        for start in range(0, m, chunk_size):  # C++: one histogram pass per map, column C counts bad ids
            chunk = maps[start:start + chunk_size].reshape(-1, hw)
            got = torch.ops.fastvl.layout_class_counts_kernel(chunk, c, ignore_index)
            bad = got[:, c] > 0
            if bool(bad.any()):
                row = int(bad.nonzero()[0, 0])
                v = chunk[row].long()
                pix = int((((v < 0) | (v >= c)) & (v != ignore_index)).nonzero()[0, 0])
                raise _bad_id(maps, start + row, int(v[pix]), c, ignore_index)
            counts[start:start + chunk.shape[0]] = got[:, :c]
        return counts
    if maps.dtype == torch.uint8:
        ids = torch.arange(256, device=maps.device)
        foreign = (ids >= c) & (ids != ignore_index)  # [256]: ids no map may hold
    for start in range(0, m, chunk_size):
        chunk = maps[start:start + chunk_size].reshape(-1, hw)  # [B, HW]
        b = chunk.shape[0]
        if maps.dtype == torch.uint8:
            rows = torch.arange(b, dtype=torch.int32, device=maps.device)[:, None] * 256
            hist = torch.bincount((chunk.to(torch.int32) + rows).flatten(), minlength=b * 256).view(b, 256)
            bad = (hist > 0) & foreign
            if bool(bad.any()):
                row, value = (int(i) for i in bad.nonzero()[0])
                raise _bad_id(maps, start + row, value, c, ignore_index)
            hist = hist[:, :c]
            if 0 <= ignore_index < c:
                hist[:, ignore_index] = 0
            counts[start:start + b] = hist
            continue
        v = chunk.long()
        ignored = v == ignore_index
        valid = (v >= 0) & (v < c) & ~ignored
        bad = ~(valid | ignored)
        if bool(bad.any()):
            row, pix = (int(i) for i in bad.nonzero()[0])
            raise _bad_id(maps, start + row, int(v[row, pix]), c, ignore_index)
        slot = torch.where(valid, v, c) + torch.arange(b, device=v.device)[:, None] * (c + 1)
        counts[start:start + b] = torch.bincount(slot.flatten(), minlength=b * (c + 1)).view(b, c + 1)[:, :c]
    return counts


class LayoutMemory:
    """A memory bank of class maps with the per-map class areas |m_c| counted once (and every id checked once).

    Build it once per bank and pass it as ``memory`` to :func:`layout_retrieval`; the counts are reused by every
    call. The maps must not be modified in place afterwards (checked through the tensor's version counter).

    Attributes:
        maps: [M, H, W] uint8 (int16 when C > 255) class maps. num_classes: C. ignore_index: label of no class.
        counts: [M, C] int32 pixels of each class per map.
    """

    def __init__(self, maps: torch.Tensor, num_classes: int, ignore_index: int = 255,
                 chunk_size: int | None = None) -> None:
        """Args: maps [M, H, W]; num_classes C >= 1; ignore_index; chunk_size maps counted at a time (default:
        :func:`default_chunk_size`)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise ValueError(_err("num_classes", f"must be an int >= 1, got {num_classes!r}"))
        _check_int("ignore_index", ignore_index)
        _check_maps(maps, int(num_classes))
        chunk = _check_chunk(chunk_size, maps.shape[1], maps.shape[2])
        self.maps = maps
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.counts = class_counts(maps, self.num_classes, self.ignore_index, chunk)
        self._version = maps._version

    def __len__(self) -> int:
        return self.maps.shape[0]

    def check_unchanged(self) -> None:
        """Raise if ``maps`` was modified in place since the counts were taken."""
        if self.maps._version != self._version:
            raise ValueError(_err("memory", "LayoutMemory's maps were modified in place after its class counts were "
                                            "taken; build a new LayoutMemory"))


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(_err(name, f"must be an int, got {value!r}"))


def _check_chunk(chunk_size: int | None, height: int, width: int) -> int:
    if chunk_size is None:
        return default_chunk_size(height, width)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(_err("chunk_size", f"must be an int >= 1 or None, got {chunk_size!r}"))
    return int(chunk_size)


# ----------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------

LAYOUT_RETRIEVAL = D.register_op(_OP, ["triton", "cpu", "torch_chunked", "reference"],
                                 doc="BachGAN background retrieval: top-k class maps by box-layout overlap score")


@LAYOUT_RETRIEVAL.backend("triton", doc="Triton: exact intersection counts from class bit words per (query, map) "
                                                 "block, memory in fixed-size chunks, running top-k")
def _triton_supports(query, memory, k) -> D.Reasons:
    return D.triton_reasons(query)


@LAYOUT_RETRIEVAL.backend("cpu", doc="C++ (fastvl._C): per-pixel 64-query masks, one lookup per memory pixel, parallel "
                                              "over maps; chunked memory, running top-k")
def _cpu_supports(query, memory, k) -> D.Reasons:
    return D.needs_device(query, "cpu") + D.needs_extension("layout_intersections_kernel")


@LAYOUT_RETRIEVAL.backend("torch_chunked", kind="reference",
                          doc="PyTorch, memory in fixed-size chunks, per-map class areas counted once, running top-k")
def _chunked_supports(query, memory, k) -> D.Reasons:
    return []


@LAYOUT_RETRIEVAL.backend("reference", doc="plain PyTorch, every one-hot map materialised (tests' ground truth)")
def _reference_supports(query, memory, k) -> D.Reasons:
    return []


def _example(device: str, dtype: torch.dtype) -> tuple[tuple, dict]:
    """Cityscapes-like retrieval at 64 x 64: 64 queries over 1000 maps, 35 classes (``dtype`` is not used: the
    inputs are bool and uint8)."""
    query = torch.empty(64, 35, 64, 64, device=device, dtype=torch.bool)
    memory = torch.empty(1000, 64, 64, device=device, dtype=torch.uint8)
    return (query, memory, 3), {}


LAYOUT_RETRIEVAL.example = _example


def _running_top_k(query: torch.Tensor, bank: LayoutMemory, k: int, exclude: torch.Tensor | None, chunk_size: int,
                   intersect: Callable[[int, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Walk ``bank`` in chunks of ``chunk_size`` maps keeping a running top-k per query.

    ``intersect(start, chunk)`` returns the F-restricted intersection sums [Q, B] (float64, exact counts) of the
    chunk's maps [B, H, W]; the unions come from the cached class areas. Returns (scores [Q, k] float32,
    index [Q, k] int64) as :func:`layout_retrieval_reference`."""
    maps, counts = bank.maps, bank.counts
    n_q = query.shape[0]
    n_mem = maps.shape[0]
    dev = maps.device
    qf = query.reshape(n_q, query.shape[1], -1)
    named_d = qf.any(-1).double()  # [Q, C]: F(q) as 0/1
    # [Q]: sum_{c in F} |q_c|, one class at a time (a bool sum converts its whole input to int64 first)
    q_total = torch.zeros(n_q, dtype=torch.float64, device=dev)
    for c in range(qf.shape[1]):
        q_total += qf[:, c].sum(-1)
    best_s = torch.empty(n_q, 0, dtype=torch.float64, device=dev)
    best_i = torch.empty(n_q, 0, dtype=torch.int64, device=dev)
    for start in range(0, n_mem, chunk_size):
        chunk = maps[start:start + chunk_size]
        b = chunk.shape[0]
        inter = intersect(start, chunk)  # [Q, B]
        m_area = named_d @ counts[start:start + b].double().t()  # [Q, B]: sum_{c in F} |m_c|
        score = inter / (q_total[:, None] + m_area - inter)
        idx = torch.arange(start, start + b, device=dev)
        if exclude is not None:
            score = score.masked_fill(exclude[:, None] == idx[None, :], float("-inf"))
        # Running entries come first and have lower indices, so a stable sort keeps ties in index order.
        cand_s = torch.cat([best_s, score], 1)
        cand_i = torch.cat([best_i, idx[None, :].expand(n_q, b)], 1)
        ranked, order = torch.sort(cand_s, dim=1, descending=True, stable=True)
        best_s, best_i = ranked[:, :k], cand_i.gather(1, order[:, :k])
    return best_s.float(), best_i


def _retrieve_chunked(query: torch.Tensor, bank: LayoutMemory, k: int, exclude: torch.Tensor | None,
                      chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``torch_chunked`` backend: per named class, matrix products over the pixels its query boxes cover."""
    n_q, _, h, w = query.shape
    hw = h * w
    mm_dtype = torch.float32 if hw <= _EXACT_F32 else torch.float64
    qf = query.reshape(n_q, -1, hw)
    named = qf.any(-1)  # [Q, C]: F(q)
    # Per named class: the pixels some query box of that class covers, and the queries' masks there.
    terms = []
    for c in named.any(0).nonzero().flatten().tolist():
        if c == bank.ignore_index:
            continue  # no memory pixel carries class ignore_index: |q_c & m_c| = 0
        pix = qf[:, c].any(0).nonzero().flatten()  # [P_c]
        sub = None if pix.numel() == hw else pix
        q_c = qf[:, c] if sub is None else qf[:, c, sub]
        terms.append((c, sub, q_c.to(mm_dtype).t().contiguous()))  # [P_c, Q]

    def intersect(start: int, chunk: torch.Tensor) -> torch.Tensor:
        flat = chunk.reshape(-1, hw)  # [B, HW]
        inter = torch.zeros(flat.shape[0], n_q, dtype=torch.float64, device=chunk.device)
        for c, sub, q_c in terms:
            m_c = (flat == c) if sub is None else (flat[:, sub] == c)  # [B, P_c]
            inter += (m_c.to(mm_dtype) @ q_c).double()
        return inter.t()

    return _running_top_k(query, bank, k, exclude, chunk_size, intersect)


def query_tables(query: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``cpu`` backend's query side: per block of 64 queries and pixel, the 64-bit mask of the queries whose box
    of each named class covers the pixel.

    Args:
        query: [Q, C, H, W] bool. ignore_index: label of no class (never a slot).
    Returns:
        (table [ceil(Q / 64), H W, S + 1] int64 with S = the classes some query names (minus ``ignore_index``), slot
        S all zero; lut [65536] int32: the slot of a class id by its low 16 bits, S for every other id).
    """
    n_q, n_cls = query.shape[:2]
    qf = query.reshape(n_q, n_cls, -1)
    classes = [c for c in qf.any(-1).any(0).nonzero().flatten().tolist() if c != ignore_index]
    n_slots = len(classes)
    lut = torch.full((65536,), n_slots, dtype=torch.int32, device=query.device)
    for s, c in enumerate(classes):
        lut[c & 0xFFFF] = s
    hw = qf.shape[2]
    table = torch.zeros(-(-n_q // 64), hw, n_slots + 1, dtype=torch.int64, device=query.device)
    for j in range(0, n_q, 64):
        bits = torch.arange(min(64, n_q - j), dtype=torch.int64, device=query.device)[:, None]
        for s, c in enumerate(classes):  # one [<=64, HW] int64 buffer at a time
            # distinct bits, so the sum is their OR (bit 63 included: int64 two's complement)
            table[j // 64, :, s] = (qf[j:j + 64, c].to(torch.int64) << bits).sum(0)
    return table, lut


def _retrieve_cpu(query: torch.Tensor, bank: LayoutMemory, k: int, exclude: torch.Tensor | None,
                  chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``cpu`` backend: exact int32 intersection counts from the C++ kernel (per-pixel query masks), per chunk."""
    table, lut = query_tables(query, bank.ignore_index)
    n_q, hw = query.shape[0], query.shape[2] * query.shape[3]

    def intersect(start: int, chunk: torch.Tensor) -> torch.Tensor:
        flat = chunk.reshape(chunk.shape[0], hw)
        return torch.ops.fastvl.layout_intersections_kernel(table, lut, flat, n_q).double()

    return _running_top_k(query, bank, k, exclude, chunk_size, intersect)


def _retrieve_triton(query: torch.Tensor, bank: LayoutMemory, k: int, exclude: torch.Tensor | None,
                     chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``triton`` backend: exact int32 intersection counts from the Triton kernel, per chunk of maps."""
    from ..kernels.triton.layout_ret import layout_intersections_triton, query_words

    words = query_words(query, bank.ignore_index)  # [Q, W, HW] int32, packed once

    def intersect(start: int, chunk: torch.Tensor) -> torch.Tensor:
        return layout_intersections_triton(words, chunk).double()

    return _running_top_k(query, bank, k, exclude, chunk_size, intersect)


# ----------------------------------------------------------------------------------------------------------
# Validation and the public function
# ----------------------------------------------------------------------------------------------------------


def _check(query, maps, k, exclude, ignore_index) -> None:
    """Metadata checks (no tensor values read)."""
    if not isinstance(query, torch.Tensor):
        raise TypeError(_err("query", f"must be a tensor [Q, C, H, W], got {type(query).__name__}"))
    if query.dim() != 4:
        raise ValueError(_err("query", f"must be 4-d [Q, C, H, W] box masks, got shape {list(query.shape)}"))
    if query.dtype != torch.bool:
        raise TypeError(_err("query", f"must be a bool tensor (per-class box masks), got {query.dtype}"))
    n_q, n_c, h, w = query.shape
    if n_c < 1 or h < 1 or w < 1:
        raise ValueError(_err("query", f"needs C, H, W >= 1, got shape {list(query.shape)}"))
    _check_int("ignore_index", ignore_index)
    _check_maps(maps, n_c)
    if tuple(maps.shape[1:]) != (h, w):
        raise ValueError(_err("memory", f"maps are {list(maps.shape[1:])} but 'query' is {[h, w]} (H, W must "
                                        "agree)"))
    if maps.device != query.device:
        raise ValueError(_err("memory", f"is on {maps.device} but 'query' is on {query.device}"))
    _check_int("k", k)
    if k < 1:
        raise ValueError(_err("k", f"must be >= 1, got {k}"))
    if k > maps.shape[0]:
        raise ValueError(_err("k", f"must be <= M = {maps.shape[0]} (the memory size), got {k}"))
    if exclude is not None:
        if not isinstance(exclude, torch.Tensor):
            raise TypeError(_err("exclude", f"must be a tensor [Q] or None, got {type(exclude).__name__}"))
        if exclude.dtype != torch.int64:
            raise TypeError(_err("exclude", f"must be int64, got {exclude.dtype}"))
        if tuple(exclude.shape) != (n_q,):
            raise ValueError(_err("exclude", f"must have shape [Q] = [{n_q}], got {list(exclude.shape)}"))
        if exclude.device != query.device:
            raise ValueError(_err("exclude", f"is on {exclude.device} but 'query' is on {query.device}"))


def _check_values(query, n_mem, k, exclude) -> None:
    """Checks that read values: every query has a box pixel, exclude in [-1, M), k <= the maps left."""
    empty = ~query.flatten(1).any(1)
    if bool(empty.any()):
        first = int(empty.nonzero()[0, 0])
        raise ValueError(_err("query", f"query {first} has no box pixel (every query needs at least one non-empty "
                                       "class channel)"))
    if exclude is not None and exclude.numel():
        lo, hi = int(exclude.min()), int(exclude.max())
        if lo < -1 or hi >= n_mem:
            raise ValueError(_err("exclude", f"values must be in [-1, M) = [-1, {n_mem}) (-1: none), got min {lo}, "
                                             f"max {hi}"))
        if hi >= 0 and k > n_mem - 1:
            raise ValueError(_err("k", f"must be <= M - 1 = {n_mem - 1} when 'exclude' removes a map, got {k}"))


def layout_retrieval(query: torch.Tensor, memory: torch.Tensor | LayoutMemory, k: int = 3,
                     exclude: torch.Tensor | None = None, ignore_index: int = 255, backend: str | None = None, *,
                     chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BachGAN background retrieval: the ``k`` memory maps that best match each query's boxes (module docstring).

    Args:
        query: [Q, C, H, W] bool per-class box masks (may overlap); every query needs a box pixel.
        memory: [M, H, W] uint8 class maps (int16 when C > 255), ids in [0, C) or ``ignore_index``; or a
            :class:`LayoutMemory` over them (its class counts are reused; its num_classes and ignore_index must
            match C and ``ignore_index``).
        k: maps kept per query, 1 <= k <= M (M - 1 when ``exclude`` removes one).
        exclude: [Q] int64, one memory index removed per query (the query itself), -1 for none; or None.
        ignore_index: memory label that belongs to no class (BachGAN: 255).
        backend: force 'triton', 'cpu', 'torch_chunked' or 'reference'; default: 'triton' for GPU tensors, 'cpu'
            for CPU tensors (when fastvl._C is built, else 'torch_chunked').
        chunk_size: maps per chunk (default: about 16M pixels per chunk for 'triton' and 'cpu', 4M for
            'torch_chunked').
    Returns:
        (scores [Q, k] float32, index [Q, k] int64), best first; equal scores go to the lower memory index.
    """
    bank = memory if isinstance(memory, LayoutMemory) else None
    maps = bank.maps if bank is not None else memory
    _check(query, maps, k, exclude, ignore_index)
    chunk = _check_chunk(chunk_size, query.shape[2], query.shape[3])
    if bank is not None:
        if bank.num_classes != query.shape[1]:
            raise ValueError(_err("memory", f"is a LayoutMemory for {bank.num_classes} classes but 'query' has C = "
                                            f"{query.shape[1]}"))
        if bank.ignore_index != ignore_index:
            raise ValueError(_err("ignore_index", f"is {ignore_index} but the LayoutMemory was built with "
                                                  f"{bank.ignore_index}"))
        bank.check_unchanged()
    name = LAYOUT_RETRIEVAL.select(query, maps, k, backend=backend)
    _check_values(query, maps.shape[0], k, exclude)
    if bank is None:
        bank = LayoutMemory(maps, query.shape[1], ignore_index, chunk)  # checks every class id
    if name == "reference":
        return layout_retrieval_reference(query, maps, k, exclude, ignore_index)
    if name in ("triton", "cpu"):
        run = _retrieve_triton if name == "triton" else _retrieve_cpu
        return run(query, bank, k, exclude, chunk if chunk_size is not None else
                   default_chunk_size(query.shape[2], query.shape[3], KERNEL_BUFFER_ELEMENTS))
    if name != "torch_chunked":
        raise AssertionError(f"unhandled backend {name!r}")
    return _retrieve_chunked(query, bank, k, exclude, chunk)
