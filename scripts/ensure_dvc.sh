#!/usr/bin/env bash
# DVC needs a git repository; a tarball or a copy without .git gets one here (with a first commit,
# which `dvc exp` needs). A normal clone is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  git init -q
  git add -A
  git -c user.name=pipeline -c user.email=pipeline@localhost commit -qm "initial import"
fi
[ -d .dvc ] || dvc init -q
dvc config core.analytics false
