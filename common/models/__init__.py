"""Model resolution: aliases, hub ids and local directories to loaded models (above the core)."""
