#!/usr/bin/env bash
# Start a local Ray head on loopback (dashboard and job server on 127.0.0.1:8265).
# Ray binds the machine's external interface unless RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
# and its object store takes 30% of RAM unless capped.
set -euo pipefail
# Loopback only, so Ray 2.60's token auth (on by default) is switched off here.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
ray start --head --node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1 --port=6380 \
  --num-cpus="${PLACERL_RAY_CPUS:-$(( $(nproc) < 4 ? 4 : $(nproc) ))}" \
  --object-store-memory="${PLACERL_OBJECT_STORE_BYTES:-1073741824}" \
  --disable-usage-stats "$@"
echo "Ray head on 127.0.0.1; submit jobs with: ray job submit --address http://127.0.0.1:8265 -- ..."
