#!/usr/bin/env bash
# The test suite, as the README and CI run it. The files that drive in-process vLLM
# engines run in a pytest process of their own: sharing one process with the rest of
# the suite (Ray drivers, FSDP groups, other engines) ended it without a report, while
# each group passes on its own. Extra arguments go to both pytest runs.
set -uo pipefail
cd "$(dirname "$0")/../.."
py=.venv/bin/python
status=0
$py -m pytest -q tests --ignore=tests/test_rollout.py --ignore=tests/test_sync.py "$@" || status=1
$py -m pytest -q tests/test_rollout.py tests/test_sync.py "$@" || status=1
exit $status
