#!/usr/bin/env bash
# The local mesh demo: pods as network namespaces with isthmus-init's capture rules and an
# isthmus-proxy sidecar each; traffic, a live routing change, a rejected config, metrics.
# Pass --keep to leave the mesh up until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --workspace --bins --quiet
exec ./target/debug/isthmus-ctl local demo "$@"
