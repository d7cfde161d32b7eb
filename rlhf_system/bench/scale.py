"""`rlhf bench scale`: a sweep of placements (SFT and PPO steps), one JSON line per point, then a report.

    rlhf bench scale --config configs/bench/scale-cpu.yaml --steps 2 --out runs/bench/scale [k=v ...]

The sweep file names, per kind, a base run config and the points: a grid of dotted settings (their
product, in order) or explicit override lists. `k=v` overrides on the command line apply to every point
(model paths, usually), and `sft:k=v` / `ppo:k=v` to one kind's points (data paths). Every point's config is validated, and checked against the Ray
cluster's resources, before the first one starts. Each point then runs the same code as `rlhf bench sft`
(one variant) or `rlhf bench ppo` (without the Hugging Face comparison): a warm-up step, then --steps
timed steps, in fresh worker groups.

Per point, one JSON line (stdout, and run_dir/scale.jsonl as it completes): tokens/s (SFT: real input
tokens; PPO: prompt + sampled tokens of the step), seconds per step and per phase, each rank's peak
memory by role, the nodes the ranks ran on, weight-sync seconds and bytes (PPO), and the scaling
efficiency against the first point of the same kind: (tokens/s / first tokens/s) / (workers / first
workers), where workers counts every process slot the point takes (SFT: actor ranks; PPO: the ranks of
every role plus engines x tensor_parallel_size). Then scale.md (a table) and throughput.png,
efficiency.png and memory.png in the run folder. A point that fails is a line with its error; the sweep
goes on, and the command exits 1. A benchmark, not a test: nothing asserts a speed.
"""

from __future__ import annotations

import itertools
import json
import traceback
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlhf_system.config import ConfigError, RunConfig, load_config, load_yaml
from rlhf_system.config_checks import role_slots, roles_for


