"""plugins.resolve / load_from_file: a registry name, or "file.py:name"; every failure one line naming the
setting, the file and the name."""

import pytest

from rlhf_system.plugins import resolve


class Bad(Exception):
    pass


def test_a_registry_name_or_a_files_callable(tmp_path):
    f = tmp_path / "mine.py"
    f.write_text("def fn(x):\n    return x + 1\n")
    assert resolve("known", {"known": len}, "reward", Bad) is len
    assert resolve(f"{f}:fn", {}, "reward", Bad)(1) == 2


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown reward 'nope' (rewards.rules); registered: known"),
    ("{dir}/missing.py:fn", "missing.py not found (for 'fn')"),
    ("{dir}/mine.py:absent", "has no 'absent'"),
    ("{dir}/mine.py:VALUE", "'VALUE' is a int, not callable"),
    ("{dir}/broken.py:fn", "failed to import (for 'fn')"),
    ("{dir}/mine.py:", "no name after ':'"),
])
def test_failures_are_one_line(tmp_path, spec, message):
    (tmp_path / "mine.py").write_text("VALUE = 3\n")
    (tmp_path / "broken.py").write_text("def fn(:\n")
    with pytest.raises(Bad, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(spec.format(dir=tmp_path), {"known": len}, "reward", Bad, "rewards.rules")
