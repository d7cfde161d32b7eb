"""User code named in a config: a registry name, or "path/to/file.py:name" imported from that file.

Reward rules (rewards/registry.py) and environments (envs/registry.py) both accept such a spec; this is
the one resolver, so both fail the same way, naming the setting, the file and the name, before any
worker starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path


def load_from_file(spec: str, what: str, error: type[Exception]):
    """The object `name` of "path/to/file.py:name"; `what` ("reward", "environment") words the errors,
    raised as `error`."""
    file_part, _, name = spec.rpartition(":")
    path = Path(file_part).expanduser()
    if not name:
        raise error(f"{what} spec {spec!r}: no name after ':'")
    if not path.is_file():
        raise error(f"{what} file {path} not found (for {name!r})")
    # A module name derived from the resolved path: two files with one stem do not collide.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    mod_spec = importlib.util.spec_from_file_location(f"rlhf_user_{what}_{path.stem}_{digest}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise error(f"{what} file {path} cannot be imported as Python (for {name!r})")
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:
        raise error(f"{what} file {path} failed to import (for {name!r}): {e!r}") from e
    if not hasattr(module, name):
        raise error(f"{what} file {path} has no {name!r}")
    obj = getattr(module, name)
    if not callable(obj):
        raise error(f"{what} file {path}: {name!r} is a {type(obj).__name__}, not callable")
    return obj


def resolve(spec: str, registry: dict, what: str, error: type[Exception], setting: str = ""):
    """registry[spec], else the object a "file.py:name" spec names; unknown: `error` listing the registry."""
    if not isinstance(spec, str) or not spec.strip():
        raise error(f"{what} spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in registry:
        return registry[spec]
    if ":" in spec:
        return load_from_file(spec, what.split()[0], error)
    where = f" ({setting})" if setting else ""
    raise error(f"unknown {what} {spec!r}{where}; registered: {', '.join(sorted(registry))} "
                "(or use 'path/to/file.py:name')")
