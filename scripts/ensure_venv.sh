#!/usr/bin/env bash
# Make ./.venv a virtual environment that runs this checkout's code, building the heavy part only when needed.
#
# Two layers, so that checkouts never run each other's code yet share one multi-GB install:
# - the heavy environment (torch, numpy, ...) lives outside the clone, keyed by the hash of requirements.txt,
#   shared by every checkout and CI clone on this machine. The project itself is never installed into it.
#   A build that is interrupted leaves no ".complete" marker and is rebuilt from scratch next time.
# - ./.venv is this checkout's own small venv (no pip, under a second to make): one .pth file puts this
#   checkout on the import path and another adds the heavy environment's site-packages after it, and
#   .venv/bin/attnmed is written here with this checkout's interpreter. Deleting another checkout, or
#   rebuilding its .venv, cannot touch this one.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
python=${PYTHON:-python3}
hash=$(cat requirements.txt | sha256sum | cut -c1-12)
root=${ATTNMED_VENV_ROOT:-$HOME/.cache/attnmed}
shared="$root/venv-$hash"
log="$root/venv-$hash.log"

quietly() {  # run a setup step, keeping its chatter in the log unless it fails
  "$@" >>"$log" 2>&1 || { tail -n 40 "$log" >&2; echo "attnmed: setup failed; full log: $log" >&2; exit 1; }
}

mkdir -p "$root"
if [ ! -f "$shared/.complete" ]; then
  echo "attnmed: building the shared environment in $shared (once per requirements.txt; several minutes)" >&2
  rm -rf "$shared"
  : >"$log"
  quietly "$python" -m venv "$shared"
  quietly "$shared/bin/python" -m pip install --upgrade pip
  quietly "$shared/bin/python" -m pip install -r requirements.txt
  touch "$shared/.complete"
fi
# Earlier versions installed the project editable into the shared environment, which made whichever checkout
# ran last own every checkout's imports. Remove such an install wherever it is still found.
if compgen -G "$shared/lib/python*/site-packages/attnmed-*.dist-info" >/dev/null; then
  quietly "$shared/bin/python" -m pip uninstall -y attnmed
fi

shared_site=$("$shared/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
base_python=$("$shared/bin/python" -c 'import sys; print(sys._base_executable)')
if [ -L .venv ]; then rm .venv; fi  # the old layout: a link to the shared environment
if [ ! -x .venv/bin/python ] || [ "$(cat .venv/.attnmed-shared 2>/dev/null)" != "$shared" ]; then
  rm -rf .venv
  "$base_python" -m venv --without-pip .venv
  echo "$shared" > .venv/.attnmed-shared
fi
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# .pth files are read in name order: this checkout first, then the shared packages (addsitedir also runs
# their own .pth files).
echo "$here" > "$site/00-attnmed-checkout.pth"
echo "import site; site.addsitedir('$shared_site')" > "$site/10-attnmed-shared.pth"
cat > .venv/bin/attnmed <<EOF
#!$here/.venv/bin/python
import sys

from analysis.cli import main

sys.exit(main())
EOF
chmod +x .venv/bin/attnmed
