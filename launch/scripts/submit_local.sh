#!/usr/bin/env bash
# Submit a training run as a Ray job to a Ray head on loopback, starting one if none runs.
#   launch/scripts/submit_local.sh launch/configs/quickstart.yaml trainer.steps=5
# The job's code travels with --working-dir; its run folder is written under ./runs here.
# Prints the job's own output and its outcome; Ray's submission chatter is left out
# (PLACERL_VERBOSE=1 keeps it).
set -euo pipefail
cd "$(dirname "$0")/../.."
config=${1:?usage: submit_local.sh CONFIG [key=value ...]}; shift
# Loopback only, so Ray 2.60's token auth (on by default) is switched off here.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
address=http://127.0.0.1:8265
started=0
if ! ray status --address 127.0.0.1:6380 >/dev/null 2>&1; then
  echo "starting a Ray head on 127.0.0.1 (launch/scripts/ray_start.sh)"
  bash launch/scripts/ray_start.sh >/dev/null
  started=1
fi
trap '[ "$started" = 1 ] && bash launch/scripts/ray_stop.sh' EXIT
job_args=(--address "$address" --working-dir . --runtime-env launch/runtime_env.yaml --
          python -m launch.train --config "$config" logging.output_dir="$PWD/runs" "$@")
if [ "${PLACERL_VERBOSE:-0}" = 1 ]; then
  ray job submit "${job_args[@]}"; exit
fi
out=$(ray job submit --no-wait "${job_args[@]}" 2>&1) || { echo "$out" >&2; exit 1; }
job=$(grep -o "raysubmit_[A-Za-z0-9]*" <<<"$out" | head -1)
echo "job $job submitted (ray job logs/status/stop $job --address $address)"
# Ray's own lines (its CLI's banner, the job manager's setup notes) are left out.
ray job logs --address "$address" --follow "$job" 2>/dev/null \
  | grep -v -E "^Running entrypoint for job|Runtime env is setting up| (cli|sdk)\.py:[0-9]+ -- " || true
status=$(ray job status --address "$address" "$job" 2>&1 | grep -o "succeeded\|failed\|stopped" | tail -1)
echo "job $job ${status:-ended without a status}"
[ "$status" = succeeded ]
