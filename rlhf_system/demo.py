"""The main job (`rlhf demo`, `bash launch/demo.sh`): the whole adaptation pipeline on the embedded
synthetic tasks and a tiny model, on CPU.

    1. data        synthetic instruction / preference / RL prompt sets (tasks/synthetic.py); 30% of the SFT
                   demonstrations are flawed on purpose, as human demonstrations are (`demo_flaws`)
    2. model       a tokenizer trained on that corpus and a ~3.5M-parameter Llama (models/tiny.py)
    3. sft         instruction tuning            rlhf train sft --config configs/sft/tiny-cpu.yaml
    4. rm          reward model on the pairs     rlhf train rm  --config configs/rm/tiny-cpu.yaml
    5. ppo         PPO against the reward model plus the rule verifiers
                                                 rlhf train ppo --config configs/ppo/tiny-cpu.yaml
       feedback    (--with-feedback) simulated annotators judge pairs of SFT samples in the feedback app
                   (rlhf feedback ...); a reward model trained on the export is reported beside stage 4's
    6. eval        base, SFT and RLHF on held-out prompts (seen families, the composed unseen families and
                   the unseen `sort` control): the alignment table (eval/alignment.py) -> report.md,
                   eval.json; the report also shows the task-scaling experiment's shipped figures
                   (docs/figures/, made by `rlhf experiment task-scaling`, too long for the demo)

Each training stage is the same `rlhf train` command a user runs, in its own process (Ray, DeepSpeed and
vLLM start and stop cleanly), with the shipped config and overrides that point it at this run's folder.
Every stage has a deadline. `--smoke` shrinks every stage (CI: under 3 minutes) and checks that each
produced its outputs; the full demo takes about 6 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sizes:
    n_train: int
    n_test: int
    sft: tuple[str, ...]
    rm: tuple[str, ...]
    ppo: tuple[str, ...]
    eval_limit: int
    stage_timeout_s: int
    feedback_prompts: int  # --with-feedback: SFT prompts sampled twice for the simulated annotators


FULL = Sizes(4000, 400, sft=("train.epochs=5",), rm=("train.epochs=2",),
             ppo=(), eval_limit=400, stage_timeout_s=1800, feedback_prompts=2000)
SMOKE = Sizes(200, 40, sft=("train.epochs=1", "train.eval_every=0"), rm=("train.epochs=1",),
              ppo=("train.max_steps=2", "train.eval_every=0", "train.rollout_batch_size=8",
                   "train.global_batch_size=16", "train.micro_batch_size=8", "train.max_eval_samples=16",
                   "rollout.max_new_tokens=16"),
              eval_limit=20, stage_timeout_s=600, feedback_prompts=48)
FEEDBACK_NOISE = 0.1
FEEDBACK_ANNOTATORS = [f"sim{i}" for i in range(5)]
DEMO_FLAWS = 0.3
STAGES = ("data", "model", "sft", "rm", "ppo", "eval")
EXPECTED_MIN = {"data": 0.1, "model": 0.1, "sft": 1.6, "rm": 1.6, "ppo": 2.8, "eval": 0.3}  # measured 2026-12-02, 2 cores


def header(i: int, name: str, what: str, smoke: bool, t0: float) -> None:
    expect = "" if smoke else f", about {EXPECTED_MIN[name]:g} min"
    done = sum(EXPECTED_MIN[s] for s in STAGES[:i - 1])
    bar = "#" * (i - 1) + "." * (len(STAGES) - i + 1)
    print(f"\n=== [{bar}] stage {i}/{len(STAGES)}: {name} — {what}{expect} "
          f"(elapsed {time.perf_counter() - t0:.0f}s"
          + ("" if smoke else f", pipeline ETA ~{sum(EXPECTED_MIN.values()) - done:.0f} min") + ") ===",
          flush=True)


def rlhf(args: list[str], timeout_s: int) -> None:
    """`rlhf ...` in a child process; its progress bar goes to this terminal. A failure stops the demo
    with the stage's command; outputs already written stay."""
    cmd = [sys.executable, "-m", "rlhf_system.cli", *args]
    try:
        out = subprocess.run(cmd, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"demo: `rlhf {' '.join(args[:4])} ...` passed its {timeout_s}s deadline") from None
    if out.returncode != 0:
        raise SystemExit(f"demo: `rlhf {' '.join(args)}` failed with exit status {out.returncode}")


