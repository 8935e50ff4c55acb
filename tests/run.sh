#!/usr/bin/env bash
# The whole test suite, from a fresh clone: a virtual environment in .venv, the package
# with its test and shapes extras (the shapes: the example apps that
# tests/integration/test_estimate.py starts), Debian's redis-server and rabbitmq-server
# when they are missing,
# then pytest.
# Arguments go to pytest (for example: bash tests/run.sh -k json).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=""
if ! command -v redis-server >/dev/null 2>&1 && [ ! -x /usr/bin/redis-server ]; then
    missing="redis-server"
fi
if [ ! -x /usr/lib/rabbitmq/bin/rabbitmq-server ]; then
    missing="$missing rabbitmq-server"
fi
if [ -n "$missing" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "tests/run.sh: installing$missing (apt-get)" >&2
    $sudo apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq $missing >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -qq --disable-pip-version-check -e '.[test,shapes]'
exec .venv/bin/python -m pytest "$@"
