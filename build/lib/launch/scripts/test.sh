#!/usr/bin/env bash
# The test suite, as the README and CI run it: one pytest process per test file.
# Run as one process, the suite has crashed natively (a segfault, at a different test
# each time) while every file passes on its own: in-process vLLM engines, Ray drivers
# and FSDP groups leave native state behind. One process per file keeps a file's state
# from reaching the next; the cost is a few seconds of imports per file.
# Extra arguments go to every pytest run.
set -uo pipefail
cd "$(dirname "$0")/../.."
py=.venv/bin/python
failed=()
for f in tests/test_*.py; do
  $py -m pytest -q "$f" "$@"
  rc=$?
  # 5: every test in the file was deselected by the caller's -m/-k; not a failure.
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then failed+=("$f"); fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "failed files: ${failed[*]}"
  exit 1
fi
