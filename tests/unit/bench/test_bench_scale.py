"""`rlhf bench scale` without a cluster: the sweep file's points, per-kind overrides, the efficiency
arithmetic and the report. The sweep itself runs on a two-node cluster in tests/integration/test_scale.py."""

import pytest
import yaml

from rlhf_system.bench.scale import expand, for_kind, load_sweep, markdown, report, with_efficiency
from rlhf_system.config import ConfigError

SWEEP = {"run_dir": "x", "steps": 1, "sweeps": [
    {"kind": "sft", "config": "configs/sft/tiny-cpu.yaml", "overrides": ["train.micro_batch_size=4"],
     "grid": {"placement.actor": [1, 2], "placement.strategy": ["PACK", "SPREAD"]}},
    {"kind": "ppo", "config": "configs/grpo/tiny-cpu.yaml", "points": [["rollout.num_engines=2"]]}]}


def write(tmp_path, doc) -> str:
    p = tmp_path / "sweep.yaml"
    p.write_text(yaml.safe_dump(doc))
    return str(p)


def test_grid_points_in_order_with_per_kind_overrides(tmp_path):
    path = write(tmp_path, SWEEP)
    points = expand(load_sweep(path), ["model.path=/m", "sft:data.max_len=112", "ppo:data.max_len=144"], path)
    assert [(p.kind, p.label) for p in points] == [
        ("sft", "placement.actor=1 placement.strategy=PACK"), ("sft", "placement.actor=1 placement.strategy=SPREAD"),
        ("sft", "placement.actor=2 placement.strategy=PACK"), ("sft", "placement.actor=2 placement.strategy=SPREAD"),
        ("ppo", "rollout.num_engines=2")]
    assert [p.cfg.placement.actor for p in points[:4]] == [1, 1, 2, 2]
    assert all(p.cfg.model.path == "/m" and p.cfg.placement.launcher == "ray" for p in points)
    assert [p.cfg.data.max_len for p in points] == [112] * 4 + [144]
    assert points[0].cfg.train.micro_batch_size == 4 and points[4].cfg.rollout.num_engines == 2


def test_kind_prefix_only_strips_the_two_kinds():
    assert for_kind(["a=1", "sft:b=2", "ppo:c=3", "data.train=[{path: s3:x}]"], "sft") == \
        ["a=1", "b=2", "data.train=[{path: s3:x}]"]


def test_a_bad_point_is_one_line_naming_file_and_point(tmp_path):
    doc = {**SWEEP, "sweeps": [{**SWEEP["sweeps"][0], "grid": {"placement.actor": [1, 3]}}]}
    path = write(tmp_path, doc)
    with pytest.raises(ConfigError, match=r"sweep.yaml: sweeps\[0\] point placement.actor=3: train.global_batch_size"):
        expand(load_sweep(path), [], path)
    with pytest.raises(ConfigError, match=r"sweep.yaml: sweeps.0.kind: Input should be 'sft' or 'ppo'"):
        load_sweep(write(tmp_path, {"sweeps": [{"kind": "dpo", "config": "c"}]}))


def row(point, kind, workers, tps, **extra):
    return {"point": point, "kind": kind, "label": f"p{point}", "workers": workers, "nodes": 1, "tokens_per_s": tps,
            "step_s": 1.0, "phases": {"train": 1.0}, "peak_memory_mb": {"actor": [100.0] * workers}, "sync": None,
            **extra}


def test_efficiency_is_speedup_over_worker_ratio_against_the_kinds_first_point(tmp_path):
    first = row(0, "sft", 1, 100.0)
    assert with_efficiency(first, first)["efficiency"] == 1.0
    two = with_efficiency(row(1, "sft", 2, 150.0), first)
    assert two["speedup"] == 1.5 and two["efficiency"] == 0.75
    failed = with_efficiency({"point": 2, "kind": "sft", "label": "p2", "workers": 4, "error": "boom"}, first)
    assert "efficiency" not in failed
    rows = [with_efficiency(first, first), two, failed]
    table = markdown(rows)
    assert table.count("\n| ") == 3 and "| 0.75 |" in table and "failed: boom" in table
    report(rows, tmp_path)
    assert {p.name for p in tmp_path.glob("*.png")} == {"throughput.png", "efficiency.png", "memory.png"}
    assert (tmp_path / "scale.md").read_text().count("| sft |") == 3
