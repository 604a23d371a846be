"""The masking and hooking core: rules, criteria (scores and selections) and their calibration math,
FFN site table, hooks, recorder, statistics.

Imports only torch and itself (enforced by the import-linter contracts in setup.cfg), so every
layer above it and every specialized package can build on it.
"""
