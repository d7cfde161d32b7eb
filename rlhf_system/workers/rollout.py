"""RolloutWorker: one vLLM engine per Ray actor; RolloutGroup: the engines of a run.

    rollout = RolloutGroup(cfg, model_path)             # starts cfg.rollout.num_engines engines
    samples = rollout.generate(prompt_ids)              # n samples per prompt, prompt-major order
    rollout.shutdown()

Each sample is a data/samples.Generation (response ids, the sampling distribution's log-probs after
temperature, finish reason). Prompts go out in one chunk per engine, each to the least-loaded engine.
Weight updates arrive through the WeightSyncExtension mixed into vLLM's worker (weight_sync.py).

Placement (placement/engines.py): on GPUs each engine gets a placement group of
`tensor_parallel_size` GPUs on one node (vLLM's Ray executor places its workers there when it is > 1). On
CPU an engine reserves no Ray CPU: it shares the cores with the trainer workers, which are idle while it
generates, and binds its OpenMP threads to its share of the node's cores (distributed/threads.py;
rollout.cpu_bind overrides).
"""

from __future__ import annotations

import os

from rlhf_system.config import RunConfig
from rlhf_system.data.samples import Generation
from rlhf_system.distributed.devices import on_gpu
from rlhf_system.placement.engines import EnginePlan, actor_options, engine_plans, release, reserve

EXTENSION = "rlhf_system.distributed.vllm_ext.WeightSyncExtension"


