"""What the instruction-tuning experiments share: one tiny base model, SFT points run by the same trainer
`rlhf train sft` runs, greedy evaluation on the held-out synthetic sets, and a results file that makes a
sweep resumable.

A point is one SFT run of the base model on one training set, then its evaluation; its result is one JSON
line in `results.jsonl`, written when the point is done. A sweep started again reads that file and skips
the points it holds; a point cut short (its line missing) starts over in a clean folder.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rlhf_system.config import ConfigError, load_config
from rlhf_system.tasks import files as synthetic_files

SFT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sft" / "tiny-cpu.yaml"  # the shipped one
EVAL_SETS = ("test_composed", "test_unseen_family", "test_unseen_phrasing", "test_seen")


@dataclass(frozen=True)
class Budget:
    """The size of every point: training examples (fixed across points), epochs, held-out prompts per
    set, and the tiny model's shape (small_model: 2 layers of 128, else the kit's default ~3.5M
    parameters)."""

    n_train: int
    epochs: int
    n_test: int
    small_model: bool = False

    def spec(self):
        from rlhf_system.models.tiny import TinySpec

        return TinySpec(hidden_size=128, num_heads=2, num_kv_heads=1, num_layers=2,
                        intermediate_size=256) if self.small_model else TinySpec()


def check_seeds(seeds: list[int]) -> None:
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds: give distinct seeds, got {seeds}")


def claim(out: Path, name: str, budget: Budget) -> None:
    """Record the sweep's kind and sizes in out/sweep.json, or check them against what is there: resuming
    with other sizes would mix points of two experiments in one table (and reuse their data folders)."""
    want = {"experiment": name, **asdict(budget)}
    path = out / "sweep.json"
    if path.is_file():
        have = json.loads(path.read_text())
        if have != want:
            diff = ", ".join(f"{k}: {have.get(k)} -> {v}" for k, v in want.items() if have.get(k) != v)
            raise ConfigError(f"{out} holds a sweep with other settings ({diff}). Fix: give another --out, or "
                              "the same sizes to resume it")
    else:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(want, indent=2) + "\n")


def base_model(out: Path, budget: Budget) -> Path:
    """The tiny base model every point starts from (made once; its tokenizer covers every family)."""
    from rlhf_system.models.tiny import make_tiny_model

    path = out / "base"
    if not (path / "policy" / "config.json").is_file():
        make_tiny_model(path, budget.spec(), seed=0)
    return path / "policy"


class Results:
    """results.jsonl: one line per finished point, keyed by `key(row)`."""

    def __init__(self, path: Path, key):
        self.path, self.key = path, key
        self.rows: list[dict] = []
        lines = path.read_text().splitlines() if path.is_file() else []
        for lineno, line in enumerate(lines, 1):
            try:
                self.rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a kill: that point runs again
                print(f"{path}:{lineno}: unreadable line dropped; its point runs again", flush=True)
        if len(self.rows) != len(lines):  # rewrite without it, so the next line does not join a cut one
            path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self.done = {key(r) for r in self.rows}

    def add(self, row: dict, emit) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows.append(row)
        self.done.add(self.key(row))
        emit(json.dumps(row))


def train_point(run_dir: Path, model: Path, data: Path, seed: int, budget: Budget, extra: list[str]) -> dict:
    """SFT of `model` on data/sft_train.jsonl into run_dir (started clean); returns its steps, seconds and
    held-out loss (sft_test_seen: the tuned families' and the others') before and after."""
    from rlhf_system.trainers import sft

    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(SFT_CONFIG, [
        f"model.path={model}", f"run_dir={run_dir}", f"seed={seed}",
        f"data.train=[{{path: {data / 'sft_train.jsonl'}}}]", f"data.eval=[{{path: {data / 'sft_test_seen.jsonl'}}}]",
        f"train.epochs={budget.epochs}", "train.eval_every=0", "logging.console=false", *extra],
        mode="sft")
    start = time.perf_counter()
    result = sft.run(cfg)
    return {"steps": result["steps"], "seconds": round(time.perf_counter() - start, 1),
            "eval_loss": [round(result[k]["eval_loss"], 4) for k in ("initial", "final")]}


def evaluate(model: Path, data: Path, limit: int, system_prompt: str = "") -> dict:
    """Greedy completions on each held-out set (the first `limit` prompts of each): exact match and rule
    reward, overall and per family. The model is loaded once for every set."""
    from rlhf_system.eval.generation import generate_greedy, load_for_eval, load_prompts, score

    lm, tokenizer = load_for_eval(model)
    out = {}
    for name in EVAL_SETS:
        rows = load_prompts(data / f"rl_{name}.jsonl", limit)
        prompts = rows
        if system_prompt:  # evaluated as trained: the same system turn first
            prompts = [{**r, "prompt": [{"role": "system", "content": system_prompt},
                                        {"role": "user", "content": r["prompt"]}]} for r in rows]
        metrics = score(rows, generate_greedy(lm, tokenizer, prompts))
        out[name] = {fam: {"exact": m["exact"], "reward": m["reward"], "n": m["n"]} for fam, m in metrics.items()}
    return out


def write_data(data: Path, seed: int, budget: Budget, **kw) -> None:
    if not (data / "manifest.json").is_file():
        synthetic_files.write_dataset(data, seed=seed, n_train=budget.n_train, n_test=budget.n_test, **kw)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else 0.0


def cell(values: list[float]) -> str:
    mean, std = mean_std(values)
    return f"{mean:.3f} ± {std:.3f}" if len(values) > 1 else f"{mean:.3f}"
