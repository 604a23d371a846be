"""The fused CPU sparse GEMV (``sparse_gemv_cpu.cpp``): per token, compare the input with the
layer's threshold and stream only the kept rows of an input-major weight, in one pass.

Two entry points, both returning ``(out, kept entries, non-finite token indices)``:

* ``sparse_gemv(x [T, I], rows [I, O], threshold, mask=None, bias=None)``;
* ``bundled_glu(x [T, H], gate [T, I], bundle [I, 2H], threshold, mask=None, up_bias, down_bias)``:
  the CATS intermediate, one contiguous bundle row per kept neuron.

Tokens whose input holds a NaN or an infinity are not sparsified: their output rows are left for
the caller, which computes them densely.

It is built on first use with ``common.core.extension.build_extension`` for the machine that runs
it (on x86-64 ``-march=native``: AVX-512 and AVX512-BF16 where the CPU has them; portable loops
elsewhere), under a name carrying a short hash of the CPU's flags, so a shared torch extension
cache never loads a build made for another CPU. ``ACTIVATION_SPARSITY_SPARSE_GEMV=0`` turns it off;
then, and where nothing builds, the products use the pure-torch gather (``common.execution.kernels``),
which gives the same outputs up to float summation order.
"""

from __future__ import annotations

import hashlib
import platform
from functools import lru_cache
from pathlib import Path

import torch

from common.core.extension import build_extension, switched_on

SOURCE = Path(__file__).with_name("sparse_gemv_cpu.cpp")
DTYPES = (torch.float32, torch.bfloat16)
SWITCH = "ACTIVATION_SPARSITY_SPARSE_GEMV"
NAME = "activation_sparsity_sparse_gemv"


def cpu_signature() -> str:
    """The CPU's model and instruction-set flags (``/proc/cpuinfo``; the platform's names elsewhere)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    fields = {}
    for line in lines:
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = fields.get("flags") or fields.get("Features") or ""
    model = fields.get("model name") or fields.get("CPU part") or platform.processor()
    return f"{platform.machine()}|{model}|{flags}"


def extension_name() -> str:
    """The extension's name with a short hash of the CPU: a build is only loaded on its own CPU."""
    return f"{NAME}_{hashlib.sha256(cpu_signature().encode()).hexdigest()[:10]}"


def enabled() -> bool:
    """False when ``ACTIVATION_SPARSITY_SPARSE_GEMV`` is 0 / off / false / no."""
    return switched_on(SWITCH)


@lru_cache(maxsize=None)
def _build():
    """The compiled extension module, or None (with one warning) where it cannot be built."""
    flags = ["-O3"]
    if platform.machine().lower() in {"x86_64", "amd64"}:  # elsewhere the portable loops (compiler-vectorized)
        flags += ["-march=native", "-mprefer-vector-width=512"]
    return build_extension(extension_name(), SOURCE, "sparse GEMV CPU kernel", SWITCH, tuple(flags))


def kernel():
    """The extension module when enabled and buildable, else None."""
    return _build() if enabled() else None


def applies(x: torch.Tensor, weights: torch.Tensor) -> bool:
    """Whether the fused kernel can take this product: CPU tensors of one supported dtype, no gradient."""
    return (x.is_cpu and weights.is_cpu and x.dtype == weights.dtype and x.dtype in DTYPES
            and not (x.requires_grad and torch.is_grad_enabled()))


def instruction_set() -> str | None:
    """The vector instructions of the loaded build (``avx512-bf16``, ``avx512``, ``portable``), or None."""
    module = kernel()
    return None if module is None else module.instruction_set()
