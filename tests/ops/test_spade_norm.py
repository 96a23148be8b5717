"""spade_norm (SPADE / BachGAN): every backend runnable here (triton under the interpreter, the C++ cpu kernel) against
the PyTorch reference (tolerance rule), batch and instance norm, training and eval, the running-statistics update
against F.batch_norm's, both Triton plans (one program per group, two-phase), gradients of x / gamma / beta, bf16
with fp32 statistics (cpu), poisoned outputs, opcheck, bad inputs (the public function's and the C++ kernel's),
dispatch."""

import pytest
import torch
import torch.nn.functional as F

from fastvl.ops import BackendUnavailableError, spade_norm
from fastvl.ops import spade as S
from fastvl.ops.testing import assert_close_to_ref, value_and_grads

NAMES = ["output", "grad x", "grad gamma", "grad beta"]
# (N, C, H, W): tiny odd sizes; a plane of 65 x 65 = 4225 elements is more than one program holds (two-phase plan)
SHAPES = [(1, 3, 5, 5), (3, 2, 7, 9), (2, 3, 65, 65)]
MODES = [("batch", True), ("batch", False), ("instance", True)]
FAST = ["triton", "cpu"]


def _inputs(shape, gen, device, dtype=torch.float32):
    x = torch.randn(shape, generator=gen) * 2.0 + 0.5
    gamma = torch.randn(shape, generator=gen) * 0.3
    beta = torch.randn(shape, generator=gen) * 0.5
    return [t.to(device=device, dtype=dtype) for t in (x, gamma, beta)]


def _buffers(c, gen, device, dtype=torch.float32):
    return (torch.randn(c, generator=gen) * 0.5).to(device, dtype), (torch.rand(c, generator=gen) + 0.5).to(device,
                                                                                                           dtype)


def _segments(shape, norm):
    return 1 if norm == "instance" else shape[0]


def _compare(backend, shape, norm, training, gen, device, momentum=0.1):
    x, gamma, beta = _inputs(shape, gen, device)
    bufs = _buffers(shape[1], gen, device) if norm == "batch" else (None, None)
    copies = [tuple(None if b is None else b.clone().to(dt) for b in bufs) for dt in (torch.float32, torch.float64)]
    weight = (torch.rand(shape, generator=gen) + 0.5).to(device)

    def fast(x, gamma, beta):
        return spade_norm(x, gamma, beta, norm=norm, running_mean=bufs[0], running_var=bufs[1], momentum=momentum,
                          training=training, backend=backend)

    def ref(bufs):
        return lambda x, g, b: S.spade_norm_reference(x, g, b, norm, 1e-5, *bufs, momentum, training)

    got = value_and_grads(fast, [x, gamma, beta], weight)
    r32 = value_and_grads(ref(copies[0]), [x, gamma, beta], weight)
    r64 = value_and_grads(ref(copies[1]), [t.double() for t in (x, gamma, beta)], weight.double())
    for name, f, a, a64 in zip(NAMES, got, r32, r64):
        assert f.dtype == x.dtype, f"{backend} {name}: dtype {f.dtype} != {x.dtype}"
        assert_close_to_ref(f, a64, a, f"{backend} {norm} training={training} {name}")
    return bufs, copies


