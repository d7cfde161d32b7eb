#!/usr/bin/env bash
# The GPU checks, for the day a GPU is lent (issue 22; tests/gpu/README.md): ONE JSON line per check on
# stdout, {"check": NAME, "ok": true|false|null, "skipped"?: reason, ...figures}; every log on stderr.
#
#   bash tests/gpu/run_checks.sh > checks.jsonl 2> checks.log
#
# Exit status: 1 when a check that ran failed, else 0 (skips included: no CUDA device, a package missing).
# Each check runs in its own process (python -m tests.gpu.checks.NAME) under `timeout`, inside an overall
# budget (RLHF_GPU_CHECKS_BUDGET_S, 440 s) that keeps the whole script under 8 minutes on one GPU. Nothing is
# installed and no network or model hub is used: the tiny model and data are built into a temp folder.
#
# Environment: PYTHON (default python3: the image's own), RLHF_GPU_CHECKS_BUDGET_S, RLHF_GPU_CHECKS_DIR
# (work folder, kept; default a temp folder, removed), RLHF_GPU_CHECKS_ONLY="sft rm" (a subset),
# RLHF_GPU_CHECK_STEPS (20), RLHF_GPU_CHECKS_ON_CPU=1 (develop the checks' plumbing without a GPU).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"

# In the order they run: the cheap ones first, so a short budget still gets them.
CHECKS=(fa2_packing gkd_forward sft rm dpo families rollout_tokens_per_s grpo_colocated grpo_nccl)
declare -A LIMIT=([fa2_packing]=90 [gkd_forward]=60 [sft]=120 [rm]=120 [dpo]=120 [families]=150 [rollout_tokens_per_s]=150
                  [grpo_colocated]=240 [grpo_nccl]=240)
if [[ -n "${RLHF_GPU_CHECKS_ONLY:-}" ]]; then read -r -a CHECKS <<< "$RLHF_GPU_CHECKS_ONLY"; fi
BUDGET="${RLHF_GPU_CHECKS_BUDGET_S:-440}"
START=$SECONDS

log() { echo "[run_checks] $*" >&2; }
json_str() { local s=${1//\\/\\\\}; s=${s//\"/\\\"}; printf '"%s"' "${s//$'\n'/ }"; }
skip_all() {
  log "every check skipped: $1"
  for name in "${CHECKS[@]}"; do
    printf '{"check": "%s", "ok": null, "skipped": %s}\n' "$name" "$(json_str "$1")"
  done
  exit 0
}

# --- Is there a CUDA device? Cheap probes first: this path must not import torch on a machine without one.
if [[ "${RLHF_GPU_CHECKS_ON_CPU:-0}" != 1 ]]; then
  if [[ "${CUDA_VISIBLE_DEVICES-unset}" == "" || "${CUDA_VISIBLE_DEVICES:-}" == "-1" ]]; then
    skip_all "no CUDA device"  # hidden on purpose (the CPU unit test does this)
  fi
  if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; } \
     && ! compgen -G '/dev/nvidia[0-9]*' >/dev/null; then
    skip_all "no CUDA device"
  fi
  if ! "$PY" -c 'import torch' >/dev/null 2>&1; then skip_all "torch not installed ($PY)"; fi
  if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >&2; then
    skip_all "no CUDA device"
  fi
  nvidia-smi -L >&2 2>/dev/null || true
fi

# --- Environment: the repository on the path, nothing reaches a network or a model hub.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export WANDB_MODE=disabled VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0
export PYTHONUNBUFFERED=1
if [[ "${RLHF_GPU_CHECKS_ON_CPU:-0}" == 1 ]]; then export DS_ACCELERATOR=cpu; fi
if [[ -n "${RLHF_GPU_CHECKS_DIR:-}" ]]; then
  WORK="$RLHF_GPU_CHECKS_DIR"; mkdir -p "$WORK"
else
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/rlhf-gpu-checks.XXXXXX")"
  trap 'rm -rf "$WORK"' EXIT
fi
export HF_DATASETS_CACHE="$WORK/hf_datasets"
log "python: $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])'); work folder: $WORK"

# --- The tiny model and data every check uses (built at run time: `rlhf make-tiny-model`, `rlhf make-data`).
if [[ ! -f "$WORK/data/manifest.json" ]]; then
  log "building the tiny model and data"
  timeout -k 10 120 "$PY" -m tests.gpu.checks.assets "$WORK" >&2 || log "building the assets failed (rc $?)"
fi

FAILED=0
for name in "${CHECKS[@]}"; do
  left=$(( BUDGET - (SECONDS - START) ))
  limit=${LIMIT[$name]:-120}
  if (( left < 30 )); then
    line="{\"check\": \"$name\", \"ok\": null, \"skipped\": \"out of time: RLHF_GPU_CHECKS_BUDGET_S=$BUDGET spent\"}"
  else
    (( limit > left )) && limit=$left
    out="$WORK/$name.json"; rm -f "$out"
    log "--- $name (at most ${limit}s; ${left}s of the budget left)"
    t0=$SECONDS; deadline=$(( $(date +%s) + limit ))
    timeout -k 15 "$limit" "$PY" -m "tests.gpu.checks.$name" "$WORK" "$out" >&2
    rc=$?
    if [[ -s "$out" ]]; then
      line="$(head -n 1 "$out")"
      if (( rc == 124 || rc == 137 )); then
        if (( $(stat -c %Y "$out") < deadline )); then  # the result came in time, then the process hung
          line="${line%\}}, \"note\": \"wrote its result, then did not exit within ${limit}s\"}"
        else  # SIGTERM at the deadline: the run stopped early (trainers checkpoint and return) and reported
          line="${line%\}}, \"note\": \"stopped by the ${limit}s time limit\"}"
          line="${line/\"ok\": true/\"ok\": false}"
        fi
      fi
    elif (( rc == 124 || rc == 137 )); then
      line="{\"check\": \"$name\", \"ok\": false, \"error\": \"timed out after ${limit}s\", \"seconds\": $(( SECONDS - t0 ))}"
    else
      line="{\"check\": \"$name\", \"ok\": false, \"error\": \"exited $rc without a result (stderr says why)\", \"seconds\": $(( SECONDS - t0 ))}"
    fi
  fi
  echo "$line"
  [[ "$line" == *'"ok": false'* ]] && FAILED=1
done
log "done in $(( SECONDS - START ))s"
exit $FAILED
