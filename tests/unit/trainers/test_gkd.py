"""GKD's off-policy share (trainers/gkd.py): which groups take the data's response (seeded, about 1 - lambda
of them), the reference response's tokens as the student would have made them, the mixed batch's order,
and the config errors of what the mix cannot be combined with."""

import pytest

from rlhf_system.config import ConfigError, load_config
from rlhf_system.data.samples import Sample
from rlhf_system.data.sources import DataError
from rlhf_system.data.tokenize import encode_with_mask, render_prompt
from rlhf_system.trainers import gkd

GKD = ["algorithm.estimator=opd", "model.reference_path=teacher", "algorithm.kl.coef=0", "algorithm.distill.loss=gkd",
       "rewards.use_model=false", "rewards.rules=[synthetic]"]


def config(*over):
    return load_config("configs/grpo/tiny-cpu.yaml", [*GKD, *over])


def row(tok, question: str, response: str | None) -> dict:
    messages = [{"role": "user", "content": question}]
    meta = {"answer": "4"} | ({"response": response} if response is not None else {})
    return {"prompt_ids": tok(render_prompt(tok, messages, "chat"), add_special_tokens=False)["input_ids"],
            "messages": messages, "meta": meta}


def test_the_off_policy_share_is_seeded_per_step_and_group():
    cfg = config("algorithm.distill.on_policy=0.25")
    draws = [gkd.off_policy_groups(cfg, step, 40) for step in range(10)]
    assert draws[3] == gkd.off_policy_groups(cfg, 3, 40)  # a resumed step draws the same
    assert draws[3] != draws[4]
    share = sum(map(sum, draws)) / 400
    assert 0.65 < share < 0.85, share  # 1 - lambda of the groups, in expectation
    assert not any(map(any, (gkd.off_policy_groups(config(), s, 40) for s in range(3))))  # lambda 1: none
    assert all(map(all, (gkd.off_policy_groups(config("algorithm.distill.on_policy=0"), s, 40) for s in range(3))))


def test_the_reference_response_is_what_the_template_puts_after_the_prompt(char_tokenizer):
    tok = char_tokenizer
    r = row(tok, "2+2?", "four")
    s = gkd.reference_response(tok, "chat", r, "response", max_new_tokens=64)
    ids, mask = encode_with_mask(tok, r["messages"] + [{"role": "assistant", "content": "four"}], "chat", 0, "t")
    trained = [i for i, m in zip(ids, mask) if m]  # the SFT mask: the assistant turn through its eos
    assert s.prompt_ids + s.response_ids == ids[:len(s.prompt_ids) + len(s.response_ids)]
    assert s.response_ids == trained and s.response_ids[-1] == tok.eos_token_id
    assert s.off_policy and s.finish_reason == "stop" and s.text == "four" and s.logprobs == [0.0] * len(s.response_ids)
    cut = gkd.reference_response(tok, "chat", r, "response", max_new_tokens=3)
    assert cut.response_ids == s.response_ids[:3] and cut.finish_reason == "length"
    with pytest.raises(DataError, match="has no 'response' text"):
        gkd.reference_response(tok, "chat", row(tok, "2+2?", None), "response", 64)


def test_mixed_batches_keep_prompt_major_order_and_sample_only_the_on_policy_groups(char_tokenizer):
    cfg = config("algorithm.distill.on_policy=0.5", "rollout.n_samples_per_prompt=2", "train.global_batch_size=32")
    rows = [row(char_tokenizer, f"{i}+1?", f"r{i}") for i in range(12)]
    off = gkd.off_policy_groups(cfg, 7, len(rows))
    asked = []

    def episodes(cfg, tok, rollout, prompts, seed):
        asked.extend(prompts)
        return [Sample(p["prompt_ids"], [5, 6], [-1.0, -1.0], "stop", "x") for p in prompts for _ in range(2)], {}

    samples, metrics = gkd.mixed_episodes(cfg, char_tokenizer, None, rows, 0, 7, episodes)
    assert asked == [r for r, o in zip(rows, off) if not o] and 0 < sum(off) < len(rows)
    assert len(samples) == 24 and metrics["gkd/off_policy"] == sum(off) / 12
    for i, r in enumerate(rows):
        pair = samples[2 * i:2 * i + 2]
        assert all(s.prompt_ids == r["prompt_ids"] and s.off_policy == off[i] for s in pair)
        assert all(s.text == (f"r{i}" if off[i] else "x") for s in pair)
    assert samples[2 * off.index(True)] is not samples[2 * off.index(True) + 1]  # copies, not one object twice


@pytest.mark.parametrize("over, message", [
    (["algorithm.distill.loss=reverse_kl", "algorithm.distill.on_policy=0.5"], "Fix: algorithm.distill.loss=gkd"),
    (["algorithm.distill.on_policy=0.5", "rollout.env=tools", "rollout.max_turns=2"], "with rollout.env='tools'"),
    (["algorithm.distill.on_policy=0.5", "rollout.dynamic_sampling=true"], "with rollout.dynamic_sampling=true"),
    (["algorithm.distill.on_policy=0.5", "rollout.partial_tokens=8", "train.max_staleness=1"],
     "with rollout.partial_tokens=8"),
    (["algorithm.estimator=grpo", "algorithm.distill.on_policy=0.5"], "Fix: algorithm.estimator=opd"),
])
def test_what_the_off_policy_share_cannot_be_combined_with_is_a_config_error(over, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        config(*over)
    config("algorithm.distill.on_policy=0.5", "algorithm.distill.beta=0", "algorithm.distill.topk=8")  # valid
