"""Residual streams in, probe results out."""
