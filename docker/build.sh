#!/usr/bin/env bash
# Builds the isthmus images from the workspace's binaries, with nothing pulled: each image is
# one layer made from scratch (the binary, exactly the shared libraries `ldd` says it loads,
# /etc/passwd and /etc/group) and loaded with `docker import`.
#
#   isthmus/proxy  the sidecar, USER 1337:1337
#   isthmus/init   isthmus-init and the iptables tools (nft and legacy, their libraries and
#                  xtables modules, from the host's Debian packages), USER 0 (it needs root
#                  with NET_ADMIN and NET_RAW, and nothing else)
#   isthmus/ctl    isthmus-ctl (controller, validate, the test app, pause), USER 65532: not
#                  root, and not 1337 either, whose traffic the capture rules let through
#
# Tags: `<git short sha>` (`-dirty` when the work tree has changes) and `dev`; `--tag T` gives
# T alone. The layer is reproducible: files sorted, owned by 0 (1337 for nothing: the proxy
# writes no file), mtimes set to the commit's time, so the same binaries give the same digest.
#
# Usage: docker/build.sh [--bin-dir DIR] [--tag TAG] [--quiet]
#   --bin-dir DIR  use prebuilt binaries (e.g. target/debug in CI) instead of
#                  `cargo build --release`; they are stripped into the image either way
#   --tag TAG      tag every image isthmus/<name>:TAG only
# Needs: docker, ldd, objcopy (binutils), and the iptables package (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

bin_dir=""
tag=""
quiet=false
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$(cd "$2" && pwd); shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --quiet) quiet=true; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
say() { $quiet || echo "$@"; }

export PATH=$PATH:/usr/sbin
for tool in docker ldd objcopy xtables-nft-multi xtables-legacy-multi; do
  command -v "$tool" >/dev/null 2>&1 || {
    echo "build.sh: $tool not found (docker.io, libc-bin, binutils, iptables: scripts/setup.sh)" >&2
    exit 1
  }
done

if [ -z "$bin_dir" ]; then
  say "== cargo build --release"
  cargo build --release --quiet -p isthmus-proxy -p isthmus-init -p isthmus-ctl
  bin_dir=${CARGO_TARGET_DIR:-$repo/target}/release
fi
for bin in isthmus-proxy isthmus-init isthmus-ctl; do
  [ -x "$bin_dir/$bin" ] || { echo "build.sh: $bin_dir/$bin not found" >&2; exit 1; }
done

revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
epoch=$(git log -1 --format=%ct 2>/dev/null || echo 0)
if [ -z "$tag" ]; then
  tag=$(git rev-parse --short=12 HEAD)
  [ -z "$(git status --porcelain --untracked-files=no)" ] || tag=$tag-dirty
  tags=("$tag" dev)
else
  tags=("$tag")
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)

work=$(mktemp -d /tmp/isthmus-images.XXXXXX)
trap 'rm -rf "$work"' EXIT

# The ELF files (binaries or modules) given, and every shared library they load, copied into
# the root at the paths the dynamic linker looks them up at.
copy_with_libs() {
  local root=$1
  shift
  local lib
  for lib in $(ldd "$@" 2>/dev/null | awk '/=> \// { print $3 } /^\t\/.*ld-linux/ { print $1 }' | sort -u); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}

# /etc, /tmp and the one binary an image runs, stripped (release builds keep debug = 1 for
# perf; the image does not need it).
base_root() {
  local root=$1 bin=$2
  mkdir -p "$root/etc" "$root/tmp" "$root/usr/local/bin"
  chmod 1777 "$root/tmp"
  cat >"$root/etc/passwd" <<'EOF'
root:x:0:0:root:/:/nonexistent
isthmus-proxy:x:1337:1337:isthmus sidecar:/nonexistent:/nonexistent
nonroot:x:65532:65532:nonroot:/nonexistent:/nonexistent
EOF
  cat >"$root/etc/group" <<'EOF'
root:x:0:
isthmus-proxy:x:1337:
nonroot:x:65532:
EOF
  objcopy --strip-all "$bin_dir/$bin" "$root/usr/local/bin/$bin"
  copy_with_libs "$root" "$bin_dir/$bin"
}

