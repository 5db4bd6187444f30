#!/usr/bin/env bash
# The whole of np on one machine, from nothing to `ssh` through it:
#   a "server" network namespace runs the control plane (embedded database) and the relay,
#   a "device" namespace runs a real sshd and the device daemon npd (no port opened for np),
#   a "client" namespace runs `np up`, and ssh connects to the device's virtual address.
# Every step prints its elapsed time. Everything is removed at the end.
#
#   sudo scripts/demo.sh
#
# NP_BIN_DIR=DIR uses binaries already built there instead of building (release) first.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "demo.sh needs root (it creates network namespaces and a TUN interface): sudo $0" >&2; exit 1; }

T0=$(date +%s.%N)
step() { printf '[%7.2fs] %s\n' "$(python3 -c "import time; print(time.time() - $T0)")" "$*"; }

# --- what it needs -----------------------------------------------------------------------------
need=()
command -v ip >/dev/null || need+=(iproute2)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  step "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ -n "${NP_BIN_DIR:-}" ]; then
  BIN=$NP_BIN_DIR
else
  step "building np (release; the first build takes a few minutes)"
  (cd "$REPO" && cargo build --release --bins -q)
  BIN=${CARGO_TARGET_DIR:-$REPO/target}/release
fi
for b in np np-control np-relay npd; do [ -x "$BIN/$b" ] || { echo "missing $BIN/$b" >&2; exit 1; }; done

# --- three hosts -------------------------------------------------------------------------------
ID=$$
S=npdemo$ID-server; D=npdemo$ID-device; C=npdemo$ID-client; BR=npdb$ID
WORK=$(mktemp -d /tmp/np-demo.XXXXXX)
PIDS=()
cleanup() {
  set +e
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  sleep 0.3
  for n in $S $D $C; do ip netns pids $n 2>/dev/null | xargs -r kill 2>/dev/null; ip netns del $n 2>/dev/null; done
  ip link del $BR 2>/dev/null
  [ -n "${NP_DEMO_KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
ns() { local n=$1; shift; ip netns exec "$n" "$@"; }
bg() { local log=$1; shift; "$@" >"$WORK/$log.out" 2>"$WORK/$log.log" & PIDS+=($!); }

step "creating hosts: $S (198.18.77.1), $D (198.18.77.2), $C (198.18.77.3)"
ip link add $BR type bridge && ip link set $BR up
i=1
for n in $S $D $C; do
  ip netns add $n
  ip link add v$ID$i type veth peer name eth0 netns $n
  ip link set v$ID$i master $BR up
  ns $n ip addr add 198.18.77.$i/24 dev eth0; ns $n ip link set eth0 up; ns $n ip link set lo up
  i=$((i+1))
done

# --- control plane and relay ------------------------------------------------------------------
step "starting the control plane (np-control, embedded database in $WORK/control)"
bg control ns $S "$BIN/np-control" serve --listen 198.18.77.1:7443 --data "$WORK/control"
for _ in $(seq 100); do grep -q "listening on" "$WORK/control.out" 2>/dev/null && break; sleep 0.05; done
enrol() { # NS NAME: a one-time code from the operator, keys made on the identity's own host
  local code; code=$("$BIN/np-control" enroll "$2" --data "$WORK/control" 2>/dev/null)
  ns "$1" "$BIN/np" keys new "$2" --control 198.18.77.1:7443 --code "$code" --home "$WORK/home-${2#@}" \
    >/dev/null 2>>"$WORK/enrol.log" || { cat "$WORK/enrol.log" >&2; exit 1; }
}
step "enrolling @relay, @alice_device (the device) and @alice (you)"
enrol $S @relay; enrol $D @alice_device; enrol $C @alice
step "starting the relay (np-relay)"
bg relay ns $S "$BIN/np-relay" --as @relay --listen 198.18.77.1:7444 --home "$WORK/home-relay"
for _ in $(seq 100); do grep -q "listening on" "$WORK/relay.out" 2>/dev/null && break; sleep 0.05; done
step "listing @relay as a relay devices trust (np-control relay add)"
"$BIN/np-control" relay add @relay --data "$WORK/control" >/dev/null

# --- the device --------------------------------------------------------------------------------
step "starting sshd and npd on the device (npd only connects out)"
ssh-keygen -q -t ed25519 -N '' -f "$WORK/host_key"; ssh-keygen -q -t ed25519 -N '' -C np-demo -f "$WORK/client_key"
cp "$WORK/client_key.pub" "$WORK/authorized_keys"; mkdir -p /run/sshd
bg sshd ns $D /usr/sbin/sshd -D -e -f /dev/null -o ListenAddress=127.0.0.1 -o PidFile=none -o StrictModes=no \
  -o HostKey="$WORK/host_key" -o AuthorizedKeysFile="$WORK/authorized_keys" -o PasswordAuthentication=no
bg npd ns $D "$BIN/npd" --as @alice_device --device pi --manager @alice --home "$WORK/home-alice_device"
for _ in $(seq 100); do grep -q "waiting for session requests" "$WORK/npd.log" 2>/dev/null && break; sleep 0.05; done

# --- the client --------------------------------------------------------------------------------
step "np up on the client: a TUN interface with an address for pi@alice_device"
bg up ns $C "$BIN/np" up --as @alice --relay @relay --device pi@alice_device --home "$WORK/home-alice"
for _ in $(seq 100); do grep -q "^ready" "$WORK/up.out" 2>/dev/null && break; sleep 0.05; done
grep -q "^ready" "$WORK/up.out" || { echo "np up did not come up:" >&2; cat "$WORK/up.log" >&2; exit 1; }
sed 's/^/           /' "$WORK/up.out"
ADDR=$(awk '/pi@alice_device/ {print $1; exit}' "$WORK/up.out")

step "ssh root@$ADDR (through the TUN, an encrypted session and the relay)"
OUT=$(ns $C ssh -i "$WORK/client_key" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes \
  -o LogLevel=ERROR -o ConnectTimeout=15 root@"$ADDR" 'echo "hello from the device via np: $(uname -sr)"')
echo "$OUT" | sed 's/^/           /'
step "done; cleaning up"
echo "$OUT" | grep -q "hello from the device via np"
