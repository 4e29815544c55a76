#!/usr/bin/env bash
# Every test: unit tests, isthmus-init against real iptables in throwaway namespaces, and the
# end-to-end scenarios (pods as network namespaces, real capture, real sidecars). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
# h2load and grpcio: the HTTP tests' load generator and gRPC peers (tests/peers/); binutils:
# objcopy, which docker/build.sh strips the binaries with for the container test.
bash scripts/setup.sh nghttp2-client python3-grpcio binutils
# kmock: the Kubernetes API emulator of the controller tests (PyPI only: a venv under target/).
bash scripts/setup-kmock.sh
# The e2e tests run the built binaries (isthmus-proxy, isthmus-init, isthmus-ctl).
cargo build --workspace --bins
log=$(mktemp)
# Tests that cannot run here (io_uring blocked, no root) record themselves in this file; they
# return normally, which libtest counts as a pass, so the summary moves them to "skipped".
export ISTHMUS_SKIP_LOG
ISTHMUS_SKIP_LOG=$(mktemp)
trap 'rm -f "$log" "$ISTHMUS_SKIP_LOG"' EXIT
status=0
cargo test --workspace --no-fail-fast "$@" 2>&1 | tee "$log" || status=$?
if [ -s "$ISTHMUS_SKIP_LOG" ]; then
  echo
  echo "skipped at run time:"
  sed 's/^/  /' "$ISTHMUS_SKIP_LOG"
fi
# One closing line over every test binary (cargo prints one per binary, the last often 0).
skipped=$(wc -l < "$ISTHMUS_SKIP_LOG")
awk -v s="$skipped" '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "\ntests: %d passed, %d failed, %d skipped\n", p - s, f, i + s }' "$log"
exit "$status"