# Packs a root into one layer (reproducibly) and imports it.
import() {
  local name=$1 root=$2
  shift 2
  local ref="isthmus/$name:${tags[0]}" old t
  # What these tags named before: removed below once nothing names it (no dangling images).
  old=$(for t in "${tags[@]}"; do docker image inspect -f '{{.Id}}' "isthmus/$name:$t" 2>/dev/null || true; done | sort -u)
  tar -C "$root" --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner -cf "$work/$name.tar" .
  docker import \
    --change "LABEL org.opencontainers.image.title=isthmus-$name" \
    --change "LABEL org.opencontainers.image.version=$version" \
    --change "LABEL org.opencontainers.image.revision=$revision" \
    --change "LABEL org.opencontainers.image.licenses=Apache-2.0" \
    --change "LABEL org.opencontainers.image.source=isthmus" \
    "$@" "$work/$name.tar" "$ref" >/dev/null
  for t in "${tags[@]:1}"; do docker tag "$ref" "isthmus/$name:$t"; done
  local new
  new=$(docker image inspect -f '{{.Id}}' "$ref")
  for t in $old; do
    [ "$t" = "$new" ] || docker rmi "$t" >/dev/null 2>&1 || true
  done
}

say "== images from $bin_dir, tags: ${tags[*]}"

# isthmus/proxy
root=$work/proxy
base_root "$root" isthmus-proxy
mkdir -p "$root/etc/isthmus/config"
import proxy "$root" \
  --change 'USER 1337:1337' \
  --change 'ENV ISTHMUS_CONFIG_DIR=/etc/isthmus/config' \
  --change 'EXPOSE 15001 15006 15020 15021' \
  --change 'ENTRYPOINT ["/usr/local/bin/isthmus-proxy"]'

# isthmus/init: the iptables tools as Debian installs them (multi-call binaries and their
# names; iptables-restore and friends point at nft, Debian's default alternative), every
# xtables module (which ones load depends on the rules the flags ask for), and the libraries
# of all of them.
root=$work/init
base_root "$root" isthmus-init
mkdir -p "$root/usr/sbin" "$root/run"
multi=()
for m in xtables-nft-multi xtables-legacy-multi; do
  cp -L "$(command -v $m)" "$root/usr/sbin/$m"
  multi+=("$root/usr/sbin/$m")
done
for fam in iptables ip6tables; do
  for suffix in "" -restore -save; do
    ln -s xtables-nft-multi "$root/usr/sbin/$fam-nft$suffix"
    ln -s xtables-legacy-multi "$root/usr/sbin/$fam-legacy$suffix"
    ln -s "$fam-nft$suffix" "$root/usr/sbin/$fam$suffix"
  done
done
# The modules' directory is compiled into libxtables (XTABLES_LIBDIR): take it from the package.
xtables=$(dpkg -L iptables 2>/dev/null | grep -m 1 '/xtables$' || true)
[ -d "$xtables" ] || xtables=/usr/lib/$(gcc -print-multiarch 2>/dev/null || echo x86_64-linux-gnu)/xtables
mkdir -p "$root$xtables"
cp "$xtables"/*.so "$root$xtables/"
copy_with_libs "$root" "${multi[@]}" "$root$xtables"/*.so
import init "$root" \
  --change 'USER 0:0' \
  --change 'ENTRYPOINT ["/usr/local/bin/isthmus-init"]'

# isthmus/ctl
root=$work/ctl
base_root "$root" isthmus-ctl
import ctl "$root" \
  --change 'USER 65532:65532' \
  --change 'ENTRYPOINT ["/usr/local/bin/isthmus-ctl"]'

say "== sizes"
for name in proxy init ctl; do
  size=$(docker image inspect -f '{{.Size}}' "isthmus/$name:${tags[0]}")
  say "$(awk -v n="isthmus/$name:${tags[0]}" -v s="$size" 'BEGIN { printf "%-36s %6.1f MB  (%d bytes)\n", n, s / 1e6, s }')"
done
