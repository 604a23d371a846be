"""Plug-in (entry point ``activation_sparsity.plugins``): registers the ``llada-sparse`` lm-eval model."""

from . import lm_eval_llada  # noqa: F401  (its @register_model runs on import)
