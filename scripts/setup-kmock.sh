#!/usr/bin/env bash
# kmock (PyPI only, no Debian package): the Kubernetes API emulator the controller tests run
# (ctl/tests/controller_kmock.rs). Installed into a venv under target/, so it clashes neither with
# PEP 668 nor with Debian's python3 packages the other peers use; the test finds it there.
# Does nothing when it is present. A failed install is reported, not fatal: the controller test
# then records itself as skipped with the reason, visible in scripts/test.sh's summary.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=target/kmock-venv
version=0.8
if "$venv/bin/python" -c "import kmock, sys; sys.exit(kmock.__version__ != '$version')" 2>/dev/null; then
  exit 0
fi
if ! python3 -m venv --help >/dev/null 2>&1; then
  bash scripts/setup.sh python3-venv || true
fi
rm -rf "$venv"
if python3 -m venv "$venv" && "$venv/bin/pip" install -q --disable-pip-version-check "kmock==$version"; then
  echo "kmock $version installed in $venv"
else
  echo "warning: kmock could not be installed; the controller's API tests will be skipped" >&2
fi
exit 0
