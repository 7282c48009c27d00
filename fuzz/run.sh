#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for a bounded time each, one after the other, with
# cargo-fuzz on the nightly toolchain: fuzz/run.sh [SECONDS] [TARGET...] (default 60 s each).
# Each target's corpus grows in fuzz/corpus/<target>/ (not committed); fuzz/seeds/<target>/,
# when there is one, is read as well. Crashes land in fuzz/artifacts/<target>/; keep each one as
# a regression unit test next to the code it broke. The last line of each run (execs, coverage,
# corpus) is printed again at the end.
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
shift || true
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo +nightly fuzz list)
summary=()
for target in "${targets[@]}"; do
  echo "== $target: ${seconds}s"
  corpora=("corpus/$target")
  mkdir -p "corpus/$target"
  [ -d "seeds/$target" ] && corpora+=("seeds/$target")
  log=$(mktemp)
  # One job, one worker: the fuzzer gets one core.
  status=0
  cargo +nightly fuzz run "$target" "${corpora[@]}" -- -max_total_time="$seconds" -timeout=5 \
    -rss_limit_mb=2048 2>&1 | tee "$log" || status=$?
  summary+=("$target: $(grep -E '^#[0-9]+' "$log" | tail -n 1)")
  rm -f "$log"
  [ "$status" -eq 0 ] || { printf '%s\n' "${summary[@]}"; exit "$status"; }
done
printf '%s\n' "${summary[@]}"
