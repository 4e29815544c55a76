#!/usr/bin/env bash
# Every test: unit tests, isthmus-init against real iptables in throwaway namespaces, and the
# end-to-end scenarios (pods as network namespaces, real capture, real sidecars). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The e2e tests run the built binaries (isthmus-proxy, isthmus-init, isthmus-ctl).
cargo build --workspace --bins
cargo test --workspace "$@"
