"""Cross-field checks of a RunConfig: every problem as one line; config.validate raises them together
as one ConfigError, before any worker starts. Field-level checks (types, ranges) live on the fields in
config.py; this file holds the rules that involve several sections (batch arithmetic, roles,
placement), and the roles a run starts. It imports nothing from config.py, which imports it.
"""

from __future__ import annotations


def roles_for(cfg) -> list[str]:
    """The roles a run of this mode starts; the first one is the one being trained (its DP size matters)."""
    if cfg.mode == "sft":
        return ["actor"]
    if cfg.mode == "rm":
        return ["reward"]
    if cfg.mode == "dpo":
        return ["actor"]  # the frozen reference lives inside each actor worker (trainers/dpo.py)
    roles = ["actor", "rollout"]
    if cfg.algorithm.needs_critic:
        roles.append("critic")
    if cfg.rewards.use_model:
        roles.append("reward")
    if cfg.algorithm.kl.coef > 0 or cfg.algorithm.estimator == "opd":  # opd: the reference is the teacher
        roles.append("reference")
    return roles


def role_slots(cfg, role: str) -> int:
    """GPUs (process slots on CPU) a role takes."""
    if role == "rollout":
        return cfg.rollout.num_engines * cfg.rollout.tensor_parallel_size
    return getattr(cfg.placement, role)


def _distill_problems(cfg) -> list[str]:
    """algorithm.estimator=opd: the frozen reference role holds the teacher."""
    a, out = cfg.algorithm, []
    if not cfg.model.reference_path:
        out.append("algorithm.estimator=opd distils from a teacher, which the reference role loads from "
                   "model.reference_path, but it is empty. Fix: model.reference_path=<the teacher's folder>")
    if a.kl.coef > 0:
        out.append(f"algorithm.estimator=opd: the reference is the teacher and its reverse KL is already the "
                   f"reward, so algorithm.kl.coef={a.kl.coef} would count it twice. Fix: algorithm.kl.coef=0 "
                   "(algorithm.distill.coef weighs the KL)")
    if a.distill.reward_coef > 0 and cfg.rollout.n_samples_per_prompt < 2:
        out.append(f"algorithm.distill.reward_coef={a.distill.reward_coef} adds the reward's GRPO advantage, which "
                   "needs a group of samples per prompt. Fix: rollout.n_samples_per_prompt=4")
    return out + _gkd_problems(cfg)


def _gkd_problems(cfg) -> list[str]:
    """algorithm.distill.on_policy < 1 (GKD's off-policy share, trainers/gkd.py): one-turn samples only."""
    d, r = cfg.algorithm.distill, cfg.rollout
    if d.on_policy == 1:
        return []
    where = f"algorithm.distill.on_policy={d.on_policy}"
    if d.loss != "gkd":
        return [f"{where} trains some groups on the data's responses, which the student did not sample, so they have "
                "no sampled reverse KL (algorithm.distill.loss=reverse_kl). Fix: algorithm.distill.loss=gkd (its "
                "divergence is computed on any sequence), or on_policy=1"]
    out = []
    for bad, what in ((r.env, f"rollout.env={r.env!r}"), (r.agent, f"rollout.agent={r.agent!r}"),
                      (r.dynamic_sampling, "rollout.dynamic_sampling=true"),
                      (r.partial_tokens, f"rollout.partial_tokens={r.partial_tokens}")):
        if bad:
            out.append(f"{where} with {what}: a reference response is one turn, sampled in one round. Fix: "
                       f"on_policy=1 (GKD on the student's samples alone), or turn {what.split('=')[0]} off")
    return out


