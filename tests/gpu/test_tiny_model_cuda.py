"""The tiny kit model on CUDA in bf16 (the GPU default): packing boundaries still hold."""

import copy
import importlib.util

import pytest
import torch

from rlhf_system.data.collate import collate_flat, collate_packed, pack_samples
from tests.unit.data.test_collate import assert_each_sample_solo


def test_packed_forward_bf16_on_cuda(tiny_policy):
    model = copy.deepcopy(tiny_policy).to("cuda", torch.bfloat16)  # the fixture is shared with CPU tests
    torch.manual_seed(0)
    samples = [{"input_ids": torch.randint(5, 300, (n,)).tolist(), "loss_mask": [1] * n} for n in (7, 5, 9)]
    batch = {k: v.cuda() for k, v in collate_packed(pack_samples(samples, 24), 0, torch.bfloat16).items()}
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       attention_mask=batch["attention_mask"]).logits[0].float()
    assert_each_sample_solo(model, packed, samples, atol=3e-2, device="cuda")
    assert model.dtype == torch.bfloat16


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs the flash-attn package")
def test_flash_attention_2_flat_packing_equals_unpacked(tiny_policy, tmp_path):
    """FA2 takes no dense mask: packs go flat (one row, restarting position ids) and each sample still
    gets its solo logits."""
    from transformers import AutoModelForCausalLM

    tiny_policy.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16,
                                                 attn_implementation="flash_attention_2").cuda().eval()
    torch.manual_seed(0)
    samples = [{"input_ids": torch.randint(5, 300, (n,)).tolist(), "loss_mask": [1] * n} for n in (7, 5, 9, 4)]
    batch = {k: v.cuda() for k, v in collate_flat(pack_samples(samples, 14)).items()}
    with torch.no_grad():
        flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                     use_cache=False).logits[0].float()
    assert_each_sample_solo(model, flat, samples, atol=3e-2, device="cuda")
