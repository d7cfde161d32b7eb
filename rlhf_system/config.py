"""The one config tree: typed sections, YAML + dotted overrides, and a single `validate()`.

Every run (`rlhf train sft|rm|dpo|ppo`, the demo, benchmarks) is described by one `RunConfig`.
A YAML file holds overrides of the defaults below; `key.sub=value` arguments on the command line
override the YAML. Unknown keys are errors that suggest the closest valid key; invalid
combinations are errors, never quiet rewrites. `validate()` does the cross-field arithmetic and
runs before anything expensive (Ray, DeepSpeed, vLLM, tokenisation) starts.

What this file is not: it does not start anything, read datasets or look at the hardware beyond
`torch.cuda.is_available()` for resolving `dtype: auto` inside a worker.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rlhf_system.algorithms.names import ADVANTAGE_ESTIMATORS, GROUP_ESTIMATORS, POLICY_LOSSES
from rlhf_system.config_checks import problems
from rlhf_system.config_files import ConfigError, load_yaml, parse_override


class _Section(BaseModel):
    # extra="forbid": a mistyped key is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----------------------------------------------------------------------------------------- model
class ModelConfig(_Section):
    path: str = Field("", description="HF model folder or hub id of the policy / trained model.")
    tokenizer_path: str = Field("", description="Tokenizer folder; empty means `path`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA and on CPUs with bf16 matrix instructions (AMX, AVX-512 "
        "BF16), float32 on other CPUs (where bf16 is emulated, slower than fp32).")
    trust_remote_code: bool = Field(False, description="Run the model folder's own Python code (custom architectures); off: only transformers' classes.")
    allow_pickle: bool = Field(False, description="Load pickled weights (pytorch_model.bin); unpickling can run "
                               "code, so only safetensors load unless this is true.")
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2"] = Field("auto", description="Attention kernel for training forwards; auto: transformers' default (sdpa where supported).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, about a third more compute.")
    reward_path: str = Field("", description="Reward model (sequence classifier) for PPO / eval.")
    critic_path: str = Field("", description="Critic init; empty means the reward model, else the policy.")
    reference_path: str = Field("", description="Frozen reference for KL / DPO; empty means `path`.")
    reference_quant: Literal["none", "4bit", "8bit"] = Field(
        "none", description="PPO's frozen reference loaded in 4-bit NF4 / 8-bit (bitsandbytes); the KL then "
        "includes the quantisation error (nonzero at step 0).")
    reward_quant: Literal["none", "4bit", "8bit"] = Field(
        "none", description="PPO's frozen reward model loaded in 4-bit NF4 / 8-bit (bitsandbytes).")

    def resolved_dtype(self, gpu: bool | None = None) -> str:
        """The dtype a worker trains in. `gpu`: whether that worker runs on a GPU (devices.on_gpu of the
        placement); the driver must pass it, since its own devices need not be the workers'. None: this
        process's view (inside a worker, which sees exactly its placement's devices)."""
        if self.dtype != "auto":
            return self.dtype
        if gpu is None:
            import torch  # local: resolving `auto` is the only hardware question this file asks

            gpu = torch.cuda.is_available()
        if gpu:
            return "bfloat16"
        from rlhf_system.cpu_features import cpu_bf16

        return "bfloat16" if cpu_bf16() else "float32"


# ------------------------------------------------------------------------------------ peft/quant
class LoraConfig(_Section):
    enabled: bool = Field(False, description="Train LoRA adapters instead of the full weights (merged for weight sync and export).")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], description="Module names (suffixes) that get adapters; checked against the model before start-up.")


class QuantConfig(_Section):
    load_in: Literal["none", "4bit", "8bit"] = Field("none", description="bitsandbytes quantised loading.")
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="load_in=4bit: NF4 (normal-float, for weights) or FP4.")
    double_quant: bool = Field(True, description="load_in=4bit: quantise the quantisation constants too (about 0.4 bit per weight less).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="dtype of the matmuls over quantised weights; auto: the model's training dtype.")


class PeftConfig(_Section):
    lora: LoraConfig = Field(default_factory=LoraConfig)
    quant: QuantConfig = Field(default_factory=QuantConfig)


# ------------------------------------------------------------------------------------------ data
class DataSource(_Section):
    path: str = Field(..., description=".jsonl, .json, .parquet file or a `save_to_disk` folder.")
    weight: float = Field(1.0, gt=0, description="Mixing weight relative to the other sources.")
    split: str = Field("train", description="Split name inside a DatasetDict folder.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many rows of the source (the first ones); empty: all.")


class DataKeys(_Section):
    """Column names. The format is detected from which of these a dataset has."""

    prompt: str = Field("prompt", description="Column of a plain prompt (prompt / prompt_response / pairwise formats).")
    response: str = Field("response", description="Column of the response to a prompt (prompt_response format).")
    instruction: str = Field("instruction", description="Alpaca format: the instruction column.")
    input: str = Field("input", description="Alpaca format: the optional input column, appended to the instruction.")
    output: str = Field("output", description="Alpaca format: the response column.")
    messages: str = Field("messages", description="Column of a chat as a list of {role, content} messages.")
    chosen: str = Field("chosen", description="Preference pairs: the preferred response (or whole transcript).")
    rejected: str = Field("rejected", description="Preference pairs: the dispreferred response (or whole transcript).")
    responses: str = Field("responses", description="Ranking format: the list of responses to one prompt.")
    ranks: str = Field("ranks", description="Ranking format: each response's rank (1 best); expanded into pairs.")
    answer: str = Field("answer", description="Prompts: the reference answer rule rewards check (kept in the row's meta).")


DataFormat = Literal[
    "auto", "prompt", "prompt_response", "alpaca", "messages",
    "pairwise", "transcript_pairwise", "ranking",
]


class DataConfig(_Section):
    train: list[DataSource] = Field(default_factory=list, description="Training sources, mixed by weight (each a DataSource).")
    eval: list[DataSource] = Field(default_factory=list, description="Held-out sources, each evaluated and logged on its own.")
    format: DataFormat = Field("auto", description="Row format; auto: detected from which data.keys columns a source has.")
    keys: DataKeys = Field(default_factory=DataKeys)
    template: Literal["chat", "plain"] = Field(
        "chat", description="chat: tokenizer.apply_chat_template; plain: prompt + response + eos.")
    system_prompt: str = Field("", description="A system message put before every conversation that has none.")
    max_len: int = Field(512, ge=8, description="Tokens per sample (prompt and response) at most; longer ones follow data.truncation.")
    max_prompt_len: int = Field(256, ge=1, description="Prompt tokens at most (PPO prompts, the prompt part of SFT / preference samples).")
    truncation: Literal["drop", "left", "right"] = Field(
        "left", description="drop: skip over-long samples; left: cut the prompt from its start; "
        "right: cut the end (may cut the response).")
    packing: bool = Field(False, description="SFT: concatenate samples into rows of up to max_len tokens (position ids restart per sample).")
    streaming: bool = Field(False, description="Iterate sources lazily instead of building an Arrow cache; "
                            "each data-parallel rank reads its own share, and a run needs train.max_steps. "
                            "Held-out sets are read into memory (up to train.max_eval_samples).")
    mix_stopping: Literal["first_exhausted", "all_exhausted"] = Field("all_exhausted", description="Mixing several sources: stop when the first runs out, or when all have (repeating those that ran out).")
    num_proc: int = Field(1, ge=1, description="Processes for tokenisation (in-memory sources only).")
    cache_dir: str = Field("", description="Tokenisation cache; empty means the datasets default.")


# ----------------------------------------------------------------------------------- train/optim
class TrainConfig(_Section):
    global_batch_size: int = Field(32, ge=1, description="Samples per optimizer step, all ranks.")
    micro_batch_size: int = Field(4, ge=1, description="Samples per forward/backward per rank.")
    max_tokens_per_micro_batch: int = Field(
        0, ge=0, description="PPO: fill each micro-batch up to this many tokens (prompt + response) instead of "
        "micro_batch_size rows, balanced by Karmarkar-Karp; ranks agree on the count. 0: fixed rows. Needs "
        "padding_free (a token budget counts real tokens).")
    padding_free: bool | Literal["auto"] = Field(
        "auto", description="PPO: the actor/critic/reference forwards pack each micro-batch's sequences into one "
        "row without padding (position ids restart per sequence). auto: on with flash_attention_2 (varlen "
        "kernel), off otherwise (sdpa/eager then attend through a dense block-diagonal mask).")
    balance_ranks: bool = Field(True, description="PPO: deal each step's sequences to data-parallel ranks so that "
                                "every rank gets the same row count and near-equal tokens (Karmarkar-Karp).")
    epochs: int = Field(1, ge=1, description="Passes over data.train (unless train.max_steps ends the run first).")
    max_steps: int = Field(-1, ge=-1, description="-1: run the epochs.")
    eval_every: int = Field(0, ge=0, description="Steps between evaluations; 0: at the end only.")
    rollout_batch_size: int = Field(32, ge=1, description="PPO: prompts per step.")
    max_eval_samples: int = Field(0, ge=0, description="0: all.")
    max_staleness: int = Field(0, ge=0, description="PPO: batches may be sampled by a policy this many updates "
                               "old, so the next rollouts run while the actor trains; 0: the synchronous step.")
    stale_batches: Literal["wait", "drop"] = Field(
        "wait", description="wait: sampling waits for weights new enough; drop: sampling never waits, batches "
        "older than max_staleness are dropped.")
    eval_samples: int = Field(4, ge=1, description="PPO evaluation: sampled completions per held-out prompt "
                              "(mean@n and pass@k are over these), beside the greedy one.")
    eval_pass_k: list[int] = Field(default_factory=lambda: [1, 4], description="PPO evaluation: the k of pass@k; "
                                   "each at most train.eval_samples.")

    def flat(self, attn_implementation: str) -> bool:
        """Whether the PPO forwards use the padding-free layout (workers/sequences.py)."""
        if self.padding_free == "auto":
            return attn_implementation == "flash_attention_2"
        return self.padding_free


class OptimConfig(_Section):
    lr: float = Field(1e-5, gt=0, description="Peak learning rate of the trained model (the actor in PPO).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Learning-rate schedule after warm-up.")
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of the run's optimiser steps with a linear warm-up from 0.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine / linear: the lr at the end, as a fraction of optim.lr.")
    grad_clip: float = Field(1.0, ge=0, description="0 disables clipping.")
    critic_lr: float = Field(5e-6, gt=0, description="PPO: the critic's peak learning rate.")


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage of trained roles: 0 none, 1 optimizer states, 2 and gradients, 3 and parameters sharded.")
    offload_optimizer: bool = Field(False, description="Keep optimizer states in host memory (ZeRO 1-3): less GPU memory, slower steps.")
    offload_params: bool = Field(False, description="ZeRO-3 only.")
    frozen_zero_stage: Literal[0, 3] = Field(0, description="ZeRO stage for frozen roles (reference, reward).")
    frozen_offload: bool = Field(False, description="frozen_zero_stage=3: keep the frozen roles' parameters in host memory.")


# ----------------------------------------------------------------------------------- RL / losses
class RolloutConfig(_Section):
    num_engines: int = Field(1, ge=1, description="vLLM engines (each with tensor_parallel_size devices); prompts are dealt between them.")
    tensor_parallel_size: int = Field(1, ge=1, description="Devices per engine (CPU: processes).")
    n_samples_per_prompt: int = Field(1, ge=1, description="Samples per prompt (a group, for the group estimators).")
    max_new_tokens: int = Field(128, ge=1, description="Tokens per generated turn at most.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of rollouts (the trainer's log-probs use it too); 0: greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="< 1 makes vLLM's sampling log-probs (after top-p) differ "
                         "from the trainer's, which only apply the temperature: mind algorithm.tis_cap.")
    env: str = Field("", description="Multi-turn environment: a registered name (tools) or 'file.py:Class'; "
                     "empty: one response per prompt.")
    env_args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the environment.")
    max_turns: int = Field(1, ge=1, description="Assistant turns per episode at most.")
    max_episode_tokens: int = Field(0, ge=0, description="Response tokens per episode at most, the policy's and "
                                    "the environment's together; 0: max_new_tokens x max_turns. Each turn gets "
                                    "at most max_new_tokens.")
    env_timeout_s: float = Field(30.0, gt=0, description="Deadline of one environment reset or step.")
    env_errors: Literal["fail", "end_episode"] = Field(
        "fail", description="An environment that raises, hangs or answers malformed: fail the run naming it, "
        "or end that episode with reward 0 (counted in env/errors).")
    tools: list[str] = Field(default_factory=lambda: ["calculator"], description="env=tools: the tools offered.")
    tool_timeout_s: float = Field(5.0, gt=0, description="env=tools: wall-clock limit of one python tool call.")
    tool_memory_mb: int = Field(256, ge=32, description="env=tools: memory limit of one python tool call.")
    agent: str = Field("", description="An agent program that drives each episode through an OpenAI-compatible "
                       "endpoint in front of the engines: 'file.py:fn' or 'module:fn', called as fn(base_url, "
                       "api_key, messages, meta) -> reward or None; or 'cmd:COMMAND', run per episode with "
                       "OPENAI_BASE_URL / OPENAI_API_KEY set (agents/). Empty: none.")
    agent_timeout_s: float = Field(300.0, gt=0, description="Deadline of one agent episode, all its calls included.")
    agent_host: str = Field("127.0.0.1", description="Where the agent endpoint listens (loopback by default; "
                            "every episode has its own bearer token).")
    agent_batch_wait_ms: float = Field(50.0, ge=0, description="How long the endpoint waits for another request "
                                       "to batch with after the last one (10x in all at most), unless every "
                                       "running episode is already waiting.")

    @property
    def sync_bucket_bytes(self) -> int:
        """rollout.sync_bucket_mb in bytes (MiB: 2**20), the one conversion the sync and its checks use."""
        return int(self.sync_bucket_mb * 2**20)

    @property
    def episode_tokens(self) -> int:
        """Response tokens an episode may hold: the policy's turns and the environment's observations."""
        return self.max_episode_tokens or self.max_new_tokens * self.max_turns

    dynamic_sampling: bool = Field(False, description="DAPO: drop prompt groups whose rewards are all equal (no "
                                   "signal under a group baseline) and sample more prompts until the batch is full.")
    dynamic_sampling_max_rounds: int = Field(4, ge=1, description="Generation rounds per step at most when "
                                             "refilling; then the batch is completed with dropped groups (counted).")
    dynamic_sampling_timeout_s: float = Field(600.0, gt=0, description="Seconds of refilling per step at most, "
                                              "the same fallback.")
    partial_tokens: int = Field(0, ge=0, description="Partial rollouts (trainers/partial.py): generate in slices "
                                "of at most this many tokens; the groups unfinished when the step's batch is "
                                "full stay in flight and continue under the next weights, each token recording its "
                                "policy version. Needs train.max_staleness >= 1 (stale_batches=wait). 0: off.")
    partial_pool: int = Field(2, ge=2, description="Partial rollouts: prompt batches (train.rollout_batch_size "
                              "groups each) in flight; the step takes the first rollout_batch_size groups to finish.")
    stop: list[str] = Field(default_factory=list, description="Extra stop strings (EOS always stops).")
    seed: int = Field(0, description="Sampling seed of the engines (engine i uses seed + i).")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="Share of each engine GPU's memory vLLM may take (weights and KV cache).")
    cpu_kv_cache_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on CPU.")
    enforce_eager: bool = Field(True, description="No CUDA graphs in vLLM: slower decoding, less memory and start-up (always on CPU).")
    sync_bucket_mb: float = Field(64.0, gt=0, description="Weight sync moves the model in buckets of this size: "
                                  "the actor gathers, and each engine loads, one at a time. A larger tensor travels "
                                  "alone, unless this was set explicitly (then it is a hard bound).")
    sync_backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="Weight sync to engines on their own devices. auto: nccl with GPUs, gloo on CPU; gloo on "
        "GPUs works where NCCL between the trainer and the engines cannot (slower). Colocated engines use CUDA IPC "
        "(GPU) or shared memory (CPU) whatever this says.")
    sync_timeout_s: float = Field(600.0, gt=0, description="Deadline of each weight-sync step (join, send): a peer "
                                  "that stopped mid-sync becomes an error naming it, not a hang.")
    sleep_level: Literal[1, 2] = Field(
        1, description="Colocated engines (placement.colocate with rollout): what they free while the trainers run. "
        "1: weights to host memory, KV cache dropped (needs host RAM for each engine's weights); 2: both dropped "
        "(the next sync restores the weights).")
    cpu_bind: str = Field("auto", description="vLLM on CPU. auto: a node's engines split its cores, none reserved; "
                          "vllm: vLLM's own binding; else VLLM_CPU_OMP_THREADS_BIND as is, e.g. '0-7'.")


class KLConfig(_Section):
    coef: float = Field(0.05, ge=0, description="0 disables the KL penalty and the reference role.")
    estimator: Literal["k1", "k2", "k3"] = Field("k1", description="Per-token KL estimate (Schulman's k1 log-ratio, k2 half squared, k3 unbiased and positive).")
    in_reward: bool = Field(True, description="True: KL shapes the reward; False: KL is a loss term.")
    adaptive: bool = Field(False, description="Adapt the coefficient towards kl.target (Ziegler et al.'s controller).")
    target: float = Field(6.0, gt=0, description="adaptive: the KL per sequence (nats) the controller aims at.")
    horizon: int = Field(10000, ge=1, description="adaptive: samples over which the coefficient adapts.")


class DPOConfig(_Section):
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL to the reference (DPO's beta).")
    loss: Literal["sigmoid", "ipo"] = Field("sigmoid", description="sigmoid: DPO's logistic loss; ipo: IPO's squared loss.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO.")
    nll_coef: float = Field(0.0, ge=0, description="Weight of an NLL term on the chosen responses (RPO); 0: off.")
    precompute_reference: bool = Field(False, description="Compute reference log-probs once, then drop it. "
                                       "With data.streaming only for the held-out set: a stream has no end.")


class RMConfig(_Section):
    margin: float = Field(0.0, ge=0, description="Bradley-Terry margin: the chosen score must beat the rejected by this much.")
    head: Literal["classifier", "value_head"] = Field("classifier", description="classifier: a sequence-classification model; value_head: a scalar head on a causal LM.")


class DistillConfig(_Section):
    coef: float = Field(1.0, gt=0, description="algorithm.estimator=opd: weight of each token's reverse KL to "
                        "the teacher (model.reference_path) in its reward.")
    discount: float = Field(0.0, ge=0, le=1, description="opd: 0 gives each token its own KL only (the "
                            "published recipes); 1 sums the later tokens' too (the sequence-level gradient).")
    reward_coef: float = Field(0.0, ge=0, description="opd: weight of the task reward's GRPO advantage added "
                               "to the distillation signal; 0: distillation only (rewards are still logged).")
    loss: Literal["reverse_kl", "gkd"] = Field(
        "reverse_kl", description="opd: reverse_kl: each sampled token's reverse KL to the teacher is its reward "
        "(policy gradient); gkd: GKD's generalised JSD between the teacher's and the student's next-token "
        "distributions on the teacher's top-k tokens, a loss of its own (algorithm.distill.beta, topk), on the "
        "student's samples and, with on_policy < 1, the data's responses.")
    beta: float = Field(0.5, ge=0, le=1, description="gkd: 0 the forward KL(teacher || student), 1 the reverse "
                        "KL(student || teacher), between: the generalised JSD (GKD's beta, as TRL).")
    topk: int = Field(32, ge=1, description="gkd: the teacher's most likely tokens per position that cross to "
                      "the actor; the rest of the vocabulary is one bucket (algorithms/gkd.py).")
    on_policy: float = Field(1.0, ge=0, le=1, description="gkd: GKD's lambda, the share of prompt groups the "
                             "student samples; the others train on the prompt record's reference response "
                             "(data.keys.response), off-policy. Seeded per step and group.")


class AlgorithmConfig(_Section):
    estimator: Literal[ADVANTAGE_ESTIMATORS] = Field(
        "gae", description="gae: PPO with a critic; the others are critic-free (no critic group is started). "
        "dr_grpo: GRPO without the std division, with loss_agg=seq_sum_norm (Dr. GRPO). opd: on-policy "
        "distillation from the teacher at model.reference_path (algorithm.distill).")
    policy_loss: Literal[POLICY_LOSSES] = Field(
        "ppo", description="ppo: clipped token ratios; gspo: one clipped ratio per sequence (set clip_eps=3e-4 "
        "clip_eps_high=4e-4); cispo: REINFORCE with a clipped IS weight (clip_eps=1 clip_eps_high=0.28).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount of per-token estimators (gae, reinforce_pp).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE's lambda: 1 Monte-Carlo returns, 0 one-step TD errors.")
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip (lower side; also the upper unless clip_eps_high).")
    value_clip: float = Field(0.2, ge=0, description="Clip of the critic's value change per update (PPO value clipping); 0: off.")
    clip_eps_high: float = Field(0.0, ge=0, description="Upper clip (DAPO clip-higher); 0: same as clip_eps.")
    dual_clip: float = Field(0.0, ge=0, description="Dual-clip bound c > 1 for negative advantages; 0: off.")
    ppo_epochs: int = Field(1, ge=1, description="Passes of updates over each rollout batch.")
    normalize_advantages: bool = Field(True, description="Whiten advantages per batch (gae, rloo); the group estimators are normalised already.")
    loss_agg: Literal["token", "seq", "seq_sum_norm"] = Field(
        "token", description="token: mean over all kept tokens; seq: mean over sequences of per-sequence means; "
        "seq_sum_norm: per-sequence sums / rollout.max_new_tokens (Dr. GRPO).")
    overlong_filter: bool = Field(False, description="DAPO: responses cut at rollout.max_new_tokens are left out "
                                  "of the loss.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight in the policy loss.")
    vf_coef: float = Field(1.0, ge=0, description="Weight of the critic's value loss.")
    tis_cap: float = Field(0.0, ge=0, description="Importance sampling for the rollout/trainer log-prob "
                           "mismatch: the truncation cap (or the band's top with is_mode=mask); 0: off.")
    is_mode: Literal["truncate", "mask"] = Field(
        "truncate", description="truncate: weight min(ratio, tis_cap); mask: drop tokens whose ratio is outside "
        "[is_low, tis_cap].")
    is_low: float = Field(0.5, ge=0, lt=1, description="is_mode=mask: the band's bottom.")
    kl: KLConfig = Field(default_factory=KLConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    rm: RMConfig = Field(default_factory=RMConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    GROUP_ESTIMATORS: ClassVar[tuple[str, ...]] = GROUP_ESTIMATORS

    @property
    def needs_critic(self) -> bool:
        return self.estimator == "gae"


class RewardsConfig(_Section):
    use_model: bool = Field(True, description="Score with the reward model (model.reward_path).")
    rules: list[str] = Field(default_factory=list, description="Rule-based reward functions by name.")
    rule_weight: float = Field(1.0, ge=0, description="Weight of the rule rewards in the sum.")
    model_weight: float = Field(1.0, ge=0, description="Weight of the reward model's score in the sum.")
    remote_url: str = Field("", description="HTTP reward server; empty: none.")
    remote_weight: float = Field(1.0, ge=0, description="Weight of the remote server's score in the sum.")
    remote_token_env: str = Field("RLHF_REWARD_TOKEN", description="Env var holding the server's bearer token.")
    retries: int = Field(3, ge=0, description="Remote server: retries of a failed batch (with backoff) before the run fails.")
    timeout_s: float = Field(60.0, gt=0, description="Remote server: deadline of one request.")
    clip: float = Field(0.0, ge=0, description="Clip the combined score to [-clip, clip]; 0: off.")
    overlong_buffer: int = Field(0, ge=0, description="DAPO soft overlong punishment: the last this-many tokens "
                                 "before rollout.max_new_tokens ramp a penalty from 0 to -overlong_penalty; 0: off.")
    overlong_penalty: float = Field(1.0, ge=0, description="The overlong punishment at the budget's end (see overlong_buffer).")
    normalize: bool = Field(False, description="Standardise the scores of each rollout batch (mean 0, std 1).")


# ------------------------------------------------------------------------------------- placement
Role = Literal["actor", "critic", "reward", "reference", "rollout"]


class PlacementConfig(_Section):
    """Where the roles run. On CPU a "GPU" slot is a process slot (gpus_per_node is then 0)."""

    nodes: int = Field(1, ge=1, description="Nodes of the Ray cluster the run uses.")
    gpus_per_node: int = Field(0, ge=0, description="0: CPU-only cluster (one worker per process slot).")
    actor: int = Field(1, ge=1, description="Actor (policy / trained model) workers = data-parallel size.")
    critic: int = Field(1, ge=1, description="Critic workers (data-parallel size); started only by gae.")
    reward: int = Field(1, ge=1, description="Reward-model workers; started only with rewards.use_model.")
    reference: int = Field(1, ge=1, description="Reference workers; started when a KL is used (or opd's teacher).")
    colocate: list[list[Role]] = Field(
        default_factory=list, description="Groups of roles that share the same GPUs, e.g. [[actor, reference]].")
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK", description="Ray placement-group strategy of each role's workers.")
    launcher: Literal["auto", "local", "ray"] = Field(
        "auto", description="local: one in-process worker; ray: a Ray WorkerGroup; auto: ray when more than "
        "one worker, more than one node, or RAY_ADDRESS is set.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs each worker reserves in its placement bundle.")
    threads_per_worker: int = Field(0, ge=0, description="torch threads per trainer worker; 0: from the placement "
                                    "(CPU: node cores / the role's ranks there; GPU: bundle CPUs; threads.py).")
    cpu_split: Literal["auto", "shared", "disjoint"] = Field(
        "auto", description="CPU-only nodes, PPO. shared: rollout engines and trainers each compute on all cores; "
        "disjoint: the engines get engine_core_share of a node's cores and the trainers the rest, as "
        "disaggregated GPUs would, so generation and training overlap instead of competing; auto: disjoint "
        "when train.max_staleness > 0 (generation runs beside training), shared otherwise.")
    engine_core_share: float = Field(0.5, gt=0, lt=1, description="cpu_split=disjoint: the engines' share of a "
                                     "node's cores (at least one core each side).")
    timeout_s: float = Field(120.0, gt=0, description="Deadline for placement groups to be ready.")
    call_timeout_s: float = Field(1800.0, gt=0, description="Deadline for one remote call on a worker group.")


# ------------------------------------------------------------------------------ logging/checkpoint
class LoggingConfig(_Section):
    log_every: int = Field(1, ge=1, description="SFT, RM, DPO: steps between logged metrics (PPO logs every step).")
    wandb: bool = Field(False, description="Log to Weights & Biases (WANDB_MODE=offline keeps it local).")
    wandb_project: str = Field("rlhf_system", description="wandb project name.")
    tensorboard: bool = Field(False, description="Write TensorBoard event files into run_dir.")
    console: bool = Field(True, description="Print metric lines to the console.")
    plots: bool = Field(True, description="Draw metric plots into run_dir/plots at the end.")
    rollouts: bool = Field(False, description="ppo: write what each step trains on (token ids, trained-token "
                           "mask, sampling log-probs, score, text) to run_dir/rollouts.jsonl.")


class CheckpointConfig(_Section):
    save_every: int = Field(0, ge=0, description="Steps between checkpoints; 0: only at the end.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept; older ones are deleted once a new one is complete.")
    resume: str = Field("none", description="none, auto (latest in run_dir) or a checkpoint folder.")
    allow_config_change: bool = Field(False, description="Resume although the config differs from the "
                                      "checkpoint's in more than logging, saving, run length and deadlines.")
    export_hf: bool = Field(True, description="At the end, write the trained model as a plain Hugging Face folder (run_dir/hf).")
    export_shard_mb: int = Field(2048, ge=1, description="Under ZeRO-3 the export gathers and writes one "
                                 "safetensors shard of at most this size at a time.")


# ------------------------------------------------------------------------------------------- run
Mode = Literal["sft", "rm", "dpo", "ppo"]


class RunConfig(_Section):
    mode: Mode = Field("sft", description="What to train: sft, rm (reward model), dpo or ppo (every RL estimator); `rlhf train MODE` must agree.")
    name: str = Field("run", description="The run's name in logs and trackers (wandb, TensorBoard).")
    run_dir: str = Field("runs/run", description="Everything the run writes goes here.")
    seed: int = Field(42, description="Seed of data order, initialisation and dropout (sampling has rollout.seed).")
    model: ModelConfig = Field(default_factory=ModelConfig)
    peft: PeftConfig = Field(default_factory=PeftConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    rewards: RewardsConfig = Field(default_factory=RewardsConfig)
    placement: PlacementConfig = Field(default_factory=PlacementConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)

    def split_cores(self) -> bool:
        """Whether rollout engines and trainer workers compute on disjoint cores (placement.cpu_split)."""
        p = self.placement
        if p.gpus_per_node > 0 or self.mode != "ppo" or p.cpu_split == "shared":
            return False
        return p.cpu_split == "disjoint" or self.train.max_staleness > 0

    def train_dtype(self) -> str:
        """The dtype this run's workers train in, from the placement (the same answer on the driver and
        on every worker, whatever devices the driver itself sees)."""
        return self.model.resolved_dtype(gpu=self.placement.gpus_per_node > 0)

    def dump(self, path: str | os.PathLike) -> Path:
        """Write the resolved config (every default spelled out) as YAML, atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))
        os.replace(tmp, path)
        return path


