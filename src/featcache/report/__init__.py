"""Plots (matplotlib, headless) and markdown tables."""
