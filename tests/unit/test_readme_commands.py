"""Every `rlhf ...` line in the README's shell blocks is a valid command: it parses with the CLI's own
parser, and each `rlhf train` / `rlhf config` line's config and overrides pass validation. (What the
commands do is exercised by the integration tests that run them; this keeps the README from drifting
from the CLI.)"""

import re
import shlex
from pathlib import Path

import pytest

from rlhf_system.cli import build_parser
from rlhf_system.config import load_config

REPO = Path(__file__).resolve().parents[2]


def readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            line = re.sub(r"^RLHF_REWARD_TOKEN=\S+ ", "", line)
            if line.startswith("rlhf "):
                cmds.append(line)
    return cmds


def test_readme_has_commands():
    modes = {shlex.split(c)[1] for c in readme_commands()}
    assert {"train", "eval", "export", "config", "bench"} <= modes, modes


@pytest.mark.parametrize("line", readme_commands())
def test_readme_command_parses_and_validates(line):
    argv = shlex.split(line)[1:]
    if argv[0] == "serve-reward":  # its own parser
        from rlhf_system.rewards.server import build_parser as serve_parser

        serve_parser().parse_args(argv[1:])
        return
    args, extra = build_parser().parse_known_args(argv)
    assert not [e for e in extra if e.startswith("-")], extra
    if argv[0] == "bench" and args.what == "scale":  # a sweep file: every point validates
        from rlhf_system.bench.scale import expand, load_sweep

        assert expand(load_sweep(args.config), list(args.overrides) + extra, args.config)
        return
    if argv[0] in ("train", "config", "bench"):
        mode = args.what if argv[0] == "bench" else getattr(args, "mode", None)
        load_config(args.config, list(args.overrides) + extra, mode=mode)
