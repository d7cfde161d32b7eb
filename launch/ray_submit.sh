#!/usr/bin/env bash
# Submit an `rlhf ...` command to a running Ray cluster as a Ray Job, stream its logs, and exit 0 only
# when the job SUCCEEDED (1 when it FAILED or was STOPPED; 130 when you interrupt the log stream).
#
#   bash launch/ray_submit.sh [--address http://HEAD:8265] [--no-wait] [--no-upload] [--timeout SECONDS] \
#       [--env KEY=VAL ...] -- rlhf train ppo --config configs/ppo/tiny-cpu.yaml run_dir=/shared/runs/ppo [k=v ...]
#
# Address: --address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS, else http://127.0.0.1:8265 (the
# dashboard's job API; a GCS address host:6379 also works, Ray then looks the dashboard up).
#
# Token authentication (kept on): the head must be started with RAY_AUTH_MODE=token, e.g.
#     ray get-auth-token --generate                  # writes ~/.ray/auth_token once, on the head machine
#     RAY_AUTH_MODE=token ray start --head --dashboard-host 0.0.0.0 ...
# This script sets RAY_AUTH_MODE=token for its `ray job` calls, and Ray's client reads the token from
# $RAY_AUTH_TOKEN, else the file named by $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token, on the machine
# you submit from: copy the head's ~/.ray/auth_token there, or `export RAY_AUTH_TOKEN=$(ray get-auth-token)`
# run on the head. The token is never put into the job's runtime_env (anyone who can read the job's
# details on the dashboard would see it): the job's driver runs on the head node and uses the head's
# own token, and worker nodes need the same token when they `ray start --address=...`.
#
# Code: by default this checkout is uploaded as the job's working_dir (Ray's runtime_env upload, a zip
# of at most 512 MiB: .venv, runs/, .git, caches and .gitignore'd files stay out) and put first on
# PYTHONPATH for the driver and every worker, so the job runs exactly this code. The Python packages
# themselves (torch, deepspeed, vllm, ray and the `rlhf` entry point) must already be installed on every
# node: the venv the nodes were started from, or the Docker image. --no-upload skips the upload and runs
# the command in this checkout's path ON THE HEAD NODE with the package installed there: for one machine
# or a shared filesystem (relative paths such as runs/demo/... then mean what they mean in a local run).
#
# Paths: with the upload, the job's working directory is a temporary copy on the head node
# (<ray temp dir>/session_*/runtime_resources/working_dir_files/_ray_pkg_*). configs/... resolve there,
# but runs/ is not uploaded: give data and model paths that exist on the nodes, and an ABSOLUTE run_dir
# on storage you can reach (run_dir=/shared/runs/ppo). A relative run_dir would be written into the
# temporary copy and lost when Ray cleans it up.
#
# Environment: the run's switches travel with the job when set here (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE,
# WANDB_MODE, DS_ACCELERATOR, VLLM_TARGET_DEVICE, TOKENIZERS_PARALLELISM, VLLM_CPU_KVCACHE_SPACE,
# OMP_NUM_THREADS), plus every --env KEY=VAL. Machine-specific paths (caches, TORCH_EXTENSIONS_DIR) come
# from the nodes' own environment when `ray start` ran. Values are visible in the job's details: pass
# secrets (WANDB_API_KEY, RLHF_REWARD_TOKEN) through the nodes' environment, not --env.
#
# One machine, start to end (the head's environment, e.g. `source launch/_env.sh`, reaches every worker):
#     ray get-auth-token --generate
#     RAY_AUTH_MODE=token ray start --head --dashboard-host 127.0.0.1 --dashboard-port 8265 --num-cpus 4
#     bash launch/ray_submit.sh --no-upload -- rlhf train ppo --config configs/ppo/tiny-cpu.yaml
#     ray stop      # note: stops every Ray cluster of this user on the machine
# Follow a job started with --no-wait:  ray job logs --follow ID --address ADDR  (RAY_AUTH_MODE=token)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'; exit 0; }
die() { echo "[ray_submit] error: $*" >&2; exit 2; }

ADDRESS="${RAY_API_SERVER_ADDRESS:-${RAY_ADDRESS:-http://127.0.0.1:8265}}"
WAIT=1 UPLOAD=1 TIMEOUT=""
EXTRA_ENV=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --address) [[ $# -ge 2 ]] || die "--address needs a value"; ADDRESS="$2"; shift 2 ;;
    --address=*) ADDRESS="${1#*=}"; shift ;;
    --no-wait) WAIT=0; shift ;;
    --no-upload) UPLOAD=0; shift ;;
    --timeout) [[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "--timeout needs a number of seconds"; TIMEOUT="$2"; shift 2 ;;
    --env) [[ $# -ge 2 && "$2" == *=* ]] || die "--env needs KEY=VAL, got '${2:-}'"; EXTRA_ENV+=("$2"); shift 2 ;;
    --env=*) [[ "${1#*=}" == *=* ]] || die "--env needs KEY=VAL, got '${1#*=}'"; EXTRA_ENV+=("${1#*=}"); shift ;;
    -h|--help) usage ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the command goes after --). Usage: bash launch/ray_submit.sh [options] -- rlhf train ..." ;;
  esac