def problems(cfg) -> list[str]:
    """Every cross-field problem of `cfg` (a RunConfig), one line each; [] when there is none."""
    errors: list[str] = []
    t = cfg.train
    roles = roles_for(cfg)
    trained = roles[0]
    dp = role_slots(cfg, trained)

    if t.global_batch_size % (dp * t.micro_batch_size) != 0:
        errors.append(
            f"train.global_batch_size={t.global_batch_size} is not divisible by data-parallel size "
            f"(placement.{trained}={dp}) x train.micro_batch_size={t.micro_batch_size} = "
            f"{dp * t.micro_batch_size}. Fix: use a multiple of {dp * t.micro_batch_size}, "
            f"e.g. train.global_batch_size={max(1, round(t.global_batch_size / (dp * t.micro_batch_size))) * dp * t.micro_batch_size}")

    if cfg.data.streaming and t.max_steps <= 0:
        errors.append("data.streaming=true reads the data without knowing its length, so the run needs a step "
                      "count. Fix: set train.max_steps (each rank starts a new pass when its share ends)")

    if cfg.mode == "ppo":
        n = cfg.rollout.n_samples_per_prompt
        if cfg.algorithm.estimator in cfg.algorithm.GROUP_ESTIMATORS and n < 2:
            errors.append(
                f"rollout.n_samples_per_prompt={n} but algorithm.estimator={cfg.algorithm.estimator} needs a "
                f"group of at least 2 samples per prompt for its baseline. Fix: rollout.n_samples_per_prompt=4")
        experiences = t.rollout_batch_size * n
        if experiences % t.global_batch_size != 0:
            errors.append(
                f"train.rollout_batch_size={t.rollout_batch_size} x rollout.n_samples_per_prompt={n} = "
                f"{experiences} samples per step is not divisible by train.global_batch_size="
                f"{t.global_batch_size}. Fix: make the product a multiple of the global batch")
        for role in [r for r in roles if r not in ("actor", "rollout")]:
            k = role_slots(cfg, role)
            if experiences % k:
                errors.append(f"{experiences} samples per step do not split evenly over placement.{role}={k} "
                              f"workers. Fix: make train.rollout_batch_size x rollout.n_samples_per_prompt a "
                              f"multiple of {k}")
        if "critic" in roles and t.global_batch_size % (cfg.placement.critic * t.micro_batch_size):
            errors.append(f"train.global_batch_size={t.global_batch_size} is not divisible by placement.critic="
                          f"{cfg.placement.critic} x train.micro_batch_size={t.micro_batch_size}. Fix: use a "
                          f"multiple of {cfg.placement.critic * t.micro_batch_size}")
        if t.max_tokens_per_micro_batch and not t.flat(cfg.model.attn_implementation):
            errors.append(f"train.max_tokens_per_micro_batch={t.max_tokens_per_micro_batch} budgets real tokens, "
                          f"but train.padding_free={t.padding_free} pads each micro-batch (with "
                          f"model.attn_implementation={cfg.model.attn_implementation}). Fix: train.padding_free=true")
        kl = cfg.algorithm.kl
        a = cfg.algorithm
        if kl.coef > 0 and kl.in_reward and a.estimator in ("grpo", "dr_grpo"):
            errors.append(f"algorithm.estimator={a.estimator} normalises outcome scores per group and applies the KL as a loss "
                          "term, but algorithm.kl.in_reward=true. Fix: algorithm.kl.in_reward=false "
                          "algorithm.kl.estimator=k3")
        if a.estimator == "opd":
            errors.extend(_distill_problems(cfg))
        elif a.distill.loss == "gkd" or a.distill.on_policy < 1:
            errors.append(f"algorithm.distill.loss={a.distill.loss} on_policy={a.distill.on_policy} distil from a "
                          f"teacher, but algorithm.estimator={a.estimator}. Fix: algorithm.estimator=opd")
        if a.estimator == "dr_grpo" and a.loss_agg != "seq_sum_norm":
            errors.append(f"algorithm.estimator=dr_grpo drops GRPO's length normalisation as well as its std "
                          f"division, but algorithm.loss_agg={a.loss_agg} divides by lengths. Fix: "
                          "algorithm.loss_agg=seq_sum_norm")
        if a.is_mode == "mask" and a.tis_cap and a.tis_cap <= 1:
            errors.append(f"algorithm.is_mode=mask keeps tokens whose ratio is in [is_low, tis_cap], but tis_cap="
                          f"{a.tis_cap} <= 1. Fix: algorithm.tis_cap=2 (or another bound above 1)")
        if cfg.rewards.overlong_buffer > cfg.rollout.max_new_tokens:
            errors.append(f"rewards.overlong_buffer={cfg.rewards.overlong_buffer} is longer than "
                          f"rollout.max_new_tokens={cfg.rollout.max_new_tokens}. Fix: a buffer within the budget, "
                          f"e.g. {max(1, cfg.rollout.max_new_tokens // 4)}")
        if cfg.rollout.dynamic_sampling and a.estimator not in a.GROUP_ESTIMATORS:
            errors.append(f"rollout.dynamic_sampling=true drops groups whose samples score the same, which only a "
                          f"group estimator ignores; algorithm.estimator={a.estimator} is not one. Fix: "
                          f"algorithm.estimator=grpo (or dynamic_sampling=false)")
        errors.extend(_partial_problems(cfg))
        if cfg.rollout.agent and cfg.rollout.env:
            errors.append(f"rollout.agent={cfg.rollout.agent!r} and rollout.env={cfg.rollout.env!r}: an episode is "
                          "driven by an agent program or by an environment, not both. Fix: empty one of them")
        if cfg.rollout.max_turns > 1 and not (cfg.rollout.env or cfg.rollout.agent):
            errors.append(f"rollout.max_turns={cfg.rollout.max_turns} but rollout.env is empty: without an "
                          "environment to answer, an episode has one turn. Fix: rollout.env=tools (or a file's "
                          "environment, or an agent: rollout.agent), or rollout.max_turns=1")
        bad_k = [k for k in t.eval_pass_k if not 1 <= k <= t.eval_samples]
        if bad_k:
            errors.append(f"train.eval_pass_k={t.eval_pass_k}: each k must be in [1, train.eval_samples="
                          f"{t.eval_samples}], got {bad_k}. Fix: raise train.eval_samples or drop those k")
        if kl.coef > 0 and not kl.in_reward and kl.estimator == "k1":
            errors.append("algorithm.kl.in_reward=false with algorithm.kl.estimator=k1: as a loss, k1's gradient is "
                          "the score function, zero in expectation on-policy, so it does not regularise. Fix: "
                          "algorithm.kl.estimator=k3 (or k2)")
        if cfg.peft.quant.load_in != "none":
            errors.append(f"peft.quant.load_in={cfg.peft.quant.load_in} with mode ppo: syncing a quantised actor into "
                          "vLLM is not supported yet. Fix: peft.quant.load_in=none (LoRA alone is fine)")
        if cfg.rewards.use_model and not cfg.model.reward_path:
            errors.append("rewards.use_model=true but model.reward_path is empty. Fix: set model.reward_path to "
                          "a reward model (rlhf train rm), or rewards.use_model=false with rewards.rules")
        if not cfg.data.train:
            errors.append("data.train is empty: a ppo run needs prompt sources. Fix: data.train=[{path: prompts.jsonl}]")
        if cfg.rewards.use_model is False and not cfg.rewards.rules and not cfg.rewards.remote_url:
            errors.append("rewards: no reward source (use_model=false, rules=[], remote_url=''). "
                          "Fix: set rewards.use_model=true or list rewards.rules")

    if cfg.mode in ("sft", "rm", "dpo") and not cfg.data.train:
        errors.append(f"data.train is empty: a {cfg.mode} run needs at least one source. "
                      "Fix: data.train=[{path: data/train.jsonl}]")
    if cfg.data.max_prompt_len >= cfg.data.max_len:
        errors.append(f"data.max_prompt_len={cfg.data.max_prompt_len} must be < data.max_len={cfg.data.max_len}. "
                      f"Fix: lower data.max_prompt_len or raise data.max_len")
    if cfg.data.packing and cfg.mode != "sft":
        errors.append(f"data.packing=true is only supported for mode sft (got mode {cfg.mode}). "
                      "Fix: data.packing=false")
    if cfg.model.attn_implementation == "flash_attention_2":
        if cfg.placement.gpus_per_node == 0:
            errors.append("model.attn_implementation=flash_attention_2 needs CUDA GPUs, but placement.gpus_per_node=0. "
                          "Fix: model.attn_implementation=auto (sdpa) on CPU")
        if cfg.model.dtype == "float32":
            errors.append("model.attn_implementation=flash_attention_2 runs in bfloat16 or float16 only, but "
                          "model.dtype=float32. Fix: model.dtype=bfloat16 (or auto on GPU)")
    if cfg.model.dtype == "float16" and cfg.placement.gpus_per_node == 0:
        errors.append("model.dtype=float16 needs GPUs (CPUs lack fp16 kernels), but placement.gpus_per_node=0. "
                      "Fix: model.dtype=float32 or auto on CPU")
    if cfg.deepspeed.offload_params and cfg.deepspeed.zero_stage != 3:
        errors.append(f"deepspeed.offload_params=true needs deepspeed.zero_stage=3 (got {cfg.deepspeed.zero_stage}). "
                      "Fix: deepspeed.zero_stage=3 or deepspeed.offload_params=false")
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        # Stage 0 keeps the optimizer beside the parameters (on the GPU), so DeepSpeedCPUAdam would step
        # GPU tensors and assert at the first step; ZeRO's offload moves the states for stages 1-3.
        errors.append("deepspeed.offload_optimizer=true needs deepspeed.zero_stage 1, 2 or 3 (got 0): ZeRO moves "
                      "the optimizer states to the CPU only from stage 1. Fix: deepspeed.zero_stage=2 or "
                      "deepspeed.offload_optimizer=false")
    if cfg.peft.quant.load_in != "none" and not cfg.peft.lora.enabled and cfg.mode != "ppo":
        errors.append(f"peft.quant.load_in={cfg.peft.quant.load_in} trains only through adapters. "
                      "Fix: peft.lora.enabled=true (QLoRA)")
    if cfg.peft.quant.load_in != "none" and cfg.deepspeed.zero_stage == 3:
        errors.append("peft.quant.load_in with deepspeed.zero_stage=3 is unsupported (bitsandbytes weights "
                      "cannot be partitioned). Fix: deepspeed.zero_stage=2")

    for field, role in (("reference_quant", "reference"), ("reward_quant", "reward")):
        value = getattr(cfg.model, field)
        if value != "none" and role not in roles:
            errors.append(f"model.{field}={value} quantises PPO's frozen {role} role, which this {cfg.mode} run does "
                          f"not start. Fix: model.{field}=none")
        elif value != "none" and cfg.deepspeed.frozen_zero_stage == 3:
            errors.append(f"model.{field}={value} with deepspeed.frozen_zero_stage=3: bitsandbytes weights cannot be "
                          f"partitioned. Fix: deepspeed.frozen_zero_stage=0 (or model.{field}=none)")

    if cfg.placement.launcher == "local" and (role_slots(cfg, trained) > 1 or cfg.placement.nodes > 1):
        errors.append(f"placement.launcher=local runs one in-process worker, but placement.{trained}="
                      f"{role_slots(cfg, trained)} and placement.nodes={cfg.placement.nodes}. "
                      "Fix: placement.launcher=ray (or auto)")
    errors += _check_placement(cfg, roles)
    return errors


