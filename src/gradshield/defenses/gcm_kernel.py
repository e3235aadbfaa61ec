"""The fused CPU kernel behind :class:`~gradshield.defenses.concealment.GradientConcealment`.

GCM computes ``sin(w * x)`` at arguments around 1e19 (``w = 1e20``, x in [0, 1] pixel scale).
PyTorch's CPU sine handles such arguments with a slow general range reduction: 2.7 ms for a batch
of 256 CIFAR images, 5x its cost on small arguments, and 2.5 % of the compact net's whole forward
pass. ``gcm_kernel.c`` reduces the float32 argument exactly with a per-exponent table (see its
header) and fuses the layer's multiply, sine, scale and add into one pass (and the backward pass
likewise), with the same float32 roundings as PyTorch's formula; its sine is within 0.501 ulp of
the exact value (correctly rounded but for rare ties), PyTorch's within 0.6 ulp.

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``/``gcc``/
``clang``) into ``<cache>/kernels/`` (see :func:`gradshield.paths.cache_dir`), keyed by the
source, flags, compiler and CPU, so a cache shared between machines never loads a library built
for another CPU. It is threaded with OpenMP, which in a PyTorch process means PyTorch's own
intra-op threads (``torch.get_num_threads()``); a compiler without OpenMP gives one thread.
Without a compiler, or on any build error, :func:`library` returns ``None``,
:func:`unavailable_reason` says why, and GCM uses PyTorch's formula (same values to an ulp of
the sine, slower).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from gradshield.errors import GradshieldError
from gradshield.paths import cache_dir

SOURCE = Path(__file__).with_name("gcm_kernel.c")
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math",
         "-shared", "-fPIC")
#: Tried first; a compiler without OpenMP builds a single-threaded library instead.
OPENMP_FLAG = "-fopenmp"
#: Slices smaller than this (elements) are not worth a thread of their own.
MIN_ELEMENTS_PER_THREAD = 32_768
_FLOAT32_EXPONENT_BIAS = 150  # a float32 with biased exponent b and 24-bit integer m is m * 2**(b-150)


def _pi_times_power_of_two(bits: int) -> int:
    """floor(pi * 2**bits) to within one unit, from Machin's formula in integer arithmetic."""
    guard = 64
    scale = 1 << (bits + guard)

    def arctan_of_inverse(n: int) -> int:  # arctan(1/n) * scale
        total, term, k = 0, scale // n, 0
        while term:
            total += term // (2 * k + 1) if k % 2 == 0 else -(term // (2 * k + 1))
            term //= n * n
            k += 1
        return total

    return (16 * arctan_of_inverse(5) - 4 * arctan_of_inverse(239)) >> guard


@functools.cache
def sine_table() -> torch.Tensor:
    """The reduction table: 3 planes x 256 float32 exponents, float64, flattened.

    Entry ``b`` of the planes holds F1, F2, F3 with F1 + F2 + F3 = frac(2**(b-150) / (2 pi)) (the
    value itself where it is below 1; exponent 0 shares exponent 1's scale) to about 2**-109
    relative, F1 and F2 with at most 28 significant bits each. Exponent 255 (inf, NaN) holds NaN.
    """
    precision = 1024  # bits of 1/(2 pi): covers 2**104 (largest float32 scale) and 109 more bits
    inverse_two_pi = (1 << (2 * precision)) // (2 * _pi_times_power_of_two(precision))  # 2**p/(2pi)
    planes = torch.zeros(3, 256, dtype=torch.float64)
    planes[:, 255] = math.nan
    for exponent in range(255):
        e = max(exponent, 1) - _FLOAT32_EXPONENT_BIAS
        fraction = inverse_two_pi % (1 << (precision - e))  # frac(2**e/(2pi)) * 2**(precision-e)
        remaining, width = fraction, fraction.bit_length()
        for plane, bits in enumerate((28, 28, 53)):
            shift = max(width - bits, 0)
            top = remaining >> shift
            planes[plane, exponent] = math.ldexp(float(top), shift + e - precision)
            remaining -= top << shift
            width = shift
    return planes.reshape(-1).contiguous()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_fingerprint() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags.strip()}"


