#!/usr/bin/env bash
# The whole test suite: installs what the tests need, builds once, checks format and lints, runs
# every test (unit, property and end-to-end with the real binaries), then every fuzz target for
# NP_FUZZ_SECONDS each (default 10; 0 skips them). `.ci/run` calls this.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the end-to-end tests use.
PKGS=(iproute2 openssh-server openssh-client iperf3 nftables socat python3 rsync git curl postgresql dnsmasq-base bind9-dnsutils mosh tmux)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
  else
    echo "warning: missing packages (tests that need them will fail): ${missing[*]}" >&2
  fi
fi

cargo fmt --all --check
cargo build --workspace --all-targets --locked
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests start the binaries built above (target/debug).
cargo test --workspace --locked --no-fail-fast
# The control-plane tests once more with every node on PostgreSQL (NP_TEST_STORE: a fresh
# database per node, in one throwaway cluster per test binary; tests/src/pgstore.rs), so both
# stores are held to the same behaviour.
CONTROL_TESTS=(control_bad_input control_enrol_auth control_notify control_quota presence revocation
  relays_list relay_choice relay_e2e)
NP_TEST_STORE=postgres cargo test -p np-tests --locked --no-fail-fast "${CONTROL_TESTS[@]/#/--test=}"

# Every parser that takes bytes from a network or the TUN, fuzzed briefly (cargo-fuzz, its own
# build under fuzz/target: about 2 minutes cold, plus installing cargo-fuzz the first time).
# A crash fails the suite and leaves its input in fuzz/artifacts/TARGET.
FUZZ_SECONDS="${NP_FUZZ_SECONDS:-10}"
if [ "$FUZZ_SECONDS" != 0 ]; then
  scripts/fuzz.sh "$FUZZ_SECONDS"
fi
