"""Check `gkd_forward`: GKD's two sides (workers/sequences.py, algorithms/gkd.py) on CUDA in bf16 agree with
float32 on the CPU, in the padded and the padding-free layouts.

The kit policy loaded by the project's loader (models/load.load_causal_lm) stands for both teacher and
student. The teacher's side (policy_topk: sampled-token log-probs, top-k ids and log-probs, one forward) and
the student's (policy_forward with at_ids, differentiable) run on the device, with the top-k ids crossing
as CPU tensors as they do between the reference role and the actor. For the gradient, the teacher is the
float32 model at a lower temperature (the same model at the same temperature has zero divergence). ok when: the top-k log-probs and the
student's log-probs of those ids are within 5e-2 of float32 CPU and of the teacher's (bf16 logits;
the sorted top-k values are compared, defined whatever near-ties swap), the top-1 ids agree on at
least 95% of positions (bf16 near-ties may swap); the generalised JSD backward leaves finite, non-zero
gradients, and both layouts agree within the same tolerance.
"""

from __future__ import annotations

from pathlib import Path

from tests.gpu.checks.common import ON_CPU, assets, main

TOL = 5e-2
K = 8


def check(work: Path) -> dict:
    import torch

    from rlhf_system.algorithms.gkd import topk_jsd
    from rlhf_system.config import ModelConfig
    from rlhf_system.data.experience import Experience
    from rlhf_system.models.load import load_causal_lm
    from rlhf_system.workers.sequences import policy_forward, policy_topk

    class Bare:  # what the forwards use of a DeepSpeed engine
        def __init__(self, module, device):
            self.module, self.device = module, torch.device(device)

        def __call__(self, **kw):
            return self.module(**kw)

    path = str(assets(work)["policy"])
    device, dtype = ("cpu", "float32") if ON_CPU else ("cuda", "bfloat16")
    ref = Bare(load_causal_lm(ModelConfig(path=path, dtype="float32")).eval(), "cpu")
    dev = Bare(load_causal_lm(ModelConfig(path=path, dtype=dtype)).to(device), device)
    g = torch.Generator().manual_seed(0)
    vocab = ref.module.config.vocab_size
    shapes = [(5, 9), (12, 3), (3, 0), (7, 14), (9, 1)]
    exp = Experience.from_rollout([torch.randint(5, vocab, (p,), generator=g).tolist() for p, _ in shapes],
                                  [torch.randint(5, vocab, (r,), generator=g).tolist() for _, r in shapes], 0)
    mask = exp.response_mask.bool()
    with torch.no_grad():
        _, want_ids, want_lps = policy_topk(ref, exp, K, temperature=0.7)
        # a teacher that differs from the student (sharper), so that the divergence has a gradient
        _, sharp_ids, sharp_lps = policy_topk(ref, exp, K, temperature=0.4)
    out: dict = {"ok": True}
    grads = {}
    for flat in (False, True):
        name = "flat" if flat else "padded"
        with torch.no_grad():
            lp, ids, lps = (x.cpu() for x in policy_topk(dev, exp, K, temperature=0.7, flat=flat))
            _, _, at = policy_forward(dev, exp, temperature=0.7, flat=flat, at_ids=ids)
        dev.module.zero_grad()
        _, _, student = policy_forward(dev, exp, temperature=0.7, flat=flat, at_ids=sharp_ids)
        jsd = topk_jsd(sharp_lps.to(student.device), student, 0.5)
        (jsd * exp.response_mask.to(jsd.device)).sum().backward()
        g_norm = sum(float(p.grad.float().norm()) ** 2 for p in dev.module.parameters() if p.grad is not None) ** 0.5
        top1 = (ids[..., 0] == want_ids[..., 0])[mask].float().mean().item()
        lps_err = (lps - want_lps)[mask].abs().max().item()  # sorted values: defined whatever ids swap
        at_err = (at.detach().float().cpu() - lps)[mask].abs().max().item()  # the student's side at the same ids
        grads[name] = g_norm
        out[name] = {"top1_agree": round(top1, 4), "topk_logprob_err": float(f"{lps_err:.3g}"),
                     "student_vs_teacher_err": float(f"{at_err:.3g}"), "grad_norm": float(f"{g_norm:.4g}")}
        out["ok"] &= top1 >= 0.95 and lps_err < TOL and at_err < TOL and 0 < g_norm < float("inf")
    rel = abs(grads["flat"] - grads["padded"]) / max(grads["padded"], 1e-12)
    out |= {"layouts_grad_rel_diff": float(f"{rel:.3g}"), "tolerance": TOL, "k": K, "dtype": dtype}
    out["ok"] &= rel < TOL
    return out


if __name__ == "__main__":
    raise SystemExit(main("gkd_forward", check))
