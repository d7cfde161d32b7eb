"""The text side of configs, apart from the config tree (config.py): the error type, YAML files with
duplicate keys refused, `key=value` overrides, and `rlhf config --describe`'s listing."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from rlhf_system.errors import UserError


class ConfigError(UserError):
    """A config problem, phrased for a user: field, value and fix."""


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=2e-5` -> (["optim", "lr"], 2e-05). Values are parsed as YAML scalars/lists."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not key.strip() or any(not p or not p.replace("_", "").isalnum() for p in parts):
        raise ConfigError(
            f"bad override '{text}': expected dotted.key=value, e.g. optim.lr=2e-5 or data.max_len=512")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"bad override '{text}': value is not valid YAML ({e.problem})") from None
    return parts, parsed


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' given twice (first on line {seen[key] + 1}); keep one",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def describe(cfg: BaseModel, prefix: str = "") -> list[str]:
    """`rlhf config --describe [PREFIX]`: one line per setting under `prefix`, "key = value  # what it
    does", from the fields' descriptions."""

    def walk(section: BaseModel, path: str):
        for name, f in type(section).model_fields.items():
            value, key = getattr(section, name), f"{path}{name}"
            if isinstance(value, BaseModel):
                yield from walk(value, key + ".")
            elif key.startswith(prefix):
                shown = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
                if isinstance(shown, list):
                    shown = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in shown]
                yield f"{key} = {shown!r}  # {f.description}"

    lines = list(walk(cfg, ""))
    if not lines:
        raise ConfigError(f"--describe {prefix}: no setting starts with it. Fix: a section such as algorithm, "
                          "rollout or data.keys")
    return lines
