"""Trainable heads: blocks and one module per task."""