def data_overrides(d: Path, train: str, eval_: list[str]) -> list[str]:
    evals = ", ".join(f"{{path: {d / e}}}" for e in eval_)
    return [f"data.train=[{{path: {d / train}}}]", f"data.eval=[{evals}]"]


def run(out: str | Path = "runs/demo", smoke: bool = False, extra: dict[str, list[str]] | None = None,
        with_feedback: bool = False) -> dict:
    """Run the pipeline into `out`; returns the evaluation report. `extra`: more overrides per stage.
    `with_feedback`: after the reward model, collect simulated feedback on SFT samples and train a second
    reward model on it (feedback_stage)."""
    from rlhf_system.models.tiny import TinySpec, make_tiny_model
    from rlhf_system.tasks.files import write_dataset

    sizes, extra, t0 = (SMOKE if smoke else FULL), extra or {}, time.perf_counter()
    out = Path(out).resolve()
    d, tiny = out / "data", out / "tiny"
    runs = {s: out / s for s in ("sft", "rm", "ppo")}
    quiet = ["logging.console=false"] if smoke else []
    evals = ["rl_test_seen.jsonl", "rl_test_unseen_phrasing.jsonl", "rl_test_unseen_family.jsonl"]

    header(1, "data", f"synthetic tasks, {DEMO_FLAWS:.0%} flawed demonstrations -> {d}", smoke, t0)
    write_dataset(d, seed=0, n_train=sizes.n_train, n_test=sizes.n_test, demo_flaws=DEMO_FLAWS)

    header(2, "model", f"tokenizer + tiny Llama policy -> {tiny}", smoke, t0)
    spec = TinySpec(hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=2, intermediate_size=256) if smoke else None
    make_tiny_model(tiny, spec, seed=0)

    header(3, "sft", "instruction tuning under DeepSpeed (assistant-only loss, packed)", smoke, t0)
    rlhf(["train", "sft", "--config", "configs/sft/tiny-cpu.yaml", f"model.path={tiny / 'policy'}",
          f"run_dir={runs['sft']}", *data_overrides(d, "sft_train.jsonl", ["sft_test_seen.jsonl"]),
          *sizes.sft, *quiet, *extra.get("sft", [])], sizes.stage_timeout_s)

    header(4, "rm", "reward model (Bradley-Terry, value head on the SFT model)", smoke, t0)
    rlhf(["train", "rm", "--config", "configs/rm/tiny-cpu.yaml", f"model.path={runs['sft'] / 'hf'}",
          f"run_dir={runs['rm']}", *data_overrides(d, "pref_train.jsonl", ["pref_test.jsonl"]),
          *sizes.rm, *quiet, *extra.get("rm", [])], sizes.stage_timeout_s)
    if with_feedback:
        feedback_stage(out, d, runs, sizes, quiet, t0)

    header(5, "ppo", "PPO: actor, critic, reference, reward + vLLM engine on Ray", smoke, t0)
    rlhf(["train", "ppo", "--config", "configs/ppo/tiny-cpu.yaml", f"model.path={runs['sft'] / 'hf'}",
          f"model.reward_path={runs['rm'] / 'hf'}", f"run_dir={runs['ppo']}",
          *data_overrides(d, "rl_train.jsonl", evals), *sizes.ppo, *quiet, *extra.get("ppo", [])],
         sizes.stage_timeout_s)

    header(6, "eval", "base vs SFT vs RLHF on held-out prompts (greedy)", smoke, t0)
    report = evaluate(out, tiny / "policy", runs, d, sizes.eval_limit)
    check_outputs(out, with_feedback)
    print(f"\n{(out / 'report.md').read_text()}\nDone in {time.perf_counter() - t0:.0f}s. Run folder: {out}")
    return report


