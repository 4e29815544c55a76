#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a bounded time; fails on any crash.
# Usage: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]      (default: 60 s, every target)
# Works on a stable toolchain: RUSTC_BOOTSTRAP=1 lets it accept the -Z flags cargo-fuzz passes.
# New corpus entries go to the target dir (never into the committed seeds in corpus/);
# crashing inputs go to fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-60}
shift || true
export RUSTC_BOOTSTRAP=1
target_dir=${CARGO_TARGET_DIR:+$CARGO_TARGET_DIR/fuzz}
target_dir=${target_dir:-$PWD/target}

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

# No sanitizer: the code under test is safe Rust, so ASan finds nothing extra there and would
# halve the executions. Overflow checks and debug assertions stay on (cargo-fuzz's default).
opts=(--sanitizer none --target-dir "$target_dir")
if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build "${opts[@]}"

crashes=0
for t in "${targets[@]}"; do
  work="$target_dir/corpus/$t"
  log="$target_dir/$t.log"
  mkdir -p "$work" "corpus/$t"
  extra=()
  case "$t" in config_*) extra=(-dict="$PWD/config.dict") ;; esac
  echo "fuzz: $t for ${secs}s"
  set +e
  cargo fuzz run "${opts[@]}" "$t" "$work" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    "${extra[@]}" >"$log" 2>&1
  rc=$?
  set -e
  grep -E '^(stat::number_of_executed_units|stat::new_units_added)' "$log" | sed "s/^/fuzz: $t /" || true
  if [ "$rc" != 0 ]; then
    crashes=$((crashes + 1))
    echo "fuzz: $t CRASHED (exit $rc); last lines of $log:" >&2
    tail -n 40 "$log" >&2
    grep -oE "(Test unit|artifact) written to [^ ]+" "$log" >&2 || true
  fi
done
echo "fuzz: ${#targets[@]} targets, $crashes crashes"
[ "$crashes" = 0 ]
