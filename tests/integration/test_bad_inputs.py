"""Bad input, as a new user gives it: one line on stderr naming the thing, exit 2 (1 for a runtime
failure such as a reward server that is down), and nothing started.

Each case is a real `rlhf` command line run through `cli.main` in this process, on real files: a
saved tiny model, the synthetic datasets, a checkpoint written by a real SFT run, a live reward
server. "Nothing started" is checked, not timed: after the command this process has no child
processes (Ray, vLLM engines and DeepSpeed workers are all processes) and Ray is not initialised.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from rlhf_system.cli import main

from .conftest import rlhf, train_args

pytestmark = pytest.mark.integration

WRONG = "not-the-token"


@dataclass
class Case:
    id: str
    argv: object          # ctx -> list[str] (may write files or set environment variables first)
    needle: str           # a piece of the line that names the thing at fault
    code: int = 2


class Ctx:
    """Paths of the shared real inputs, and helpers to write the bad ones."""

    def __init__(self, root: Path, model: dict, data: Path, checkpoint: Path, ckpt_run: Path, server_url: str,
                 monkeypatch):
        self.root, self.model, self.data = root, model, data
        self.checkpoint, self.ckpt_run, self.server_url = checkpoint, ckpt_run, server_url
        self.env = monkeypatch
        self.case = ""

    def path(self, name: str) -> Path:
        p = self.root / self.case / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write(self, name: str, text: str | bytes) -> Path:
        p = self.path(name)
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
        return p

    def jsonl(self, name: str, rows: list) -> Path:
        return self.write(name, "".join(json.dumps(r) + "\n" for r in rows))

    def model_copy(self, name: str, drop=(), add: dict | None = None) -> Path:
        dst = self.path(name)
        shutil.copytree(self.model["policy"], dst)
        for pattern in drop:
            for f in dst.glob(pattern):
                f.unlink()
        for fname, content in (add or {}).items():
            (dst / fname).write_bytes(content) if isinstance(content, bytes) else (dst / fname).write_text(content)
        return dst

    def ckpt_copy(self) -> Path:
        dst = self.path("ckpt") / self.checkpoint.name
        shutil.copytree(self.checkpoint, dst)
        return dst

    def unrelated(self) -> Path:
        """A folder of another tool's files (a Hugging Face Trainer checkpoint's names)."""
        dst = self.path("hf-trainer-checkpoint")
        dst.mkdir(parents=True)
        for name in ("trainer_state.json", "optimizer.pt", "scheduler.pt", "model.safetensors"):
            (dst / name).write_bytes(b"{}")
        return dst

    def train(self, mode: str, *over: str, train=None, evaluate=None) -> list[str]:
        files = {"sft": ("sft_train", "sft_test_seen"), "rm": ("pref_train", "pref_test"),
                 "dpo": ("pref_train", "pref_test"), "ppo": ("rl_train", "rl_test_seen")}[mode]
        base = {"sft": "sft", "rm": "rm", "dpo": "dpo", "ppo": "grpo"}[mode]
        extra = ["rewards.use_model=false", "rewards.rules=[synthetic]"] if mode == "ppo" else []
        return train_args(mode, f"configs/{base}/tiny-cpu.yaml", self.model["policy"], self.path("run"),
                          train or self.data / f"{files[0]}.jsonl", evaluate or self.data / f"{files[1]}.jsonl",
                          "train.max_steps=2", *extra, *over)

    def sft(self, *over: str, train=None) -> list[str]:
        return self.train("sft", *over, train=train)

    def resume_args(self, *over: str) -> list[str]:
        """The checkpointed SFT run's own command line (same config), resuming, plus `over`."""
        return [*json.loads((self.ckpt_run / "argv.json").read_text()), f"run_dir={self.path('run')}", *over]


def _rule(ctx: Ctx, body: str) -> str:
    """rewards.rules=[FILE:fn] for a rule file whose function body is `body`."""
    path = ctx.write("reward.py", f"def fn(prompt, response, meta):\n    {body}\n")
    return f"rewards.rules=[{path}:fn]"


SFT_ROW = {"prompt": "2 + 2", "response": "4"}
ENV_NEEDS_ARG = "class Env:\n    def __init__(self, level):\n        pass\n"
NO_TOOL_TEMPLATE = ("{% for m in messages %}{% if m['role'] in ['user', 'assistant'] %}{{ m['role'] + ': ' + "
                    "m['content'] + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")