def feedback_stage(out: Path, d: Path, runs: dict[str, Path], sizes: Sizes, quiet: list[str], t0: float) -> None:
    """Collecting human feedback, simulated: two SFT samples per training prompt become pairwise tasks;
    the feedback app serves them to simulated annotators (the rule verifiers with 10% noise, two per
    task); the export trains a reward model like stage 4's, whose held-out pair accuracy the report
    shows beside the one trained on the synthetic pairs."""
    from rlhf_system.feedback.app import Access
    from rlhf_system.feedback.serve import Background
    from rlhf_system.feedback.simulate import rule_judge, simulate
    from rlhf_system.feedback.tasks import read_tasks

    fb = out / "feedback"
    print(f"\n=== feedback: simulated annotators judge SFT samples in the feedback app -> {fb} "
          f"(elapsed {time.perf_counter() - t0:.0f}s) ===", flush=True)
    # A re-run samples new responses: it starts from an empty database (the app refuses changed tasks
    # under stored ids, so that nothing already collected is overwritten).
    shutil.rmtree(fb, ignore_errors=True)
    tasks = fb / "tasks.jsonl"
    rlhf(["feedback", "make-tasks", "--prompts", str(d / "rl_train.jsonl"), "--limit", str(sizes.feedback_prompts),
          "--models", f"sft={runs['sft'] / 'hf'}", "--samples", "2", "--max-new-tokens", "24", "--out", str(tasks)],
         sizes.stage_timeout_s)
    by_id = {t.id: t for t in read_tasks(tasks)}
    with Background(tasks, fb / "feedback.db", fb / "tokens.json", FEEDBACK_ANNOTATORS, overlap=2) as url:
        access = Access.load(fb / "tokens.json")
        simulate(url, access.annotators, by_id, rule_judge("synthetic"), noise=FEEDBACK_NOISE, seed=0)
    rlhf(["feedback", "export", "--db", str(fb / "feedback.db"), "--out", str(fb / "prefs.jsonl")], 300)
    rlhf(["feedback", "report", "--db", str(fb / "feedback.db"), "--out", str(fb / "report")], 300)
    # Pairs of one model's samples are often equally good (both right, or both wrong): only the decisive
    # ones are exported, so the batch shrinks to what there is (the shipped config's 32 pairs at most).
    pairs = sum(1 for _ in (fb / "prefs.jsonl").open())
    if pairs < 2:
        raise SystemExit(f"demo: the simulated annotators found only {pairs} decisive pair(s) among the SFT samples")
    batch = min(32, 1 << (pairs.bit_length() - 1))
    rlhf(["train", "rm", "--config", "configs/rm/tiny-cpu.yaml", f"model.path={runs['sft'] / 'hf'}",
          f"run_dir={out / 'rm-feedback'}", f"data.train=[{{path: {fb / 'prefs.jsonl'}}}]",
          f"data.eval=[{{path: {d / 'pref_test.jsonl'}}}]", f"train.global_batch_size={batch}",
          f"train.micro_batch_size={min(16, batch)}", *sizes.rm, *quiet], sizes.stage_timeout_s)


def feedback_outputs(out: Path) -> list[Path]:
    return [out / "feedback" / "prefs.jsonl", out / "feedback" / "report" / "report.md",
            out / "rm-feedback" / "result.json"]


