#!/usr/bin/env bash
# The README's main job. Today it runs the largest real pipeline that exists (later issues extend it
# to SFT -> reward model -> PPO -> evaluation):
#   1. write the synthetic instruction / preference / RL prompt sets     (rlhf make-data)
#   2. train a tokenizer on them and build the tiny policy + reward model (rlhf make-tiny-model)
#   3. format, tokenise, mask and pack the SFT data and its held-out split (rlhf prepare-data)
#   4. sample from the (untrained) policy with vLLM's CPU build on held-out prompts (rlhf sample)
# Outputs go to runs/demo/. Extra arguments are passed to step 3 as config overrides.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
RUN=runs/demo
stage() { printf '\n=== %s ===\n' "$*"; }

stage "1/4 synthetic instruction tasks -> $RUN/data"
rlhf make-data "$RUN/data" --seed 0
stage "2/4 tokenizer + tiny models -> $RUN/tiny"
rlhf make-tiny-model "$RUN/tiny" --seed 0
stage "3/4 SFT data: chat template, assistant-only loss mask, packing"
rlhf prepare-data sft --config configs/sft/tiny-cpu.yaml "$@"
stage "4/4 vLLM (CPU build) samples from the untrained policy"
rlhf sample "$RUN/tiny/policy" "$RUN/data/rl_test_seen.jsonl" --n 64 --max-new-tokens 24
printf '\nDone. Resolved config: %s\n' "$RUN/sft/config.yaml"
