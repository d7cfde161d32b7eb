#!/usr/bin/env bash
# The README's main job: the largest real pipeline that exists today (later issues add the reward
# model -> PPO stages), on the embedded synthetic tasks and a tiny model, on CPU in a few minutes:
#   1. write the synthetic instruction / preference / RL prompt sets        (rlhf make-data)
#   2. train a tokenizer on them and build the tiny policy + reward model    (rlhf make-tiny-model)
#   3. instruction-tune the policy under DeepSpeed (SFT, assistant-only loss) (rlhf train sft)
#   4. evaluate base vs SFT by greedy generation + rule-based verifiers      (rlhf eval)
#   5. sample from the SFT model with vLLM's CPU build                       (rlhf sample)
# Outputs go to runs/demo/. Extra arguments are config overrides for step 3 (e.g. train.epochs=1).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
RUN=runs/demo
stage() { printf '\n=== %s ===\n' "$*"; }

stage "1/5 synthetic instruction tasks -> $RUN/data"
rlhf make-data "$RUN/data" --seed 0
stage "2/5 tokenizer + tiny models -> $RUN/tiny"
rlhf make-tiny-model "$RUN/tiny" --seed 0
stage "3/5 SFT (DeepSpeed, in-process) -> $RUN/sft"
rlhf train sft --config configs/sft/tiny-cpu.yaml "$@"
for split in test_seen test_unseen_phrasing test_unseen_family; do
  stage "4/5 eval on rl_$split: base vs SFT"
  rlhf eval "$RUN/tiny/policy" "$RUN/sft/hf" --prompts "$RUN/data/rl_$split.jsonl" --limit 200 > "$RUN/eval_$split.json"
done
stage "5/5 vLLM (CPU build) samples from the SFT model"
rlhf sample "$RUN/sft/hf" "$RUN/data/rl_test_seen.jsonl" --n 64 --max-new-tokens 24
printf '\nDone. Run directory: %s (config.yaml, metrics.jsonl, plots/, hf/), evaluations: %s/eval_*.json\n' \
  "$RUN/sft" "$RUN"
