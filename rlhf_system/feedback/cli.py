"""`rlhf feedback ...`: make-tasks, serve, simulate, export, report (subcommands of rlhf_system/cli.py).

    rlhf feedback make-tasks --prompts P.jsonl --models sft=runs/demo/sft/hf,base=runs/demo/tiny/policy --out T.jsonl
    rlhf feedback make-tasks --responses R.jsonl --k 2 --out T.jsonl
    rlhf feedback serve --tasks T.jsonl --db F.db --tokens tokens.json --annotators alice,bob [--overlap 2]
    rlhf feedback simulate --url http://127.0.0.1:8000 --tokens tokens.json --tasks T.jsonl --noise 0.1
    rlhf feedback export --db F.db --out prefs.jsonl [--format ranking] [--keep-ties] [--min-agreement 0.7]
    rlhf feedback report --db F.db --out runs/feedback/report
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("feedback", help="collect human feedback: make-tasks, serve (web app), simulate, export, report")
    fsub = p.add_subparsers(dest="feedback_cmd", required=True)

    m = fsub.add_parser("make-tasks", help="comparison tasks from checkpoints' samples or a file of responses")
    m.add_argument("--out", required=True)
    m.add_argument("--prompts", help="prompt JSONL (with --models)")
    m.add_argument("--models", help="NAME=PATH,... (or PATH,...): sampled through our generation path")
    m.add_argument("--responses", help="JSONL of ready responses: {prompt, response, model[, meta]}")
    m.add_argument("--k", type=int, default=2, help="responses per task (2: pairwise; more: ranking)")
    m.add_argument("--samples", type=int, default=1, help="samples per model and prompt (with --models)")
    m.add_argument("--limit", type=int, default=0, help="the first N prompts (0: all)")
    m.add_argument("--max-new-tokens", type=int, default=32)
    m.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature (default: greedy for --samples 1, 1.0 for more)")
    m.add_argument("--backend", choices=["vllm", "hf"], default="vllm")
    m.add_argument("--seed", type=int, default=0)

    s = fsub.add_parser("serve", help="the annotation web app (binds 127.0.0.1 unless --host says otherwise)")
    s.add_argument("--tasks", help="tasks JSONL to load (optional once the database holds tasks)")
    s.add_argument("--db", required=True, help="SQLite file (WAL); made on first use")
    s.add_argument("--tokens", required=True, help="tokens JSON; made on first use with --annotators")
    s.add_argument("--annotators", default="", help="NAME,NAME,...: added to the tokens file")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--overlap", type=int, default=1, help="annotators per task (for agreement)")
    s.add_argument("--max-body-kb", type=int, default=64, help="larger request bodies are refused")

    x = fsub.add_parser("export", help="votes -> preference JSONL that rlhf train rm / dpo read")
    x.add_argument("--db", required=True)
    x.add_argument("--out", required=True)
    x.add_argument("--format", choices=["pairwise", "ranking"], default="pairwise")
    x.add_argument("--criterion", choices=["overall", "helpful", "honest", "harmless"], default="overall")
    x.add_argument("--keep-ties", action="store_true")
    x.add_argument("--keep-both-bad", action="store_true")
    x.add_argument("--min-agreement", type=float, default=0.0, help="share of a task's votes agreeing with its majority")

    r = fsub.add_parser("report", help="agreement, model win rates and ratings, position bias, speed: md + PNG")
    r.add_argument("--db", required=True)
    r.add_argument("--out", required=True, help="folder for report.md, report.json, models.png, speed.png")
    r.add_argument("--bootstrap", type=int, default=200, help="resamples for the rating intervals")
    r.add_argument("--seed", type=int, default=0)

    v = fsub.add_parser("simulate", help="simulated annotators voting through the HTTP API")
    v.add_argument("--url", required=True)
    v.add_argument("--tokens", required=True)
    v.add_argument("--tasks", required=True, help="the tasks file (the judge reads each task's meta)")
    v.add_argument("--judge", default="synthetic", help="reward rule name or file.py:function")
    v.add_argument("--noise", type=float, default=0.0, help="probability of a random judgement instead")
    v.add_argument("--annotators", default="", help="NAME,...: these only (default: all in the tokens file)")
    v.add_argument("--max-votes", type=int, default=0, help="per annotator (0: until no task is left)")
    v.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


def _models(spec: str) -> dict[str, str]:
    out = {}
    for part in spec.split(","):
        name, sep, path = part.partition("=")
        name, path = (name, path) if sep else (Path(part).name, part)
        out[name.strip()] = path.strip()
    return out


def make_tasks(args) -> list:
    from rlhf_system.data.sources import DataError
    from rlhf_system.feedback.tasks import tasks_from_responses

    if bool(args.responses) == bool(args.models):
        raise DataError("make-tasks: give either --responses FILE or --models with --prompts")
    if args.responses:
        from rlhf_system.eval.generation import load_prompts

        rows = load_prompts(args.responses)
        return tasks_from_responses(rows, args.k, args.seed, args.responses)
    if not args.prompts:
        raise DataError("make-tasks --models needs --prompts P.jsonl")
    from rlhf_system.eval.generation import load_prompts
    from rlhf_system.models.generate import sample
    from rlhf_system.models.load import check_model_path

    temperature = args.temperature if args.temperature is not None else (0.0 if args.samples == 1 else 1.0)
    if temperature < 0 or (temperature == 0 and args.samples > 1):
        raise DataError(f"make-tasks --temperature {temperature} with --samples {args.samples}: "
                        + ("a temperature is >= 0" if temperature < 0 else "greedy decoding gives the same response "
                           "each time") + ". Fix: --temperature 1.0 (or --samples 1)")
    prompts = load_prompts(args.prompts, args.limit)
    models = _models(args.models)
    for name, path in models.items():
        check_model_path(path, f"--models {name}")  # an unknown model fails before any sampling
    # One engine per model, each prompt repeated `samples` times in one call (sampled when more than one).
    repeated = [p for p in prompts for _ in range(args.samples)]
    rows = []
    for name, path in models.items():
        texts = sample(path, [p["prompt"] for p in repeated], args.max_new_tokens, args.backend,
                       temperature=temperature)
        rows += [{"prompt": p["prompt"], "response": t, "model": name,
                  "meta": {k: v for k, v in p.items() if k != "prompt"}} for p, t in zip(repeated, texts)]
    return tasks_from_responses(rows, args.k, args.seed, args.prompts)


def run(args) -> int:
    cmd = args.feedback_cmd
    if cmd == "make-tasks":
        from rlhf_system.feedback.tasks import write_tasks

        tasks = make_tasks(args)
        write_tasks(tasks, args.out)
        kinds = {k: sum(t.kind == k for t in tasks) for k in ("pairwise", "ranking")}
        print(json.dumps({"tasks": len(tasks), **kinds, "out": args.out}))
    elif cmd == "serve":
        from rlhf_system.feedback.serve import serve

        names = [n.strip() for n in args.annotators.split(",") if n.strip()]
        serve(args.tasks, args.db, args.tokens, names, args.host, args.port, args.overlap, args.max_body_kb * 1024)
    elif cmd == "export":
        from rlhf_system.feedback.export import export_rows, write_jsonl
        from rlhf_system.feedback.store import Store

        if not Path(args.db).exists():
            from rlhf_system.data.sources import DataError

            raise DataError(f"{args.db}: no such feedback database")
        rows, stats = export_rows(Store(args.db), args.format, args.criterion, args.keep_ties, args.keep_both_bad,
                                  args.min_agreement)
        write_jsonl(rows, args.out)
        print(json.dumps({**stats, "out": args.out}))
    elif cmd == "report":
        from rlhf_system.feedback.report import make_report, write_report
        from rlhf_system.feedback.store import Store

        if not Path(args.db).exists():
            from rlhf_system.data.sources import DataError

            raise DataError(f"{args.db}: no such feedback database")
        report = make_report(Store(args.db), args.bootstrap, args.seed)
        write_report(report, args.out)
        print(json.dumps({"votes": report["votes"], "krippendorff_alpha": report["agreement"]["krippendorff_alpha"],
                          "models": {m: round(s["win_rate"], 3) for m, s in report["models"].items()},
                          "out": args.out}))
    elif cmd == "simulate":
        from rlhf_system.feedback.app import Access
        from rlhf_system.feedback.simulate import rule_judge, simulate
        from rlhf_system.feedback.tasks import read_tasks

        access = Access.load(args.tokens)
        names = [n.strip() for n in args.annotators.split(",") if n.strip()] or sorted(access.annotators)
        tasks = {t.id: t for t in read_tasks(args.tasks)}
        results = simulate(args.url, {n: access.annotators[n] for n in names}, tasks, rule_judge(args.judge),
                           args.noise, args.seed, args.max_votes or None)
        counts = {n: {k: v for k, v in r.items() if k != "acked"} for n, r in results.items()}
        print(json.dumps({"annotators": counts, "votes": sum(r["votes"] for r in results.values())}))
    else:  # argparse's `required=True` makes this unreachable
        print(f"unknown feedback command {cmd}", file=sys.stderr)
        return 2
    return 0