def _check_placement(cfg, roles: list[str]) -> list[str]:
    p = cfg.placement
    errors: list[str] = []
    seen: set[str] = set()
    for group in p.colocate:
        for role in group:
            if role in seen:
                errors.append(f"placement.colocate: role '{role}' is in two groups. Fix: list each role once")
            seen.add(role)
        active = [r for r in group if r in roles]
        if "rollout" in group and "actor" not in group:
            errors.append(f"placement.colocate group {group}: rollout engines share devices only with the actor, whose "
                          "weights they map (the hybrid engine). Fix: put rollout in the actor's group, e.g. "
                          "[[actor, rollout]]")
        if "rollout" in active and cfg.train.max_staleness > 0:
            errors.append(f"placement.colocate puts the rollout engines on the actor's devices, where they sleep while "
                          f"it trains, but train.max_staleness={cfg.train.max_staleness} overlaps generation with "
                          "training. Fix: train.max_staleness=0, or engines on their own devices")
        sizes = {r: role_slots(cfg, r) for r in active}
        if len(set(sizes.values())) > 1:
            errors.append(f"placement.colocate group {group}: colocated roles need the same number of GPUs, "
                          f"got {sizes}. Fix: give them equal counts")
    if cfg.rollout.sync_backend == "nccl" and p.gpus_per_node == 0 and "rollout" in roles:
        errors.append("rollout.sync_backend=nccl needs GPUs, but placement.gpus_per_node=0. Fix: "
                      "rollout.sync_backend=auto (gloo on CPU)")
    if p.gpus_per_node == 0:
        return errors  # CPU: workers are process slots; Ray checks CPUs when the group is placed.
    # Each colocated group takes the GPUs of its largest member once; other roles take their own.
    counted: set[str] = set()
    need = 0
    for group in p.colocate:
        active = [r for r in group if r in roles]
        if active:
            need += max(role_slots(cfg, r) for r in active)
            counted.update(active)
    need += sum(role_slots(cfg, r) for r in roles if r not in counted)
    have = p.nodes * p.gpus_per_node
    if need > have:
        detail = ", ".join(f"{r}={role_slots(cfg, r)}" for r in roles)
        errors.append(f"placement: the {cfg.mode} run needs {need} GPUs ({detail}; colocate={p.colocate}) but "
                      f"placement.nodes x placement.gpus_per_node = {have}. Fix: add nodes, colocate roles "
                      f"(e.g. placement.colocate=[[actor,reference]]) or shrink the groups")
    return errors