@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("norm,training", MODES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(backend, norm, training, shape, gen, device, triton_device):
    _compare(backend, shape, norm, training, gen, device)


def test_both_triton_plans_are_exercised():
    from fastvl.kernels.triton import spade as K

    assert K.plan(1, 25) == K.plan(3, 63) == "single"
    assert K.plan(2, 65 * 65) == K.plan(1, 65 * 65) == "two_phase"  # SHAPES[-1], batch and instance
    assert K.plan(2, 40 * 40) == "single" and K.plan(3, 40 * 40) == "two_phase"  # the segments count too


@pytest.mark.parametrize("norm,training", MODES)
@pytest.mark.parametrize("shape", [(3, 2, 5, 7)])
def test_triton_two_phase_with_tiny_tiles(norm, training, shape, gen, device, triton_device, monkeypatch):
    """The two-phase plan with tiles shrunk so that tiny planes need it: blocks of 8 elements (a segment of 35 = 4
    full blocks + a partial one of 3) and finalize programs combining 4 partials per step (15 partials per group in
    batch norm: several steps and a partial last one)."""
    from fastvl.kernels.triton import spade as K

    monkeypatch.setattr(K, "MAX_TILE", 16)
    monkeypatch.setattr(K, "BLOCK", 8)
    monkeypatch.setattr(K, "BLOCK_P", 4)
    assert K.plan(_segments(shape, norm), shape[2] * shape[3]) == "two_phase"
    _compare("triton", shape, norm, training, gen, triton_device)


@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (2, 3, 65, 65)])
@pytest.mark.parametrize("momentum", [0.1, 0.7])
def test_running_statistics_update_as_batch_norm(backend, shape, momentum, gen, device, triton_device):
    """After a training call the buffers hold what F.batch_norm leaves in them (unbiased running_var)."""
    x, gamma, beta = _inputs(shape, gen, device)
    rm, rv = _buffers(shape[1], gen, device)
    want = [rm.clone(), rv.clone()]
    want64 = [rm.double(), rv.double()]
    F.batch_norm(x, *want, training=True, momentum=momentum)
    F.batch_norm(x.double(), *want64, training=True, momentum=momentum)
    before = rm.clone(), rv.clone()
    spade_norm(x, gamma, beta, running_mean=rm, running_var=rv, momentum=momentum, backend=backend)
    assert not torch.equal(rm, before[0]) and not torch.equal(rv, before[1]), "the buffers were not updated"
    assert_close_to_ref(rm, want64[0], want[0], "running_mean")
    assert_close_to_ref(rv, want64[1], want[1], "running_var")
    spade_norm(x, gamma, beta, running_mean=rm, running_var=rv, training=False, backend=backend)
    assert_close_to_ref(rm, want64[0], want[0], "running_mean after eval")  # eval leaves them as they are
    assert_close_to_ref(rv, want64[1], want[1], "running_var after eval")


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_eval_uses_the_running_statistics(backend, gen, device, triton_device):
    x, gamma, beta = _inputs((2, 3, 6, 5), gen, device)
    rm, rv = _buffers(3, gen, device)
    out = spade_norm(x, gamma, beta, running_mean=rm, running_var=rv, training=False, backend=backend)
    x_hat = (x - rm[None, :, None, None]) / torch.sqrt(rv[None, :, None, None] + 1e-5)
    torch.testing.assert_close(out, x_hat * (1 + gamma) + beta, rtol=1e-5, atol=1e-5)
    batch = spade_norm(x, gamma, beta, backend=backend)  # training: the batch statistics differ
    assert (batch - out).abs().max() > 1e-2


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("norm,training", MODES)
@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (2, 3, 65, 65)])
def test_outputs_are_written_everywhere(backend, norm, training, shape, gen, device, poisoned):
    """Every allocation starts as NaN (the `poisoned` fixture): each output and gradient entry must be written."""
    x, gamma, beta = _inputs(shape, gen, device)
    bufs = _buffers(shape[1], gen, device) if norm == "batch" else (None, None)
    got = value_and_grads(lambda x, g, b: spade_norm(x, g, b, norm=norm, running_mean=bufs[0], running_var=bufs[1],
                                                     training=training, backend=backend), [x, gamma, beta])
    assert poisoned.covers(got[0]), "the poison missed the outputs: this test could not see a gap"
    for name, t in zip(NAMES, got):
        assert torch.isfinite(t).all(), f"{backend} {norm} {name} has unwritten entries"
    for b in bufs:
        assert b is None or torch.isfinite(b).all(), "running buffers got unwritten statistics"


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("instance,use_input_stats", [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (2, 2, 65, 65)])
def test_opcheck(backend, instance, use_input_stats, shape, gen, device):
    x, gamma, beta = (t.requires_grad_() for t in _inputs(shape, gen, device))
    rm, rv = (None, None) if use_input_stats else _buffers(shape[1], gen, device)
    torch.library.opcheck(torch.ops.fastvl.spade_norm_fwd.default,
                          (x, gamma, beta, rm, rv, instance, use_input_stats, 1e-5, backend))
    groups = shape[0] * shape[1] if instance else shape[1]
    mean, var = torch.randn(groups, generator=gen).to(device), torch.rand(groups, generator=gen).to(device)
    dout = torch.randn(shape, generator=gen).to(device)
    torch.library.opcheck(torch.ops.fastvl.spade_norm_bwd.default,
                          (dout, x.detach(), gamma.detach(), mean, var, instance, use_input_stats, 1e-5, backend))


