#!/usr/bin/env bash
# The demo: the import-heavy example app asks for 16 pool children in a 1 GiB budget.
# A guarded worker on kombu's filesystem:// broker (no server to install) prints its
# startup line, scales the pool down to what fits, and runs a few tasks.
# Try another budget with: CELERY_GUARD_MEMORY_LIMIT=2G bash examples/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -qq --disable-pip-version-check -e .

data=$(mktemp -d)
export HEAVY_APP_BROKER=filesystem:// HEAVY_APP_DATA_DIR="$data"
export CELERY_GUARD_MEMORY_LIMIT="${CELERY_GUARD_MEMORY_LIMIT:-1G}"
cd examples
../.venv/bin/celery -A heavy_app worker -c 16 -l info >"$data/worker.log" 2>&1 &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; sleep 3; kill -KILL $worker 2>/dev/null; rm -rf "$data"' EXIT

for _ in $(seq 150); do
    grep -q " ready\." "$data/worker.log" && break
    kill -0 $worker 2>/dev/null || { cat "$data/worker.log"; exit 1; }
    sleep 0.2
done
echo "--- the guard's startup line (worker asked for -c 16, budget $CELERY_GUARD_MEMORY_LIMIT):"
grep "celery-guard" "$data/worker.log"
echo "--- pool children forked: $(grep -c 'pool child started' "$data/worker.log")"

# The client needs the app's name and broker, not its data: keep it small.
HEAVY_APP_OBJECTS=0 HEAVY_APP_BUFFER_MIB=0 ../.venv/bin/python - <<'PY'
from heavy_app import add, walk

print("--- tasks:")
for x in range(3):
    print(f"add({x}, 10) = {add.delay(x, 10).get(timeout=60)}")
print(f"walk() = {walk.delay().get(timeout=60)}  (read every catalogue entry in a child)")
PY
