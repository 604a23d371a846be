"""Sparse execution: skip the weight reads of the dropped entries, for real decode speed-ups.

A layer above ``common.core`` (imports only torch and ``common.core``): ``SparseFFNExecution``
swaps GLU MLPs for sparse versions inside a ``with`` block (sites input, intermediate, gate);
``SparseLinearExecution`` sparsifies the inputs of every decoder linear layer (q/k/v, o,
gate/up, down), TEAL style; ``thresholds`` calibrates the keep rules to a target sparsity;
``products`` holds the sparse products (fused input-major layouts, the CATS bundle) and picks
their path: the fused CPU kernel of ``sparse_gemv`` or the pure-torch gathers of ``kernels``.
"""

from common.execution.groups import ALL_LINEAR, LINEAR_GROUPS
from common.execution.kernels import GATHER_GEMV, resolve_kernel
from common.execution.products import GateBundle, SparseProduct
from common.execution.sparse_ffn import EXECUTION_SITES, SparseFFNExecution, SparseGLU
from common.execution.sparse_linear import SparseLinearExecution
from common.execution.thresholds import LayerThresholds, calibrate_thresholds, calibrate_topp_value

__all__ = ["ALL_LINEAR", "EXECUTION_SITES", "GATHER_GEMV", "LINEAR_GROUPS", "GateBundle", "LayerThresholds",
           "SparseFFNExecution", "SparseGLU", "SparseLinearExecution", "SparseProduct", "calibrate_thresholds",
           "calibrate_topp_value", "resolve_kernel"]