def gkd_args(c: Ctx) -> list[str]:
    """GKD distilling the test model into itself (a teacher with the same tokenizer)."""
    return ["algorithm.estimator=opd", "algorithm.kl.coef=0", f"model.reference_path={c.model['policy']}",
            "algorithm.distill.loss=gkd", "algorithm.distill.topk=8"]


CASES = [
    # ---------------------------------------------------------------- config
    Case("config_missing", lambda c: ["train", "sft", "--config", str(c.path("nope.yaml"))], "config file not found"),
    Case("yaml_invalid", lambda c: ["config", "--config", str(c.write("c.yaml", "optim: [1,\n"))], "c.yaml:"),
    Case("yaml_duplicate_key", lambda c: ["config", "--config", str(c.write("c.yaml", "optim:\n  lr: 1\n  lr: 2\n"))],
         "key 'lr' given twice"),
    Case("yaml_not_mapping", lambda c: ["config", "--config", str(c.write("c.yaml", "- a\n"))],
         "top level must be a mapping"),
    Case("unknown_key", lambda c: c.sft("optim.lrr=1"), "unknown config key 'optim.lrr'"),
    Case("wrong_type", lambda c: c.sft("optim.lr=fast"), "optim.lr"),
    Case("out_of_range", lambda c: c.sft("optim.lr=-1"), "optim.lr"),
    Case("bad_enum", lambda c: c.train("ppo", "algorithm.estimator=ppo2"), "algorithm.estimator"),
    Case("bad_override", lambda c: c.sft("optim.lr"), "bad override 'optim.lr'"),
    Case("mode_mismatch", lambda c: ["train", "dpo", "--config", "configs/sft/tiny-cpu.yaml"], "mode is 'sft'"),
    Case("batch_not_divisible", lambda c: c.sft("train.global_batch_size=10"), "train.global_batch_size=10"),
    Case("fp16_on_cpu", lambda c: c.sft("model.dtype=float16"), "model.dtype=float16"),
    Case("removed_knob", lambda c: c.train("ppo", "rollout.backend=hf"), "rollout.backend' (from the override"),
    Case("removed_knob_data", lambda c: c.sft("data.shuffle_seed=1"), "data.shuffle_seed' (from the override"),
    Case("streaming_without_max_steps", lambda c: c.sft("data.streaming=true", "train.max_steps=0"),
         "train.max_steps"),
    # ---------------------------------------------------------------- data
    Case("data_missing", lambda c: c.sft(train=c.path("nope.jsonl")), "nope.jsonl: no such file"),
    Case("jsonl_malformed", lambda c: c.sft(train=c.write("d.jsonl", json.dumps(SFT_ROW) + "\n{\"prompt\": \n")),
         "d.jsonl:2: malformed JSON line"),
    Case("jsonl_blank_line", lambda c: c.sft(train=c.write("d.jsonl", json.dumps(SFT_ROW) + "\n\n")),
         "d.jsonl:2: blank line"),
    Case("jsonl_not_object", lambda c: c.sft(train=c.write("d.jsonl", "[1, 2]\n")), "d.jsonl:1: expected a JSON object"),
    Case("file_empty", lambda c: c.sft(train=c.write("d.jsonl", "")), "d.jsonl: empty file"),
    Case("unsupported_type", lambda c: c.sft(train=c.write("d.csv", "prompt,response\n")), "unsupported file type '.csv'"),
    Case("parquet_garbage", lambda c: c.sft(train=c.write("d.parquet", b"not parquet at all")),
         "d.parquet: could not be read as parquet"),
    Case("folder_not_dataset", lambda c: c.sft(train=c.jsonl("folder/rows.jsonl", [SFT_ROW]).parent),
         "not a saved dataset"),
    Case("format_undetectable", lambda c: c.sft(train=c.jsonl("d.jsonl", [{"question": "q", "reply": "a"}] * 20)),
         "cannot detect a sft format"),
    Case("value_wrong_type", lambda c: c.sft(train=c.jsonl("d.jsonl", [SFT_ROW] * 10 + [{"prompt": 3, "response": "a"}])),
         "d.jsonl:11: key 'prompt' must be a string"),
    Case("message_bad_role", lambda c: c.sft(train=c.jsonl("d.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}] * 20)), "role is 'bot'"),
    Case("no_assistant_turn", lambda c: c.sft(train=c.jsonl("d.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}]}] * 20)), "no assistant turn"),
    Case("all_rows_truncated", lambda c: c.sft("data.max_len=8", "data.max_prompt_len=4", "data.packing=false",
                                                  "data.truncation=drop"),
         "empty after filtering"),
    Case("pairs_all_identical", lambda c: c.train("rm", train=c.jsonl("p.jsonl", [
        {"prompt": f"{i} + 1", "chosen": "same", "rejected": "same"} for i in range(40)])), "chosen == rejected"),
    Case("pairs_mostly_identical", lambda c: c.train("dpo", train=c.jsonl("p.jsonl", [
        {"prompt": f"{i} + 1", "chosen": "same", "rejected": "same" if i else "other"} for i in range(40)])),
         "1 preference pairs, after 39 pairs whose chosen equals rejected after tokenisation were dropped (39 in "),
    Case("prompt_ends_with_assistant", lambda c: c.train("ppo", train=c.jsonl("p.jsonl", [{"prompt": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 40)),
         "must not end with an assistant turn"),
    # ---------------------------------------------------------------- models
    Case("model_missing", lambda c: c.sft(f"model.path={c.path('nope')}"), "is not a model folder"),
    Case("model_no_config", lambda c: c.sft(f"model.path={c.model_copy('m', drop=['config.json'])}"),
         "no config.json"),
    Case("model_pickled", lambda c: c.sft(f"model.path={c.model_copy('m', drop=['*.safetensors'], add={'pytorch_model.bin': b'x'})}"),
         "model.allow_pickle=true"),
    Case("model_no_weights", lambda c: c.sft(f"model.path={c.model_copy('m', drop=['*.safetensors'])}"),
         "no weights"),
    Case("no_chat_template", lambda c: c.sft(f"model.path={c.model_copy('m', drop=['chat_template.jinja'], add={'tokenizer_config.json': json.dumps({'tokenizer_class': 'PreTrainedTokenizerFast', 'eos_token': '</s>'})})}"),
         "no chat template"),
    Case("lora_bad_target", lambda c: c.sft("peft.lora.enabled=true", "peft.lora.target_modules=[nope_proj]"),
         "peft.lora.target_modules"),
    Case("reward_model_missing", lambda c: c.train("ppo", "rewards.use_model=true", f"model.reward_path={c.path('rm')}"),
         "model.reward_path"),
    Case("rm_head_mismatch", lambda c: c.train("rm", "algorithm.rm.head=classifier"), "algorithm.rm.head=classifier"),
    Case("sync_bucket_too_small", lambda c: c.train("ppo", "rollout.sync_bucket_mb=0.01"), "sync_bucket_mb"),
    Case("gkd_topk_over_vocab", lambda c: c.train("ppo", *gkd_args(c), "algorithm.distill.topk=5000"),
         "algorithm.distill.topk=5000 but the teacher's vocabulary has"),
    Case("gkd_no_reference_response", lambda c: c.train("ppo", *gkd_args(c), "algorithm.distill.on_policy=0.5"),
         "has no 'response' text"),
    # ---------------------------------------------------------------- environments and tools
    Case("env_unknown", lambda c: c.train("ppo", "rollout.env=gym"), "unknown environment 'gym' (rollout.env)"),
    Case("env_file_missing", lambda c: c.train("ppo", f"rollout.env={c.path('e.py')}:Env"), "e.py not found"),
    Case("env_bad_args", lambda c: c.train("ppo", f"rollout.env={c.write('e.py', ENV_NEEDS_ARG)}:Env"),
         "could not be built with rollout.env_args={}: TypeError"),
    Case("tool_unknown", lambda c: c.train("ppo", "rollout.env=tools", "rollout.tools=[calculator, shell]"),
         "unknown tool(s) ['shell'] in rollout.tools"),
    Case("tool_template_unsupported", lambda c: c.train("ppo", "rollout.env=tools", "model.path=" + str(c.model_copy(
        "m", add={"chat_template.jinja": NO_TOOL_TEMPLATE}))), "its chat template drops tool-role messages"),
    # ---------------------------------------------------------------- rewards
    Case("rule_unknown", lambda c: c.train("ppo", "rewards.rules=[nope]"), "unknown reward rule 'nope'"),
    Case("rule_file_missing", lambda c: c.train("ppo", f"rewards.rules=[{c.path('r.py')}:fn]"), "r.py not found"),
    Case("rule_raises", lambda c: c.train("ppo", _rule(c, 'raise ValueError("boom")')),
         "raised ValueError: boom"),
    Case("rule_nan", lambda c: c.train("ppo", _rule(c, 'return float("nan")')),
         "returned float nan"),
    Case("rule_not_a_number", lambda c: c.train("ppo", _rule(c, 'return "1"')),
         "returned str '1'"),
    Case("rule_meta_key_missing", lambda c: c.train("ppo", train=c.jsonl("p.jsonl", [{"prompt": f"{i} + 1"} for i in range(40)])),
         "meta is missing key 'task'"),
    Case("remote_without_token", lambda c: (c.env.delenv("RLHF_REWARD_TOKEN", raising=False),
                                            c.train("ppo", f"rewards.remote_url={c.server_url}"))[1],
         "RLHF_REWARD_TOKEN"),
    Case("remote_wrong_token", lambda c: (c.env.setenv("RLHF_REWARD_TOKEN", WRONG),
                                          c.train("ppo", f"rewards.remote_url={c.server_url}"))[1],
         "rejected the bearer token"),
    Case("remote_down", lambda c: (c.env.setenv("RLHF_REWARD_TOKEN", WRONG),
                                   c.train("ppo", f"rewards.remote_url=http://127.0.0.1:{_free_port()}",
                                           "rewards.retries=1"))[1], "unreachable after 1 retries", code=1),
    # ---------------------------------------------------------------- checkpoints
    Case("resume_missing", lambda c: c.resume_args(f"checkpoint.resume={c.path('step_00000009')}"), "no such folder"),
    Case("resume_run_folder", lambda c: c.resume_args(f"checkpoint.resume={c.ckpt_run}"), "is a run folder"),
    Case("resume_incomplete", lambda c: c.resume_args(f"checkpoint.resume={_without(c.ckpt_copy(), 'run_state.json')}"),
         "not a complete checkpoint"),
    Case("resume_truncated", lambda c: c.resume_args(f"checkpoint.resume={_truncate(c.ckpt_copy())}"),
         "were written (truncated"),
    Case("resume_no_manifest", lambda c: c.resume_args(f"checkpoint.resume={_without(c.ckpt_copy(), 'manifest.json')}"),
         "manifest.json is missing"),
    Case("resume_old_format_garbage", lambda c: c.resume_args(
        f"checkpoint.resume={_garbage(_old_format(c.ckpt_copy()))}"), "not a torch checkpoint file"),
    Case("resume_run_state_truncated", lambda c: c.resume_args(
        f"checkpoint.resume={_truncate_file(c.ckpt_copy(), 'run_state.json')}"), "run_state.json is not valid JSON"),
    Case("resume_unrelated_folder", lambda c: c.resume_args(f"checkpoint.resume={c.unrelated()}"),
         "is not a checkpoint of this project"),
    Case("resume_other_shape", lambda c: c.resume_args(f"model.path={c.model['other_shape']}",
                                                       f"checkpoint.resume={c.checkpoint}"), "another shape"),
    Case("resume_other_model_path", lambda c: c.resume_args(f"model.path={c.model_copy('same')}",
                                                            f"checkpoint.resume={c.checkpoint}"),
         "another config: model.path"),
    Case("resume_other_lr", lambda c: c.resume_args("optim.lr=0.5", f"checkpoint.resume={c.checkpoint}"),
         "another config: optim.lr"),
    # ---------------------------------------------------------------- other commands
    Case("eval_names", lambda c: ["eval", c.model["policy"], "--names", "a,b", "--prompts", str(c.data / "rl_test_seen.jsonl")],
         "--names"),
    Case("eval_prompts_missing", lambda c: ["eval", c.model["policy"], "--prompts", str(c.path("p.jsonl"))], "p.jsonl"),
    Case("export_missing", lambda c: ["export", str(c.path("nope")), "--out", str(c.path("out"))], "does not exist"),
    Case("bench_sweep_missing", lambda c: ["bench", "scale", "--config", str(c.path("sweep.yaml"))], "sweep.yaml"),
    Case("experiment_counts", lambda c: ["experiment", "task-scaling", "--counts", "1", "5", "--out", str(c.path("x"))],
         "--counts"),
    Case("experiment_seeds", lambda c: ["experiment", "instruction-formats", "--seeds", "1", "1", "--out",
                                        str(c.path("x"))], "--seeds"),
    Case("prepare_data_missing", lambda c: ["prepare-data", "sft", "--config", "configs/sft/tiny-cpu.yaml",
                                            f"model.path={c.model['policy']}", f"data.train=[{{path: {c.path('x.jsonl')}}}]"],
         "x.jsonl: no such file"),
]


def _free_port() -> int:
    from .ray_nodes import free_port

    return free_port()


def _without(ckpt: Path, name: str) -> Path:
    (ckpt / name).unlink()
    return ckpt


def _truncate(ckpt: Path) -> Path:
    f = max(ckpt.rglob("*.pt"), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ckpt


def _old_format(ckpt: Path) -> Path:
    """A checkpoint as saves wrote them before manifests: no manifest, and no config in its run state."""
    (ckpt / "manifest.json").unlink()
    state = json.loads((ckpt / "run_state.json").read_text())
    state.pop("config", None)
    (ckpt / "run_state.json").write_text(json.dumps(state))
    return ckpt


def _truncate_file(ckpt: Path, name: str) -> Path:
    f = ckpt / name
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return ckpt


def _garbage(ckpt: Path) -> Path:
    f = max(ckpt.rglob("*.pt"), key=lambda p: p.stat().st_size)
    f.write_bytes(os.urandom(f.stat().st_size))
    return ckpt


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def inputs(small_model, synthetic_dir, tmp_path_factory):
    """The real inputs: models (policy, one of another shape), data, a checkpoint of a real SFT run,
    and a live reward server (token 'secret')."""
    from rlhf_system.models.tiny import TinySpec, make_tiny_model
    from rlhf_system.rewards.registry import RuleRewards
    from rlhf_system.rewards.server import RewardServer, Scorer

    root = tmp_path_factory.mktemp("bad_inputs")
    other = make_tiny_model(root / "other_shape", TinySpec(vocab_size=1024, hidden_size=64, num_heads=1,
                                                           num_kv_heads=1, num_layers=1, intermediate_size=128))
    run = root / "ckpt_run"
    argv = train_args("sft", "configs/sft/tiny-cpu.yaml", small_model["policy"], run,
                      synthetic_dir / "sft_train.jsonl", synthetic_dir / "sft_test_seen.jsonl",
                      "train.max_steps=2", "checkpoint.save_every=1", "checkpoint.export_hf=false",
                      "train.max_eval_samples=8")
    rlhf(*argv)
    (run / "argv.json").write_text(json.dumps(argv))
    checkpoint = sorted((run / "checkpoints").glob("step_*"))[-1]
    with RewardServer(Scorer(RuleRewards(["synthetic"])), "secret") as server:
        yield root, {**small_model, "other_shape": other["policy"]}, synthetic_dir, checkpoint, run, server.url


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_starts_nothing(case, inputs, capsys, monkeypatch):
    import ray

    root, model, data, checkpoint, run, url = inputs
    ctx = Ctx(root, model, data, checkpoint, run, url, monkeypatch)
    ctx.case = case.id
    argv = [str(a) for a in case.argv(ctx)]
    capsys.readouterr()
    before = _children()
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == case.code, f"exit {code}, stderr:\n{err[-3000:]}"
    assert lines and lines[-1].startswith("error: "), err[-3000:]
    assert [line for line in lines if line.startswith("error: ")] == [lines[-1]], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert case.needle in lines[-1], lines[-1]
    print(f"{case.id}: {lines[-1]}", file=sys.__stdout__)  # the table of lines, for review (pytest -s)
    assert _children() <= before, f"processes started: {_children() - before}"
    assert not ray.is_initialized()


def test_the_table_is_large_enough():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