def _build(compiler: str, directory: Path) -> Path:
    """Compile gcm_kernel.c into ``directory`` (with OpenMP if the compiler has it); the path."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    source, cpu = SOURCE.read_text(), _cpu_fingerprint()
    variants = []  # (flags, target), the OpenMP build first
    for flags in ((*FLAGS, OPENMP_FLAG), FLAGS):
        key = hashlib.sha256("\0".join([source, " ".join(flags), version, cpu]).encode())
        variants.append((flags, directory / f"gcm_kernel-{key.hexdigest()[:16]}.so"))
    # a built library is reused, so a compiler without OpenMP does not retry that build each run
    built = next((target for _, target in variants if target.exists()), None)
    if built is not None:
        return built
    directory.mkdir(parents=True, exist_ok=True)
    errors = []
    for flags, target in variants:
        # build under a temporary name, then rename: concurrent processes never load a partial file
        with tempfile.TemporaryDirectory(dir=directory) as scratch:
            partial = Path(scratch) / target.name
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", str(partial)],
                                  capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                os.replace(partial, target)
                return target
            errors.append(f"{compiler} {' '.join(flags)}: {done.stderr.strip()[-1000:]}")
    raise RuntimeError("; ".join(errors))


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Give a loaded kernel library its C signatures (returns it)."""
    pointer, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.gcm_forward.argtypes = [pointer, pointer, i64, f32, f32, pointer, ctypes.c_int]
    lib.gcm_backward.argtypes = [pointer, pointer, pointer, i64, f32, f32, pointer, ctypes.c_int]
    lib.gcm_sine.argtypes = [pointer, pointer, i64, i64, pointer, ctypes.c_int]
    for function in (lib.gcm_forward, lib.gcm_backward, lib.gcm_sine):
        function.restype = None
    return lib


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") or (None, why not); built and loaded once per process."""
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set $CC or install gcc/clang)"
    try:
        path = _build(compiler, cache_dir() / "kernels")
        lib = declare(ctypes.CDLL(str(path)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        return None, f"building {SOURCE.name} failed: {error}"
    return lib, ""


def library() -> ctypes.CDLL | None:
    """The compiled kernel library, or ``None`` when it cannot be built here."""
    return _load()[0]


def unavailable_reason() -> str:
    """Why :func:`library` is ``None`` ("" when it is available)."""
    return _load()[1]


def supports(x: torch.Tensor) -> bool:
    """Whether the kernel computes GCM for ``x``: a float32 CPU tensor, library available."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and library() is not None


def _dense(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors, dense and all in the first one's layout (channels-last kept, else contiguous)."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu":
            raise GradshieldError(f"the GCM kernel takes float32 CPU tensors, got {t.dtype} on "
                                  f"{t.device}; use the torch formula (kernel='torch') for others")
    if library() is None:
        raise GradshieldError(f"the GCM kernel is not available here: {unavailable_reason()}")
    first = tensors[0]
    layout = (torch.channels_last if first.dim() == 4 and not first.is_contiguous()
              and first.is_contiguous(memory_format=torch.channels_last)
              else torch.contiguous_format)
    return tuple(t.contiguous(memory_format=layout) for t in tensors)


def _threads(n: int) -> int:
    return max(1, min(torch.get_num_threads(), n // MIN_ELEMENTS_PER_THREAD))


def forward(x: torch.Tensor, w: float, eps: float) -> torch.Tensor:
    """``x + eps * sin(w * x)`` for a float32 CPU tensor, in x's layout (no autograd)."""
    (x,) = _dense(x)
    out = torch.empty_like(x)
    library().gcm_forward(x.data_ptr(), out.data_ptr(), x.numel(), w, eps,
                          sine_table().data_ptr(), _threads(x.numel()))
    return out


def backward(x: torch.Tensor, grad: torch.Tensor, w: float, eps: float) -> torch.Tensor:
    """``grad + ((grad * eps) * cos(w * x)) * w``: the input gradient of :func:`forward`."""
    x, grad = _dense(x, grad)
    out = torch.empty_like(x)
    library().gcm_backward(x.data_ptr(), grad.data_ptr(), out.data_ptr(), x.numel(), w, eps,
                           sine_table().data_ptr(), _threads(x.numel()))
    return out


def sine(v: torch.Tensor, quarter: int = 0) -> torch.Tensor:
    """``sin(v + quarter * pi/2)`` of a float32 CPU tensor (0: sine, 1: cosine), by the kernel."""
    (v,) = _dense(v)
    out = torch.empty_like(v)
    library().gcm_sine(v.data_ptr(), out.data_ptr(), v.numel(), quarter, sine_table().data_ptr(),
                       _threads(v.numel()))
    return out
