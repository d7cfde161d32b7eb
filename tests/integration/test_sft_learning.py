"""Learning is real: `rlhf train sft` with the shipped tiny config lowers held-out loss and lifts held-out
exact-match accuracy (greedy generation, rule-based verifiers) clearly above the untrained model."""

import json

import pytest

from rlhf_system.eval.generation import evaluate_model, load_prompts

pytestmark = pytest.mark.integration


def test_sft_learns_the_synthetic_tasks(sft_run, kit_model, synthetic_dir):
    run = sft_run  # conftest: rlhf train sft --config configs/sft/tiny-cpu.yaml on the kit model
    result = json.loads((run / "result.json").read_text())
    before, after = result["initial"]["eval_loss"], result["final"]["eval_loss"]
    assert after < 0.5 * before, (before, after)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[-1]["step"] == result["steps"] > 50 and "loss" in rows[1]

    prompts = load_prompts(synthetic_dir / "rl_test_seen.jsonl", limit=200)
    base, _ = evaluate_model(kit_model["policy"], prompts)
    tuned, _ = evaluate_model(run / "hf", prompts)
    print(json.dumps({"eval_loss": [before, after], "exact": [base["all"]["exact"], tuned["all"]["exact"]],
                      "by_family": tuned}))
    assert tuned["all"]["exact"] >= base["all"]["exact"] + 0.15
    assert tuned["safety"]["exact"] > 0.5  # refuses flagged requests and answers safe ones
