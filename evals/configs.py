"""Pruning configurations: what one column of the comparison is.

    parse_config("none")                         -> Config("none", 1.0, {})      the baseline
    parse_config("cls_attention:64")             -> Config("cls_attention", 64, {})
    parse_config("pool:0.25:mode=subsample")     -> Config("pool", 0.25, {"mode": "subsample"})
    parse_config("fastv:64:layer=2,query=last")  -> options are name=value, comma separated,
                                                    values JSON when they parse ("[-3,-2]", "1")
    parse_config("visionzip:192+transition:64:alpha=0.5")
                                                 -> a pipeline (vlm_prune.pipeline_config): the
                                                    string is the method, each stage its keep

`Config.name` names its output folder: "none", "cls_attention-64", "pool-0.25-mode=subsample".
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from vlm_prune.cli_args import parse_options as parse_pairs
from vlm_prune.registry import available_methods


@dataclass(frozen=True)
class Config:
    method: str
    keep: int | float | None = 1.0  # None: a pipeline, whose string holds each stage's keep
    options: dict = field(default_factory=dict, hash=False)

    @property
    def name(self) -> str:
        if self.method == "none":
            return "none"
        if self.keep is None:  # a pipeline: its string says it all
            return re.sub(r"[^A-Za-z0-9_.,=\-\[\]]", "_", self.method)
        opts = "".join(f"-{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}" for k, v in sorted(self.options.items()))
        return re.sub(r"[^A-Za-z0-9_.,=\-\[\]]", "_", f"{self.method}-{self.keep}{opts}")

    def to_dict(self) -> dict:
        return {"method": self.method, "keep": self.keep, "options": dict(self.options)}


def parse_keep(text: str) -> int | float:
    """"64" -> 64 tokens per image; "0.25" -> a fraction (a dot or exponent makes it a float)."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise ValueError(f"keep {text!r}: an int (tokens per image) or a float in (0, 1] (fraction)") from None


def parse_options(text: str) -> dict:
    """"layers=[-3,-2],seed=1" -> {"layers": [-3, -2], "seed": 1} (commas inside [...] stay)."""
    return parse_pairs(list(filter(None, re.split(r",(?![^\[]*\])", text) if text else [])))


def make_config(method: str, keep: int | float, options: dict | None = None) -> Config:
    if method != "none" and method not in available_methods():
        raise ValueError(f"unknown method {method!r}; choose none or one of {', '.join(available_methods())}")
    return Config(method, 1.0 if method == "none" else keep, dict(options or {}))


def parse_config(spec: str) -> Config:
    """"method[:keep[:name=value,...]]", or stages of those joined by '+' (see the module docstring)."""
    if "+" in spec:
        from vlm_prune.pipeline_config import pipeline_config

        pipeline_config(spec)  # a bad pipeline fails here, naming what is wrong
        return Config(spec, None, {})
    method, _, rest = spec.partition(":")
    keep_text, _, opts = rest.partition(":")
    if method != "none" and not keep_text:
        raise ValueError(f"--compare {spec!r}: give method:keep (e.g. cls_attention:64)")
    return make_config(method, parse_keep(keep_text) if keep_text else 1.0, parse_options(opts))
