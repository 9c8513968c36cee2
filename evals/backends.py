"""The eval backends by name: `--backend hf` / `--backend vllm`.

    backend = make_backend("hf", "./llava-1.5-7b-hf", device="cuda")

Each name maps to the "module:Class" of its backend, imported on first use (as the family
registry in vlm_prune/registry.py does): nothing here imports a backend, so a backend module
imports the interface (backend.py) and nothing imports back -- and vLLM is imported only by a
run that asks for it. A new backend is one module with a `Backend` subclass plus one line here
(or `register_backend` at run time).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .backend import Backend

# name -> "module:Class", imported on first use
BACKENDS: dict[str, str] = {
    "hf": "vlm_prune.evals.hf_backend:HFBackend",
    "vllm": "vlm_prune.evals.vllm_backend:VLLMBackend",
}


def available_backends() -> list[str]:
    return list(BACKENDS)


def register_backend(name: str, target: str) -> None:
    """Adds (or replaces) a backend: `target` is "module:Class"."""
    if target.count(":") != 1:
        raise ValueError(f"backend {name!r}: give its class as 'module:Class', not {target!r}")
    BACKENDS[name] = target


def backend_class(name: str) -> type["Backend"]:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose {' or '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def make_backend(name: str, model_dir: str, **kwargs: Any) -> "Backend":
    return backend_class(name)(model_dir, **kwargs)
