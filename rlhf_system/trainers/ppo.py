"""RLHF with PPO and its critic-free relatives (GRPO, RLOO, REINFORCE++): the single controller.

    rlhf train ppo --config configs/ppo/tiny-cpu.yaml [overrides]

`run` reads top to bottom. Before anything starts, `prepare` checks paths, tokenises the prompt sets
(cached) and loads the reward functions, so bad input fails in seconds. Then the role groups start
(actor, critic, reference, reward under DeepSpeed; rollout = vLLM engines), the weight-sync group
opens, and each step does:

 1. generate   n samples per prompt from the rollout engines (token ids, sampling log-probs); with
               rollout.env, multi-turn episodes with an environment (trainers/episodes.py)
 2. reward     reward model (reward group) + rule functions + remote server, weighted, clipped
               (trainers/ppo_samples.py; DAPO's dynamic sampling refills there)
 3. inference  actor old log-probs, reference log-probs, critic values: the groups work concurrently,
               each on its data-parallel shard
 4. advantages KL to the reference (in the reward or as a loss), then GAE / GRPO / RLOO / REINFORCE++
               (algorithms/, pure torch, here in the controller)
 5. train      actor and critic PPO epochs, concurrently
 6. sync       actor weights -> every engine (distributed/weight_sync.py), prefix caches reset
 7. log        metrics with per-phase timings; evaluate every train.eval_every steps; checkpoint
               (and after SIGTERM / SIGUSR1: checkpoint, stop, exit 0; preemption.py)

Steps 1-2 run in the rollout pipeline's producer thread (trainers/pipeline.py): after step i-1's sync
when train.max_staleness=0, beside step i-1's training when it is k > 0 (at most k versions stale).
The estimator is a config choice (algorithm.estimator); with a critic-free one the critic group is
never started. Resume restores the engines, the KL coefficient, the position in the prompt data and
the batches sampled ahead.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf_system import checkpoint
from rlhf_system.algorithms.advantages import compute_advantages
from rlhf_system.algorithms.kl import kl_penalty, make_kl_controller
from rlhf_system.algorithms.logprobs import masked_mean, masked_sum
from rlhf_system.algorithms.packing import pack, unpack
from rlhf_system.config import ConfigError, RunConfig
from rlhf_system.data.build import build_dataset
from rlhf_system.data.experience import Experience
from rlhf_system.data.prompts import StepPrompts, prompt_row
from rlhf_system.data.stream import materialise, sources
from rlhf_system.data.tokenize import check_tool_template
from rlhf_system.errors import cleanup
from rlhf_system.models.load import load_tokenizer
from rlhf_system.preemption import StopOnSignal
from rlhf_system.tracking import Tracker
from rlhf_system.trainers import gkd
from rlhf_system.trainers.episodes import make_env_factory
from rlhf_system.trainers.partial import PartialRollouts
from rlhf_system.trainers.pipeline import Batch, RolloutPipeline
from rlhf_system.trainers.ppo_eval import evaluate
from rlhf_system.trainers.ppo_samples import Scored, sample_and_score, score
from rlhf_system.trainers.role_calls import experience_of, in_turn_or_together, sharded
from rlhf_system.workers.update import one_optimizer_step


# ---------------------------------------------------------------------------------------- prepare
@dataclass
class Prepared:
    tokenizer: object
    train: StepPrompts                      # a step's prompt rows at a time: prompt_ids, messages, meta
    evals: dict[str, list[dict]]            # held-out prompt sets by name, read into memory
    rules: object | None = None             # rewards.registry.RuleRewards
    remote: object | None = None            # rewards.client.RemoteReward
    env: object | None = None               # () -> environment for multi-turn episodes (rollout.env), or None
    agent: object | None = None             # agents/runner.AgentRunner (rollout.agent), or None
    steps: int = 0
    optimizer_steps: int = 0
    resume: Path | None = None               # the checked checkpoint to resume from
    notes: dict = field(default_factory=dict)


def prepare(cfg: RunConfig) -> Prepared:
    from rlhf_system.rewards.client import from_config
    from rlhf_system.rewards.dry_run import ROWS, dry_run
    from rlhf_system.rewards.registry import RuleRewards
    from rlhf_system.trainers.preflight import preflight_model

    tok = load_tokenizer(cfg.model)
    preflight_model(cfg)  # every model path, LoRA targets, the sync bucket, attention
    env = make_env_factory(cfg)  # an unknown environment or tool fails here, before any worker
    if cfg.rollout.env == "tools":
        check_tool_template(tok, cfg.data.template, cfg.model.tokenizer_path or cfg.model.path)
    name = cfg.model.tokenizer_path or cfg.model.path
    train_ds = build_dataset("prompt", cfg.data, cfg.data.train, tok, cfg.seed, name)[0]
    train = StepPrompts(train_ds, cfg.train.rollout_batch_size, cfg.seed, cfg.data.streaming,
                        sources(cfg.data.train))
    limit = cfg.train.max_eval_samples
    evals = {Path(src.path).stem: [prompt_row(r) for r in materialise(
                build_dataset("prompt", cfg.data, [src], tok, cfg.seed, name)[0], limit)][:limit or None]
             for src in cfg.data.eval}
    rules = RuleRewards(cfg.rewards.rules) if cfg.rewards.rules else None
    remote = from_config(cfg.rewards) if cfg.rewards.remote_url else None
    rows = [prompt_row(r) for r in (train_ds.take(ROWS) if cfg.data.streaming
                                    else train_ds.select(range(min(ROWS, len(train_ds)))))]
    dry_run(rules, remote, rows, f"the first prompts of {cfg.data.train[0].path}")
    if gkd.uses_data(cfg):
        gkd.check_responses(cfg, tok, train_ds, rows, f"data.train ({sources(cfg.data.train)})")
    if train.per_epoch == 0:
        raise ConfigError(f"data.train has {len(train.ds)} prompts, fewer than train.rollout_batch_size="
                          f"{cfg.train.rollout_batch_size}. Fix: lower the rollout batch or add prompts")
    steps = cfg.train.max_steps if cfg.train.max_steps > 0 else train.per_epoch * cfg.train.epochs
    experiences = cfg.train.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    opt_steps = steps * cfg.algorithm.ppo_epochs * (experiences // cfg.train.global_batch_size)
    resume = checkpoint.check_resume(cfg)
    agent = None
    if cfg.rollout.agent:  # a rollout.agent that names nothing fails here; its endpoint starts with the engines
        from rlhf_system.agents.runner import AgentRunner

        agent = AgentRunner(cfg, tok)
    return Prepared(tok, train, evals, rules, remote, env, agent, steps, opt_steps, resume)


# ----------------------------------------------------------------------------------------- groups
def start(cfg: RunConfig, prep: Prepared):
    from rlhf_system.config_checks import roles_for
    from rlhf_system.distributed.weight_sync import WeightSync, colocated_engines, sync_backend
    from rlhf_system.placement.group import ensure_ray
    from rlhf_system.placement.roles import cpus_needed, start_roles
    from rlhf_system.workers.actor import ActorWorker
    from rlhf_system.workers.critic import CriticWorker
    from rlhf_system.workers.reference import ReferenceWorker
    from rlhf_system.workers.reward import RewardWorker
    from rlhf_system.workers.rollout import RolloutGroup

    classes = {"actor": ActorWorker, "critic": CriticWorker, "reference": ReferenceWorker, "reward": RewardWorker}
    roles = {r: c for r, c in classes.items() if r in roles_for(cfg)}
    # Separate engines start first and load while the trainers start and set up (each start is mostly
    # imports on one core: on 2 cores this overlap saved ~5 s a run, measured). Colocated engines (the hybrid engine)
    # need the actor's placement group, so they come after it.
    ensure_ray(cpus_needed(cfg, list(roles)))
    rollout = None if colocated_engines(cfg) else RolloutGroup(cfg, cfg.model.path, wait=False)
    groups, shared = {}, []
    try:
        groups, shared = start_roles(cfg, roles)
        waits = [groups["actor"].submit("setup", cfg, prep.optimizer_steps)]
        if "critic" in groups:
            waits.append(groups["critic"].submit("setup", cfg, prep.optimizer_steps))
        waits += [groups[r].submit("setup", cfg) for r in ("reference", "reward") if r in groups]
        if rollout is None:
            rollout = RolloutGroup(cfg, cfg.model.path, colocated_pg=groups["actor"].pg)
        else:
            rollout.wait_started()
        for w in waits:
            w()
        sync = WeightSync(groups["actor"], rollout, cfg.rollout.sync_timeout_s, sync_backend(cfg),
                          cfg.rollout.sleep_level)
        sync.open()
    except BaseException:
        stop(groups, shared, rollout, None)
        raise
    return groups, shared, rollout, sync


def stop(groups: dict, shared: list, rollout, sync) -> None:
    from rlhf_system.placement.roles import stop_roles

    if sync is not None:
        sync.close()
    if rollout is not None:
        rollout.shutdown()
    stop_roles(groups, shared)


# ------------------------------------------------------------------------------------ one PPO step
def needs_old_logprobs(cfg: RunConfig) -> bool:
    """Whether the actor's old log-probs need a forward of their own before the update. Not when the
    step makes one optimiser step (the update's own forward, detached, gives them: workers/update.py)
    and no KL enters the reward (that needs them before the advantages)."""
    kl_in_reward = cfg.algorithm.kl.coef > 0 and cfg.algorithm.kl.in_reward
    return kl_in_reward or cfg.algorithm.estimator == "opd" or not one_optimizer_step(cfg)


def make_experiences(cfg: RunConfig, prep: Prepared, groups: dict, got, kl_coef: float,
                     timer: dict) -> tuple[Experience, dict]:
    """A sampled and scored batch (ppo_samples.Scored) -> the Experience to train on: old and reference
    log-probs, critic values, advantages (steps 3-4 of the module docstring)."""
    n = cfg.rollout.n_samples_per_prompt
    gen, scores, metrics = got.samples, got.scores, dict(got.metrics)
    exp = experience_of([p["prompt_ids"] for p in got.prompts], gen, prep.tokenizer.pad_token_id)
    a = cfg.algorithm
    if cfg.algorithm.overlong_filter:  # DAPO: a response cut at the budget is left out of the loss
        keep = torch.tensor([g.finish_reason != "length" for g in gen], dtype=torch.float32)[:, None]
        exp.action_mask = keep.expand(len(gen), exp.T) * (exp.action_mask if exp.action_mask is not None else 1)

    t = time.perf_counter()
    calls = {}
    if needs_old_logprobs(cfg):
        calls["old"] = lambda: sharded(cfg, groups["actor"], "logprobs", exp)
    use_gkd = a.estimator == "opd" and a.distill.loss == "gkd"
    if use_gkd:  # the teacher's log-probs of the sampled tokens and its top-k distributions, one forward
        calls["ref"] = lambda: sharded(cfg, groups["reference"], "teacher", exp, a.distill.topk)
    elif "reference" in groups:
        calls["ref"] = lambda: sharded(cfg, groups["reference"], "logprobs", exp)
    if "critic" in groups:
        calls["values"] = lambda: sharded(cfg, groups["critic"], "values", exp)
    got = in_turn_or_together(cfg, calls)
    timer["time/inference"] = time.perf_counter() - t

    mask = exp.policy_mask
    old, ref, teacher = got.get("old"), got.get("ref"), None
    if use_gkd:
        ref, *teacher = ref
    # GKD's off-policy rows (trainers/gkd.py): the data's response, which no policy sampled here
    sampled = torch.tensor([not g.off_policy for g in gen], dtype=torch.float32)[:, None]
    if not bool(sampled.all()):
        exp.rollout_logprobs = torch.where(sampled.bool(), exp.rollout_logprobs, old)  # no sampler gap to correct
    # opd: the reference is the teacher, and the per-token log-ratio (k1) is the distillation reward
    kl_estimator = "k1" if a.estimator == "opd" else a.kl.estimator
    kl = kl_penalty(old, ref, kl_estimator, mask) if old is not None and ref is not None else None
    # On the policy's tokens alone, one after another (algorithms/packing.py): the identity for one turn.
    values = got.get("values")
    adv, returns = compute_advantages(
        a.estimator, scores=scores, mask=pack(mask, mask)[1], values=None if values is None else pack(values, mask)[0],
        kl=None if kl is None else pack(kl, mask)[0], kl_coef=kl_coef, kl_in_reward=a.kl.in_reward, gamma=a.gamma,
        lam=a.lam, group_size=n, whiten_advantages=a.normalize_advantages,
        distill_coef=0.0 if use_gkd else a.distill.coef,  # gkd: the divergence is a loss of the actor's instead
        distill_discount=a.distill.discount, distill_reward_coef=a.distill.reward_coef)
    adv, returns = unpack(adv, mask) * sampled, None if returns is None else unpack(returns, mask)

    metrics |= {
        "tokens": int(exp.prompt_lens.sum() + exp.response_lens.sum()),  # prompts + samples
        "response_length": exp.response_lens.float().mean().item(),
        "truncated": sum(g.finish_reason == "length" for g in gen) / len(gen),
        "advantage_mean": masked_mean(adv, mask).item(),
    }
    if old is not None:
        # how far vLLM's sampling log-probs are from the trainer's (fp32 CPU: ~0; bf16 GPU: larger);
        # without this forward the actor's update reports it instead
        metrics["logprob_mismatch"] = (masked_mean((old - exp.rollout_logprobs).abs(), mask).item()
                                       if cfg.rollout.temperature > 0 else 0.0)
        if ref is not None:
            rows = sampled[:, 0].bool()  # a KL of the policy: on its own samples (GKD: some rows are data's)
            per_seq = masked_sum(kl_penalty(old, ref, "k1", mask), mask, dim=-1)[rows]
            metrics["kl"] = per_seq.mean().item() if len(per_seq) else 0.0  # nats/seq
        if a.estimator == "opd":  # per token, as the distillation literature reports it; sampled rows only
            metrics["distill/reverse_kl"] = masked_mean(kl, mask * sampled).item()
    exp = exp.with_fields(old_logprobs=old, ref_logprobs=ref, values=got.get("values"), advantages=adv,
                          returns=returns)
    if teacher:
        exp = exp.with_fields(teacher_ids=teacher[0], teacher_logprobs=teacher[1])
    return exp, metrics


def train(cfg: RunConfig, groups: dict, exp: Experience, step: int, kl_coef: float, timer: dict) -> dict:
    t = time.perf_counter()
    calls = {"actor": lambda: sharded(cfg, groups["actor"], "update", exp, step, kl_coef, by_rank=True)}
    if "critic" in groups:
        calls["critic"] = lambda: sharded(cfg, groups["critic"], "update", exp, step, by_rank=True)
    metrics: dict = {}
    for per_rank in in_turn_or_together(cfg, calls).values():  # per-rank metric dicts: average them
        for k in per_rank[0]:
            metrics[k] = sum(m[k] for m in per_rank) / len(per_rank)
    timer["time/train"] = time.perf_counter() - t
    # Measured inside the update when the old-log-prob forward was skipped (make_experiences).
    for name, key in (("logprob_mismatch", "actor/logprob_mismatch"), ("kl", "actor/kl_seq")):
        if key in metrics:
            value = metrics.pop(key)
            metrics.setdefault(name, value if name == "kl" or cfg.rollout.temperature > 0 else 0.0)
    return metrics


def dump_rollouts(path: Path, step: int, exp: Experience, scored: Scored) -> None:
    """What this step trains on, one JSON line per sample: the prompt and response token ids as they sit
    in the Experience the workers get, the mask of the tokens the loss uses, the sampling log-probs, the
    score, the scored text, with partial rollouts each token's policy version, and with GKD's off-policy
    share whether the row is the data's response (logging.rollouts)."""
    mask = exp.policy_mask
    with open(path, "a") as f:
        for b in range(len(exp)):
            p, r = int(exp.prompt_lens[b]), int(exp.response_lens[b])
            seq = exp.sequences[b, :p + r].tolist()
            f.write(json.dumps({"step": step + 1, "row": b, "prompt_ids": seq[:p], "response_ids": seq[p:],
                                "trained_mask": mask[b, :r].int().tolist(),
                                "logprobs": exp.rollout_logprobs[b, :r].tolist(), "score": float(scored.scores[b]),
                                "text": scored.samples[b].text, "versions": scored.samples[b].versions,
                                "off_policy": scored.samples[b].off_policy}) + "\n")


def learn(cfg: RunConfig, prep: Prepared, groups: dict, sync, pipe, batch, step: int, kl_coef: float) -> dict:
    """Steps 3-6 on a batch the pipeline sampled (steps 1-2, trainers/pipeline.py): its metrics, with the
    phases' seconds, how much generation of later batches ran inside the train phase, and the batch's
    staleness. `rlhf bench ppo` times this same function."""
    t = time.perf_counter()
    timer = dict(batch.timer)
    if sync.colocated:  # the engines free the devices for steps 3-5; generation is idle (k = 0)
        with pipe.engines:
            sync.sleep_engines()
        timer["time/sleep"] = time.perf_counter() - t
    exp, metrics = make_experiences(cfg, prep, groups, batch.scored, kl_coef, timer)
    versions = [v for s in batch.scored.samples for v in (s.versions or ())]
    if versions:  # partial rollouts: how old each trained token's policy is
        metrics |= {"partial/token_staleness": sum(step - v for v in versions) / len(versions),
                    "partial/token_staleness_max": step - min(versions)}
    if cfg.logging.rollouts:
        dump_rollouts(Path(cfg.run_dir) / "rollouts.jsonl", step, exp, batch.scored)
    t_train = time.perf_counter()
    metrics |= train(cfg, groups, exp, step, kl_coef, timer)
    overlap = pipe.overlap(t_train, time.perf_counter())
    # weights reach the engines between two generations (pipeline.sync_weights waits for the one running)
    timer["time/sync"], waited = pipe.sync_weights(step + 1, sync.sync)
    # the step: what the trainer waited for its batch (all of sampling when synchronous), then the rest
    if sync.colocated:  # bytes that crossed a socket in the sync (handles only) and free memory per phase
        metrics |= sync.phase_memory | {"hybrid/sync_wire_bytes": sync.wire_bytes}
    return metrics | timer | {"time/sync_wait": waited, "time/generate_overlap": overlap, "time/step":
                              batch.waited + time.perf_counter() - t, "async/staleness": step - batch.version,
                              "async/dropped": pipe.dropped}


# ----------------------------------------------------------------------------------------- the run
PIPELINE_FILE = "pipeline.json"  # a checkpoint's rollout batches in flight (train.max_staleness > 0)


def save(cfg: RunConfig, groups: dict, step: int, pipe: RolloutPipeline, kl_ctl, initial: dict) -> None:
    with checkpoint.saving(cfg.run_dir, step) as tmp:
        waits = [groups[r].submit("save_checkpoint", str(tmp / r)) for r in ("actor", "critic") if r in groups]
        snap = pipe.snapshot()  # batches sampled ahead are kept, so resume trains on them as this run would
        for w in waits:
            w()
        if snap["batches"] or snap["carry"]:
            (tmp / PIPELINE_FILE).write_text(json.dumps({"next": snap["next"], "carry": snap["carry"], "batches": [
                {"index": b.index, "version": b.version, "timer": b.timer, "scored": b.scored.to_json()}
                for b in snap["batches"]]}))
        # The prompts' place: (epoch, position) in the shuffled batch order, or the stream's position.
        checkpoint.commit(tmp, {"step": step, **snap["prompts"], "seed": cfg.seed, "kl": kl_ctl.state_dict(),
                                "initial": initial, **checkpoint.identity(cfg)}, cfg.checkpoint.keep_last)


def restore_pipeline(pipe: RolloutPipeline, ckpt: Path) -> None:
    path = ckpt / PIPELINE_FILE
    if path.exists():
        doc = json.loads(path.read_text())
        pipe.restore({"next": doc["next"], "carry": doc.get("carry"), "batches": [
            Batch(b["index"], b["version"], Scored.from_json(b["scored"]), b["timer"]) for b in doc["batches"]]})


def pipeline(cfg: RunConfig, prep: Prepared, groups: dict, rollout, step: int, last: int) -> RolloutPipeline:
    """The rollout side of the loop (trainers/pipeline.py): batch i is sampled for step i (steps step ..
    last - 1), beside the training of earlier steps when train.max_staleness > 0."""
    r = cfg.rollout
    partial = PartialRollouts(cfg, prep.tokenizer) if r.partial_tokens else None

    def produce(i: int, version: int):
        timer: dict = {}
        if partial is None:
            return sample_and_score(cfg, prep, groups, rollout, prep.train.next(), i, prep.train.next, timer), timer
        t = time.perf_counter()
        rows, samples, metrics = partial.produce(rollout, prep.train.next, version)
        timer["time/generate"] = time.perf_counter() - t
        return score(cfg, prep, groups, rows, samples, metrics, timer), timer

    # A backstop only: every engine, reward and environment call the producer makes has its own deadline.
    rounds = r.dynamic_sampling_max_rounds if r.dynamic_sampling else 1
    calls = -(-r.max_new_tokens // r.partial_tokens) + 1 if partial else r.max_turns  # engine calls per round
    deadline = 4 * rounds * calls * cfg.placement.call_timeout_s
    return RolloutPipeline(produce, cfg.train.max_staleness, cfg.train.stale_batches, first=step, last=last, version=step,
                           prompts_state=prep.train.state_dict, deadline_s=deadline, carry=partial)


def run(cfg: RunConfig) -> dict:
    t0 = time.perf_counter()
    prep = prepare(cfg)
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    cfg.dump(Path(cfg.run_dir) / "config.yaml")
    tracker = Tracker(cfg.run_dir, cfg.logging, prep.steps, config=cfg.model_dump(mode="json"), name=cfg.name)
    a = cfg.algorithm
    kl_ctl = make_kl_controller(a.kl.coef, a.kl.adaptive, a.kl.target, a.kl.horizon)
    try:
        groups, shared, rollout, sync = start(cfg, prep)
    except BaseException:
        cleanup(True, tracker.close, *([prep.agent.close] if prep.agent else []))  # report the start-up error
        raise
    roles = [*groups, "rollout"]
    failed = True
    try:
        step = 0
        resume = prep.resume
        if resume is not None:
            for w in [groups[r].submit("load_checkpoint", str(resume / r)) for r in ("actor", "critic") if r in groups]:
                w()
            state = checkpoint.read_run_state(resume)
            step, initial = state["step"], state["initial"]
            prep.train.load_state_dict(state)
            kl_ctl.load_state_dict(state["kl"])
            sync.sync()  # the engines still hold the initial weights
            tracker.log(step, {"resumed_from": str(resume)})
        else:
            initial = evaluate(cfg, prep, groups, rollout)
            tracker.log(0, initial)
        every = cfg.checkpoint.save_every
        pipe = pipeline(cfg, prep, groups, rollout, step, prep.steps)
        if resume is not None:
            restore_pipeline(pipe, resume)
        with StopOnSignal() as preempt, pipe:
            while step < prep.steps:
                batch = pipe.take(step)
                metrics = learn(cfg, prep, groups, sync, pipe, batch, step, kl_ctl.value)
                if "kl" in metrics:
                    kl_ctl.update(metrics["kl"], cfg.train.rollout_batch_size * cfg.rollout.n_samples_per_prompt)
                step += 1
                metrics["kl_coef"] = kl_ctl.value
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < prep.steps:
                    with pipe.engines:
                        metrics |= evaluate(cfg, prep, groups, rollout)
                tracker.log(step, metrics)
                if (every and (step % every == 0 or step == prep.steps)) or preempt.requested:
                    save(cfg, groups, step, pipe, kl_ctl, initial)
                if preempt.requested:  # the checkpoint above is where resume=auto goes on
                    tracker.log(step, {"stopped_by": preempt.signal})
                    failed = False
                    return {"steps": step, "seconds": time.perf_counter() - t0, "roles": roles, "initial": initial,
                            "stopped_by": preempt.signal, "export": None}
        final = evaluate(cfg, prep, groups, rollout)
        tracker.log(step, final)
        out = Path(cfg.run_dir) / "hf"
        if cfg.checkpoint.export_hf:
            groups["actor"].call("save_hf", str(out))
        failed = False
    finally:
        cleanup(failed, tracker.close, *([prep.agent.close] if prep.agent else []),
                lambda: stop(groups, shared, rollout, sync))
    return {"steps": step, "seconds": time.perf_counter() - t0, "roles": roles, "initial": initial, "final": final,
            "export": str(out) if cfg.checkpoint.export_hf else None}
