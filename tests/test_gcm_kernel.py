"""The fused GCM kernel: its reduction table against mpmath, its sine against a float64 reference
over every float32 exponent, agreement with PyTorch's formula (values, gradients, higher
derivatives, layouts, thread splits), and the fallback when no compiler is available."""

from __future__ import annotations

import ctypes
import math

import mpmath
import numpy as np
import pytest
import torch

from gradshield.defenses import gcm_kernel
from gradshield.defenses.concealment import GradientConcealment, conceal
from gradshield.errors import GradshieldError

needs_kernel = pytest.mark.skipif(gcm_kernel.library() is None,
                                  reason=f"fused GCM kernel unavailable: {gcm_kernel.unavailable_reason()}")


def _every_exponent(n: int, seed: int) -> np.ndarray:
    """n float32 values with uniformly random bits over every exponent (no inf/NaN) and sign."""
    rng = np.random.default_rng(seed)
    bits = (rng.integers(0, 2**23, n) | (rng.integers(0, 255, n) << 23)
            | (rng.integers(0, 2, n) << 31)).astype(np.uint32)
    return bits.view(np.float32)


def test_table_is_the_fraction_of_two_to_the_e_over_two_pi():
    planes = gcm_kernel.sine_table().view(3, 256)
    mpmath.mp.prec = 1400
    for exponent in (0, 1, 2, 60, 126, 127, 148, 149, 150, 151, 152, 180, 200, 230, 254):
        e = max(exponent, 1) - 150
        exact = mpmath.mpf(2) ** e / (2 * mpmath.pi)
        exact -= mpmath.floor(exact)
        parts = [float(p) for p in planes[:, exponent]]
        total = mpmath.mpf(parts[0]) + mpmath.mpf(parts[1]) + mpmath.mpf(parts[2])
        assert abs(total - exact) <= exact * mpmath.mpf(2) ** -105, exponent
        for part in parts[:2]:  # at most 28 significant bits: m * part is exact for |m| < 2**24
            mantissa, _ = math.frexp(part)
            assert (mantissa * 2**28).is_integer(), (exponent, part)
    assert torch.isnan(planes[:, 255]).all()


@needs_kernel
@pytest.mark.parametrize("quarter, reference", [(0, np.sin), (1, np.cos)])
def test_sine_is_correctly_rounded_to_half_an_ulp_over_every_exponent(quarter, reference):
    v = _every_exponent(400_000, seed=quarter)
    got = gcm_kernel.sine(torch.from_numpy(v), quarter).numpy().astype(np.float64)
    exact = reference(v.astype(np.float64))  # float64 libm: exact to ~2**-53, reduction included
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)
    error = np.abs(got - exact) / ulp
    assert error.max() <= 0.501  # float64 rounding of the result adds at most ~2**-29 ulp
    torch_fn = torch.sin if quarter == 0 else torch.cos
    torch_error = np.abs(torch_fn(torch.from_numpy(v)).numpy().astype(np.float64) - exact) / ulp
    assert error.mean() <= torch_error.mean() and error.max() <= torch_error.max()


@needs_kernel
def test_sine_special_values():
    v = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-45, -1e-45, 3.4028235e38])
    s, c = gcm_kernel.sine(v, 0), gcm_kernel.sine(v, 1)
    assert torch.equal(torch.signbit(s[:2]), torch.tensor([False, True]))  # sin(-0) = -0
    assert torch.equal(c[:2], torch.ones(2))
    assert torch.isnan(s[2:5]).all() and torch.isnan(c[2:5]).all()
    assert torch.equal(s[5:7], v[5:7])  # sin(x) = x for the smallest subnormals
    assert float(s[7]) == pytest.approx(math.sin(3.4028234663852886e38), abs=1e-7)


@needs_kernel
def test_forward_and_gradient_match_the_torch_formula_on_real_images(test_batch):
    x = test_batch[0][:128]
    fused, plain = GradientConcealment(kernel="fused"), GradientConcealment(kernel="torch")
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_fused, out_plain = fused(a), plain(b)
    # the same float32 steps; only the sine differs, by at most an ulp, scaled by eps = 1e-8
    assert float((out_fused - out_plain).detach().abs().max()) <= float(torch.finfo(torch.float32).eps)
    assert float((out_fused == out_plain).float().mean()) >= 0.999
    g = torch.randn_like(x)
    out_fused.backward(g)
    out_plain.backward(g)
    # the gradient factor 1e12 * cos(v): cos differs by at most an ulp, three roundings follow
    relative = ((a.grad - b.grad).abs() / b.grad.abs()).max()
    assert float(relative) <= 4 * float(torch.finfo(torch.float32).eps)
    assert float((a.grad == b.grad).float().mean()) >= 0.95


@needs_kernel
def test_moderate_frequency_gradients_and_second_derivatives_match_torch():
    x = torch.linspace(-3, 3, 5000)
    fused, plain = GradientConcealment(w=7.0, eps=0.3, kernel="fused"), GradientConcealment(
        w=7.0, eps=0.3, kernel="torch")
    grads = []
    for layer in (fused, plain):
        z = x.clone().requires_grad_(True)
        (first,) = torch.autograd.grad(layer(z).pow(2).sum(), z, create_graph=True)
        (second,) = torch.autograd.grad(first.sum(), z)
        grads.append((first.detach(), second))
    assert torch.allclose(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)
    # and the analytic derivative: d/dx [x + eps sin(w x)] = 1 + eps w cos(w x)
    z = x.double()
    analytic = 2 * (z + 0.3 * torch.sin(7 * z)) * (1 + 0.3 * 7 * torch.cos(7 * z))
    assert torch.allclose(grads[0][0].double(), analytic, rtol=1e-5, atol=1e-4)