def test_selection_and_forcing(gen):
    x, gamma, beta = _inputs((2, 3, 4, 4), gen, "cpu")
    assert S.SPADE_NORM.select(x, gamma, beta, "batch", True) == "cpu"  # CPU: the C++ kernel; Triton only forced
    assert S.SPADE_NORM.select(x.double(), gamma.double(), beta.double(), "batch", True) == "reference"
    with pytest.raises(BackendUnavailableError, match="float32 only"):
        spade_norm(*(t.bfloat16() for t in (x, gamma, beta)), backend="triton")
    with pytest.raises(BackendUnavailableError, match="'cpu' was forced"):
        spade_norm(*(t.double() for t in (x, gamma, beta)), backend="cpu")
    out = spade_norm(*(t.bfloat16() for t in (x, gamma, beta)))
    assert out.dtype == torch.bfloat16
    ref64 = S.spade_norm_reference(*(t.bfloat16().double() for t in (x, gamma, beta)))
    assert (out.double() - ref64).abs().max() <= 0.05 * ref64.abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("norm,training", MODES)
@pytest.mark.parametrize("shape", [(3, 5, 7, 9), (2, 3, 33, 31)])
def test_cpu_low_precision_keeps_fp32_statistics(dtype, norm, training, shape, gen):
    """bf16 / fp16 inputs on the C++ kernel: output and gradients within the tolerance rule of the reference run in
    that dtype (which computes in fp32), and the running buffers get the fp32 statistics of the rounded input."""
    x, gamma, beta = _inputs(shape, gen, "cpu", dtype)
    bufs = _buffers(shape[1], gen, "cpu") if norm == "batch" else (None, None)
    copies = [tuple(None if b is None else b.clone().to(dt) for b in bufs) for dt in (torch.float32, torch.float64)]
    weight = (torch.rand(shape, generator=gen) + 0.5).to(dtype)

    def run(bufs, backend=None):
        def fn(x, g, b):
            if backend is not None:
                return spade_norm(x, g, b, norm=norm, running_mean=bufs[0], running_var=bufs[1], training=training,
                                  backend=backend)
            return S.spade_norm_reference(x, g, b, norm, 1e-5, *bufs, 0.1, training)
        return fn

    got = value_and_grads(run(bufs, "cpu"), [x, gamma, beta], weight)
    lowp = value_and_grads(run(copies[0]), [x, gamma, beta], weight)
    r64 = value_and_grads(run(copies[1]), [t.double() for t in (x, gamma, beta)], weight.double())
    for name, f, a, a64 in zip(NAMES, got, lowp, r64):
        assert f.dtype == dtype, f"{name}: dtype {f.dtype}"
        assert_close_to_ref(f, a64, a, f"cpu {dtype} {norm} training={training} {name}")
    for name, b, b64 in zip(("running_mean", "running_var"), bufs, copies[1]):
        if b is not None:  # fp32 buffers from fp32 statistics: within float32 rounding of the float64 update
            torch.testing.assert_close(b.double(), b64, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("call,match", [
    (lambda x, m: torch.ops.fastvl.spade_norm_fwd_kernel(x, x[:, :2], x, None, None, False, 1e-5),
     r"'gamma' must have the shape of 'x' \[2, 3, 5, 4\]"),
    (lambda x, m: torch.ops.fastvl.spade_norm_fwd_kernel(x, x, x.double(), None, None, False, 1e-5),
     "'beta' must have the dtype of 'x'"),
    (lambda x, m: torch.ops.fastvl.spade_norm_fwd_kernel(x.double(), x.double(), x.double(), None, None, False, 1e-5),
     "'x' must be float32, bfloat16 or float16"),
    (lambda x, m: torch.ops.fastvl.spade_norm_fwd_kernel(x[0], x[0], x[0], None, None, False, 1e-5),
     "'x' must be 4-d"),
    (lambda x, m: torch.ops.fastvl.spade_norm_fwd_kernel(x, x, x, m, None, False, 1e-5),
     "'var' must be given together with 'mean'"),
    (lambda x, m: torch.ops.fastvl.spade_norm_fwd_kernel(x, x, x, m, m, True, 1e-5),  # instance: G = N C = 6
     r"'mean' must have shape \[G\] = \[6\]"),
    (lambda x, m: torch.ops.fastvl.spade_norm_fwd_kernel(x, x, x, m.double(), m, False, 1e-5),
     "'mean' must have dtype Float"),
    (lambda x, m: torch.ops.fastvl.spade_norm_fwd_kernel(x, x, x, None, None, False, 0.0), "'eps' must be > 0"),
    (lambda x, m: torch.ops.fastvl.spade_norm_bwd_kernel(x[:1], x, x, m, m, False, True, 1e-5),
     "'dout' must have the shape of 'x'"),
    (lambda x, m: torch.ops.fastvl.spade_norm_bwd_kernel(x, x, x, m[:2], m, False, True, 1e-5),
     r"'mean' must have shape \[G\] = \[3\]"),
])
def test_cpu_kernel_checks_its_arguments(call, match, gen):
    """The C++ kernel refuses what it cannot compute, naming the argument (callers that skip the public checks)."""
    if not hasattr(torch.ops.fastvl, "spade_norm_fwd_kernel"):
        pytest.skip("fastvl._C is not built")
    x = _inputs((2, 3, 5, 4), gen, "cpu")[0]
    with pytest.raises(ValueError, match=match):
        call(x, torch.zeros(3))


def test_instance_norm_ignores_training(gen):
    x, gamma, beta = _inputs((2, 3, 4, 5), gen, "cpu")
    torch.testing.assert_close(spade_norm(x, gamma, beta, norm="instance", training=False),
                               spade_norm(x, gamma, beta, norm="instance"))


def _bad(gen):
    x, gamma, beta = _inputs((2, 3, 4, 4), gen, "cpu")
    rm, rv = _buffers(3, gen, "cpu")
    return dict(x=x, gamma=gamma, beta=beta, norm="batch", running_mean=rm, running_var=rv, training=True)


@pytest.mark.parametrize("change,err,match", [
    (lambda a: a.update(norm="layer"), ValueError, r"'norm' must be one of \['batch', 'instance'\]"),
    (lambda a: a.update(x=a["x"][0]), ValueError, r"'x' must be 4-d \[N, C, H, W\]"),
    (lambda a: a.update(x=a["x"].int()), TypeError, "'x' must be a float tensor"),
    (lambda a: a.update(x=[1.0]), TypeError, "'x' must be a tensor"),
    (lambda a: a.update(gamma=a["gamma"][:, :2]), ValueError, r"'gamma' must have the shape of 'x' \[2, 3, 4, 4\]"),
    (lambda a: a.update(beta=a["beta"][..., :3]), ValueError, "'beta' must have the shape of 'x'"),
    (lambda a: a.update(gamma=a["gamma"].double()), TypeError, "'gamma' must have the dtype of 'x'"),
    (lambda a: a.update(beta=a["beta"].to("meta")), ValueError, "'beta' is on meta but 'x' is on cpu"),
    (lambda a: a.update(norm="instance"), ValueError, "'running_mean' must be None with norm='instance'"),
    (lambda a: a.update(norm="instance", running_mean=None), ValueError, "'running_var' must be None with norm="),
    (lambda a: a.update(running_mean=None, running_var=None, training=False), ValueError,
     "'running_mean' and 'running_var' are required with training=False"),
    (lambda a: a.update(running_var=None), ValueError, "'running_var' must be given together with 'running_mean'"),
    (lambda a: a.update(running_mean=None), ValueError, "'running_mean' must be given together with 'running_var'"),
    (lambda a: a.update(running_mean=a["running_mean"][:2]), ValueError, r"'running_mean' must have shape \[C\] = "),
    (lambda a: a.update(running_var=a["running_var"].long()), TypeError, "'running_var' must be a float tensor"),
    (lambda a: a.update(running_var=a["running_var"].to("meta")), ValueError, "'running_var' is on meta but 'x'"),
    (lambda a: a.update(training=1), TypeError, "'training' must be a bool"),
    (lambda a: a.update(eps=0.0), ValueError, "'eps' must be a number > 0"),
    (lambda a: a.update(momentum=1.5), ValueError, r"'momentum' must be a number in \[0, 1\]"),
    (lambda a: a.update(x=a["x"][:1, :, :1, :1], gamma=a["gamma"][:1, :, :1, :1], beta=a["beta"][:1, :, :1, :1]),
     ValueError, "'x' needs more than 1 value per statistic"),
    (lambda a: a.update(norm="instance", running_mean=None, running_var=None, x=a["x"][:, :, :1, :1],
                        gamma=a["gamma"][:, :, :1, :1], beta=a["beta"][:, :, :1, :1]), ValueError,
     r"'x' needs more than 1 value per statistic \(H x W\)"),
])
def test_bad_input_names_the_argument(change, err, match, gen):
    args = _bad(gen)
    change(args)
    x, gamma, beta = args.pop("x"), args.pop("gamma"), args.pop("beta")
    with pytest.raises(err, match=match):
        spade_norm(x, gamma, beta, **args)


@pytest.mark.cuda
@pytest.mark.parametrize("norm,training", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_bachgan_sizes(norm, training, dtype, gen, triton_device):
    """BachGAN's 256 x 512 Cityscapes block (64 channels, batch 4): two-phase plan, bf16 inputs, fp32 statistics."""
    shape = (4, 64, 256, 512)
    x, gamma, beta = _inputs(shape, gen, triton_device, dtype)
    bufs = _buffers(64, gen, triton_device) if norm == "batch" else (None, None)
    weight = (torch.rand(shape, generator=gen) + 0.5).to(triton_device)

    def run(fn, bufs):
        return lambda x, g, b: fn(x, g, b, norm=norm, running_mean=bufs[0], running_var=bufs[1], training=training)

    def ref(x, g, b, **kw):
        return S.spade_norm_reference(x, g, b, kw["norm"], 1e-5, kw["running_mean"], kw["running_var"], 0.1,
                                      kw["training"])

    copies = [tuple(None if b is None else b.clone().to(dt) for b in bufs) for dt in (torch.float32, torch.float64)]
    got = value_and_grads(run(lambda *a, **k: spade_norm(*a, **k, backend="triton"), bufs), [x, gamma, beta], weight)
    lowp = value_and_grads(run(ref, copies[0]), [x, gamma, beta], weight)
    r64 = value_and_grads(run(ref, copies[1]), [t.double() for t in (x, gamma, beta)], weight.double())
    for name, f, a, a64 in zip(NAMES, got, lowp, r64):
        assert_close_to_ref(f, a64, a, f"gpu {dtype} {norm} {name}")
