"""Environments by name: the built-ins, those registered with `register`, or "path/to/file.py:name"."""

from __future__ import annotations

from collections.abc import Callable

from rlhf_system.envs.base import EnvError, Environment
from rlhf_system.envs.tool_env import ToolEnv
from rlhf_system.plugins import resolve

REGISTRY: dict[str, Callable[..., Environment]] = {"tools": ToolEnv}


def register(name: str):
    """Class decorator (or function decorator for a factory) adding it to REGISTRY as `name`."""

    def deco(factory):
        if name in REGISTRY and REGISTRY[name] is not factory:
            raise EnvError(f"environment {name!r} is already registered")
        REGISTRY[name] = factory
        return factory

    return deco


def load_env(spec: str) -> Callable[..., Environment]:
    """A registry name, or "path/to/file.py:name" imported from that file. Unknown: EnvError naming both."""
    return resolve(spec, REGISTRY, "environment", EnvError, "rollout.env")
