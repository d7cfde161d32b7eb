"""Every `rlhf ...` line in the shell blocks of the README and of the docs pages (docs/*.md) is a valid
command: it parses with the CLI's own parser, and each `rlhf train` / `rlhf config` / `rlhf bench` line's
config and overrides pass validation. (What the commands do is exercised by the integration tests that run
them; this keeps the README and the docs from drifting from the CLI.)"""

import re
import shlex
from pathlib import Path

import pytest

from rlhf_system.cli import build_parser
from rlhf_system.config import load_config

REPO = Path(__file__).resolve().parents[2]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def page_commands(page: Path) -> list[str]:
    text = page.read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            line = re.sub(r"^RLHF_REWARD_TOKEN=\S+ ", "", line)
            if line.startswith("rlhf "):
                cmds.append(line)
    return cmds


def readme_commands() -> list[str]:
    return page_commands(REPO / "README.md")


def all_commands() -> list:
    return [pytest.param(line, id=f"{page.relative_to(REPO)}: {line[:60]}")
            for page in PAGES for line in page_commands(page)]


def test_readme_has_commands():
    modes = {shlex.split(c)[1] for c in readme_commands()}
    assert {"train", "eval", "export", "config", "bench"} <= modes, modes


def test_docs_pages_are_scanned():
    """The docs pages hold most of the commands (moved out of the README): they are found and checked."""
    docs = [p for p in PAGES if p.parent.name == "docs"]
    assert len(docs) >= 5, docs
    modes = {shlex.split(c)[1] for p in docs for c in page_commands(p)}
    assert {"train", "eval", "export", "config", "bench", "feedback", "experiment", "serve-reward"} <= modes, modes


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_rlhf_lines_only_in_bash_blocks(page):
    """A command in a fenced block of another language (or none) would escape the check below."""
    text = page.read_text()
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, flags=re.S):
        if lang != "bash":
            bad = [ln for ln in block.splitlines() if ln.strip().startswith("rlhf ")]
            assert not bad, f"{page.name}: `rlhf` lines in a ```{lang} block (use ```bash): {bad}"


@pytest.mark.parametrize("line", all_commands())
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