def _partial_problems(cfg) -> list[str]:
    """rollout.partial_tokens: what partial rollouts (trainers/partial.py) cannot be combined with."""
    r, t = cfg.rollout, cfg.train
    if not r.partial_tokens:
        return []
    where = f"rollout.partial_tokens={r.partial_tokens}"
    out = []
    if t.max_staleness < 1 or t.stale_batches != "wait":
        out.append(f"{where} lets generations continue under newer weights, which needs rollouts beside training "
                   f"(train.max_staleness={t.max_staleness}, train.stale_batches={t.stale_batches}). Fix: "
                   "train.max_staleness=1 train.stale_batches=wait (or rollout.partial_tokens=0)")
    if r.partial_tokens >= r.max_new_tokens:
        out.append(f"{where} is not below rollout.max_new_tokens={r.max_new_tokens}: every sample would finish "
                   f"in one slice. Fix: rollout.partial_tokens={max(1, r.max_new_tokens // 4)}")
    for name, on in (("rollout.env", r.env), ("rollout.agent", r.agent), ("rollout.dynamic_sampling", r.dynamic_sampling)):
        if on:
            out.append(f"{where} continues single-turn generations across steps; {name}={on!r} is not supported "
                       f"with it (an episode's environment or agent cannot wait between steps). Fix: "
                       f"rollout.partial_tokens=0 or {name} off")
    if r.stop:
        out.append(f"{where}: rollout.stop={r.stop} could be missed across a slice boundary. Fix: rely on EOS "
                   "(rollout.stop=[]) or rollout.partial_tokens=0")
    return out
