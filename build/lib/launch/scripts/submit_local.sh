#!/usr/bin/env bash
# Submit a training run as a Ray job to a Ray head on loopback, starting one if none runs.
#   launch/scripts/submit_local.sh launch/configs/gsm8k_grpo.yaml trainer.steps=5
# The job's code travels with --working-dir; its run folder is written under ./runs here.
set -euo pipefail
cd "$(dirname "$0")/../.."
config=${1:?usage: submit_local.sh CONFIG [key=value ...]}; shift
# Loopback only, so Ray 2.60's token auth (on by default) is switched off here.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
started=0
if ! ray status --address 127.0.0.1:6380 >/dev/null 2>&1; then
  bash launch/scripts/ray_start.sh >/dev/null
  started=1
fi
trap '[ "$started" = 1 ] && bash launch/scripts/ray_stop.sh' EXIT
ray job submit --address http://127.0.0.1:8265 --working-dir . \
  --runtime-env launch/runtime_env.yaml -- \
  python -m launch.train --config "$config" logging.output_dir="$PWD/runs" "$@"