class Sweep(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["sft", "ppo"]
    config: str = Field(description="The base run config of this kind's points (its mode must match).")
    overrides: list[str] = Field(default_factory=list, description="Applied to each of this sweep's points first.")
    grid: dict[str, list] = Field(default_factory=dict, description="Dotted setting -> values: every combination.")
    points: list[list[str]] = Field(default_factory=list, description="Explicit override lists, after the grid's.")


class ScaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    run_dir: str = "runs/bench/scale"
    steps: int = Field(2, ge=1)
    sweeps: list[Sweep] = Field(min_length=1)


class Point(BaseModel):
    index: int
    kind: str
    label: str                 # the point's own overrides, joined: what varies
    cfg: RunConfig


def load_sweep(path: str) -> ScaleConfig:
    raw = load_yaml(path)
    try:
        return ScaleConfig(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"{path}: {'.'.join(str(x) for x in err['loc'])}: {err['msg']}") from None


def _value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def for_kind(overrides: list[str], kind: str) -> list[str]:
    """The command line's overrides for one kind: `k=v` goes to every point, `sft:k=v` / `ppo:k=v` to
    that kind's only (the kinds read different data: data.train differs)."""
    out = []
    for o in overrides:
        prefix, sep, rest = o.partition(":")
        if sep and prefix in ("sft", "ppo") and "=" not in prefix:
            if prefix == kind:
                out.append(rest)
        else:
            out.append(o)
    return out


def expand(scale: ScaleConfig, overrides: list[str], source: str) -> list[Point]:
    """Every point's validated run config, in sweep order; the first bad one is a ConfigError naming it."""
    points: list[Point] = []
    for s, sweep in enumerate(scale.sweeps):
        keys = list(sweep.grid)
        combos = [[f"{k}={_value(v)}" for k, v in zip(keys, values)]
                  for values in itertools.product(*(sweep.grid[k] for k in keys))] if keys else []
        for point in combos + sweep.points:
            try:
                cfg = load_config(sweep.config, [*sweep.overrides, *for_kind(overrides, sweep.kind), *point],
                                  mode=sweep.kind)
            except ConfigError as e:
                raise ConfigError(f"{source}: sweeps[{s}] point {' '.join(point) or '(base)'}: {e}") from None
            cfg.placement.launcher = "ray"
            points.append(Point(index=len(points), kind=sweep.kind, label=" ".join(point) or "(base)", cfg=cfg))
    return points


def workers(cfg: RunConfig) -> int:
    """Process slots a point takes: the trained role's ranks (SFT), or every role's (PPO, engines x TP)."""
    return sum(role_slots(cfg, r) for r in roles_for(cfg))


def preflight(points: list[Point]) -> None:
    """Each point against the cluster, before any starts: a ConfigError naming the point and the role."""
    import ray

    from rlhf_system.placement.engines import check_cluster, engine_plans
    from rlhf_system.placement.group import bundles_for, check_resources

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    for p in points:
        try:
            for role in roles_for(p.cfg):
                if role == "rollout":
                    check_cluster(engine_plans(p.cfg), nodes)
                else:
                    check_resources(role, bundles_for(p.cfg.placement, role_slots(p.cfg, role)), p.cfg.placement.strategy)
        except ConfigError as e:
            raise ConfigError(f"point {p.index} ({p.kind}: {p.label}): {e}") from None


def measure(p: Point, steps: int) -> dict:
    """Run one point; its figures in the shape every kind shares."""
    from rlhf_system.bench import ppo as bench_ppo
    from rlhf_system.bench import sft as bench_sft

    if p.kind == "sft":
        r = bench_sft.bench_variant(p.cfg, steps)
        return {"tokens_per_s": r["tokens_per_s"], "step_s": r["step_s"], "phases": {"train": r["step_s"]},
                "peak_memory_mb": {"actor": r["peak_memory_mb_by_rank"]}, "nodes": len(set(r["nodes"])),
                "sync": None}
    r = bench_ppo.run(p.cfg, steps, compare_hf=False)
    ranks = r["ranks"]
    return {"tokens_per_s": r["tokens_per_s"], "step_s": r["step_s"],
            "phases": {k: v["seconds"] for k, v in r["phases"].items()},
            "peak_memory_mb": {role: v["peak_memory_mb"] for role, v in ranks.items() if "peak_memory_mb" in v},
            "nodes": len({n for v in ranks.values() for n in v["nodes"]}),
            "sync": {"seconds": r["weight_sync"]["seconds"], "bytes": r["weight_sync"]["bytes"]}}


def with_efficiency(row: dict, first: dict | None) -> dict:
    """Scaling efficiency against the first successful point of the same kind (1.0 for that point)."""
    if "error" in row or first is None:
        return row
    speedup = row["tokens_per_s"] / first["tokens_per_s"]
    return {**row, "speedup": round(speedup, 3),
            "efficiency": round(speedup / (row["workers"] / first["workers"]), 3)}


def run(path: str, overrides: list[str], steps: int | None, run_dir: str | None, emit=print) -> list[dict]:
    """The sweep; `emit` gets each point's JSON line as it completes. Returns the rows."""
    from rlhf_system.placement.group import ensure_ray

    scale = load_sweep(path)
    steps = steps or scale.steps
    out = Path(run_dir or scale.run_dir)
    points = expand(scale, overrides, path)  # every config error before anything starts
    ensure_ray(int(max(workers(p.cfg) * p.cfg.placement.cpus_per_worker for p in points)))
    preflight(points)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    firsts: dict[str, dict] = {}
    with open(out / "scale.jsonl", "w") as log:
        for p in points:
            base = {"point": p.index, "kind": p.kind, "label": p.label, "workers": workers(p.cfg), "steps": steps}
            try:
                row = {**base, **measure(p, steps)}
                firsts.setdefault(p.kind, row)
            except Exception as e:  # a failed point is reported; the others still run
                row = {**base, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
                traceback.print_exc()
            row = with_efficiency(row, firsts.get(p.kind))
            rows.append(row)
            line = json.dumps(row)
            log.write(line + "\n")
            log.flush()
            emit(line)
    report(rows, out)
    return rows


# ------------------------------------------------------------------------------------------ report
def markdown(rows: list[dict]) -> str:
    head = ("| # | kind | point | workers | nodes | tokens/s | s/step | speedup | efficiency | peak MB per rank "
            "(max) | phases (s) | sync s / MB |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['point']} | {r['kind']} | {r['label']} | {r['workers']} | | failed: {r['error']} "
                         "| | | | | | |")
            continue
        peak = max(m for ranks in r["peak_memory_mb"].values() for m in ranks)
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phases"].items())
        sync = f"{r['sync']['seconds']:.3f} / {r['sync']['bytes'] / 2**20:.1f}" if r["sync"] else ""
        lines.append(f"| {r['point']} | {r['kind']} | {r['label']} | {r['workers']} | {r['nodes']} | "
                     f"{r['tokens_per_s']:.1f} | {r['step_s']:.3f} | {r['speedup']:.2f} | {r['efficiency']:.2f} | "
                     f"{peak:.0f} | {phases} | {sync} |")
    return head + "\n".join(lines) + "\n"


def report(rows: list[dict], out: Path) -> None:
    """scale.md, and throughput / efficiency against workers and memory per rank as PNGs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out / "scale.md").write_text("# rlhf bench scale\n\n" + markdown(rows))
    ok = [r for r in rows if "error" not in r]
    for key, name, ylabel in (("tokens_per_s", "throughput", "tokens/s"), ("efficiency", "efficiency",
                                                                           "scaling efficiency")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for kind in dict.fromkeys(r["kind"] for r in ok):
            pts = [r for r in ok if r["kind"] == kind]
            ax.plot([r["workers"] for r in pts], [r[key] for r in pts], "o-", label=kind)
            for r in pts:
                ax.annotate(str(r["point"]), (r["workers"], r[key]), fontsize=7)
        ax.set_xlabel("workers (process slots)")
        ax.set_ylabel(ylabel)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / f"{name}.png", dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(max(6, len(ok) * 0.9), 4))
    roles = sorted({role for r in ok for role in r["peak_memory_mb"]})
    labelled: set[str] = set()
    for i, r in enumerate(ok):  # one bar per rank, coloured by role
        ranks = [(role, m) for role, ms in r["peak_memory_mb"].items() for m in ms]
        width = 0.8 / max(1, len(ranks))
        for j, (role, m) in enumerate(ranks):
            ax.bar(i - 0.4 + (j + 0.5) * width, m, width, color=f"C{roles.index(role)}",
                   label=None if role in labelled else role)
            labelled.add(role)
    ax.set_xticks(range(len(ok)), [f"{r['point']}: {r['kind']}" for r in ok], rotation=30, fontsize=7)
    ax.set_ylabel("peak memory per rank (MB)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "memory.png", dpi=100)
    plt.close(fig)
