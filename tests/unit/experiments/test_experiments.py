"""The experiments' bookkeeping (experiments/common.py, task_scaling.py): resumable results, the sweep's
recorded sizes, the argument checks and the family order. No model is trained here."""

import json

import pytest

from rlhf_system.config import ConfigError
from rlhf_system.experiments import common, task_scaling
from rlhf_system.experiments.common import Budget, Results
from rlhf_system.tasks import synthetic


def test_a_line_cut_by_a_kill_is_dropped_and_its_point_runs_again(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"k": 1, "seed": 0}) + "\n" + '{"k": 2, "se')  # killed mid-write
    results = Results(path, key=lambda r: (r["k"], r["seed"]))
    assert results.done == {(1, 0)}
    emitted = []
    results.add({"k": 2, "seed": 0}, emitted.append)
    lines = [json.loads(line) for line in path.read_text().splitlines()]  # every line parses again
    assert lines == [{"k": 1, "seed": 0}, {"k": 2, "seed": 0}] and emitted == [json.dumps(lines[1])]
    assert Results(path, key=lambda r: (r["k"], r["seed"])).done == {(1, 0), (2, 0)}


def test_a_folder_keeps_the_sizes_it_was_started_with(tmp_path):
    full = Budget(n_train=4000, epochs=5, n_test=200)
    common.claim(tmp_path, "task-scaling", full)
    common.claim(tmp_path, "task-scaling", full)  # a resume with the same sizes
    with pytest.raises(ConfigError, match="n_train: 4000 -> 320.*another --out"):
        common.claim(tmp_path, "task-scaling", task_scaling.SMOKE)
    with pytest.raises(ConfigError, match="experiment: task-scaling -> instruction-formats"):
        common.claim(tmp_path, "instruction-formats", full)


def test_counts_seeds_and_the_nested_family_order():
    for bad in ([], [0], [5], [1, 1]):
        with pytest.raises(ConfigError, match="--counts"):
            task_scaling.check_counts(bad)
    with pytest.raises(ConfigError, match="--seeds"):
        common.check_seeds([3, 3])
    orders = [task_scaling.family_order(seed) for seed in range(3)]
    assert all(sorted(o) == sorted(synthetic.SEEN_FAMILIES) for o in orders)
    assert orders[0] == task_scaling.family_order(0) and len({tuple(o) for o in orders}) > 1
    assert common.mean_std([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5)) and common.cell([0.5]) == "0.500"