class RolloutWorker:
    def __init__(self, model_path: str, cfg: RunConfig, plan: EnginePlan):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.rollout.cpu_kv_cache_gib))
        os.environ.update(plan.env)  # before vLLM reads its environment: which bundle each TP worker takes
        from rlhf_system.distributed.net import pin_gloo_interface

        pin_gloo_interface()  # the weight-sync group (and a CPU engine's TP workers) talk on Ray's network
        from vllm import LLM

        r, index = cfg.rollout, plan.index
        # From the config, not torch: an engine with tensor_parallel_size > 1 reserves no GPU itself (vLLM's
        # Ray executor places its workers), so CUDA is not visible in this process; a CPU placement's
        # engine has the GPUs hidden (devices.py).
        gpu = on_gpu(cfg.placement)
        # CPU: no chunked prefill. A prompt split across scheduler steps makes vLLM rewind the request's
        # seeded generator, which CPU generators cannot do ("CPU Generator does not use offset"); seeded
        # sampling is what makes rollouts and sampled evaluations reproducible.
        kwargs = ({"gpu_memory_utilization": r.gpu_memory_utilization, "enable_sleep_mode": True} if gpu
                  else {"enable_chunked_prefill": False})
        if not gpu and r.cpu_bind != "vllm":
            # vLLM's own binding reserves a core for its scheduler and leaves it idle while decoding:
            # half of a 2-core machine. Bind to this engine's share of the node instead (threads.py).
            from rlhf_system.distributed.threads import bind_engine, engine_cpu_bind, node_cores, split_cores

            # the node's cores, or the engines' part of them when trainers compute beside (cpu_split)
            cores = split_cores(node_cores(), cfg.placement.engine_core_share)[0] if cfg.split_cores() else node_cores()
            bind = r.cpu_bind if r.cpu_bind != "auto" else engine_cpu_bind(cores, index, r.num_engines,
                                                                            r.tensor_parallel_size)
            bind_engine(bind, inline=plan.executor == "uni")
        self.index, self.cfg = index, cfg
        # The engine runs in the policy's training dtype (what the sync sends), not the checkpoint's: bf16 on
        # GPUs and on CPUs with bf16 matrix units; a CPU without them emulates bf16 (slower than fp32), so an
        # explicit model.dtype=bfloat16 there still samples in fp32. The trainer/engine gap this leaves is
        # the TIS / masked-IS correction's (algorithm.tis_cap), and shows in logprob_mismatch.
        from rlhf_system.cpu_features import cpu_bf16

        dtype = cfg.train_dtype() if gpu or cpu_bf16() else "float32"
        self.llm = LLM(model=model_path, dtype=dtype, enforce_eager=r.enforce_eager or not gpu,
                       max_model_len=cfg.data.max_prompt_len + r.episode_tokens, seed=r.seed + index,
                       tensor_parallel_size=r.tensor_parallel_size, distributed_executor_backend=plan.executor,
                       worker_extension_cls=EXTENSION, logprobs_mode="processed_logprobs", **kwargs)

        # Sleep state (the hybrid engine, WeightSync.sleep_engines / sync): what is resident, and whether the
        # weights are the trained ones. Kept here, not left to vLLM, because vLLM's CPU build ignores
        # sleep: the same order is then checked on CPU.
        self.awake = {"weights": True, "kv_cache": True}
        self.weights_valid = True

    def ready(self) -> int:
        return self.index

    def _check_awake(self, what: str, need: tuple[str, ...] = ("weights", "kv_cache")) -> None:
        asleep = [t for t in need if not self.awake[t]]
        if asleep:
            raise RuntimeError(f"rollout engine {self.index}: {what} while its {' and '.join(asleep)} sleep; the "
                               "controller must wake it first (weight_sync.WeightSync.sync)")
        if what != "weight sync" and not self.weights_valid:
            raise RuntimeError(f"rollout engine {self.index}: {what} after a level-2 sleep dropped its weights and "
                               "before a sync restored them")

    def generate(self, prompt_ids: list[list[int]], n: int, temperature: float, seed: int | None = None,
                 max_new_tokens: int | None = None, seeds: list[int] | None = None) -> list[Generation]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        r = self.cfg.rollout
        self._check_awake("generate")

        def params(k: int) -> SamplingParams:
            # Prompt k of this call gets seeds seed + k*n .. seed + k*n + n-1 (vLLM offsets the n samples):
            # no two prompts share a random stream. The caller gives each call a disjoint range.
            return SamplingParams(n=n, temperature=temperature, top_p=r.top_p if temperature > 0 else 1.0,
                                  max_tokens=max_new_tokens or r.max_new_tokens, stop=r.stop or None,
                                  logprobs=0 if temperature > 0 else None,
                                  seed=seeds[k] if seeds is not None else None if seed is None else seed + k * n)

        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids],
                                 [params(k) for k in range(len(prompt_ids))], use_tqdm=False)
        samples = []
        for o in outs:
            for c in o.outputs:
                ids = list(c.token_ids)
                lps = ([lp[t].logprob for lp, t in zip(c.logprobs, ids)] if c.logprobs is not None
                       else [0.0] * len(ids))
                samples.append(Generation(ids, lps, c.finish_reason))
        return samples

    def score_sequences(self, prompt_ids: list[list[int]], response_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-probs of given responses (teacher-forced, at the rollout temperature): what
        the sync-parity check compares with the actor's."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._check_awake("score_sequences")
        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=self.cfg.rollout.temperature or 1.0)
        seqs = [TokensPrompt(prompt_token_ids=p + r) for p, r in zip(prompt_ids, response_ids)]
        outs = self.llm.generate(seqs, params, use_tqdm=False)
        return [[lp[t].logprob for lp, t in zip(o.prompt_logprobs[len(p):], r)]
                for o, p, r in zip(outs, prompt_ids, response_ids)]

    # weight sync (weight_sync.py has the contract); each call fans out to the engine's workers
    def ws_join(self, addr: str, port: int, rank_offset: int, world: int, timeout_s: float, backend: str,
                senders: int) -> list[int]:
        return self.llm.collective_rpc("ws_join", args=(addr, port, rank_offset, world, timeout_s, backend, senders))

    def ws_receive(self, plan) -> list[dict]:
        self._check_awake("weight sync", ("weights",))  # loading into offloaded / discarded weights is lost
        plan = [[(m.name, m.dtype, tuple(m.shape)) for m in bucket] for bucket in plan]
        out = self.llm.collective_rpc("ws_receive", args=(plan,))
        self.weights_valid = True
        return out

    def ws_close(self) -> None:
        self.llm.collective_rpc("ws_close")

    def where(self) -> tuple[str, int]:
        """(node id, cores this process may use), as BaseWorker.where: the benchmarks report the nodes."""
        import ray

        return ray.get_runtime_context().get_node_id(), len(os.sched_getaffinity(0))

    def num_threads(self) -> list[int]:
        """Threads each of this engine's workers computes with (a placement check for tests)."""
        return self.llm.collective_rpc("num_threads")

    def reset_prefix_cache(self) -> bool:
        return self.llm.reset_prefix_cache()

    def sleep(self, level: int = 1) -> int | None:
        """Free the device for the trainers (level 1: weights to host memory, KV cache dropped; level 2: both
        dropped). Returns the smallest free device memory of its workers after it (None on CPU, where
        vLLM has no sleep mode and this only records the state)."""
        if on_gpu(self.cfg.placement):
            if level == 1:
                _check_host_memory_for_sleep(self.llm, self.index)
            self.llm.sleep(level=level)
        self.awake = {"weights": False, "kv_cache": False}
        self.weights_valid = level == 1
        return self.device_free_bytes()

    def wake_up(self, tags: list[str]) -> int | None:
        """Reallocate `tags` ("weights", "kv_cache"); returns free device memory after it (None on CPU)."""
        if on_gpu(self.cfg.placement) and not all(self.awake[t] for t in tags):
            self.llm.wake_up(tags=[t for t in tags if not self.awake[t]])
        for t in tags:
            self.awake[t] = True
        return self.device_free_bytes()

    def device_free_bytes(self) -> int | None:
        free = [b for b in self.llm.collective_rpc("device_free_bytes") if b is not None]
        return min(free) if free else None

    def shutdown(self) -> None:
        from rlhf_system.models.generate import shutdown_vllm

        shutdown_vllm(self.llm)


