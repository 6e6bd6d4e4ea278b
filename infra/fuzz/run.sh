#!/usr/bin/env bash
# Runs every fuzz target for a while: `infra/fuzz/run.sh [SECONDS_PER_TARGET]` (default 60).
# Needs cargo-fuzz (`cargo install cargo-fuzz`). The toolchain here is stable, so the nightly
# flags cargo-fuzz passes are allowed with RUSTC_BOOTSTRAP, and no sanitizer is used: Rust is
# memory-safe, and what is hunted is panics (a panic aborts, libFuzzer saves the input under
# artifacts/ and this script fails).
set -euo pipefail
cd "$(dirname "$0")"
seconds=${1:-60}
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for target in job_request query_and_urls provider_answer; do
  echo "==> $target for ${seconds}s"
  if ! RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir . --sanitizer none "$target" -- \
      -max_total_time="$seconds" -max_len=4096 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log"
    echo "$target: crashed; the input is in infra/fuzz/artifacts/$target/"
    exit 1
  fi
  grep -E "^stat::(number_of_executed_units|peak_rss_mb)|^#[0-9]+ +DONE" "$log" || tail -n 5 "$log"
done
echo "no crashes"