def feedback_lines(out: Path, rm: dict) -> list[str]:
    """The report's lines on the feedback-trained reward model, when the stage ran."""
    path = out / "rm-feedback" / "result.json"
    if not path.exists():
        return []
    fed = json.loads(path.read_text())
    pairs = sum(1 for _ in (out / "feedback" / "prefs.jsonl").open())
    synthetic = sum(1 for _ in (out / "data" / "pref_train.jsonl").open())
    report = json.loads((out / "feedback" / "report" / "report.json").read_text())
    alpha = report["agreement"]["krippendorff_alpha"]
    return ["", "## Reward model from (simulated) human feedback", "",
            f"{report['votes']} votes by {len(report['annotators'])} simulated annotators "
            f"({FEEDBACK_NOISE:.0%} noise, two per task) on pairs of SFT samples; {pairs} decisive pairs exported; "
            f"Krippendorff's alpha {alpha if alpha is None else round(alpha, 3)}.", "",
            "| reward model trained on | pairs | held-out pair accuracy |", "|---|---|---|",
            f"| synthetic pairs (stage 4) | {synthetic} | {rm['final'].get('eval_accuracy', float('nan')):.3f} |",
            f"| simulated feedback on SFT samples | {pairs} | {fed['final'].get('eval_accuracy', float('nan')):.3f} |"]


def evaluate(out: Path, base: Path, runs: dict[str, Path], d: Path, limit: int) -> dict:
    from rlhf_system.eval.alignment import alignment_table
    from rlhf_system.eval.generation import load_prompts
    from rlhf_system.eval.report import EvalOptions, evaluate_models, family_table

    # Seen families, the composed unseen ones and the `sort` control: every exact-match column.
    prompts = [row for name in ("seen", "composed", "unseen_family") for row in load_prompts(d / f"rl_test_{name}.jsonl", limit)]
    models = {"base": str(base), "SFT": str(runs["sft"] / "hf"), "RLHF (PPO)": str(runs["ppo"] / "hf")}
    report = evaluate_models(models, prompts, EvalOptions(reward_model=str(runs["rm"] / "hf")))
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    table = alignment_table({n: e["alignment"] for n, e in report.items()})
    ppo = json.loads((runs["ppo"] / "result.json").read_text())
    rm = json.loads((runs["rm"] / "result.json").read_text())
    sft = json.loads((runs["sft"] / "result.json").read_text())
    delta = {k: round(report["RLHF (PPO)"]["alignment"][k] - report["SFT"]["alignment"][k], 4)
             for k in ("rm_score", "rule_reward", "exact_seen", "helpful", "honest", "harmless")
             if report["SFT"]["alignment"].get(k) is not None}
    lines = [
        "# rlhf_system demo: effect of instruction tuning and RLHF", "",
        f"{len(prompts)} held-out prompts (rl_test_seen + rl_test_composed + rl_test_unseen_family), greedy "
        "decoding. Columns: eval/alignment.py. The SFT demonstrations were 30% flawed on purpose (hedges, bare "
        "words, over-refusals, harmful compliance), as human demonstrations are; RLHF optimises the "
        "reward instead of imitating. Unseen families: the composed ones reuse the seen families' skills in "
        "new combinations (near transfer); `sort` needs a skill no seen family teaches (far transfer, the "
        "control), so it is expected to stay near 0.", "", table, "",
        "Per composed family, exact: " + composed_line(report), "",
        f"RLHF - SFT: {json.dumps(delta)}", "",
        "## PPO's own held-out evaluation (SFT = before the first step, RLHF = after the last)", "",
        "Rule reward and exact match on each held-out set: greedy, and the mean of 4 seeded samples at the "
        "rollout temperature (the policy's expected reward, the quantity RL maximises).", "",
        ppo_table(ppo), "",
        "## Per family", "", family_table(report), "",
        "## Stages", "",
        f"- SFT: held-out loss {sft['initial']['eval_loss']:.3f} -> {sft['final']['eval_loss']:.3f} "
        f"({sft['steps']} steps, {sft['seconds']:.0f}s)",
        f"- Reward model: held-out pair accuracy {rm['final'].get('eval_accuracy', float('nan')):.3f} "
        f"({rm['steps']} steps, {rm['seconds']:.0f}s)",
        f"- PPO: {ppo['steps']} steps, {ppo['seconds']:.0f}s; plots in ppo/plots/ (reward.png, kl.png, "
        "held_out_reward.png, ppo_loss.png, time_split.png)", *feedback_lines(out, rm), *task_scaling_lines(out), ""]
    (out / "report.md").write_text("\n".join(lines))
    return report