# ---------------------------------------------------------------------------- loading/overrides
def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _section_at(loc: tuple, root: type[BaseModel] = RunConfig) -> type[BaseModel] | None:
    """The section class that holds the last key of `loc` (None when a list index is in the way)."""
    cls: Any = root
    for key in loc[:-1]:
        if isinstance(key, int):
            continue  # list element: stay on the element's model
        field = cls.model_fields.get(key) if isinstance(cls, type) and issubclass(cls, BaseModel) else None
        if field is None:
            return None
        ann = field.annotation
        # unwrap list[Model] / Model
        args = getattr(ann, "__args__", ())
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            cls = ann
        elif args and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            cls = args[0]
        else:
            return None
    return cls if isinstance(cls, type) and issubclass(cls, BaseModel) else None


def _dotted(loc: tuple) -> str:
    return ".".join(f"[{k}]" if isinstance(k, int) else str(k) for k in loc).replace(".[", "[")


def _describe(err: dict, source: str, overrides: list[str] = ()) -> str:
    loc = tuple(err["loc"])
    where = _dotted(loc)
    got = err.get("input")
    # The override that set this key (or a section above it) is the origin, else the YAML file.
    given = [o for o in overrides if (k := tuple(parse_override(o)[0])) == tuple(loc[:len(k)])]
    origin = f" (from the override '{given[-1]}')" if given else f" (from {source})" if source else ""
    if err["type"] == "extra_forbidden" and where in REMOVED:
        return f"config key '{where}'{origin} was removed: {REMOVED[where]}"
    if err["type"] == "extra_forbidden":
        section = _section_at(loc)
        valid = _field_names(section) if section else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{_dotted(loc[:-1] + (close[0],))}'?" if close else f"valid keys: {', '.join(valid)}"
        return f"unknown config key '{where}'{origin}: {hint}"
    section = _section_at(loc)
    field = section.model_fields.get(str(loc[-1])) if section else None
    expected = ""
    if field is not None:
        expected = f" ({field.description})" if field.description else ""
        expected = f"; expected {_type_name(field.annotation)}{expected}"
    return f"config field '{where}'{origin}: got {got!r}: {err['msg']}{expected}. Fix: set {where} to a valid value"


