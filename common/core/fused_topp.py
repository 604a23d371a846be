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

from functools import lru_cache
from pathlib import Path

import torch

from common.core.extension import build_extension, switched_on

SOURCE = Path(__file__).with_name("topp_cpu.cpp")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SWITCH = "ACTIVATION_SPARSITY_FUSED_TOPP"
NAME = "activation_sparsity_topp_cpu"


def enabled() -> bool:
    """False when ``ACTIVATION_SPARSITY_FUSED_TOPP`` is 0 / off / false / no."""
    return switched_on(SWITCH)


@lru_cache(maxsize=None)
def _build():
    """The compiled extension module, or None (with one warning) where it cannot be built."""
    return build_extension(NAME, SOURCE, "fused top-p CPU kernel", SWITCH)


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
