"""vLLM warns "<Layer>: Failed to load weights" after every in-place reload for layers a sync never
sends; the filter drops exactly those (rotary cache; the LM head only when it is the tied embedding)."""

import logging

from rlhf_system.distributed.vllm_ext import ExpectedUnloaded


def record(layer: str, msg: str = "%s: Failed to load weights") -> logging.LogRecord:
    return logging.LogRecord("vllm.model_executor.model_loader.reload.layerwise", logging.WARNING, __file__, 1,
                             msg, (layer,), None)


def test_only_the_layers_a_sync_skips_on_purpose_are_quiet():
    tied, untied = ExpectedUnloaded(tied=True), ExpectedUnloaded(tied=False)
    assert not tied.filter(record("RotaryEmbedding")) and not untied.filter(record("RotaryEmbedding"))
    assert not tied.filter(record("ParallelLMHead"))
    assert untied.filter(record("ParallelLMHead"))  # an untied head is sent: missing it is a real gap
    assert tied.filter(record("QKVParallelLinear"))
    assert tied.filter(record("RotaryEmbedding", "%s: Delayed processing"))
