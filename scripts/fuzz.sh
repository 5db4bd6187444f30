#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60), after one build.
#
#   scripts/fuzz.sh          # 60 s per target
#   scripts/fuzz.sh 10       # a short run, e.g. for CI
#   FUZZ_TARGETS="relay_join mux_frames" scripts/fuzz.sh 300
#
# Corpora grow in fuzz/corpus/TARGET (kept between runs, not committed); a crash leaves its
# input in fuzz/artifacts/TARGET and makes the script exit non-zero after running the rest.
# Reproduce one with `cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-…` and turn it into a
# unit test in the crate concerned.
#
# cargo-fuzz needs nightly flags (sanitizers); on a stable toolchain RUSTC_BOOTSTRAP=1 lets the
# stable compiler accept them. The build goes to fuzz/target, apart from the workspace's.
#
# FUZZ_SANITIZER picks cargo-fuzz's sanitizer (default `none`): our crates deny `unsafe`, so
# AddressSanitizer mostly watches ring's C and costs a slower build (the CI budget) and fewer
# executions per second; `FUZZ_SANITIZER=address scripts/fuzz.sh 600` for a deep run.
set -euo pipefail

SECONDS_EACH="${1:-60}"
cd "$(dirname "$0")/.."

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi

# Debug assertions on: overflow checks catch arithmetic on lengths that release builds wrap.
FLAGS=(--debug-assertions --sanitizer "${FUZZ_SANITIZER:-none}")
TARGETS="${FUZZ_TARGETS:-$(cargo fuzz list)}"

start=$(date +%s)
cargo fuzz build "${FLAGS[@]}"
built=$(date +%s)
echo "fuzz build: $((built - start)) s"

failed=()
for t in $TARGETS; do
    mkdir -p "fuzz/corpus/$t"
    echo "== $t (${SECONDS_EACH} s)"
    if ! cargo fuzz run "${FLAGS[@]}" "$t" "fuzz/corpus/$t" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        2> "fuzz/$t.log"; then
        failed+=("$t")
        tail -n 40 "fuzz/$t.log" >&2
    else
        grep -E "^stat::number_of_executed_units|^#[0-9]+.*DONE" "fuzz/$t.log" | tail -n 2 || true
    fi
done
end=$(date +%s)
n=$(echo $TARGETS | wc -w)
echo "fuzzed $n targets for ${SECONDS_EACH} s each; build $((built - start)) s, total $((end - start)) s"
if ((${#failed[@]})); then
    echo "$((n - ${#failed[@]})) passed, ${#failed[@]} failed: ${failed[*]}" >&2
    exit 1
fi
echo "$n passed, 0 failed"
