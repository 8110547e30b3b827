#!/usr/bin/env bash
# Set-up and entry point: ./dev.sh demo | ./dev.sh test [pytest args]
# Creates the virtual environment .venv on first use and reuses it afterwards.
set -euo pipefail
cd "$(dirname "$0")"
venv=.venv
stamp=$venv/.vlp-installed
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet -c constraints.txt -e ".[test]"
    touch "$stamp"
fi
cmd=${1:-demo}
shift || true
case "$cmd" in
    demo) exec "$venv/bin/vlp" demo "$@" ;;
    test) exec "$venv/bin/python" -m pytest -q "$@" ;;
    *) exec "$venv/bin/vlp" "$cmd" "$@" ;;
esac
