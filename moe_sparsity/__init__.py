"""Per-expert sparsity of fused-experts MoE models (Qwen3-MoE, OLMoE)."""