done
[[ $# -gt 0 ]] || die "no command after --, e.g. -- rlhf train ppo --config configs/ppo/tiny-cpu.yaml"

# The ray CLI and a Python that imports ray: this checkout's venv when there is one, else PATH.
if [[ -x "$ROOT/.venv/bin/ray" ]]; then PATH="$ROOT/.venv/bin:$PATH"; fi
command -v ray >/dev/null || die "the 'ray' command is not on PATH (install ray[default] or create .venv)"
PY="$(dirname "$(command -v ray)")/python"
[[ -x "$PY" ]] || PY=python3

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"
if [[ "$RAY_AUTH_MODE" == token && -z "${RAY_AUTH_TOKEN:-}" ]]; then
  TOKEN_FILE="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
  [[ -s "$TOKEN_FILE" ]] || die "no Ray auth token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH, or copy the head's ~/.ray/auth_token to $TOKEN_FILE"
fi

# Built in Python: JSON quoting of arbitrary values.
RUNTIME_ENV="$(UPLOAD="$UPLOAD" ROOT="$ROOT" "$PY" - "${EXTRA_ENV[@]}" <<'EOF'
import json, os, sys
forward = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE", "DS_ACCELERATOR", "VLLM_TARGET_DEVICE",
           "TOKENIZERS_PARALLELISM", "VLLM_CPU_KVCACHE_SPACE", "OMP_NUM_THREADS")
env = {k: os.environ[k] for k in forward if os.environ.get(k)}
env.update(kv.split("=", 1) for kv in sys.argv[1:])
renv = {"env_vars": env}
if os.environ["UPLOAD"] == "1":
    renv["working_dir"] = os.environ["ROOT"]
    renv["excludes"] = [".venv", "venv", "runs", ".git", "wandb", "__pycache__", "*.egg-info", ".pytest_cache",
                        ".ruff_cache", ".whl"]
print(json.dumps(renv))
EOF
)"

ENTRY=("$@")
if [[ $UPLOAD == 0 ]]; then
  # Same path on the head node (one machine, or a shared filesystem); Ray shell-quotes each argument.
  ENTRY=(bash -c 'cd "$0" && exec "$@"' "$ROOT" "$@")
else
  abs_run_dir=0
  for a in "$@"; do [[ "$a" == run_dir=/* ]] && abs_run_dir=1; done
  [[ $abs_run_dir == 1 ]] || echo "[ray_submit] note: no absolute run_dir=... given; the run will write into the job's temporary copy" \
       "of the code on the head node (see the header of launch/ray_submit.sh)" >&2
fi

ID="rlhf-$(date +%Y%m%d-%H%M%S)-$RANDOM"
RJ=(--address "$ADDRESS")
echo "[ray_submit] job $ID -> $ADDRESS ($([[ $UPLOAD == 1 ]] && echo "uploading $ROOT" || echo "running in $ROOT on the head"))" >&2

if [[ $WAIT == 0 ]]; then
  ray job submit "${RJ[@]}" --submission-id "$ID" --runtime-env-json "$RUNTIME_ENV" --no-wait -- "${ENTRY[@]}"
  echo "[ray_submit] follow: RAY_AUTH_MODE=$RAY_AUTH_MODE ray job logs --follow $ID --address $ADDRESS" >&2
  echo "$ID"
  exit 0
fi

# Submitted without following, then followed here rather than by `ray job submit`: Ray's own stream
# can end before the job's last lines reach it (ray-project/ray#48701), so the follower finishes from the
# stored log once the job is over. stdout carries the job's output alone; Ray's CLI chatter goes to stderr.
ray job submit "${RJ[@]}" --submission-id "$ID" --runtime-env-json "$RUNTIME_ENV" --no-wait -- "${ENTRY[@]}" >&2 \
  || { echo "[ray_submit] job $ID was not submitted (see the error above)" >&2; exit 1; }
trap 'echo "[ray_submit] stopped following; job $ID keeps running. Stop it: ray job stop $ID --address $ADDRESS" >&2; exit 130' INT
rc=0
timeout "${TIMEOUT:-0}" "$PY" - "$ADDRESS" "$ID" <<'EOF' || rc=$?
import asyncio, sys, time
from ray.job_submission import JobSubmissionClient

client, job = JobSubmissionClient(sys.argv[1]), sys.argv[2]
shown = 0  # characters of the job's log already written


async def follow():
    global shown
    async for chunk in client.tail_job_logs(job):
        sys.stdout.write(chunk)
        sys.stdout.flush()
        shown += len(chunk)

asyncio.run(follow())
deadline = time.monotonic() + 60  # the stream ends with the job; its status can lag a moment behind
while not client.get_job_status(job).is_terminal() and time.monotonic() < deadline:
    time.sleep(1)
sys.stdout.write(client.get_job_logs(job)[shown:])
sys.stdout.flush()
EOF
if [[ $rc == 124 ]]; then
  echo "[ray_submit] job $ID did not finish within ${TIMEOUT}s; stopping it" >&2
  timeout 60 ray job stop "${RJ[@]}" --no-wait "$ID" >&2 || true
  exit 1
fi
trap - INT

# The job's own status decides the exit code (under a deadline: the stream ends when the job does).
STATUS="$(timeout 120 "$PY" - "$ADDRESS" "$ID" 2>/dev/null <<'EOF' || true
import sys, time
from ray.job_submission import JobSubmissionClient
client = JobSubmissionClient(sys.argv[1])
deadline = time.monotonic() + 60
status = client.get_job_status(sys.argv[2])
while not status.is_terminal() and time.monotonic() < deadline:
    time.sleep(2)
    status = client.get_job_status(sys.argv[2])
print(status.value)
EOF
)"
if [[ -z "$STATUS" ]]; then
  echo "[ray_submit] job $ID: no status from $ADDRESS (not submitted? see the error above)" >&2
  exit 1
fi
echo "[ray_submit] job $ID: $STATUS (logs: ray job logs $ID --address $ADDRESS)" >&2
[[ "$STATUS" == SUCCEEDED ]] || exit 1