# Keys that were never read (a setting that does nothing is worse than none): why, and what to use.
REMOVED = {
    "data.shuffle_seed": "the data order comes from `seed` (seed + epoch). Fix: delete the key, set seed",
    "rollout.backend": "rollouts always run on vLLM engines (`rlhf bench ppo` and `rlhf sample --backend hf` "
                       "compare HF generate). Fix: delete the key",
}


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _from_dict(raw: dict, source: str = "", overrides: list[str] = ()) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(_describe(err, source, overrides) for err in e.errors())) from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        for i in range(1, len(parts)):
            holder = _section_at(tuple(parts[: i + 1]))
            if holder is None and _section_at(tuple(parts[:i])) is not None:
                raise ConfigError(f"bad override '{text}': '{parts[i - 1]}' is a value, not a section")
        node = raw
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"bad override '{text}': '{p}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                mode: str | None = None, check: bool = True) -> RunConfig:
    """YAML (optional) + dotted overrides -> validated RunConfig (`check=False`: typed and keyed, without
    the cross-field checks). `mode` comes from the CLI verb."""
    raw = load_yaml(path) if path else {}
    if mode is not None:
        if raw.get("mode", mode) != mode:
            raise ConfigError(f"{path}: mode is '{raw['mode']}' but the command is 'train {mode}'. "
                              f"Fix: use 'rlhf train {raw['mode']}' or set mode: {mode}")
        raw["mode"] = mode
    apply_overrides(raw, overrides or [])
    cfg = _from_dict(raw, source=str(path) if path else "", overrides=list(overrides or []))
    return validate(cfg) if check else cfg


# ------------------------------------------------------------------------------------- validate()
def validate(cfg: RunConfig) -> RunConfig:
    """Cross-field checks (config_checks.py): raises one ConfigError listing every problem, one line each."""
    errors = problems(cfg)
    if errors:
        raise ConfigError("\n".join(errors))
    return cfg
