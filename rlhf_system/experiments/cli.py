"""`rlhf experiment task-scaling|instruction-formats`: argument parsing; the sweeps live beside it."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("experiment", help="instruction-tuning experiments: task-scaling (number of tuning "
                                          "families), instruction-formats (phrasings, system prompt)")
    esub = p.add_subparsers(dest="experiment", required=True)
    for name, default, what in (
            ("task-scaling", "runs/experiments/task-scaling",
             "SFT on 1, 2, 4 of the seen families at a fixed number of examples, measured on held-out families"),
            ("instruction-formats", "runs/experiments/instruction-formats",
             "one phrasing per task against several, and with a system prompt, at equal data")):
        e = esub.add_parser(name, help=what)
        e.add_argument("--out", default=default, help="the sweep's folder; run again to resume")
        e.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
        if name == "task-scaling":
            e.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4], help="numbers of tuning families")
        e.add_argument("--smoke", action="store_true", help="toy sizes (CI): every point runs and is reported")
        e.add_argument("--n-train", type=int, help="training examples per point (default: 4000, smoke 320)")
        e.add_argument("--epochs", type=int, help="SFT epochs per point (default: 5, smoke 1)")
        e.add_argument("--n-test", type=int, help="held-out prompts per set (default: 200, smoke 20)")
        e.set_defaults(func=cmd_experiment)


def cmd_experiment(args) -> int:
    import dataclasses

    from rlhf_system.bench import stdout_to_stderr
    from rlhf_system.experiments import instruction_formats, task_scaling

    module = task_scaling if args.experiment == "task-scaling" else instruction_formats
    budget = module.SMOKE if args.smoke else module.FULL
    budget = dataclasses.replace(budget, **{k: v for k, v in (("n_train", args.n_train), ("epochs", args.epochs),
                                                              ("n_test", args.n_test)) if v is not None})
    args.state["run_dir"] = args.out
    with stdout_to_stderr() as emit:  # JSON lines on stdout; trainer logs on stderr
        if module is task_scaling:
            task_scaling.run(args.out, args.seeds, args.counts, budget, emit)
        else:
            instruction_formats.run(args.out, args.seeds, budget, emit)
    return 0
