"""The `rlhf` command.

    rlhf make-data OUT                      synthetic instruction / preference / RL prompt sets
    rlhf make-tiny-model OUT                tokenizer + tiny Llama policy and reward model (local)
                                            (--family llama3|qwen2.5|qwen3|gemma2|gemma3|mistral|phi3|qwen2_moe)
    rlhf check-model PATH                   what works with a model: template, masks, LoRA, vLLM, sync parity
    rlhf config --config X.yaml [k=v ...]   print the resolved, validated config
    rlhf prepare-data MODE --config X [k=v] tokenise (and cache) a run's datasets, print statistics
    rlhf train sft|rm|dpo|ppo --config X    SFT, reward model, DPO or PPO/GRPO/RLOO/REINFORCE++ (Ray + vLLM)
    rlhf bench sft --config X [k=v ...]     SFT tokens/s and peak memory (packing x ZeRO 2/3) as JSON
    rlhf bench scale --config SWEEP [k=v]   a sweep of placements: a JSON line per point, scale.md, PNGs
    rlhf bench gemm                         this CPU's fp32 / bf16 matrix-product GFLOP/s as JSON
    rlhf eval MODEL... --prompts P.jsonl    greedy generation scored by rules / a reward model, per family
                                            (--reward-model RM, --quant 4bit|8bit --compare-full-precision)
    rlhf export SRC --out OUT [--base B]    merge a LoRA adapter (or re-save a model) as a plain HF checkpoint
                                            (--base-quant 4bit|8bit: the base a QLoRA adapter trained on)
    rlhf sample MODEL PROMPTS.jsonl         sample completions with vLLM (or --backend hf)
    rlhf serve-reward --rules synthetic     HTTP reward server (bearer token from $RLHF_REWARD_TOKEN)
    rlhf feedback make-tasks|serve|simulate|export   collect human feedback (rlhf_system/feedback/cli.py)

Every error is one line on stderr (errors.py): exit status 2 for bad input (config, data, model, reward,
checkpoint), found before any heavy work; 1 for a runtime failure or a bug, whose traceback goes to the
run folder's error.log (the line gives the path).
Heavy imports (torch, transformers, vllm) happen inside the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rlhf_system.config import ConfigError, RunConfig, load_config

MODE_KIND = {"sft": "sft", "rm": "preference", "dpo": "preference", "ppo": "prompt"}
TRAINERS = {"sft": "sft", "rm": "reward_model", "dpo": "dpo", "ppo": "ppo"}  # mode -> module in rlhf_system/trainers


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (overrides of the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=2e-5 data.max_len=512")


def cmd_make_data(args) -> int:
    from rlhf_system.tasks.files import write_dataset

    paths = write_dataset(args.out, seed=args.seed, n_train=args.n_train, n_test=args.n_test,
                          demo_flaws=args.demo_flaws)
    if args.tools:
        from rlhf_system.tasks.tools import write_tool_dataset

        paths |= write_tool_dataset(args.out, seed=args.seed, n_train=args.n_train // 4, n_test=args.n_test // 2,
                                    demo_flaws=args.demo_flaws)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_make_tiny_model(args) -> int:
    from rlhf_system.models.tiny import TinySpec, make_tiny_model

    spec = TinySpec(vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.layers,
                    num_heads=args.hidden_size // 64, num_kv_heads=max(1, args.hidden_size // 128),
                    intermediate_size=args.intermediate_size, seed=args.seed)
    corpus = None
    if args.tools:  # the tokenizer also learns tool calls and long numbers
        from rlhf_system.tasks import files as synthetic_files
        from rlhf_system.tasks import tools as synthetic_tools

        # The tool model is never asked the composed families: leaving their phrasings out keeps the
        # vocabulary the tool task's learning figures (docs/demo.md, test_rl_learning) were measured with. A
        # tokenizer that also learned them cut the tool SFT model's greedy accuracy from 0.75 to 0.27.
        corpus = (synthetic_files.corpus_texts(seed=args.seed, composed=False)
                  + synthetic_tools.corpus_texts(seed=args.seed))
    paths = make_tiny_model(args.out, spec, corpus=corpus, seed=args.seed, split_digits=args.tools, family=args.family)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def cmd_check_model(args) -> int:
    """JSON report on stdout, one line per check on stderr; exit 1 when a check the trainers need fails."""
    from rlhf_system.model_check.report import ADVICE, check_model
    from rlhf_system.models.load import check_model_path

    path = check_model_path(args.path, "PATH")
    report = check_model(path, vllm=not args.no_vllm, rm=not args.no_rm)
    for c in report["checks"]:
        mark = "ok  " if c["ok"] else ("note" if c["name"] in ADVICE else "FAIL")
        print(f"[check-model] {mark} {c['name']:<9} {c['detail']}", file=sys.stderr)
    print(json.dumps(report))
    return 0 if report["ok"] else 1


def cmd_config(args) -> int:
    import yaml

    # describing needs no complete run (the defaults alone have no data), printing the resolved one does
    cfg = load_config(args.config, args.overrides, check=args.describe is None)
    if args.describe is not None:
        from rlhf_system.config_files import describe

        print("\n".join(describe(cfg, args.describe)))
        return 0
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def load_tokenizer(cfg: RunConfig):
    from transformers import AutoTokenizer

    path = cfg.model.tokenizer_path or cfg.model.path
    if not path or not Path(path).exists():
        raise ConfigError(f"model.tokenizer_path / model.path: '{path}' does not exist. "
                          "Fix: point model.path at a local model folder (rlhf make-tiny-model OUT makes one)")
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # generation-only tokenizers often lack one
    return tok, path


def cmd_prepare_data(args) -> int:
    from rlhf_system.data.build import build_dataset

    cfg = load_config(args.config, args.overrides, mode=args.mode)
    args.state["run_dir"] = cfg.run_dir
    tok, tok_path = load_tokenizer(cfg)
    cfg.dump(Path(cfg.run_dir) / "config.yaml")
    report = {}
    for split, sources in (("train", cfg.data.train), ("eval", cfg.data.eval)):
        if not sources:
            continue
        t0 = time.perf_counter()
        ds, stats = build_dataset(MODE_KIND[cfg.mode], cfg.data, sources, tok, cfg.seed, tok_path)
        report[split] = {"formats": stats.formats, "rows_in": stats.rows_in, "samples_out": stats.samples_out,
                         "seconds": round(time.perf_counter() - t0, 2)}
        if stats.identical_pairs:
            report[split]["dropped_identical_pairs"] = stats.identical_pairs
        if not cfg.data.streaming:
            col = "input_ids" if "input_ids" in ds.column_names else ds.column_names[0]
            lens = [len(x) for x in ds[col]]
            report[split].update(rows=len(ds), tokens=sum(lens), max_len=max(lens))
    print(json.dumps(report, indent=2))
    return 0


def cmd_train(args) -> int:
    import importlib

    cfg = load_config(args.config, args.overrides, mode=args.mode)
    args.state.update(run_dir=cfg.run_dir, checkpoints=cfg.checkpoint.save_every > 0)
    trainer = importlib.import_module(f"rlhf_system.trainers.{TRAINERS[args.mode]}")
    result = trainer.run(cfg)
    # Also on disk: libraries (DeepSpeed's JIT builds, ...) may print to stdout as well.
    (Path(cfg.run_dir) / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


def cmd_bench(args) -> int:
    from rlhf_system.bench import sft as bench_sft
    from rlhf_system.bench import stdout_to_stderr

    if args.what == "scale":
        from rlhf_system.bench import scale as bench_scale

        with stdout_to_stderr() as emit:  # stdout: one JSON line per point, nothing else
            rows = bench_scale.run(args.config, args.overrides, args.steps, args.out, emit=emit)
        return 1 if any("error" in r for r in rows) else 0
    if args.what == "gemm":
        from rlhf_system.bench import gemm

        print(json.dumps(gemm.run(args.steps or 10)))
        return 0
    steps = args.steps or 5
    if args.what == "ppo":
        from rlhf_system.bench import ppo as bench_ppo

        cfg = load_config(args.config, args.overrides, mode="ppo")
        with stdout_to_stderr():  # stdout is the JSON alone: Ray / DeepSpeed / vLLM logs go to stderr
            result = bench_ppo.run(cfg, steps)
    else:
        cfg = load_config(args.config, args.overrides, mode="sft")
        with stdout_to_stderr():
            runs = bench_sft.run(cfg, steps)
        result = {"benchmark": "sft", "model": cfg.model.path, "global_batch_size": cfg.train.global_batch_size,
                  "micro_batch_size": cfg.train.micro_batch_size, "max_len": cfg.data.max_len, "results": runs}
    print(json.dumps(result, indent=2))
    return 0


def cmd_eval(args) -> int:
    from rlhf_system.eval.generation import load_prompts
    from rlhf_system.eval.report import EvalOptions, evaluate_models, markdown_report

    names = [n.strip() for n in args.names.split(",")] if args.names else list(args.models)
    if len(names) != len(args.models) or len(set(names)) != len(names) or not all(names):
        raise ConfigError(f"--names: {len(names)} names {names} for {len(args.models)} models; give one distinct "
                          "name per model, comma-separated")
    rules = tuple(r.strip() for r in args.rules.split(",") if r.strip() and r.strip() != "none")
    opts = EvalOptions(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, rules=rules,
                       reward_model=args.reward_model or "", rm_quant=args.rm_quant, template=args.template,
                       quant=args.quant, compare_full_precision=args.compare_full_precision)
    models = dict(zip(names, args.models))
    prompts = load_prompts(args.prompts, args.limit)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr carries the markdown tables
    report = evaluate_models(models, prompts, opts)  # checks every input before a model loads
    text, md = json.dumps(report, indent=2), markdown_report(report)
    for path, content in ((args.out_json, text + "\n"), (args.out_md, md + "\n")):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(content)
    print(md, file=sys.stderr)
    print(text)
    return 0


def cmd_export(args) -> int:
    from rlhf_system.models.export import export_checkpoint

    print(json.dumps(export_checkpoint(args.src, args.out, args.base, args.base_quant), indent=2))
    return 0


def cmd_sample(args) -> int:
    from rlhf_system.models.generate import sample

    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts).read_text().splitlines()[: args.n]]
    t0 = time.perf_counter()
    outs = sample(args.model, prompts, args.max_new_tokens, backend=args.backend, temperature=args.temperature)
    dt = time.perf_counter() - t0
    for p, o in list(zip(prompts, outs))[:5]:
        print(json.dumps({"prompt": p, "completion": o}))
    print(json.dumps({"backend": args.backend, "prompts": len(prompts), "seconds": round(dt, 2)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-data", help="write the synthetic instruction tasks as JSONL")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=400)
    p.add_argument("--demo-flaws", type=float, default=0.0,
                   help="fraction of SFT training demonstrations with a flaw (hedge, bare words, over-refusal, "
                        "harmful compliance), as in real demonstration data; the demo uses 0.3")
    p.add_argument("--tools", action="store_true", help="also write the tool-use family (5-6 digit arithmetic "
                   "with calculator calls): tool_sft_*.jsonl and rl_tool_*.jsonl, a quarter and a half of the sizes")
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("make-tiny-model", help="train a tokenizer and save tiny policy/reward models")
    p.add_argument("out")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=256, help="a multiple of 64 (head_dim is 64)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=704)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tools", action="store_true", help="train the tokenizer on tool-call demonstrations too, "
                   "one token per digit")
    p.add_argument("--family", default="tiny", help="tiny (Llama with ChatML) or a family's architecture and chat "
                   "template: llama3, qwen2.5, qwen3, gemma2, gemma3, mistral, phi3, qwen2_moe (models/families.py)")
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("check-model", help="check a model before a long run: template, masks, LoRA, vLLM, sync")
    p.add_argument("path", help="a Hugging Face model folder")
    p.add_argument("--no-vllm", action="store_true", help="skip the engine checks (vllm, parity, sync, export)")
    p.add_argument("--no-rm", action="store_true", help="skip the RM step, which loads a second copy of the weights "
                   "(a sequence classifier): for a model that fits memory only once")
    p.set_defaults(func=cmd_check_model)

    p = sub.add_parser("config", help="print the resolved config after validation")
    _add_config_args(p)
    p.add_argument("--describe", nargs="?", const="", metavar="PREFIX",
                   help="print each setting (under PREFIX, e.g. algorithm.distill) with its value and what it does")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("prepare-data", help="tokenise and cache a run's datasets, print statistics")
    p.add_argument("mode", choices=sorted(MODE_KIND))
    _add_config_args(p)
    p.set_defaults(func=cmd_prepare_data)

    p = sub.add_parser("train", help="train a model: sft, rm (reward model), dpo, ppo (all RL estimators)")
    p.add_argument("mode", choices=sorted(TRAINERS))
    _add_config_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("bench", help="benchmarks that print JSON: sft (packing x ZeRO stage), ppo (phases, "
                                     "vLLM vs HF generate, weight sync), scale (a sweep of placements), gemm "
                                     "(this CPU's fp32 / bf16 matrix-product bound)")
    p.add_argument("what", choices=["sft", "ppo", "scale", "gemm"])
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps (sft/ppo: 5; scale: the sweep file's; gemm: 10 products, the median)")
    p.add_argument("--out", default=None, help="scale: the report folder (default: the sweep file's run_dir)")
    _add_config_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="greedy generation scored by reward rules / a reward model, per family")
    p.add_argument("models", nargs="+", help="one or more HF model folders (compared side by side)")
    p.add_argument("--prompts", required=True, help="RL prompt JSONL (answer/family/check fields for the verifiers)")
    p.add_argument("--limit", type=int, default=0, help="the first N prompts (0: all)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=64, help="prompts per generate() call")
    p.add_argument("--names", default="", help="comma-separated names for the models (default: their paths)")
    p.add_argument("--rules", default="synthetic",
                   help="comma-separated reward rules (rewards registry names or file.py:fn), or none")
    p.add_argument("--reward-model", default="", help="reward model folder (rlhf train rm's run_dir/hf)")
    p.add_argument("--rm-quant", choices=["none", "4bit", "8bit"], default="none",
                   help="load the reward model quantised (bitsandbytes)")
    p.add_argument("--template", choices=["chat", "plain"], default="chat",
                   help="how the reward model renders a conversation (data.template of its training)")
    p.add_argument("--quant", choices=["none", "4bit", "8bit"], default="none",
                   help="load the evaluated models in 4-bit NF4 or 8-bit (bitsandbytes)")
    p.add_argument("--compare-full-precision", action="store_true",
                   help="with --quant: also evaluate in float32 on the same prompts, report deltas and memory ratio")
    p.add_argument("--out-json", default="", help="also write the JSON report here")
    p.add_argument("--out-md", default="", help="also write the markdown tables here")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="merge a LoRA adapter into its base (or re-save a model) as a plain HF checkpoint")
    p.add_argument("src", help="adapter folder, model folder, or run directory (its hf/)")
    p.add_argument("--out", required=True, help="new folder for the checkpoint")
    p.add_argument("--base", default=None, help="base model for an adapter (default: the run's model.path or "
                   "the adapter's base_model_name_or_path)")
    p.add_argument("--base-quant", choices=["none", "4bit", "8bit"], default=None,
                   help="how the adapter's base was loaded in training (default: the run's peft.quant or the "
                   "adapter's rlhf_base.json; full precision without either): a QLoRA adapter merges onto "
                   "the dequantised 4-bit base it was trained against")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("sample", help="sample completions for prompts from a JSONL file")
    p.add_argument("model")
    p.add_argument("prompts")
    p.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=cmd_sample)

    from rlhf_system.feedback.cli import add_parser as add_feedback

    add_feedback(sub)
    from rlhf_system.experiments.cli import add_parser as add_experiment

    add_experiment(sub)
    sub.add_parser("serve-reward", help="HTTP reward server for rewards.remote_url (see rlhf serve-reward -h)")
    sub.add_parser("demo", help="the whole pipeline on the synthetic tasks: data, SFT, RM, PPO, eval table "
                                "(see rlhf demo -h; launch/demo.sh)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    state: dict = {}  # what a command learnt before failing: its run_dir (where error.log goes)
    try:
        return _dispatch(argv, state)
    except SystemExit:
        raise  # argparse's usage errors (exit 2) and -h
    except BaseException as e:  # the one place every failure is reported
        from rlhf_system.errors import report

        # A failed or interrupted run leaves every checkpoint already written complete (they are atomic).
        hint = "resume with checkpoint.resume=auto" if state.get("checkpoints") else ""
        line, code = report(e, state.get("run_dir"), hint)
        print(f"error: {line}", file=sys.stderr)
        return code


def _dispatch(argv: list[str], state: dict) -> int:
    if argv[:1] == ["serve-reward"]:  # its own parser (rewards/server.py): options pass through untouched
        from rlhf_system.rewards.server import main as serve_main

        return serve_main(argv[1:])
    if argv[:1] == ["demo"]:  # its own parser (demo.py)
        from rlhf_system.demo import main as demo_main

        return demo_main(argv[1:])
    parser = build_parser()
    # parse_known_args: overrides may follow --config (argparse would otherwise stop at the option).
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    args.state = state
    return args.func(args)

if __name__ == "__main__":
    sys.exit(main())