def _check_host_memory_for_sleep(llm, index: int) -> None:
    """Level-1 sleep copies the engine's weights into host memory; when the node cannot hold them (several
    engines per node, a large model), say so instead of letting the kernel kill the process."""
    import psutil

    weights = sum(llm.collective_rpc("weight_bytes"))
    available = psutil.virtual_memory().available
    if weights > available:
        raise RuntimeError(f"rollout engine {index}: a level-1 sleep would copy {weights / 2**30:.1f} GiB of weights "
                           f"to host memory, but the node has {available / 2**30:.1f} GiB available. Fix: "
                           "rollout.sleep_level=2 (the weights are dropped and restored by the next sync)")


class RolloutGroup:
    def __init__(self, cfg: RunConfig, model_path: str, engine_cls: type = RolloutWorker, colocated_pg=None,
                 wait: bool = True):
        """`colocated_pg`: the actor's placement group, for engines colocated with it (the hybrid engine).
        `wait=False` returns once the engines are launched; `wait_started()` then waits for them (the
        controller starts its trainers meanwhile: both are mostly imports, one core each)."""
        import ray

        from rlhf_system.placement.group import ensure_ray

        ensure_ray()
        r = cfg.rollout
        self.cfg, self.timeout = cfg, cfg.placement.call_timeout_s
        self.workers_per_engine = r.tensor_parallel_size
        plans = engine_plans(cfg)
        self.pgs = reserve(plans, cfg.placement)  # none for colocated engines: they use the actor's
        if any(plan.colocated_bundle is not None for plan in plans) and colocated_pg is None:
            raise ValueError("colocated rollout engines need the actor's placement group")
        remote = ray.remote(engine_cls)  # engine_cls: a stand-in lets tests drive the dispatch
        self.engines = [remote.options(**actor_options(plan, colocated_pg if plan.colocated_bundle is not None
                                                       else pg)).remote(model_path, cfg, plan)
                        for plan, pg in zip(plans, self.pgs)]
        self.load = [0] * len(self.engines)  # prompts in flight per engine
        if wait:
            self.wait_started()

    def wait_started(self) -> None:
        """Every engine has loaded its model, or the first failure (naming the engine) after killing them all."""
        import ray

        try:
            self._wait([e.ready.remote() for e in self.engines], "start")
        except BaseException:
            for e in self.engines:  # an engine that failed to start must not outlive the run
                ray.kill(e)
            release(self.pgs)
            self.engines, self.pgs = [], []  # a later shutdown() has nothing left to stop
            raise

    @property
    def num_workers_total(self) -> int:
        return len(self.engines) * self.workers_per_engine

    def _wait(self, refs: list, what: str, engine_of: list[int] | None = None) -> list:
        """Wait for one ref per engine, or for refs whose engines are `engine_of` (generate's chunks)."""
        from rlhf_system.distributed.waits import wait_all
        from rlhf_system.placement.group import GroupCallError

        names = [f"engine {i}" for i in (engine_of if engine_of is not None else range(len(refs)))]
        return wait_all(refs, names, self.timeout, f"rollout '{what}'", GroupCallError)

    def generate(self, prompt_ids: list[list[int]], n: int | None = None, temperature: float | None = None,
                 seed: int | None = None, max_new_tokens: int | None = None,
                 seeds: list[int] | None = None) -> list[dict]:
        """Samples in prompt-major order (prompt i's n samples are rows i*n .. i*n+n-1). `seeds`: one per
        prompt instead of `seed`'s consecutive ranges (requests batched from independent episodes)."""
        import ray

        r = self.cfg.rollout
        n = r.n_samples_per_prompt if n is None else n
        temperature = r.temperature if temperature is None else temperature
        # One chunk per engine: vLLM decodes all of a call's sequences together, and each decode step costs
        # nearly the same for 16 sequences as for 32 (two half-size calls to one engine ran at 0.8x the
        # tokens/s of one call, measured on CPU). The least-loaded rule then picks who gets which share.
        chunk = max(1, -(-len(prompt_ids) // len(self.engines)))
        refs, where = [], []
        for start in range(0, len(prompt_ids), chunk):
            e = min(range(len(self.engines)), key=self.load.__getitem__)
            part = prompt_ids[start:start + chunk]
            self.load[e] += len(part)
            chunk_seed = None if seed is None else seed + start * n  # disjoint per prompt (see generate)
            part_seeds = None if seeds is None else seeds[start:start + chunk]
            refs.append(self.engines[e].generate.remote(part, n, temperature, chunk_seed, max_new_tokens, part_seeds))
            where.append((e, len(part)))
            # Free the load of chunks that already finished, so later chunks see the real queue lengths.
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in done:
                i = refs.index(ref)
                if where[i][1]:
                    self.load[where[i][0]] -= where[i][1]
                    where[i] = (where[i][0], 0)
        try:
            parts = self._wait(refs, "generate", [e for e, _ in where])
        finally:
            for e, k in where:
                self.load[e] -= k
        return [s for part in parts for s in part]

    def call(self, method: str, *args) -> list:
        return self._wait([getattr(e, method).remote(*args) for e in self.engines], method)

    def shutdown(self) -> None:
        import ray

        refs = [e.shutdown.remote() for e in self.engines]
        ray.wait(refs, num_returns=len(refs), timeout=60)
        for e in self.engines:
            ray.kill(e)
        release(self.pgs)
