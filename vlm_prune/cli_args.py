"""Command-line values shared by `vlm-prune`'s commands and the eval harness (`vlm_prune.evals`),
in a module that imports neither, so that neither imports the other to read them."""

from __future__ import annotations

import argparse
import json
from typing import Any


def parse_keep(text: str) -> int | float:
    """"64" -> 64 tokens per image; "0.25" -> a quarter of them (a dot makes it a fraction)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--keep {text!r} must be an int (tokens per image) or a float in (0, 1] (fraction)"
        ) from None


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """["layers=[-3,-2]", "seed=1", "mode=avg"] -> {"layers": [-3, -2], "seed": 1, "mode": "avg"}
    (values parsed as JSON where they are JSON, else kept as text)."""
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise ValueError(f"option {pair!r} must look like name=value")
        name, value = pair.split("=", 1)
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return options
