#!/usr/bin/env bash
# Make ./.venv point at a complete virtual environment for this checkout, building it only when needed.
#
# The environment itself lives outside the clone, keyed by the hash of requirements.txt, so that CI's fresh
# clones and every checkout on this machine reuse one multi-GB install. A build that is interrupted leaves
# no ".complete" marker and is rebuilt from scratch next time. The project itself is installed editable,
# re-pointed at this checkout whenever the venv was last pointed at another one.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
python=${PYTHON:-python3}
hash=$(cat requirements.txt | sha256sum | cut -c1-12)
root=${ATTNMED_VENV_ROOT:-$HOME/.cache/attnmed}
venv="$root/venv-$hash"
log="$root/venv-$hash.log"

quietly() {  # run a pip step, keeping its chatter in the log unless it fails
  "$@" >>"$log" 2>&1 || { tail -n 40 "$log" >&2; echo "attnmed: setup failed; full log: $log" >&2; exit 1; }
}

if [ ! -f "$venv/.complete" ]; then
  echo "attnmed: building the environment in $venv (once per requirements.txt; several minutes)" >&2
  rm -rf "$venv"
  mkdir -p "$root"
  : >"$log"
  quietly "$python" -m venv "$venv"
  quietly "$venv/bin/python" -m pip install --upgrade pip
  quietly "$venv/bin/python" -m pip install -r requirements.txt
  touch "$venv/.complete"
fi

ln -sfn "$venv" .venv
installed_from=$(.venv/bin/python - <<'PY' 2>/dev/null || true
import importlib.util, pathlib
spec = importlib.util.find_spec("mediator_models")
print(pathlib.Path(spec.origin).parent.parent if spec else "")
PY
)
if [ "$installed_from" != "$here" ] || [ ! -x .venv/bin/attnmed ] || [ pyproject.toml -nt "$venv/.installed-from" ]; then
  quietly .venv/bin/python -m pip install --no-deps --no-build-isolation -e .
  echo "$here" > "$venv/.installed-from"
fi
