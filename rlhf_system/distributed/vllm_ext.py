"""The receiving half of weight sync, mixed into vLLM's worker class.

vLLM is started with `worker_extension_cls="rlhf_system.distributed.vllm_ext.WeightSyncExtension"`;
these methods then run inside each vLLM worker process, called through `LLM.collective_rpc`. `self`
is vLLM's Worker (it has `vllm_config`, `model_runner`, `rank`). The contract and the order of calls
are in distributed/weight_sync.py.

Only metadata travels through rpc arguments (vLLM turns tensors in rpc args into lists); the weights
themselves arrive by broadcast on the sync group.
"""

from __future__ import annotations

import logging

import torch

from rlhf_system.distributed import weight_sync


class WeightSyncExtension:
    _ws_group = None
    _ws_store = None
    _ws_backend = "gloo"

    def num_threads(self) -> int:
        """The threads this vLLM worker computes with (placement checks; distributed/threads.py)."""
        return torch.get_num_threads()

    def ws_join(self, addr: str, port: int, rank_offset: int, world: int, timeout_s: float) -> int:
        rank = rank_offset + getattr(self, "rank", 0)
        _quiet_expected_reload_warnings(self.vllm_config.model_config.hf_config)
        self._ws_backend = weight_sync.backend_for_device()
        self._ws_group, self._ws_store = weight_sync.make_group(
            self._ws_backend, addr, port, rank, world, timeout_s, is_master=False)
        return rank

    def ws_receive(self, plan: list[list]) -> dict:
        """Receive the buckets of `plan` and reload the weights in place, each bucket as it arrives.
        Returns the tensors loaded and the rise in this process's memory the sync needed."""
        from vllm.model_executor.model_loader.reload.inplace import reload_weights

        from rlhf_system.distributed.memory import PeakMemory

        if self._ws_group is None:
            raise RuntimeError("ws_receive before ws_join: the controller must open the sync group first")
        device = torch.device("cuda", torch.cuda.current_device()) if self._ws_backend == "nccl" else "cpu"
        model = self.model_runner.model
        count = [0]
        with PeakMemory(device) as peak:
            stream = _received(self._ws_group, self._ws_backend, plan, device, count)
            # In place, from checkpoint-format names: plain model.load_weights fails on CPU once vLLM has
            # repacked its kernels ("Parameter has no attribute weight_loader"); reload_weights re-runs the
            # loader's post-processing. It pulls from `stream`, so a bucket is received when it is needed.
            reload_weights(self.vllm_config, model, stream, None, True)
            # The sender broadcasts every bucket: receive any vLLM left unread, or both sides would hang.
            unread = sum(1 for _ in stream)
            if self._ws_backend == "gloo":
                _repack_cpu_lm_heads(model)
        if unread:
            raise RuntimeError(f"weight sync: vLLM's load_weights stopped with {unread} tensors of the plan unread")
        return {"tensors": count[0], "peak_rise_bytes": peak.rise}

    def ws_close(self) -> None:
        self._ws_group = self._ws_store = None


def _received(group, backend: str, plan: list[list], device, count: list[int]):
    """(name, tensor) pairs, one bucket received at a time: each bucket's buffer is dropped here as soon
    as its tensors are handed out, so only what vLLM still holds keeps it alive."""
    for bucket in plan:
        metas = [weight_sync.TensorMeta(*m) if not isinstance(m, weight_sync.TensorMeta) else m for m in bucket]
        buf = torch.empty(sum(m.numel for m in metas), dtype=getattr(torch, metas[0].dtype), device=device)
        weight_sync.broadcast(group, backend, buf)
        views = weight_sync.unflatten(buf, metas)
        del buf
        views.reverse()
        while views:
            count[0] += 1
            yield views.pop()


class ExpectedUnloaded(logging.Filter):
    """Drops vLLM's "<Layer>: Failed to load weights" for layers a sync never sends on purpose: the
    rotary embedding (a cos/sin cache computed from the config, not a weight) and, with tied embeddings,
    the LM head (it is the embedding, which is sent). Any other layer's warning still shows: that one
    would be a real gap in the sync."""

    def __init__(self, tied: bool):
        super().__init__()
        self.layers = {"RotaryEmbedding"} | ({"ParallelLMHead"} if tied else set())

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.msg == "%s: Failed to load weights" and record.args and record.args[0] in self.layers)


def _quiet_expected_reload_warnings(hf_config) -> None:
    """Once per engine process (ws_join may run again after a reopen)."""
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    if not any(isinstance(f, ExpectedUnloaded) for f in log.filters):
        log.addFilter(ExpectedUnloaded(bool(getattr(hf_config, "tie_word_embeddings", False))))


def _repack_cpu_lm_heads(model: torch.nn.Module) -> None:
    """Refresh the CPU GEMM cache of layers that keep their weight (vLLM's embedding-based LM head).

    On CPU, vLLM packs each linear weight for its GEMM kernel once after loading (`cpu_linear`). A
    tied LM head shares the embedding's parameter, so the reload updates the weight but not the
    packed copy, and logits keep coming from the OLD head (seen: log-prob gaps of 0.75 nats after a
    sync that changed the embeddings). Ordinary linears drop their weight after packing (size 0) and
    are re-packed by the reload itself; these are skipped.
    """
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    for m in model.modules():
        w = getattr(m, "weight", None)
        if hasattr(m, "cpu_linear") and isinstance(w, torch.Tensor) and w.ndim == 2 and w.numel() > 0:
            dispatch_cpu_unquantized_gemm(m, remove_weight=False)
