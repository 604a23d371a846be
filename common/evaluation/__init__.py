"""Evaluation: the lm-eval bridge, the offline task suite, sweep cells and the result store."""
