"""BaseWorker: what every Ray-hosted role worker shares: joining the process group and leaving it.

Workers are thin: a role's worker exposes a few verbs (setup, train_step, evaluate, save) and
keeps its per-rank state; the controller (trainers/) decides what happens when.
"""

from __future__ import annotations


class BaseWorker:
    rank: int = 0
    world_size: int = 1
    engine = None  # this rank's DeepSpeed engine, set by the role's `setup` (the checkpoint verbs use it)
    data = None    # data/rank_data.RankData of the SFT, RM and DPO workers: a stream's position is checkpointed

    def node_address(self) -> str:
        """This process's address as its peers reach it (Ray's node address; loopback without Ray)."""
        import sys

        ray = sys.modules.get("ray")
        return ray.util.get_node_ip_address() if ray is not None and ray.is_initialized() else "127.0.0.1"

    def master_endpoint(self) -> tuple[str, int]:
        """Rank 0's reachable address and a free port for the process-group rendezvous."""
        from rlhf_system.distributed.deepspeed import free_port

        return self.node_address(), free_port()

    def init_dist(self, rank: int, world_size: int, addr: str, port: int | None, gpu: bool = False) -> int:
        """Join the role's process group: NCCL when the placement has GPUs (`gpu`), else gloo."""
        from rlhf_system.distributed.deepspeed import dist_init
        from rlhf_system.distributed.net import pin_gloo_interface

        self.rank, self.world_size = rank, world_size
        pin_gloo_interface()  # the process group and the weight-sync group talk on Ray's network
        dist_init(rank, world_size, addr, port, gpu=gpu)
        return rank

    def where(self, engine_share: float | None = None) -> tuple[str, int]:
        """(node id, cores this process may use): the group decides thread counts from them. engine_share:
        the node's cores are split with the rollout engines (threads.split_cores); the trainers' part."""
        import ray

        from rlhf_system.distributed.threads import node_cores, split_cores

        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        cores = node_cores() if engine_share is None else split_cores(node_cores(), engine_share)[1]
        return node, len(cores)

    def set_threads(self, n: int, engine_share: float | None = None) -> int:
        """Compute with `n` threads (pinned to the trainers' cores when they are split from the engines');
        returns what torch reports."""
        from rlhf_system.distributed.threads import node_cores, pin, set_threads, split_cores

        if engine_share is not None:
            pin(split_cores(node_cores(), engine_share)[1])
        return set_threads(n)

    def num_threads(self) -> int:
        """The threads this worker's torch computes with now (tests check the placement's choice)."""
        import torch

        return torch.get_num_threads()

    def peak_memory_mb(self) -> float:
        """Peak GPU memory allocated (CUDA) or peak resident memory of this worker process (CPU)."""
        import torch

        from rlhf_system.distributed.memory import process_peak_bytes

        return process_peak_bytes("cuda" if torch.cuda.is_available() else "cpu") / 2**20

    def release_memory(self) -> None:
        """Hand this process's cached device blocks back to the driver, so an engine colocated on the same
        GPU can wake into them (the wake-up OOM peers hit when the trainer's allocator keeps them)."""
        import gc

        import torch

        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def partitions(self) -> list[tuple[str, int, int, int]]:
        """(name, full numel, numel of this rank's partition, numel of the tensor the module holds) per
        parameter of this rank's engine: under ZeRO-3 the module holds 0-size placeholders and the rank
        its 1/N partition (tests check that no rank holds the whole model)."""
        out = []
        for name, p in self.engine.module.named_parameters():
            local = p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
            out.append((name, int(getattr(p, "ds_numel", p.numel())), int(local), int(p.data.numel())))
        return out

    def full_state_dict(self) -> dict:
        """The engine's full fp32 parameters on CPU (a collective under ZeRO-3): equivalence tests compare them."""
        from rlhf_system.distributed.deepspeed import gathered_state_dict

        return gathered_state_dict(self.engine, self.engine.zero_optimization_stage())

    # Checkpoint verbs: the rank's `engine` and its place in the data (see checkpoint.py).
    def save_checkpoint(self, path: str) -> None:
        from rlhf_system.checkpoint import save_data_position, save_rank

        save_rank(self.engine, path, self.rank)
        if self.data is not None:
            save_data_position(path, self.rank, self.data.state_dict())

    def load_checkpoint(self, path: str) -> None:
        from rlhf_system.checkpoint import load_data_position, load_rank

        load_rank(self.engine, path, self.rank)
        if self.data is not None:
            self.data.load_state_dict(load_data_position(path, self.rank), path)

    def teardown(self) -> None:
        from rlhf_system.distributed.deepspeed import dist_teardown

        dist_teardown()
