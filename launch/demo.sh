#!/usr/bin/env bash
# The main job: the whole adaptation pipeline on the embedded synthetic tasks and a tiny model, on CPU
# (about 6 minutes on 2 cores; the first run also sets up .venv):
#   1. synthetic instruction / preference / RL prompt sets (30% of the SFT demonstrations flawed, as
#      human demonstrations are)                                           -> runs/demo/data
#   2. a tokenizer + tiny Llama policy                                     -> runs/demo/tiny
#   3. SFT     rlhf train sft --config configs/sft/tiny-cpu.yaml           -> runs/demo/sft
#   4. RM      rlhf train rm  --config configs/rm/tiny-cpu.yaml            -> runs/demo/rm
#   5. PPO     rlhf train ppo --config configs/ppo/tiny-cpu.yaml           -> runs/demo/ppo
#   6. eval    base vs SFT vs RLHF: the alignment table                    -> runs/demo/report.md
# Options: --smoke (every stage at toy size, under 3 minutes: what CI runs), --out DIR, --with-feedback
# (after the RM: simulated annotators judge pairs of SFT samples in the feedback app, and a reward model
# trained on their votes is reported beside the synthetic-pair one).
# The pipeline itself is rlhf_system/demo.py (`rlhf demo`).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec rlhf demo "$@"
