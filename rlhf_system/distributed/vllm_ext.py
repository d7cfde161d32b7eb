"""The receiving half of weight sync, mixed into vLLM's worker class.

vLLM is started with `worker_extension_cls="rlhf_system.distributed.vllm_ext.WeightSyncExtension"`;
these methods then run inside each vLLM worker process, called through `LLM.collective_rpc`. `self`
is vLLM's Worker (it has `vllm_config`, `model_runner`, `rank`). The contract and the order of calls
are in distributed/weight_sync.py.

Only metadata travels through rpc arguments (vLLM turns tensors in rpc args into lists); the weights
themselves arrive by broadcast on the sync group.
"""

from __future__ import annotations

import torch

from rlhf_system.distributed import weight_sync


class WeightSyncExtension:
    _ws_group = None
    _ws_store = None
    _ws_backend = "gloo"

    def ws_join(self, addr: str, port: int, rank_offset: int, world: int, timeout_s: float) -> int:
        rank = rank_offset + getattr(self, "rank", 0)
        self._ws_backend = weight_sync.backend_for_device()
        self._ws_group, self._ws_store = weight_sync.make_group(
            self._ws_backend, addr, port, rank, world, timeout_s, is_master=False)
        return rank

    def ws_receive(self, plan: list[list]) -> int:
        """Receive every bucket of `plan` and reload the weights in place. Returns tensors loaded."""
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        if self._ws_group is None:
            raise RuntimeError("ws_receive before ws_join: the controller must open the sync group first")
        device = torch.device("cuda", torch.cuda.current_device()) if self._ws_backend == "nccl" else "cpu"
        named: list[tuple[str, torch.Tensor]] = []
        for bucket in plan:
            metas = [weight_sync.TensorMeta(*m) if not isinstance(m, weight_sync.TensorMeta) else m for m in bucket]
            buf = torch.empty(sum(m.numel for m in metas), dtype=getattr(torch, metas[0].dtype), device=device)
            weight_sync.broadcast(self._ws_group, self._ws_backend, buf)
            named += weight_sync.unflatten(buf, metas)
        # In place, from checkpoint-format names: plain model.load_weights fails on CPU once vLLM has
        # repacked its kernels ("Parameter has no attribute weight_loader"); reload_weights re-runs the
        # loader's post-processing.
        reload_weights(self.vllm_config, self.model_runner.model, iter(named), None, True)
        return len(named)

    def ws_close(self) -> None:
        self._ws_group = self._ws_store = None
