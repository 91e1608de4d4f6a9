"""Experiments that combine models and probes, their results tables and figures, and the CLI."""
