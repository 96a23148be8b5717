"""ops.layout_retrieval (BachGAN background retrieval): the triton (interpreter on CPU, the `triton_device` fixture)
and torch_chunked backends vs the reference, a hand-computed example, tie order, exclude, ignore_index, int16 memory
with C > 255 (several class words in the Triton kernel), the query bit packing, and every bad input."""

import pytest
import torch

from fastvl.ops import BackendUnavailableError, LayoutMemory, layout_retrieval
from fastvl.ops.layout_ret import (
    LAYOUT_RETRIEVAL,
    default_chunk_size,
    layout_retrieval_reference,
    layout_retrieval_scores_reference,
)

BACKENDS = ["triton", "cpu", "torch_chunked", "reference"]
FAST = ["triton", "cpu", "torch_chunked"]


def retrieve(query, memory, *args, backend, device, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """layout_retrieval with every tensor argument moved to ``device`` (the `device` fixture: triton_device for the
    triton backend), the results back on the CPU."""
    def move(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    s, i = layout_retrieval(move(query), move(memory), *map(move, args), backend=backend,
                            **{key: move(v) for key, v in kwargs.items()})
    return s.cpu(), i.cpu()


def random_layouts(n_q: int, n_mem: int, n_cls: int, h: int, w: int, gen: torch.Generator, *,
                   ignore_index: int = 255, ignore_frac: float = 0.1, dtype=torch.uint8
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """query [Q, C, H, W] bool: 1-3 named classes per query, 1-2 random boxes each (they overlap freely);
    memory [M, H, W]: blocky class maps (a coarse grid upsampled, so overlaps are neither 0 nor 1) with a fraction of
    ignore pixels, some maps repeated (equal scores)."""
    query = torch.zeros(n_q, n_cls, h, w, dtype=torch.bool)
    for i in range(n_q):
        named = torch.randperm(n_cls, generator=gen)[:int(torch.randint(1, min(3, n_cls) + 1, (1,), generator=gen))]
        for c in named.tolist():
            for _ in range(int(torch.randint(1, 3, (1,), generator=gen))):
                y0, x0 = int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
                y1 = int(torch.randint(y0 + 1, h + 1, (1,), generator=gen))
                x1 = int(torch.randint(x0 + 1, w + 1, (1,), generator=gen))
                query[i, c, y0:y1, x0:x1] = True
    coarse = torch.randint(0, n_cls, (n_mem, (h + 2) // 3, (w + 2) // 3), generator=gen)
    memory = coarse.repeat_interleave(3, 1).repeat_interleave(3, 2)[:, :h, :w].contiguous()
    memory[torch.rand(n_mem, h, w, generator=gen) < ignore_frac] = ignore_index
    if n_mem >= 4:
        memory[-1] = memory[1]
        memory[n_mem // 2] = memory[1]
    return query, memory.to(dtype)


def assert_same(got: tuple, want: tuple) -> None:
    (s, i), (rs, ri) = got, want
    assert s.dtype == torch.float32 and i.dtype == torch.int64
    assert s.shape == rs.shape and i.shape == ri.shape
    assert torch.equal(i, ri), f"index {i.tolist()} != reference {ri.tolist()}"
    assert torch.equal(s, rs), f"scores {s.tolist()} != reference {rs.tolist()}"


# ----------------------------------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------------------------------


SMALL = [(5, 17, 4, 7, 9), (3, 11, 1, 5, 5), (6, 23, 9, 13, 6)]
BLOCKS = (19, 37, 35, 9, 7)  # Q > BLOCK_Q, M > BLOCK_M of the Triton kernel, 35 classes = two class words
MATCH_CASES = ([(b, c, s) for b in ("cpu", "torch_chunked") for s in [*SMALL, BLOCKS] for c in [1, 3, 7, 1000, None]]
               + [("cpu", None, (130, 29, 6, 5, 4))]  # three 64-query blocks
               + [("triton", c, s) for s in SMALL for c in [3, None]]
               + [("triton", 16, BLOCKS), ("triton", None, BLOCKS)])


@pytest.mark.parametrize("backend,chunk,shape", MATCH_CASES)
def test_fast_backends_match_reference(backend, shape, chunk, gen, device):
    """Exact scores and indices (integer counts, one float64 division); the last shape spans two query blocks and
    two map blocks of the Triton kernel and 35 classes (two class words)."""
    n_q, n_mem, n_cls, h, w = shape
    query, memory = random_layouts(n_q, n_mem, n_cls, h, w, gen)
    k = min(4, n_mem)
    want = layout_retrieval_reference(query, memory, k)
    assert_same(retrieve(query, memory, k, backend=backend, device=device, chunk_size=chunk), want)
    bank = LayoutMemory(memory.to(device), n_cls, chunk_size=chunk)
    assert_same(retrieve(query, bank, k, backend=backend, device=device, chunk_size=chunk), want)
    exclude = torch.randint(-1, n_mem, (n_q,), generator=gen)
    want = layout_retrieval_reference(query, memory, k, exclude)
    assert not (want[1] == exclude[:, None]).any()
    assert_same(retrieve(query, bank, k, exclude, backend=backend, device=device, chunk_size=chunk), want)


def test_default_backend_is_cpu_and_reference_is_forced():
    query = torch.ones(1, 2, 3, 3, dtype=torch.bool)
    memory = torch.zeros(2, 3, 3, dtype=torch.uint8)
    assert LAYOUT_RETRIEVAL.select(query, memory, 1) == "cpu"  # CPU tensors: the C++ kernel; Triton only when forced
    assert LAYOUT_RETRIEVAL.select(query, memory, 1, backend="reference") == "reference"
    assert default_chunk_size(64, 64) == 1024 and default_chunk_size(4096, 4096) == 1


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("ignore_index", [255, 0, 2])
def test_ignore_index_inside_the_class_range(backend, ignore_index, gen, device):
    """An ignore_index < C makes that class empty in every map; the backends agree with the reference."""
    query, memory = random_layouts(4, 9, 3, 6, 5, gen, ignore_index=ignore_index, ignore_frac=0.3)
    want = layout_retrieval_reference(query, memory, 3, ignore_index=ignore_index)
    got = retrieve(query, memory, 3, ignore_index=ignore_index, chunk_size=2, backend=backend, device=device)
    assert_same(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ignore_pixels_belong_to_no_class(backend, device):
    query = torch.zeros(1, 2, 1, 4, dtype=torch.bool)
    query[0, 0] = True  # class 0 over all 4 pixels
    memory = torch.tensor([[[0, 0, 255, 255]], [[0, 0, 1, 1]]], dtype=torch.uint8)
    s, i = retrieve(query, memory, 2, backend=backend, device=device)
    assert s.tolist() == [[0.5, 0.5]] and i.tolist() == [[0, 1]]


# ----------------------------------------------------------------------------------------------------------
# Hand-computed example: 2 classes, 3 maps of 2 x 3
# ----------------------------------------------------------------------------------------------------------


def hand_example() -> tuple[torch.Tensor, torch.Tensor]:
    query = torch.zeros(2, 2, 2, 3, dtype=torch.bool)
    query[0, 0, :, 0] = True  # q0: class 0 = left column {(0,0), (1,0)}; class 1 empty -> F = {0}
    query[1, 0, 0, :] = True  # q1: class 0 = top row {(0,0), (0,1), (0,2)}
    query[1, 1, :, 2] = True  #     class 1 = right column {(0,2), (1,2)} (overlaps class 0 at (0,2)) -> F = {0, 1}
    memory = torch.tensor([[[0, 0, 1],
                            [0, 1, 1]],
                           [[1, 1, 1],
                            [1, 1, 1]],
                           [[0, 255, 0],
                            [255, 1, 0]]], dtype=torch.uint8)
    return query, memory


# q0 (F = {0}, |q_0| = 2):
#   m0: m_0 = {(0,0),(0,1),(1,0)}, inter 2 -> 2 / (2 + 3 - 2) = 2/3  (with class 1 counted it would be 2/6)
#   m1: m_0 empty                           -> 0 / 2 = 0
#   m2: m_0 = {(0,0),(0,2),(1,2)}, inter 1  -> 1 / (2 + 3 - 1) = 1/4
# q1 (F = {0, 1}, |q_0| = 3, |q_1| = 2):
#   m0: class 0 inter 2 of |m_0| 3, class 1 m_1 = {(0,2),(1,1),(1,2)} inter 2 of 3 -> 4 / (4 + 3) = 4/7
#   m1: class 0 nothing, class 1 everywhere (6), inter 2  -> 2 / (3 + 6) = 2/9
#   m2: class 0 inter {(0,0),(0,2)} = 2 of 3 (the ignore pixel (0,1) counts for nothing); m_1 = {(1,1)}, inter 0
#       -> 2 / ((3 + 3 - 2) + (2 + 1)) = 2/7
HAND_SCORES = [[2 / 3, 0.0, 1 / 4], [4 / 7, 2 / 9, 2 / 7]]


def test_hand_scores_reference():
    query, memory = hand_example()
    scores = layout_retrieval_scores_reference(query, memory)
    assert scores.dtype == torch.float64
    assert torch.allclose(scores, torch.tensor(HAND_SCORES, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 2, 5])
def test_hand_example(backend, chunk, device):
    query, memory = hand_example()
    s, i = retrieve(query, memory, 3, backend=backend, device=device, chunk_size=chunk)
    assert i.tolist() == [[0, 2, 1], [0, 2, 1]]
    want = torch.tensor([[2 / 3, 1 / 4, 0.0], [4 / 7, 2 / 7, 2 / 9]], dtype=torch.float64).float()
    assert torch.equal(s, want)
    s, i = retrieve(query, memory, 2, torch.tensor([0, -1]), backend=backend, device=device, chunk_size=chunk)
    assert i.tolist() == [[2, 1], [0, 2]]
    assert torch.equal(s, torch.tensor([[1 / 4, 0.0], [4 / 7, 2 / 7]], dtype=torch.float64).float())


# ----------------------------------------------------------------------------------------------------------
# Ties, exclude, int16
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("chunk", [1, 2, 3, 100])
def test_ties_go_to_the_lower_index(backend, chunk, device):
    query = torch.zeros(2, 3, 4, 4, dtype=torch.bool)
    query[0, 0, :2, :2] = True
    query[1, 2, 1:3, 1:3] = True  # class 2 appears in no map: every score of q1 is 0
    good = torch.zeros(4, 4, dtype=torch.uint8)  # class 0 everywhere: score 4/16 for q0
    other = torch.ones(4, 4, dtype=torch.uint8)  # class 1 everywhere: score 0
    memory = torch.stack([other, good, other, good, good, other, other])
    s, i = retrieve(query, memory, 4, backend=backend, device=device, chunk_size=chunk)
    assert i.tolist() == [[1, 3, 4, 0], [0, 1, 2, 3]]
    assert s.tolist() == [[0.25, 0.25, 0.25, 0.0], [0.0] * 4]
    s, i = retrieve(query, memory, 4, torch.tensor([3, 0]), backend=backend, device=device, chunk_size=chunk)
    assert i.tolist() == [[1, 4, 0, 2], [1, 2, 3, 4]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_exclude_removes_the_query_itself(backend, gen, device):
    """BachGAN excludes the query's own map: a query built from map j's boxes would retrieve j first."""
    _, memory = random_layouts(1, 12, 4, 8, 8, gen, ignore_frac=0.0)
    query = torch.stack([torch.stack([memory[j] == c for c in range(4)]) for j in (3, 7, 10)])
    s, i = retrieve(query, memory, 3, backend=backend, device=device, chunk_size=5)
    assert i[:, 0].tolist() == [3, 7, 10] and (s[:, 0] == 1).all()
    s, i = retrieve(query, memory, 3, torch.tensor([3, 7, -1]), backend=backend, device=device, chunk_size=5)
    assert 3 not in i[0].tolist() and 7 not in i[1].tolist() and i[2, 0] == 10
    ref = layout_retrieval_reference(query, memory, 3, torch.tensor([3, 7, -1]))
    assert_same((s, i), ref)
    s, i = retrieve(query, memory, 11, torch.tensor([0, 1, 2]), backend=backend, device=device)  # k = M - 1
    assert [sorted(r) for r in i.tolist()] == [[j for j in range(12) if j != e] for e in range(3)]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("chunk", [1, 4, None])
def test_int16_memory_with_many_classes(backend, chunk, gen, device):
    n_cls = 300
    query, memory = random_layouts(4, 10, n_cls, 6, 7, gen, ignore_index=-1, dtype=torch.int16)
    assert int(memory.max()) > 255
    memory[0] = 280  # one map all class 280, named by query 0 over its whole area
    query[0] = False
    query[0, 280] = True
    want = layout_retrieval_reference(query, memory, 3, ignore_index=-1)
    assert want[1][0, 0] == 0 and want[0][0, 0] == 1.0
    assert_same(retrieve(query, memory, 3, ignore_index=-1, chunk_size=chunk, backend=backend, device=device), want)


# ----------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------


def _ok() -> tuple[torch.Tensor, torch.Tensor]:
    query = torch.zeros(2, 3, 4, 5, dtype=torch.bool)
    query[:, 1, 1:3, 1:4] = True
    memory = torch.randint(0, 3, (6, 4, 5), dtype=torch.uint8)
    return query, memory


def _bad_memory_id():
    q, m = _ok()
    m[4, 2, 3] = 3
    return (q, m), {}


def _empty_query():
    q, m = _ok()
    q[1] = False
    return (q, m), {}


def _case(query_fn=None, memory_fn=None, **kwargs):
    def build():
        q, m = _ok()
        return (query_fn(q) if query_fn else q, memory_fn(m) if memory_fn else m), kwargs
    return build


BAD = [
    ("memory id >= C", _bad_memory_id, ValueError, r"'memory' map 4 has class id 3 at pixel \(2, 3\)"),
    ("negative id in int16", _case(memory_fn=lambda m: m.to(torch.int16).index_fill_(0, torch.tensor([2]), -3)),
     ValueError, "'memory' map 2 has class id -3"),
    ("query without boxes", _empty_query, ValueError, "'query' query 1 has no box pixel"),
    ("query not bool", _case(query_fn=lambda q: q.float()), TypeError, "'query' must be a bool"),
    ("query 3-d", _case(query_fn=lambda q: q[0]), ValueError, "'query' must be 4-d"),
    ("query no classes", _case(query_fn=lambda q: q[:, :0]), ValueError, "'query' needs C, H, W >= 1"),
    ("query not a tensor", _case(query_fn=lambda q: q.tolist()), TypeError, "'query' must be a tensor"),
    ("H, W disagree", _case(memory_fn=lambda m: m[:, :, :4]), ValueError, "'memory' maps are \\[4, 4\\]"),
    ("memory 4-d", _case(memory_fn=lambda m: m[:, None]), ValueError, "'memory' must be 3-d"),
    ("memory int64", _case(memory_fn=lambda m: m.long()), TypeError, "'memory' must be uint8"),
    ("memory float", _case(memory_fn=lambda m: m.float()), TypeError, "'memory' must be uint8"),
    ("memory empty", _case(memory_fn=lambda m: m[:0]), ValueError, "'memory' is empty"),
    ("memory not a tensor", _case(memory_fn=lambda m: m.numpy()), TypeError, "'memory' must be a tensor"),
    ("k > M", _case(k=7), ValueError, "'k' must be <= M = 6"),
    ("k = M with exclude", _case(k=6, exclude=torch.tensor([-1, 2])), ValueError, "'k' must be <= M - 1 = 5"),
    ("k < 1", _case(k=0), ValueError, "'k' must be >= 1"),
    ("k float", _case(k=2.0), TypeError, "'k' must be an int"),
    ("k bool", _case(k=True), TypeError, "'k' must be an int"),
    ("exclude int32", _case(exclude=torch.tensor([0, 1], dtype=torch.int32)), TypeError, "'exclude' must be int64"),
    ("exclude shape", _case(exclude=torch.tensor([0, 1, 2])), ValueError, r"'exclude' must have shape \[Q\] = \[2\]"),
    ("exclude 2-d", _case(exclude=torch.tensor([[0, 1]])), ValueError, "'exclude' must have shape"),
    ("exclude too big", _case(exclude=torch.tensor([0, 6])), ValueError, r"'exclude' values must be in \[-1, M\)"),
    ("exclude below -1", _case(exclude=torch.tensor([-2, 0])), ValueError, "'exclude' values must be in"),
    ("exclude list", _case(exclude=[0, 1]), TypeError, "'exclude' must be a tensor"),
    ("ignore_index float", _case(ignore_index=255.0), TypeError, "'ignore_index' must be an int"),
    ("chunk_size 0", _case(chunk_size=0), ValueError, "'chunk_size' must be an int >= 1"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,build,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_name_the_argument(name, build, exc, match, backend, device):
    args, kwargs = build()
    with pytest.raises(exc, match=match):
        retrieve(*args, backend=backend, device=device, **kwargs)


def test_more_than_255_classes_need_int16():
    query = torch.zeros(1, 256, 2, 2, dtype=torch.bool)
    query[0, 3] = True
    memory = torch.zeros(2, 2, 2, dtype=torch.uint8)
    with pytest.raises(TypeError, match="'memory' must be int16 when C = 256 > 255"):
        layout_retrieval(query, memory, 1)
    s, i = layout_retrieval(query, memory.to(torch.int16), 1)
    assert i.tolist() == [[0]] and s.tolist() == [[0.0]]


def test_layout_memory_must_match_and_stay_unchanged():
    query, memory = _ok()
    bank = LayoutMemory(memory, 3)
    assert len(bank) == 6 and bank.counts.shape == (6, 3) and bank.counts.dtype == torch.int32
    assert bank.counts.sum(1).tolist() == [20] * 6
    with pytest.raises(ValueError, match="'memory' is a LayoutMemory for 4 classes but 'query' has C = 3"):
        layout_retrieval(query, LayoutMemory(memory, 4), 1)
    with pytest.raises(ValueError, match="'ignore_index' is 0 but the LayoutMemory was built with 255"):
        layout_retrieval(query, bank, 1, ignore_index=0)
    with pytest.raises(ValueError, match="'num_classes' must be an int >= 1"):
        LayoutMemory(memory, 0)
    with pytest.raises(ValueError, match="'memory' map 0 has class id 2"):
        LayoutMemory(memory.clone().fill_(2), 2)
    memory[0, 0, 0] = (int(memory[0, 0, 0]) + 1) % 3
    with pytest.raises(ValueError, match="modified in place"):
        layout_retrieval(query, bank, 1)


def test_unknown_backend():
    query, memory = _ok()
    with pytest.raises(BackendUnavailableError, match="unknown backend 'cuda'"):
        layout_retrieval(query, memory, 1, backend="cuda")


def test_query_tables_hold_one_bit_per_query(gen):
    """table[j, p, s] bit i is query 64 j + i's mask of class classes[s] at pixel p (bit 63 included: int64); the
    last slot is empty; lut maps the named classes (not ignore_index) to their slots, every other id to S."""
    from fastvl.ops.layout_ret import query_tables

    query = torch.rand(70, 6, 3, 4, generator=gen) < 0.3
    query[:, 4] = False  # class 4 named by no query: no slot
    query[63, 1, 0, 0] = True  # bit 63 of block 0
    table, lut = query_tables(query, ignore_index=2)
    classes = [0, 1, 3, 5]
    assert table.shape == (2, 12, 5) and table.dtype == torch.int64 and lut.shape == (65536,)
    assert [int(lut[c]) for c in range(6)] == [0, 1, 4, 2, 4, 3] and int(lut[255]) == int(lut[65535]) == 4
    assert (table[:, :, 4] == 0).all()
    for j in range(2):
        for i in range(64 if j == 0 else 6):
            bits = ((table[j] >> i) & 1).bool()  # [HW, S + 1]
            want = query[64 * j + i].reshape(6, 12)[classes].t()
            assert torch.equal(bits[:, :4], want), (j, i)
    assert ((table[1] >> 6) == 0).all()  # block 1 has 6 queries: no higher bits


def test_cpu_kernel_checks_its_arguments():
    table = torch.zeros(1, 12, 3, dtype=torch.int64)
    lut = torch.full((65536,), 2, dtype=torch.int32)
    maps = torch.zeros(4, 12, dtype=torch.uint8)
    k = torch.ops.fastvl.layout_intersections_kernel
    assert k(table, lut, maps, 5).shape == (5, 4)
    with pytest.raises(ValueError, match="'maps' must have H W = 12 pixels"):
        k(table, lut, maps[:, :11], 5)
    with pytest.raises(ValueError, match="'maps' must be uint8 or int16"):
        k(table, lut, maps.int(), 5)
    with pytest.raises(ValueError, match=r"'num_queries' must be in \[0, 64 x blocks\] = \[0, 64\]"):
        k(table, lut, maps, 65)
    with pytest.raises(ValueError, match=r"'lut' entries must be slots in \[0, 3\)"):
        k(table, lut.clone().fill_(3), maps, 5)


def test_query_words_pack_one_bit_per_class(gen):
    """Bit c % 32 of word c // 32 is query channel c (bit 31 included: the words are signed int32), except the
    ignore_index class."""
    from fastvl.kernels.triton.layout_ret import query_words

    query = torch.rand(3, 70, 2, 5, generator=gen) < 0.5
    query[:, 31] = True  # the sign bit of word 0
    words = query_words(query, ignore_index=40)
    assert words.shape == (3, 3, 10) and words.dtype == torch.int32
    bits = torch.stack([(words[:, c // 32] >> (c % 32)) & 1 for c in range(70)], 1).bool()  # [Q, C, HW]
    want = query.reshape(3, 70, 10).clone()
    want[:, 40] = False
    assert torch.equal(bits, want)
    assert torch.equal((words[:, 2] >> 6) & 0x3FFFFFF, torch.zeros_like(words[:, 2]))  # classes >= 70: no bits


@pytest.mark.cuda
def test_gpu_cityscapes_sized_retrieval_agrees(gen, triton_device):
    """64 queries over 5000 maps at 64 x 64 with 35 classes on the GPU: triton and torch_chunked (both on the GPU)
    return the same scores and indices, and the C++ CPU backend the same on the CPU."""
    query, memory = random_layouts(64, 5000, 35, 64, 64, gen)
    exclude = torch.randint(-1, 5000, (64,), generator=gen)
    cpu = layout_retrieval(query, memory, 5, exclude, backend="cpu")
    q, m, e = (t.to(triton_device) for t in (query, memory, exclude))
    bank = LayoutMemory(m, 35)
    got = layout_retrieval(q, bank, 5, e, backend="triton")
    want = layout_retrieval(q, bank, 5, e, backend="torch_chunked")
    assert_same(tuple(t.cpu() for t in got), tuple(t.cpu() for t in want))
    assert_same(tuple(t.cpu() for t in got), cpu)


@pytest.mark.parametrize("dtype,n_cls,ignore_index", [(torch.uint8, 7, 255), (torch.uint8, 7, 3),
                                                      (torch.int16, 300, -1), (torch.int16, 300, 17)])
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_class_counts_both_paths_match_plain_counts(dtype, n_cls, ignore_index, chunk, gen):
    """Per-map class areas from the C++ kernel and from the PyTorch path equal (maps == c).sum(), ignore_index
    counting for no class; a bad id is named (map, value, first pixel) by both paths."""
    from fastvl.ops.layout_ret import class_counts

    _, memory = random_layouts(1, 11, n_cls, 5, 6, gen, ignore_index=ignore_index, ignore_frac=0.2, dtype=dtype)
    want = torch.stack([(memory == c).flatten(1).sum(1) for c in range(n_cls)], 1).int()
    if 0 <= ignore_index < n_cls:
        want[:, ignore_index] = 0
    size = chunk or 4
    for use_kernel in (True, False):
        got = class_counts(memory, n_cls, ignore_index, size, use_kernel=use_kernel)
        assert got.dtype == torch.int32 and torch.equal(got, want), use_kernel
        bad = memory.clone()
        bad[6, 4, 2] = n_cls if n_cls < 255 else -5
        value = int(bad[6, 4, 2])
        with pytest.raises(ValueError, match=rf"'memory' map 6 has class id {value} at pixel \(4, 2\)"):
            class_counts(bad, n_cls, ignore_index, size, use_kernel=use_kernel)
