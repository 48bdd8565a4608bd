#!/usr/bin/env bash
# Print the Python interpreter that `make test` and `make demo` run with: the active
# environment's when culturemert is installed there, else .venv's, which is created and
# installed (scripts/install.sh) on first use. Set-up messages go to stderr.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

installed() {  # culturemert installed (not merely importable from the current folder) with fairseq
    "$1" -c 'import importlib.metadata as m, importlib.util as u, sys
m.distribution("culturemert"); sys.exit(u.find_spec("fairseq") is None)' 2>/dev/null
}

if command -v python >/dev/null && installed python; then
    python -c 'import sys; print(sys.executable)'
    exit 0
fi
venv=$repo/.venv
if ! installed "$venv/bin/python"; then
    log=$venv/install.log
    echo "== setting up $venv (first use only; about 3 minutes on 2 cores; pip's output: $log)" >&2
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv" >&2
    # the phases on the console, everything in the log
    if ! PYTHON="$venv/bin/python" bash "$repo/scripts/install.sh" 2>&1 | tee "$log" |
        grep --line-buffered -E '^(==|using torch|removing|install.sh:)' >&2; then
        echo "setting up $venv failed; the end of $log:" >&2
        tail -n 30 "$log" >&2
        exit 1
    fi
fi
echo "$venv/bin/python"