@needs_kernel
def test_layout_and_sizes_and_thread_splits_do_not_change_values():
    x = torch.rand(5, 3, 37, 41, generator=torch.Generator().manual_seed(0))
    reference = gcm_kernel.forward(x, 1e20, 1e-8)
    last = gcm_kernel.forward(x.contiguous(memory_format=torch.channels_last), 1e20, 1e-8)
    assert last.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(last, reference)
    assert torch.equal(gcm_kernel.forward(x.transpose(2, 3), 1e20, 1e-8), reference.transpose(2, 3))
    lib, table = gcm_kernel.library(), gcm_kernel.sine_table()
    flat = x.reshape(-1)
    for n in (0, 1, 63, 64, 65, 1000, flat.numel()):
        for threads in (1, 2, 3, 7):
            out = torch.full((n,), math.nan)
            lib.gcm_forward(flat.data_ptr(), out.data_ptr(), n, 1e20, 1e-8, table.data_ptr(),
                            threads)
            assert torch.equal(out, reference.reshape(-1)[:n]), (n, threads)


@needs_kernel
def test_kernel_functions_refuse_other_dtypes():
    with pytest.raises(GradshieldError, match="float32 CPU tensors"):
        gcm_kernel.forward(torch.rand(10, dtype=torch.float64), 1e20, 1e-8)
    with pytest.raises(GradshieldError, match="float32 CPU tensors"):
        gcm_kernel.backward(torch.rand(10), torch.rand(10, dtype=torch.float16), 1e20, 1e-8)


@needs_kernel
def test_concealed_model_uses_the_kernel_and_keeps_predictions(test_batch, trained_model):
    x = test_batch[0][:256]
    fused, plain = conceal(trained_model, kernel="fused"), conceal(trained_model, kernel="torch")
    assert "kernel=fused" in repr(fused)
    with torch.no_grad():
        assert torch.equal(fused(x).argmax(1), plain(x).argmax(1))


def test_without_a_compiler_auto_falls_back_and_fused_says_why(monkeypatch):
    monkeypatch.setattr(gcm_kernel, "_load", lambda: (None, "no C compiler found (test)"))
    x = torch.rand(1000)
    assert torch.equal(GradientConcealment()(x), x + 1e-8 * torch.sin(x * 1e20))
    with pytest.raises(GradshieldError, match="no C compiler found"):
        GradientConcealment(kernel="fused")
    with pytest.raises(GradshieldError, match="kernel must be one of"):
        GradientConcealment(kernel="fast")
    with pytest.raises(GradshieldError, match="not available here"):
        gcm_kernel.forward(x, 1e20, 1e-8)


def test_build_is_cached_by_content(tmp_path):
    compiler = gcm_kernel._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    first = gcm_kernel._build(compiler, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert gcm_kernel._build(compiler, tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left
    lib = ctypes.CDLL(str(first))
    assert hasattr(lib, "gcm_forward")


def test_a_compiler_without_openmp_builds_a_single_threaded_library(tmp_path, monkeypatch):
    compiler = gcm_kernel._compiler()
    if compiler is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(gcm_kernel, "OPENMP_FLAG", "-fno-such-openmp-flag")
    path = gcm_kernel._build(compiler, tmp_path)
    run, commands = gcm_kernel.subprocess.run, []
    monkeypatch.setattr(gcm_kernel.subprocess, "run",
                        lambda command, **kw: commands.append(command) or run(command, **kw))
    assert gcm_kernel._build(compiler, tmp_path) == path
    assert commands == [[compiler, "--version"]]  # the failing OpenMP build is not retried
    lib = gcm_kernel.declare(ctypes.CDLL(str(path)))
    x = torch.rand(10_000, generator=torch.Generator().manual_seed(2))
    out = torch.empty_like(x)
    lib.gcm_forward(x.data_ptr(), out.data_ptr(), x.numel(), 1e20, 1e-8,
                    gcm_kernel.sine_table().data_ptr(), 3)  # three slices, one thread
    exact = torch.from_numpy(np.sin((x * 1e20).double().numpy()))  # sine of the float32 product
    reference = x + 1e-8 * exact.float()  # the layer's float32 steps with a correctly rounded sine
    assert torch.equal(out, reference)


@needs_kernel
def test_functorch_transforms_compile_and_export_see_the_torch_formula():
    x = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    fused, plain = GradientConcealment(kernel="fused"), GradientConcealment(kernel="torch")
    assert torch.equal(torch.func.vmap(fused)(x), torch.func.vmap(plain)(x))
    jacobian = torch.func.jacrev(lambda z: fused(z).sum())(x[0])
    assert torch.equal(jacobian, torch.func.jacrev(lambda z: plain(z).sum())(x[0]))
    compiled = torch.compile(fused, backend="eager", fullgraph=True)  # dynamo traces, no C call
    assert torch.equal(compiled(x), plain(x))
    exported = torch.export.export(fused, (x,)).module()
    assert torch.equal(exported(x), plain(x))
