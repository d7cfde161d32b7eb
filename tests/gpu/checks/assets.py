"""Build what the checks share under WORK, with the CLI users run: `rlhf make-tiny-model WORK/tiny` (the
kit's ~3.5M-parameter Llama policy, its reward twin and tokenizer) and `rlhf make-data WORK/data`.
Local only: no model hub. In CPU mode (plumbing runs) the model is smaller, so that 20 steps take seconds.

    python -m tests.gpu.checks.assets WORK
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.gpu.checks.common import ASSETS_SKIPPED, ON_CPU, Skip, skip_missing_packages


def build(work: Path) -> None:
    from rlhf_system import cli

    small = ["--hidden-size", "128", "--layers", "2", "--intermediate-size", "256"] if ON_CPU else []
    for args in (["make-tiny-model", str(work / "tiny"), *small],
                 ["make-data", str(work / "data"), "--n-train", "2000", "--n-test", "64"]):
        rc = cli.main(args)
        if rc:
            raise SystemExit(f"rlhf {' '.join(args)} exited {rc}")


if __name__ == "__main__":
    work = Path(sys.argv[1])
    (work / ASSETS_SKIPPED).unlink(missing_ok=True)
    try:
        skip_missing_packages(build, work)
    except Skip as s:  # every check then skips with this reason
        (work / ASSETS_SKIPPED).write_text(f"{s} (the tiny model and data need it)\n")
