#!/usr/bin/env bash
# Every test: unit tests, isthmus-init against real iptables in throwaway namespaces, and the
# end-to-end scenarios (pods as network namespaces, real capture, real sidecars). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The e2e tests run the built binaries (isthmus-proxy, isthmus-init, isthmus-ctl).
cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace "$@" 2>&1 | tee "$log"
# One closing line over every test binary (cargo prints one per binary, the last often 0).
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "\ntests: %d passed, %d failed, %d skipped\n", p, f, i }' "$log"
