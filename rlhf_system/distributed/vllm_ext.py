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
    _ws_link = None

    def num_threads(self) -> int:
        """The threads this vLLM worker computes with (placement checks; distributed/threads.py)."""
        return torch.get_num_threads()

    def ws_join(self, addr: str, port: int, rank_offset: int, world: int, timeout_s: float, backend: str,
                senders: int) -> int:
        """Join as sync rank `rank_offset + this worker's rank`; with colocated engines (mapped backends) this
        worker maps the buckets of actor rank (its index among the engine workers) % `senders`."""
        from rlhf_system.distributed.sync_transport import Receiver

        rank = rank_offset + getattr(self, "rank", 0)
        _quiet_expected_reload_warnings(self.vllm_config.model_config.hf_config)
        self._ws_link = Receiver.join(backend, addr, port, rank, world, timeout_s, source=(rank - senders) % senders)
        return rank

    def ws_receive(self, plan: list[list]) -> dict:
        """Receive the buckets of `plan` and reload the weights in place, each bucket as it arrives.
        Returns the tensors loaded, the bytes that crossed a socket (mapped backends: handles) and the
        rise in this process's memory the sync needed."""
        from rlhf_system.distributed.memory import PeakMemory

        link = self._ws_link
        if link is None:
            raise RuntimeError("ws_receive before ws_join: the controller must open the sync group first")
        count = [0]
        with PeakMemory(link.device) as peak:
            stream = _received(link, plan, count)
            # vLLM's own reload path, in place, from checkpoint-format names: it unwraps a CUDA-graph
            # wrapper (model_runner.model is one under full graphs), re-runs the loader's post-processing
            # (plain model.load_weights fails on CPU once the kernels are repacked: "Parameter has no
            # attribute weight_loader") and resets the runner's caches. It pulls from `stream`, so a
            # bucket is received when it is needed.
            reload_in_place(self, stream)
            # The sender sends every bucket: receive any vLLM left unread, or both sides would hang.
            unread = sum(1 for _ in stream)
            link.finish()
        if unread:
            raise RuntimeError(f"weight sync: vLLM's load_weights stopped with {unread} tensors of the plan unread")
        return {"tensors": count[0], "peak_rise_bytes": peak.rise, "wire_bytes": link.wire_bytes,
                "backend": link.backend, "rank": link.rank}

    def device_free_bytes(self) -> int | None:
        """Free memory of this worker's GPU (None on CPU): the hybrid engine's phase report."""
        return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None

    def weight_bytes(self) -> int:
        """Bytes of this worker's weights: what a level-1 sleep copies to host memory."""
        return sum(p.numel() * p.element_size() for p in self.model_runner.get_model().parameters())

    def ws_close(self) -> None:
        if self._ws_link is not None:
            self._ws_link.close()
        self._ws_link = None


def _received(link, plan: list[list], count: list[int]):
    """(name, tensor) pairs, one bucket received at a time: each bucket's buffer is dropped here as soon
    as its tensors are handed out, so only what vLLM still holds keeps it alive."""
    for bucket in plan:
        metas = [weight_sync.TensorMeta(*m) if not isinstance(m, weight_sync.TensorMeta) else m for m in bucket]
        buf = link.recv(sum(m.numel for m in metas), getattr(torch, metas[0].dtype))
        views = weight_sync.unflatten(buf, metas)
        del buf
        views.reverse()
        while views:
            count[0] += 1
            yield views.pop()


def reload_in_place(worker, weights) -> None:
    """Load (name, tensor) pairs in checkpoint format into this vLLM worker's model, in place: the weight
    sync's load step (also `rlhf check-model`'s, through LLM.collective_rpc with the weights in memory)."""
    runner = worker.model_runner
    runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
    if next(runner.get_model().parameters()).device.type == "cpu":
        _repack_cpu_lm_heads(runner.get_model())
        _repack_cpu_moe_experts(runner.get_model())


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


def _repack_cpu_moe_experts(model: torch.nn.Module) -> None:
    """Re-pack the weights of vLLM's CPU MoE experts after a reload.

    vLLM's CPU experts (CPUUnquantizedExperts) lay w13 / w2 out for their kernel once, when the kernel
    is built at load (cpu_prepack_moe_weight). A reload writes the new weights back in checkpoint layout
    into the same storage and only re-runs the GPU path's shuffle, so the kernel read unpacked weights:
    after any sync into a Qwen2-MoE engine its log-probs were 7e-2 off (found by `rlhf check-model`; the
    experts' own process_weights_after_loading puts them back to 5e-7).
    """
    for m in model.modules():
        kernel = getattr(getattr(m, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None) if kernel is not None else None
        if hasattr(m, "w13_weight") and hasattr(experts, "process_weights_after_loading"):  # CPU only (caller)
            experts.process_weights_after_loading(m)
