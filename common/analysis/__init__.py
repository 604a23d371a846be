"""Analysis: critical sparsity, the tables and figures of a sweep (reads the result store)."""
