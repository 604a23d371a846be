"""Sparse execution of FFNs: skip the weight reads of the dropped entries, for real speed-ups.

A layer above ``common.core`` (imports only torch and ``common.core``): ``SparseFFNExecution``
swaps GLU MLPs for gather-GEMV versions inside a ``with`` block; ``thresholds`` calibrates the
keep rules to a target sparsity; ``kernels`` holds the gather-GEMV implementations by name.
"""

from common.execution.kernels import GATHER_GEMV, resolve_kernel
from common.execution.sparse_ffn import EXECUTION_SITES, SparseFFNExecution, SparseGLU
from common.execution.thresholds import LayerThresholds, calibrate_thresholds, calibrate_topp_value

__all__ = ["EXECUTION_SITES", "GATHER_GEMV", "LayerThresholds", "SparseFFNExecution", "SparseGLU",
           "calibrate_thresholds", "calibrate_topp_value", "resolve_kernel"]
