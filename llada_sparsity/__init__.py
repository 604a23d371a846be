"""LLaDA: checkpoint loading, denoising loop, per-step masks and Jaccard, Monte Carlo likelihood."""
