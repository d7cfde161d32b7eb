"""Scoring (prompt, response) pairs with a reward model: one function for PPO's reward role and `rlhf eval`.

A reward model is a one-label sequence classifier (models/load.load_reward_model). The conversation is
rendered with the reward model's OWN tokenizer and chat template, exactly as in reward-model training
(data/tokenize.render_conversation), so a policy and its reward model need not share a tokenizer. The
score is the classifier's logit, read by transformers at the last non-pad token of each right-padded
row.

What this is not: a trainer or a server. PPO calls `score_conversations` on its DeepSpeed engine
(workers/reward.py); evaluation loads a plain (optionally quantised) model with
`load_reward_scorer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_system.data.collate import pad_to
from rlhf_system.data.tokenize import render_conversation


@torch.no_grad()
def score_conversations(model, tokenizer, items: list[dict], template: str, batch_size: int) -> list[float]:
    """Scores of {"messages": prompt turns, "response": text} items, in order.

    `model` is anything called like an HF sequence classifier with a `.device` (a model or a DeepSpeed
    engine wrapping one); `template` is data.template of the reward model's training run (chat|plain).
    """
    out: list[float] = []
    for start in range(0, len(items), batch_size):
        seqs = [tokenizer(render_conversation(tokenizer, [*it["messages"], {"role": "assistant", "content": it["response"]}],
                                              template), add_special_tokens=False)["input_ids"]
                for it in items[start:start + batch_size]]
        ids = pad_to(seqs, tokenizer.pad_token_id)
        attn = pad_to([[1] * len(s) for s in seqs], 0)
        logits = model(input_ids=ids.to(model.device), attention_mask=attn.to(model.device)).logits
        out += logits[:, 0].float().cpu().tolist()
    return out


@dataclass
class RewardScorer:
    """A loaded reward model for evaluation: `score(items)` as in `score_conversations`."""

    path: str
    quant: str
    model: object
    tokenizer: object
    template: str
    batch_size: int = 16

    def score(self, items: list[dict]) -> list[float]:
        return score_conversations(self.model, self.tokenizer, items, self.template, self.batch_size)


def check_reward_model(path: str | Path, field: str = "--reward-model") -> str:
    """A local folder holding a *ForSequenceClassification checkpoint, else a one-line ConfigError."""
    import json

    from rlhf_system.config import ConfigError

    cfg_file = Path(path, "config.json")
    if not cfg_file.is_file():
        raise ConfigError(f"{field}: '{path}' is not a model folder (no config.json). "
                          "Fix: point it at a reward model export (rlhf train rm writes run_dir/hf)")
    archs = json.loads(cfg_file.read_text()).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise ConfigError(f"{field}: '{path}' is {archs or 'of unknown architecture'}, not a sequence classifier. "
                          "Fix: point it at a reward model export (rlhf train rm writes run_dir/hf)")
    return str(path)


def load_reward_scorer(path: str | Path, quant: str = "none", template: str = "chat",
                       batch_size: int = 16) -> RewardScorer:
    """The reward model at `path` in eval mode, in `model.dtype: auto`'s dtype (config.py), or 4bit / 8bit."""
    from rlhf_system.config import ModelConfig
    from rlhf_system.data.tokenize import check_template
    from rlhf_system.models.load import load_reward_model, load_tokenizer

    path = check_reward_model(path)
    cfg = ModelConfig(path=path)
    tokenizer = load_tokenizer(cfg)
    check_template(tokenizer, template, f"reward model '{path}'")
    model = load_reward_model(cfg, "classifier", tokenizer.pad_token_id, frozen_quant=quant).eval()
    return RewardScorer(path, quant, model, tokenizer, template, batch_size)
