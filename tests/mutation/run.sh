#!/usr/bin/env bash
# Mutation testing of the core against the fast single-process tier (docs/testing.md, "Mutation testing").
# Config: [tool.mutmut] in pyproject.toml. Usage, from the checkout root:
#   bash tests/mutation/run.sh            # fresh run; progress goes to mutants.log, the summary to stdout
#   PY=/path/to/python bash tests/mutation/run.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python}
rm -rf mutants
start=$(date +%s)
"$PY" -m mutmut run --max-children "${MAX_CHILDREN:-2}" >mutants.log 2>&1 || {
    tail -n 20 mutants.log
    exit 1
}
echo "mutmut run took $(($(date +%s) - start)) s"
"$PY" tests/mutation/score.py
