"""Check `fa2_packing`: with flash_attention_2, a packed forward equals each sequence's own forward.

The kit policy in bf16 on CUDA, loaded by the project's loader (models/load.load_causal_lm, the attention
and dtype from a ModelConfig). Several sequences are packed with data/collate.py's pack_samples and
collated in the layout packing_layout picks for flash_attention_2 ("flat": one row, position ids restarting
per sequence, no attention mask: what SFTWorker.collate feeds the model), then compared with each
sequence's own forward: the max |logit difference| over all tokens, ok below 2e-2. A control: the same
row with position ids that do not restart (plain causal attention across the pack) must differ by far more,
or the check would prove nothing.
"""

from __future__ import annotations

from pathlib import Path

from tests.gpu.checks.common import ON_CPU, assets, main, need

TOL = 2e-2
LENGTHS = (7, 5, 9, 4, 13, 2, 11)


def check(work: Path) -> dict:
    # CPU mode (plumbing only): sdpa in float32, whose "mask" layout the flat row still gets right
    attn, dtype, device = ("sdpa", "float32", "cpu") if ON_CPU else ("flash_attention_2", "bfloat16", "cuda")
    need(*(() if ON_CPU else ("flash_attn",)))
    import torch

    from rlhf_system.config import ModelConfig
    from rlhf_system.data.collate import collate_flat, pack_samples, packing_layout
    from rlhf_system.models.load import load_causal_lm

    layout = packing_layout("flash_attention_2")
    if layout != "flat":
        raise AssertionError(f"packing_layout('flash_attention_2') is '{layout}', expected 'flat'")
    path = assets(work)["policy"]
    model = load_causal_lm(ModelConfig(path=str(path), dtype=dtype, attn_implementation=attn)).to(device).eval()
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    samples = [{"input_ids": torch.randint(5, vocab, (n,), generator=g).tolist(), "loss_mask": [1] * n}
               for n in LENGTHS]
    packs = pack_samples(samples, max_len=24)
    batch = {k: v.to(device) for k, v in collate_flat(packs).items()}
    with torch.no_grad():
        flat = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0].float()
        joined = model(input_ids=batch["input_ids"], use_cache=False).logits[0].float()  # no boundaries
        diffs, control, start = [], 0.0, 0
        for s in samples:
            n = len(s["input_ids"])
            solo = model(input_ids=torch.tensor([s["input_ids"]], device=device), use_cache=False).logits[0].float()
            diffs.append((flat[start:start + n] - solo).abs().max().item())
            control = max(control, (joined[start:start + n] - solo).abs().max().item())
            start += n
    worst = max(diffs)
    return {"ok": worst < TOL and control > 10 * TOL, "max_abs_diff": float(f"{worst:.3g}"), "tolerance": TOL,
            "control_diff_without_boundaries": round(control, 4), "sequences": len(samples), "packs": len(packs),
            "tokens": int(batch["input_ids"].shape[1]), "attn_implementation": model.config._attn_implementation,
            "dtype": str(model.dtype).replace("torch.", "")}


if __name__ == "__main__":
    raise SystemExit(main("fa2_packing", check))
