"""Markdown tables for reports (a few lines, so no dependency for them)."""

from __future__ import annotations

import math

import pandas as pd


def fmt(value, spec: str = ".3f") -> str:
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else format(value, spec)
    return str(value)


def markdown_table(df: pd.DataFrame, spec: str = ".3f") -> str:
    header = "| " + " | ".join(map(str, df.columns)) + " |"
    lines = [header, "|" + "---|" * len(df.columns)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(fmt(v, spec) for v in row) + " |")
    return "\n".join(lines) + "\n"
