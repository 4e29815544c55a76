#!/usr/bin/env bash
# Installs what the demo and the tests need on a fresh Debian/Ubuntu machine (as root):
# iptables (nft and legacy backends), iproute2, curl, and the Debian packages named as
# arguments. Does nothing when they are present.
# The gRPC peers use Debian's python3-grpcio under /usr/bin/python3 rather than pip: one
# installer for every peer, no venv, and no clash with PEP 668 or a pyenv python3 on PATH.
set -euo pipefail
need=()
command -v iptables-restore >/dev/null 2>&1 || need+=(iptables)
command -v iptables-legacy-restore >/dev/null 2>&1 || need+=(iptables)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v curl >/dev/null 2>&1 || need+=(curl)
for pkg in "$@"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing: ${need[*]} — run as root (network namespaces and iptables need it anyway)" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
