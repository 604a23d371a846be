"""The fused CPU kernel of the top-p rule (``topp_cpu.cpp``): per row, the exact threshold, the
zeroing and the kept count in one parallel pass, 2.2-4.5x cheaper than the tensor-wide
radix select plus ``zero_below`` (``benchmarks/bench_topp_paths.py``).

It is compiled on first use with ``torch.utils.cpp_extension`` (a C++ compiler and ``ninja``;
about 30 s once, then loaded from torch's extension cache). A compiler without OpenMP gets a
one-thread build (with a warning); where nothing can be built, a warning says why once and the
rules keep their pure-torch path, which gives the same masks.
``ACTIVATION_SPARSITY_FUSED_TOPP=0`` turns it off (for side-by-side measurements or a broken
toolchain).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from functools import lru_cache
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("topp_cpu.cpp")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SWITCH = "ACTIVATION_SPARSITY_FUSED_TOPP"
NAME = "activation_sparsity_topp_cpu"
OPENMP = ["-fopenmp"]  # at::parallel_for runs the rows on torch's threads only when compiled with OpenMP


def enabled() -> bool:
    """False when ``ACTIVATION_SPARSITY_FUSED_TOPP`` is 0 / off / false / no."""
    return os.environ.get(SWITCH, "1").strip().lower() not in {"0", "off", "false", "no"}


@lru_cache(maxsize=None)
def _build():
    """The compiled extension module, or None (with one warning) where it cannot be built."""
    start = time.perf_counter()
    path = os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # the ninja wheel's binary, when its scripts folder is not on PATH
            try:
                import ninja

                os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
            except ImportError:
                pass
        try:
            module = load(name=NAME, sources=[str(SOURCE)], extra_cflags=["-O3", *OPENMP], extra_ldflags=OPENMP,
                          verbose=False)
        except Exception as error:  # a compiler without OpenMP (Apple's clang): build the one-thread kernel
            module = load(name=f"{NAME}_serial", sources=[str(SOURCE)], extra_cflags=["-O3"], verbose=False)
            warnings.warn(f"the fused top-p CPU kernel was built without OpenMP ({_first_line(error)}), so it runs "
                          f"on one thread per process; it gives the same masks (set {SWITCH}=0 to use the "
                          "multi-threaded pure-torch path instead)", RuntimeWarning, stacklevel=3)
    except Exception as error:  # no compiler, no ninja, a failed build: the torch path still works
        warnings.warn(f"the fused top-p CPU kernel could not be built ({_first_line(error)}); using the pure-torch "
                      f"path, which gives the same masks more slowly (set {SWITCH}=0 to silence this)",
                      RuntimeWarning, stacklevel=3)
        return None
    finally:
        os.environ["PATH"] = path
    elapsed = time.perf_counter() - start
    if elapsed > 5:
        print(f"built the fused top-p CPU kernel in {elapsed:.0f} s (once; torch caches it)", file=sys.stderr)
    return module


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]


def kernel():
    """The extension module when enabled and buildable, else None."""
    return _build() if enabled() else None


def applies(x: torch.Tensor, rule: str, value: float, power: float) -> bool:
    """Whether the fused kernel can apply this rule to ``x``: top-p with 0 < p < 1 and q = 1 on a
    CPU tensor of a supported dtype that needs no gradient."""
    return (rule == "topp" and 0.0 < value < 1.0 and power == 1.0 and x.device.type == "cpu"
            and x.dtype in DTYPES and x.numel() > 0 and not (x.requires_grad and torch.is_grad_enabled()))


def sparsify_rows(rows: torch.Tensor, p: float):
    """(sparse [N, D], kept [N] int32, accepted [N] bool) of the fused kernel, or None when it is
    off or unavailable. Rows not accepted are undefined in both outputs: recompute them."""
    module = kernel()
    if module is None:
        return None
    return module.topp_sparsify_rows(rows, float(p))