def composed_line(report: dict) -> str:
    from rlhf_system.tasks.synthetic import COMPOSED_FAMILIES, PARENTS

    return "; ".join(f"{f} ({'+'.join(PARENTS[f])}): " + ", ".join(
        f"{name} {entry[f]['exact']:.3f}" for name, entry in report.items() if f in entry) for f in COMPOSED_FAMILIES)


FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def task_scaling_lines(out: Path) -> list[str]:
    """The task-scaling experiment, from its shipped figures (about 15 minutes on 2 cores: longer than the
    whole demo), copied into the run folder."""
    table, plot = FIGURES / "task_scaling.md", FIGURES / "task_scaling.png"
    if not (table.is_file() and plot.is_file()):
        return []
    shutil.copy(plot, out / "task_scaling.png")
    body = table.read_text().split("\n", 2)[2]  # without its title
    return ["", "## Does tuning on more task families help on unseen ones? (shipped figures)", "",
            "Not run by the demo (about 15 minutes on 2 cores); made by `rlhf experiment task-scaling --out "
            "runs/experiments/task-scaling` (3 seeds, k = 1, 2, 4 families of 4000 examples, 5 epochs). Plot: "
            "task_scaling.png.", "", body.strip()]


def ppo_table(result: dict) -> str:
    """Before/after rows of the PPO run's held-out evaluations (trainers/ppo.py evaluate)."""
    lines = ["| held-out set | decoding | rule reward SFT -> RLHF | exact SFT -> RLHF |", "|---|---|---|---|"]
    before, after = result["initial"], result["final"]
    for key in sorted(k for k in before if k.endswith("/all/reward")):
        name, mode = key.split("/")[1], "sampled" if "/sampled/" in key else "greedy"
        ex = key.replace("/reward", "/exact")
        lines.append(f"| {name} | {mode} | {before[key]:.3f} -> {after[key]:.3f} | {before[ex]:.3f} -> {after[ex]:.3f} |")
    return "\n".join(lines)


def expected_outputs(out: Path) -> list[Path]:
    files = [out / "data" / "manifest.json", out / "tiny" / "policy" / "config.json", out / "report.md",
             out / "eval.json"]
    for stage in ("sft", "rm", "ppo"):
        files += [out / stage / f for f in ("config.yaml", "metrics.jsonl", "result.json", "hf/config.json")]
    files += [out / "sft" / "plots" / "loss.png", out / "ppo" / "plots" / "reward.png",
              out / "ppo" / "plots" / "kl.png", out / "ppo" / "plots" / "time_split.png"]
    return files


def check_outputs(out: Path, with_feedback: bool = False) -> None:
    files = expected_outputs(out) + (feedback_outputs(out) if with_feedback else [])
    missing = [str(p) for p in files if not p.exists()]
    if missing:
        raise SystemExit(f"demo: stages finished but these outputs are missing: {', '.join(missing)}")


def main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="rlhf demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("RLHF_DEMO_OUT", "runs/demo"))
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CI): every stage runs and writes its outputs")
    p.add_argument("--with-feedback", action="store_true",
                   help="after the reward model: simulated annotators judge pairs of SFT samples in the feedback "
                        "app, and a reward model trained on their votes is reported beside the synthetic-pair one")
    args = p.parse_args(argv)
    run(args.out, args.smoke, with_feedback=args.with_feedback)
    return 0
