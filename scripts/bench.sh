#!/usr/bin/env bash
# np benchmark: our paths beside the peers of ../shared/bench/peers.sh, measured in one run on the
# same three network namespaces, reported as ratios (not absolute figures).
#
#   sudo scripts/bench.sh            # T=seconds per throughput test (default 5)
#   RELAY_FLAGS="--forward-buffer 1048576" NP_PEERS=/bin/true scripts/bench.sh   # tune, no peers
#   SECTIONS="forward" scripts/bench.sh        # only some of our paths (default: all, backlog last)
#   ROUNDS=1 scripts/bench.sh                  # rounds of our paths (default 3; the median is reported)
#   CONTROL_N=1000 SECTIONS=control scripts/bench.sh   # the control plane under load, fewer devices
#
# Hosts (bridge pbr0, 198.18.0.0/24, same as peers.sh): pc client 198.18.0.1, pr relay 198.18.0.2,
# pd device 198.18.0.3. np-control and np-relay run in pr; identities are enrolled with the real
# `np keys new`; iperf3 -s and sshd run in pd.
#
# Layout: one "section" per path of ours. A section starts what it needs (bg), measures with
# `measure LABEL HOST IPERF_PORT SSH_PORT` (or prints its own `LABEL: X Gbit/s, ...` line with
# `ours`), records other figures with `metric LABEL VALUE UNIT` and text with `note`, and stops
# what it started (stop_since). The paths in $ROUNDED run $ROUNDS times, one round after the other;
# the report gives the median of the rounds (and each round's figure), and ratios to the peers
# from the medians. The peers run once, before the rounds.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
export T=${T:-5}
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
BIN=$TARGET/release
WORK=$(mktemp -d /tmp/np-bench.XXXXXX)
OURS=$WORK/ours.txt
SETUP=$WORK/setup.txt
PEERS_OUT=$WORK/peers.txt
METRICS=$WORK/metrics.txt
CONTROL=198.18.0.2:7443
ROUNDS=${ROUNDS:-3}
ROUNDED="tunnel relay forward up"
ROUND=1
: >"$OURS"; : >"$SETUP"; : >"$METRICS"; : >"$WORK/pids"

ns() { ip netns exec "$@"; }
log() { echo "bench: $*" >&2; }
# ours LINE: a `LABEL: X Gbit/s, connect-to-first-byte Y ms` line of this round.
ours() { printf 'R%s\t%s\n' "$ROUND" "$1" >>"$OURS"; echo "$1" >&2; }
# metric LABEL VALUE UNIT: a figure of this round (the report gives the median over rounds).
metric() { printf 'R%s\t%s\t%s\t%s\n' "$ROUND" "$1" "${2:-FAIL}" "$3" >>"$METRICS"; echo "$1: ${2:-FAIL} $3" >&2; }
# note LINE: text of this round, printed under the report as it is.
note() { printf 'R%s\t%s\n' "$ROUND" "$1" >>"$SETUP"; echo "$1" >&2; }

# --- hosts ----------------------------------------------------------------------------------
HOST_NS="pc pr pd"
HOST_LINKS="pbr0 vpc vpr vpd"
ns_pids() { local n; for n in $HOST_NS; do ip netns pids $n 2>/dev/null; done; }
# hosts_gone: no namespace and no link of ours is left (peers.sh uses the same names).
hosts_gone() { local n
  for n in $HOST_NS; do [ -e "/run/netns/$n" ] && return 1; done
  for n in $HOST_LINKS; do ip link show "$n" >/dev/null 2>&1 && return 1; done
  return 0; }
# teardown_hosts: stops everything in our namespaces and removes them and their links, and returns
# only once the kernel has really let go of them (or fails after 10 s).
#
# Namespace and veth teardown finish asynchronously: a namespace whose last process has not yet
# exited keeps its end of the veth (so ours, `vpc`, stays too) after `ip netns del`, and a
# deleted namespace's links go away in a kernel work queue later still. Re-creating them at once
# failed with "RTNETLINK answers: File exists" right after peers.sh, and every section with it.
teardown_hosts() { local p n i
  for p in $(cat "$WORK/pids" 2>/dev/null); do kill "$p" 2>/dev/null; done; : >"$WORK/pids"
  ns_pids | xargs -r kill 2>/dev/null
  for i in $(seq 50); do [ -z "$(ns_pids)" ] && break; sleep 0.1; done
  ns_pids | xargs -r kill -9 2>/dev/null
  for n in $HOST_NS; do [ -e "/run/netns/$n" ] && ip netns del $n 2>/dev/null; done
  # Deleting our end of a veth deletes the pair, whatever state its namespace is in.
  for n in $HOST_LINKS; do ip link del "$n" 2>/dev/null; done
  for i in $(seq 100); do hosts_gone && return 0; sleep 0.1; done
  log "hosts not gone after 10 s: $(ls /run/netns 2>/dev/null | tr '\n' ' ') $(ip -br link 2>/dev/null | awk '{print $1}' | grep -E '^(pbr0|vp[crd])' | tr '\n' ' ')"
  return 1
}
cleanup() { teardown_hosts
  [ -n "${SSH_KEY_TAG:-}" ] && sed -i "/ $SSH_KEY_TAG\$/d" /root/.ssh/authorized_keys 2>/dev/null
  [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# make_hosts: the three namespaces of peers.sh, from scratch (whatever an earlier run or peers.sh
# left is removed first; a failed attempt is torn down and tried again, three times at most).
make_hosts() { local try
  for try in 1 2 3; do
    teardown_hosts && try_make_hosts && return 0
    log "creating the hosts failed (attempt $try); tearing down and trying again"
  done
  log "could not create the hosts"; exit 1
}
try_make_hosts() { local i=1 n
  ip link add pbr0 type bridge && ip link set pbr0 up || return 1
  for n in $HOST_NS; do
    ip netns add $n && ip link add v$n type veth peer name eth0 netns $n && ip link set v$n master pbr0 up \
      && ns $n ip addr add 198.18.0.$i/24 dev eth0 && ns $n ip link set eth0 up && ns $n ip link set lo up || return 1
    i=$((i+1))
  done
}

# bg CMD...: start in the background, remembered for stop_since / cleanup; output to $WORK/logs.
# `ns` is a shell function, and a function run with `&` runs in a subshell whose pid is what $!
# gives: killing that left the program itself running (every section's relay, npd and np up
# stayed up for the rest of the run, and a later round's np up found np0 taken and measured the
# earlier one). So `ns ...` is spelt out here as a plain command, which the background child
# execs (as `ip netns exec` execs its program): $! is then the program's own pid.
bg() { mkdir -p "$WORK/logs"
  if [ "$1" = ns ]; then shift; set -- ip netns exec "$@"; fi
  "$@" >>"$WORK/logs/bg.log" 2>&1 & echo $! >>"$WORK/pids"; }
# mark / stop_since MARK: stop only what was started after `mark` (a section's own processes),
# and wait (5 s at most, then SIGKILL) until they are gone, so the next section can take their
# ports and np0.
mark() { wc -l <"$WORK/pids" 2>/dev/null || echo 0; }
stop_since() { local m=$1 p i left
  local pids; pids=$(tail -n +$((m+1)) "$WORK/pids" 2>/dev/null)
  for p in $pids; do kill "$p" 2>/dev/null; done
  for i in $(seq 50); do
    left=; for p in $pids; do kill -0 "$p" 2>/dev/null && left="$left $p"; done
    [ -z "$left" ] && break; sleep 0.1
  done
  for p in $left; do log "pid $p did not stop on SIGTERM; killing it"; kill -9 "$p" 2>/dev/null; done
  head -n "$m" "$WORK/pids" >"$WORK/pids.tmp" 2>/dev/null; mv "$WORK/pids.tmp" "$WORK/pids"; }

gbps() { python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))'; }
# iperf_sum: iperf3 JSON in, "GBIT_PER_S BYTES" out (bytes received, for CPU per GB).
iperf_sum() { python3 -c 'import json,sys; d=json.load(sys.stdin)["end"]["sum_received"]; print("%.2f %d" % (d["bits_per_second"]/1e9, d["bytes"]))'; }
HZ=$(getconf CLK_TCK)
# cpu_ticks PID: user + system CPU time of PID in clock ticks (fields 14 and 15 of /proc/PID/stat,
# counted after the command name, which may hold spaces).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | awk '{print $12 + $13}'; }
# pid_of PATTERN: the newest process whose command line starts with PATTERN (a regex). `ip netns
# exec` execs its command, so that is the program itself, not a shell or `ip`.
pid_of() { pgrep -n -f "^$1"; }
# median ms from connect() to the first byte of the SSH banner, 20 tries (as peers.sh)
cfb() { ns pc python3 - "$1" "$2" <<'PY'
import socket,sys,time,statistics
h,p=sys.argv[1],int(sys.argv[2]); r=[]
for _ in range(20):
    t=time.perf_counter(); s=socket.create_connection((h,p),timeout=5); s.recv(1); r.append((time.perf_counter()-t)*1e3); s.close()
print("%.2f" % statistics.median(r))
PY
}
# measure LABEL HOST IPERF_PORT SSH_PORT [NAME=PID ...]: iperf3 from pc, one flow, and
# connect-to-first-byte; for each NAME=PID, the CPU seconds that process spent per GB moved during
# the transfer (utime + stime from /proc before and after, over the bytes iperf3 received).
measure() { local label=$1 host=$2 iport=$3 sport=$4 r l out bytes p; shift 4
  local -A t0=()
  for p in "$@"; do t0[$p]=$(cpu_ticks "${p#*=}"); done
  out=$(ns pc iperf3 -J -t "$T" -c "$host" -p "$iport" 2>/dev/null | iperf_sum 2>/dev/null)
  r=${out% *}; bytes=${out#* }
  for p in "$@"; do
    metric "CPU seconds per GB moved, $label: ${p%%=*}" "$(awk -v a="${t0[$p]}" -v b="$(cpu_ticks "${p#*=}")" \
      -v hz="$HZ" -v n="${bytes:-0}" 'BEGIN { if (n > 0 && a != "" && b != "") printf "%.2f", (b - a) / hz / (n / 1e9) }')" "s/GB"
  done
  l=$(cfb "$host" "$sport" 2>/dev/null)
  ours "$label: ${r:-FAIL} Gbit/s, connect-to-first-byte ${l:-FAIL} ms"; }

# flows LABEL HOST PORT N: N parallel iperf3 flows from pc; the total as a line of ours, each
# flow's Mbit/s as a note, and Jain's fairness index (sum x)^2 / (n * sum x^2) as a metric
# (1 when every flow gets the same share, 1/n when one takes everything).
flows() { local label=$1 host=$2 port=$3 n=$4 out
  out=$(ns pc iperf3 -J -t "$T" -P "$n" -c "$host" -p "$port" 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)
x = [s["receiver"]["bits_per_second"] / 1e6 for s in d["end"]["streams"]]
jain = sum(x) ** 2 / (len(x) * sum(v * v for v in x)) if x and any(x) else 0
print("%.2f %.3f %d %s" % (d["end"]["sum_received"]["bits_per_second"] / 1e9, jain, len(x), " ".join("%.0f" % v for v in x)))' 2>/dev/null)
  set -- $out
  ours "$label: ${1:-FAIL} Gbit/s, connect-to-first-byte - ms"
  [ $# -ge 3 ] || return 0
  metric "Jain's fairness index, $label" "$2" "over $3 flows"
  shift 3; note "$label, each flow's Mbit/s: $*"
}

# --- warm connect-to-first-byte ------------------------------------------------------------------
# A banner server in pd (one line on accept, then close: no fork or key exchange in the way, unlike
# sshd's banner), reached through our path and through a reverse SSH tunnel via pr built the way
# peers.sh builds it, tried alternately so both see the same machine.
BANNER_PORT=7099
REV_BANNER_PORT=17099
start_banner() {
  bg ns pd python3 -c '
import socket
s = socket.create_server(("::", '$BANNER_PORT'), family=socket.AF_INET6, dualstack_ipv6=True, backlog=256)
while True:
    c, _ = s.accept()
    try:
        c.sendall(b"np-bench banner\n")
    finally:
        c.close()'
}
start_rev_tunnel() { local k=$WORK/ssh_key
  SSH_KEY_TAG="np-bench-$$"
  ssh-keygen -q -t ed25519 -N '' -C "$SSH_KEY_TAG" -f "$k" || return 1
  mkdir -p /root/.ssh && chmod 700 /root/.ssh && cat "$k.pub" >>/root/.ssh/authorized_keys
  bg ns pr /usr/sbin/sshd -D -o GatewayPorts=yes -o PidFile=none -p 22
  wait_port pr 198.18.0.2 22
  bg ns pd ssh -i "$k" -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes \
    -o LogLevel=ERROR -N -R 0.0.0.0:$REV_BANNER_PORT:127.0.0.1:$BANNER_PORT \
    -R 0.0.0.0:17201:127.0.0.1:5201 -R 0.0.0.0:17022:127.0.0.1:22 root@198.18.0.2
  wait_port pr 198.18.0.2 $REV_BANNER_PORT
}

# --- the main peers, in every round -----------------------------------------------------------------
# The reverse SSH tunnel and the socat relay of peers.sh, built again in our hosts and measured in
# every round beside our paths: the machine's load moves all of a round's figures together, so a
# round's own tunnel is the fairest yardstick for that round (peers.sh runs once, before them).
section_tunnel() {
  log "reverse SSH tunnel and socat relay"
  measure "reverse SSH tunnel via relay host (this round)" 198.18.0.2 17201 17022
  local m; m=$(mark)
  bg ns pr socat -b 262144 TCP-LISTEN:17301,fork,reuseaddr TCP:198.18.0.3:5201
  bg ns pr socat TCP-LISTEN:17302,fork,reuseaddr TCP:198.18.0.3:22
  wait_port pr 198.18.0.2 17301; wait_port pr 198.18.0.2 17302
  measure "plain TCP relay via relay host (socat, this round)" 198.18.0.2 17301 17302
  stop_since "$m"
}
# warm_cfb WHICH HOST PORT: median ms from connect() to the first banner byte through our path
# (HOST:PORT) and through the tunnel, 200 tries each, alternating; two metrics.
warm_cfb() { local which=$1 out
  out=$(ns pc python3 - "$2" "$3" 198.18.0.2 $REV_BANNER_PORT <<'PY' 2>>"$WORK/logs/bg.log"
import socket, statistics, sys, time
targets = [(sys.argv[1], int(sys.argv[2])), (sys.argv[3], int(sys.argv[4]))]
r = [[], []]
for _ in range(200):
    for j, t in enumerate(targets):
        try:
            t0 = time.perf_counter()
            s = socket.create_connection(t, timeout=5)
            if s.recv(1):
                r[j].append((time.perf_counter() - t0) * 1e3)
            s.close()
        except OSError:
            pass
print(" ".join("%.3f" % statistics.median(x) if x else "FAIL" for x in r))
PY
)
  set -- $out
  local label="warm connect-to-first-byte (banner server, median of 200)"
  metric "$label, $which" "${1:-}" ms
  metric "$label, reverse SSH tunnel beside $which" "${2:-}" ms
}

# --- setup ------------------------------------------------------------------------------------
install_deps() {
  local need=0 c
  for c in iperf3 socat sshd wireguard-go wg python3 dnsmasq; do command -v $c >/dev/null || [ -x /usr/sbin/$c ] || need=1; done
  [ $need = 0 ] && return
  log "installing missing packages"
  apt-get update -qq >/dev/null 2>&1
  for p in iperf3 openssh-server socat wireguard-go wireguard-tools python3 dnsmasq-base; do
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $p >/dev/null 2>&1 || log "package $p not available; carrying on"
  done
}

build() {
  log "building (release) into $TARGET"
  (cd "$REPO" && cargo build --release --bins --examples -q) || {
    log "workspace build failed; building only what the bench needs"
    (cd "$REPO" && cargo build --release -q -p np-control -p np-cli -p np-relay -p np-control-client -p np-tests --bins --examples) || exit 1
  }
  for b in np-control np npd np-relay examples/relay_pipe examples/notify_bench examples/ping_flood examples/relay_idle examples/control_load; do [ -x "$BIN/$b" ] || { log "missing $BIN/$b"; exit 1; }; done
}

# start_control: np-control in pr, data under $WORK.
start_control() {
  bg ns pr "$BIN/np-control" serve --listen $CONTROL --data "$WORK/control"
  local i; for i in $(seq 50); do ns pr bash -c "exec 3<>/dev/tcp/${CONTROL%:*}/${CONTROL#*:}" 2>/dev/null && return; sleep 0.1; done
  log "np-control did not start"; exit 1
}

# enrol NAME: a home at $WORK/home-NAME enrolled with the real CLI (from pc, over the bridge).
enrol() { local name=$1 code
  code=$("$BIN/np-control" enroll "$name" --data "$WORK/control" 2>/dev/null) || { log "enroll $name failed"; exit 1; }
  ns pc "$BIN/np" keys new "$name" --control $CONTROL --code "$code" --home "$WORK/home-${name#@}" >/dev/null \
    || { log "np keys new $name failed"; exit 1; }
}

start_services() { # iperf3 and sshd on the device host
  mkdir -p /run/sshd
  bg ns pd iperf3 -s
  bg ns pd /usr/sbin/sshd -D -o PidFile=none -p 22
  sleep 0.5
}

# --- peers -------------------------------------------------------------------------------------
section_peers() {
  log "running peers ($T s per test)"
  bash "${NP_PEERS:-$REPO/../shared/bench/peers.sh}" >"$PEERS_OUT" 2>"$WORK/peers.err"
  cat "$PEERS_OUT" >&2
}

# --- np-relay ----------------------------------------------------------------------------------
# One session between pc and pd through np-relay in pr. relay_pipe (relay/examples) joins the relay
# as client (pc, bridging a local port) or device (pd, dialing iperf3/sshd); each local TCP
# connection is one relay session. "alone" is one session carrying bytes generated and counted by
# relay_pipe itself, so only the relay is in the path (like the socat peer).
pipe() { local host=$1 who=$2 peer=$3; shift 3
  bg ns $host "$BIN/examples/relay_pipe" --home "$WORK/home-${who#@}" --as $who --peer $peer "$@"; }

# wait_port NS HOST PORT: until something listens there (5 s at most). Looks at the socket table
# rather than connecting: a connection to a relay_pipe would use up a session.
wait_port() { local i; for i in $(seq 50); do ns $1 ss -Hltn "sport = :$3" | grep -q . && return 0; sleep 0.1; done
  log "nothing listening on $2:$3 in $1"; return 1; }

# relay_variant LABEL PORT LOCAL_BASE [np-relay flags]: the relay on PORT, pipes on pc ports
# LOCAL_BASE+1 (iperf3) and LOCAL_BASE+2 (ssh).
relay_variant() { local label=$1 port=$2 lb=$3 m; shift 3
  m=$(mark)
  bg ns pr "$BIN/np-relay" --as @relay --home "$WORK/home-relay" --listen 198.18.0.2:$port \
    --pairing-timeout 10m ${RELAY_FLAGS:-} "$@"
  wait_port pr 198.18.0.2 $port
  local r="--relay 198.18.0.2:$port"
  pipe pd @bench_device @bench_client $r --role device --session 1000 --connect 127.0.0.1:5201
  pipe pd @bench_device @bench_client $r --role device --session 2000 --connect 127.0.0.1:22
  pipe pc @bench_client @bench_device $r --role client --session 1000 --listen 127.0.0.1:$((lb+1))
  pipe pc @bench_client @bench_device $r --role client --session 2000 --listen 127.0.0.1:$((lb+2))
  wait_port pc 127.0.0.1 $((lb+1)); wait_port pc 127.0.0.1 $((lb+2))
  measure "np-relay $label (relay_pipe at both ends + iperf3)" 127.0.0.1 $((lb+1)) $((lb+2))
  # Alone: sink in pd prints Gbit/s when the blaster in pc closes.
  local sink=$WORK/sink.$port
  ns pd "$BIN/examples/relay_pipe" --home "$WORK/home-bench_device" --as @bench_device --peer @bench_client \
    $r --role device --session 9000 --sink >"$sink" 2>>"$WORK/logs/bg.log" &
  local sp=$!
  ns pc "$BIN/examples/relay_pipe" --home "$WORK/home-bench_client" --as @bench_client --peer @bench_device \
    $r --role client --session 9000 --blast "${T}s" 2>>"$WORK/logs/bg.log"
  wait $sp
  ours "np-relay $label alone (one session, no iperf3): $(cat "$sink" 2>/dev/null || echo FAIL) Gbit/s, connect-to-first-byte - ms"
  stop_since "$m"
}

section_relay() {
  log "np-relay"
  relay_variant "copy" 7444 15200 --forward copy
  relay_variant "splice" 7445 15300 --forward splice
}

# cold_setup LOCAL_BASE LABEL: median of 7 runs of `np forward` as @bench_client (through @relay,
# at the address the running relay published), from the command's start to the first byte of
# sshd's banner through it.
cold_setup() {
  ns pc python3 - "$BIN/np" "$WORK/home-bench_client" "$1" "$2" "${3:-@relay}" 2>>"$WORK/logs/bg.log" <<'PY'
import socket, subprocess, sys, time, statistics
np, home, base, label, relay = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5]
pin = ["--relay", relay] if relay != "choose" else []
r = []
for i in range(7):
    port = base + i
    t = time.perf_counter()
    p = subprocess.Popen([np, "forward", "--as", "@bench_client", "--to", "bench@bench_device"] + pin +
                         ["-L", "127.0.0.1:%d:localhost:22" % port, "--home", home], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            if s.recv(1):
                r.append((time.perf_counter() - t) * 1e3)
                break
        except OSError:
            time.sleep(0.0005)
        if time.perf_counter() - t > 10:
            break
    p.kill(); p.wait()
print("%s (command start to first sshd byte, median of 7): %.1f ms" % (label, statistics.median(r)) if r else label + ": FAIL")
PY
}

# --- np forward ----------------------------------------------------------------------------------
# npd in pd (device @bench_device, name "bench"), np forward in pc, np-relay in pr: the whole path
# with the control plane, the encrypted session and the mux.
section_forward() {
  log "np forward"
  local m; m=$(mark)
  bg ns pr "$BIN/np-relay" --as @relay --home "$WORK/home-relay" --listen 198.18.0.2:7446 ${RELAY_FLAGS:-}
  wait_port pr 198.18.0.2 7446
  bg ns pd "$BIN/npd" --as @bench_device --device bench --manager @bench_client \
    --permit-open localhost:5201,localhost:22,localhost:$BANNER_PORT --home "$WORK/home-bench_device"
  sleep 1
  # Cold setup: from starting `np forward` to the first byte of sshd's banner through it.
  metric "np forward cold setup (command start to first sshd byte, median of 7)" \
    "$(cold_setup $((16000 + 10 * ROUND)) "np forward cold setup" | sed -n 's/.*: \([0-9.]*\) ms$/\1/p')" ms
  bg ns pc "$BIN/np" forward --as @bench_client --to bench@bench_device --relay @relay \
    -L 127.0.0.1:15401:localhost:5201 -L 127.0.0.1:15402:localhost:22 -L 127.0.0.1:15403:localhost:$BANNER_PORT \
    --home "$WORK/home-bench_client"
  wait_port pc 127.0.0.1 15401
  sleep 0.5
  local fwd npd relay
  fwd=$(pid_of "$BIN/np forward --as @bench_client"); npd=$(pid_of "$BIN/npd --as @bench_device")
  relay=$(pid_of "$BIN/np-relay .*198.18.0.2:7446")
  measure "np forward (one session, AES-256-GCM, via np-relay)" 127.0.0.1 15401 15402 \
    "np forward=$fwd" "npd=$npd" "np-relay=$relay"
  warm_cfb "np forward" 127.0.0.1 15403
  stop_since "$m"
}

# --- UDP and IPv6 through np up ------------------------------------------------------------------
# np up again, its device also reachable at its IPv6 address and a route to a resolver on the
# device host: TCP over IPv6 against IPv4 (same run, same session), iperf3 -u at 1 Gbit/s offered
# against wireguard-go's, and a DNS query's round trip through the device route against the same
# resolver queried directly.
UDP_DNS=198.19.77.1   # on pd's loopback: reached directly at 198.18.0.3, through np at this one
# udp_run LABEL HOST: iperf3 -u from pc at 1 Gbit/s offered for T s; goodput (what arrived) and loss.
udp_run() { local label=$1 host=$2 out
  out=$(ns pc iperf3 -J -u -b 1G -l 1200 -t "$T" -c "$host" -p 5201 2>/dev/null | python3 -c '
import json, sys
d = json.load(sys.stdin)["end"]["sum"]
print("%.3f %.2f" % (d["bits_per_second"] * (1 - d["lost_percent"] / 100) / 1e9, d["lost_percent"]))' 2>/dev/null)
  metric "iperf3 -u 1 Gbit/s offered, goodput, $label" "${out%% *}" Gbit/s
  metric "iperf3 -u 1 Gbit/s offered, loss, $label" "${out##* }" %
  echo "${out%% *}"
}
# dns_rtt SERVER: median ms of 200 A queries from pc, one at a time (each its own source port, so
# through np up each is an association of its own, as a resolver's queries are).
dns_rtt() { ns pc python3 - "$1" <<'PY'
import socket, statistics, struct, sys, time
q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x05probe\x04test\x00" + struct.pack(">HH", 1, 1)
rtts = []
for i in range(200):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    t = time.perf_counter()
    try:
        s.sendto(q, (sys.argv[1], 53)); s.recv(512); rtts.append((time.perf_counter() - t) * 1e3)
    except OSError:
        pass
    s.close()
print("%.3f" % statistics.median(rtts) if len(rtts) > 150 else "")
PY
}
section_udp() {
  log "UDP and IPv6 through np up"
  local m; m=$(mark)
  ns pd ip addr add $UDP_DNS/32 dev lo 2>/dev/null
  bg ns pd dnsmasq --no-daemon --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
    --listen-address=198.18.0.3 --listen-address=$UDP_DNS --host-record=probe.test,198.18.200.7 \
    --pid-file="$WORK/dnsmasq.pid" --user=root
  bg ns pr "$BIN/np-relay" --as @relay --home "$WORK/home-relay" --listen 198.18.0.2:7448 ${RELAY_FLAGS:-}
  wait_port pr 198.18.0.2 7448
  bg ns pd "$BIN/npd" --as @bench_device --device bench --manager @bench_client --home "$WORK/home-bench_device" \
    --permit-open "localhost:5201,localhost:22,udp/localhost:5201,udp/$UDP_DNS:53"
  sleep 1
  ip netns exec pc "$BIN/np" up --as @bench_client --relay @relay --device bench@bench_device=100.80.0.2 \
    --route "$UDP_DNS/32=bench@bench_device" --home "$WORK/home-bench_client" >"$WORK/up-udp.out" 2>>"$WORK/logs/bg.log" &
  echo $! >>"$WORK/pids"
  local i; for i in $(seq 100); do grep -q '^ready' "$WORK/up-udp.out" 2>/dev/null && break; sleep 0.05; done
  # 100.80.0.2's IPv6 address under the default --subnet6 (fd6e:7000::/96 + the IPv4 address).
  local v6=fd6e:7000::6450:2 r4 r6 ours_udp wg_udp direct via
  r4=$(ns pc iperf3 -J -t "$T" -c 100.80.0.2 -p 5201 2>/dev/null | gbps 2>/dev/null)
  r6=$(ns pc iperf3 -J -t "$T" -c $v6 -p 5201 2>/dev/null | gbps 2>/dev/null)
  metric "np up TCP one flow over IPv4 (this section)" "$r4" Gbit/s
  metric "np up TCP one flow over IPv6 (same session)" "$r6" Gbit/s
  note "np up TCP over IPv6 / over IPv4, same run: $(python3 -c "import sys; a, b = sys.argv[1:]; print('%.2f' % (float(b) / float(a)))" "${r4:-0}" "${r6:-0}" 2>/dev/null || echo FAIL)"
  ours_udp=$(udp_run "np up" 100.80.0.2)
  direct=$(dns_rtt 198.18.0.3); via=$(dns_rtt $UDP_DNS)
  metric "DNS query round trip, direct to the resolver" "$direct" ms
  metric "DNS query round trip, through np up's device route" "$via" ms
  note "DNS round trip through np up / direct (medians of 200): $(python3 -c "import sys; a, b = sys.argv[1:]; print('%.2f' % (float(b) / float(a)))" "${direct:-0}" "${via:-0}" 2>/dev/null || echo FAIL)"
  stop_since "$m"
  # wireguard-go as peers.sh sets it up (userspace WG over TUN), for its UDP goodput.
  local n peer
  for n in pc pd; do wg genkey >"$WORK/wg_$n.key"; wg pubkey <"$WORK/wg_$n.key" >"$WORK/wg_$n.pub"; done
  for n in pc pd; do
    if [ $n = pc ]; then peer=pd; else peer=pc; fi
    WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD=1 WG_SUDO=1 ns $n wireguard-go wg$n >/dev/null 2>&1; sleep 0.7
    ns $n wg set wg$n listen-port 51820 private-key "$WORK/wg_$n.key" peer "$(cat "$WORK/wg_$peer.pub")" \
      endpoint 198.18.0.$([ $peer = pc ] && echo 1 || echo 3):51820 allowed-ips 100.64.0.$([ $peer = pc ] && echo 1 || echo 2)/32
    ns $n ip addr add 100.64.0.$([ $n = pc ] && echo 1 || echo 2)/24 dev wg$n; ns $n ip link set wg$n up
  done
  sleep 1
  wg_udp=$(udp_run "wireguard-go" 100.64.0.2)
  for n in pc pd; do ns $n ip link del wg$n 2>/dev/null; done
  note "iperf3 -u goodput at 1 Gbit/s offered, np up / wireguard-go: $(python3 -c "import sys; a, b = sys.argv[1:]; print('%.2f' % (float(a) / float(b)))" "${ours_udp:-0}" "${wg_udp:-0}" 2>/dev/null || echo FAIL)"
  ns pd ip addr del $UDP_DNS/32 dev lo 2>/dev/null
}

# --- np up --------------------------------------------------------------------------------------
# np up in pc: a TUN with smoltcp terminating each flow, one session to the device via np-relay.
section_up() {
  log "np up"
  local m; m=$(mark)
  bg ns pr "$BIN/np-relay" --as @relay --home "$WORK/home-relay" --listen 198.18.0.2:7447 ${RELAY_FLAGS:-}
  wait_port pr 198.18.0.2 7447
  bg ns pd "$BIN/npd" --as @bench_device --device bench --manager @bench_client \
    --permit-open localhost:5201,localhost:22,localhost:$BANNER_PORT --home "$WORK/home-bench_device"
  sleep 1
  ip netns exec pc "$BIN/np" up --as @bench_client --relay @relay --device bench@bench_device=100.80.0.2 \
    --home "$WORK/home-bench_client" >"$WORK/up.out" 2>>"$WORK/logs/bg.log" &
  echo $! >>"$WORK/pids"
  local i; for i in $(seq 100); do grep -q '^ready' "$WORK/up.out" 2>/dev/null && break; sleep 0.05; done
  local up npd relay
  up=$(pid_of "$BIN/np up --as @bench_client"); npd=$(pid_of "$BIN/npd --as @bench_device")
  relay=$(pid_of "$BIN/np-relay .*198.18.0.2:7447")
  # Cold first flow: the session is set up by the first SYN (no --eager).
  metric "np up cold first flow (SYN to first sshd byte, session set up on demand)" "$(ns pc python3 - <<'PY'
import socket, time
t = time.perf_counter()
s = socket.create_connection(("100.80.0.2", 22), timeout=10); s.recv(1)
print("%.1f" % ((time.perf_counter() - t) * 1e3))
PY
)" ms
  measure "np up (TUN + smoltcp, one flow)" 100.80.0.2 5201 22 "np up=$up" "npd=$npd" "np-relay=$relay"
  local r; r=$(ns pc iperf3 -J -t "$T" -P 8 -c 100.80.0.2 -p 5201 2>/dev/null | gbps 2>/dev/null)
  ours "np up (TUN + smoltcp, 8 flows): ${r:-FAIL} Gbit/s, connect-to-first-byte - ms"
  flows "np up (TUN + smoltcp, 100 flows)" 100.80.0.2 5201 100
  # The same 100 flows without np, for what iperf3 and the kernel alone make of fairness here.
  flows "direct kernel TCP, 100 flows" 198.18.0.3 5201 100
  warm_cfb "np up" 100.80.0.2 $BANNER_PORT
  rss() { awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null; }
  metric "RSS after the runs, np up" "$(rss "$up")" kB
  metric "RSS after the runs, np-relay" "$(rss "$relay")" kB
  metric "RSS after the runs, npd" "$(rss "$npd")" kB
  metric "RSS after the runs, np-control" "$(rss "$(pid_of "$BIN/np-control serve --listen 198.18")")" kB
  stop_since "$m"
}

# --- ssh through np nc ----------------------------------------------------------------------------
# The real OpenSSH client in pc with the `Host *.np` block `np ssh-config` prints (ProxyCommand
# `np nc %h %p`, a session of its own per ssh: no np up here), beside `ssh -J` through the relay
# host (pd's sshd reached from pr: the device has an open port) and the reverse SSH tunnel (pd
# dials out to pr, pr's 17022 is pd's 22). Connect time: command start to the remote `true`
# exiting, median of 11, the three paths alternating. scp: 256 MiB up (to a file on pd) and
# down (from pd, to a file), through np nc and through the reverse tunnel; MB/s and ratios.
section_ssh() {
  log "ssh through np nc"
  local m; m=$(mark)
  local k=$WORK/ssh_key cfg=$WORK/ssh_config out
  [ -f "$k" ] || { log "no ssh key (the reverse tunnel did not start): skipping ssh"; return; }
  bg ns pr "$BIN/np-relay" --as @relay --home "$WORK/home-relay" --listen 198.18.0.2:7450 ${RELAY_FLAGS:-}
  wait_port pr 198.18.0.2 7450
  bg ns pd "$BIN/npd" --as @bench_device --device bench --manager @bench_client \
    --permit-open localhost:22 --home "$WORK/home-bench_device"
  sleep 1
  { "$BIN/np" --home "$WORK/home-bench_client" ssh-config --as @bench_client --relay @relay
    printf 'Host *\n  User root\n  IdentityFile %s\n  IdentitiesOnly yes\n  BatchMode yes\n' "$k"
    printf '  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n'
  } >"$cfg"
  note "ssh: np nc's ProxyCommand is $(grep -m1 ProxyCommand "$cfg" | sed 's/^ *//')"
  out=$(ns pc python3 - "$cfg" 2>>"$WORK/logs/bg.log" <<'PY'
import statistics, subprocess, sys, time
cfg = sys.argv[1]
paths = [
    ["ssh", "-F", cfg, "bench.bench_device.np", "true"],
    ["ssh", "-F", cfg, "-J", "root@198.18.0.2", "root@198.18.0.3", "true"],
    ["ssh", "-F", cfg, "-p", "17022", "root@198.18.0.2", "true"],
]
r = [[] for _ in paths]
for _ in range(11):
    for j, cmd in enumerate(paths):
        t = time.perf_counter()
        if subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, timeout=30).returncode == 0:
            r[j].append((time.perf_counter() - t) * 1e3)
print(" ".join("%.1f" % statistics.median(x) if x else "FAIL" for x in r))
PY
)
  set -- $out
  local via_np=${1:-} via_j=${2:-} via_rev=${3:-}
  metric "ssh connect (command start to remote true exit, median of 11), np nc" "$via_np" ms
  metric "ssh connect (same), ssh -J via the relay host" "$via_j" ms
  metric "ssh connect (same), reverse SSH tunnel" "$via_rev" ms
  metric "ssh connect, np nc / ssh -J" "$(ratio "$via_np" "$via_j")" ""
  metric "ssh connect, np nc / reverse SSH tunnel" "$(ratio "$via_np" "$via_rev")" ""
  # scp: 256 MiB of random bytes (incompressible), each way, each path.
  local f=$WORK/scp.bin
  [ -f "$f" ] || head -c 256M /dev/urandom >"$f"
  scp_mbps() { local t0 t1; t0=$(date +%s.%N)
    ns pc scp -q -F "$cfg" "$@" </dev/null >/dev/null 2>>"$WORK/logs/bg.log" || { echo FAIL; return; }
    t1=$(date +%s.%N); python3 -c "print('%.1f' % (256 * 1.048576 / ($t1 - $t0)))"; }
  local np_up np_down rev_up rev_down
  # Into files, not /dev/null: scp speaks SFTP since OpenSSH 9, which cannot truncate a device.
  local g=$WORK/scp.out
  np_up=$(scp_mbps "$f" bench.bench_device.np:"$g"); rm -f "$g"
  rev_up=$(scp_mbps -P 17022 "$f" root@198.18.0.2:"$g"); rm -f "$g"
  np_down=$(scp_mbps bench.bench_device.np:"$f" "$g"); rm -f "$g"
  rev_down=$(scp_mbps -P 17022 root@198.18.0.2:"$f" "$g"); rm -f "$g"
  metric "scp 256 MiB up, np nc" "$np_up" MB/s
  metric "scp 256 MiB up, reverse SSH tunnel" "$rev_up" MB/s
  metric "scp 256 MiB down, np nc" "$np_down" MB/s
  metric "scp 256 MiB down, reverse SSH tunnel" "$rev_down" MB/s
  metric "scp 256 MiB up, np nc / reverse SSH tunnel" "$(ratio "$np_up" "$rev_up")" ""
  metric "scp 256 MiB down, np nc / reverse SSH tunnel" "$(ratio "$np_down" "$rev_down")" ""
  rm -f "$f"
  stop_since "$m"
}
# ratio A B: A/B to two decimals, or empty (FAIL) when either is missing.
ratio() { python3 -c 'import sys
try: print("%.2f" % (float(sys.argv[1]) / float(sys.argv[2])))
except (ValueError, ZeroDivisionError): pass' "$1" "$2"; }

# --- relays as a fleet ---------------------------------------------------------------------------
# Two relays in pr on the operator's list. Relay selection: cold setup (command start to the first
# sshd byte) with no --relay, np forward probing both and choosing, beside the same with --relay
# pinned. Failover: np forward with no --relay carrying flows to the banner server; the relay it
# chose is killed, and the time to the first banner byte of a new flow (through the other) is
# measured. Runs once, last by default: it leaves @relay2 on the operator's list.
section_fleet() {
  log "relays as a fleet"
  local m; m=$(mark)
  [ -d "$WORK/home-relay2" ] || enrol @relay2
  "$BIN/np-control" relay add @relay2 --data "$WORK/control" >/dev/null || { log "np-control relay add @relay2 failed"; return; }
  bg ns pr "$BIN/np-relay" --as @relay --home "$WORK/home-relay" --listen 198.18.0.2:7452 ${RELAY_FLAGS:-}
  bg ns pr "$BIN/np-relay" --as @relay2 --home "$WORK/home-relay2" --listen 198.18.0.2:7453 ${RELAY_FLAGS:-}
  wait_port pr 198.18.0.2 7452; wait_port pr 198.18.0.2 7453
  bg ns pd "$BIN/npd" --as @bench_device --device bench --manager @bench_client \
    --permit-open localhost:22,localhost:$BANNER_PORT --home "$WORK/home-bench_device"
  sleep 1
  local pinned chosen
  pinned=$(cold_setup 16200 "pinned" @relay | sed -n 's/.*: \([0-9.]*\) ms$/\1/p')
  chosen=$(cold_setup 16300 "chosen" choose | sed -n 's/.*: \([0-9.]*\) ms$/\1/p')
  metric "np forward cold setup, relay pinned with --relay (median of 7)" "$pinned" ms
  metric "np forward cold setup, relay chosen among two by round trip (median of 7)" "$chosen" ms
  metric "relay selection: cold setup chosen / pinned" "$(awk -v a="$chosen" -v b="$pinned" 'BEGIN { if (a != "" && b > 0) printf "%.2f", a / b }')" "x"
  ip netns exec pc "$BIN/np" forward --as @bench_client --to bench@bench_device -v -L 127.0.0.1:16400:localhost:$BANNER_PORT \
    --home "$WORK/home-bench_client" >/dev/null 2>"$WORK/fleet-forward.log" &
  echo $! >>"$WORK/pids"
  wait_port pc 127.0.0.1 16400
  local first used pid
  first=$(ns pc python3 -c 'import socket; s = socket.create_connection(("127.0.0.1", 16400), timeout=10); print(s.recv(64).decode().strip())' 2>/dev/null)
  used=$(sed -n 's/^relay for bench@bench_device: \(@[a-z0-9_]*\).*/\1/p' "$WORK/fleet-forward.log" | head -1)
  [ -n "$first" ] && [ -n "$used" ] || { log "fleet: no first flow (${first:-none}) or no relay named (${used:-none})"; stop_since "$m"; return; }
  case $used in @relay) pid=$(pid_of "$BIN/np-relay --as @relay .*7452") ;; *) pid=$(pid_of "$BIN/np-relay --as @relay2 .*7453") ;; esac
  local failover
  failover=$(ns pc python3 - "$pid" <<'PY'
import os, signal, socket, sys, time
pid = int(sys.argv[1])
t = time.perf_counter()
os.kill(pid, signal.SIGKILL)
while time.perf_counter() - t < 10:
    try:
        s = socket.create_connection(("127.0.0.1", 16400), timeout=5)
        if s.recv(1):
            print("%.0f" % ((time.perf_counter() - t) * 1e3)); break
    except OSError:
        time.sleep(0.005)
PY
)
  metric "failover: new flow's first byte after the relay in use ($used) is killed" "$failover" ms
  metric "failover / cold setup pinned" "$(awk -v a="$failover" -v b="$pinned" 'BEGIN { if (a != "" && b > 0) printf "%.2f", a / b }')" "x"
  stop_since "$m"
}

# --- np-relay holding idle sessions ----------------------------------------------------------------
# 10,000 sessions paired through one relay and left idle (tests/examples/relay_idle: @bench_client
# and @bench_device each join every session, so 20,000 authenticated connections): time to pair
# them all and the relay's resident memory. The relay's session limits are raised by flags for
# this; its defaults stay as they are. Each connection is a file descriptor in the relay (and one
# in relay_idle): with an open-files limit below ~20,100 the section holds as many as fit.
section_idle() {
  log "np-relay holding idle sessions"
  local m n relay limit; m=$(mark)
  limit=$(ulimit -n)
  n=$(( (limit - 100) / 2 )); [ "$n" -gt 10000 ] && n=10000
  [ "$n" -lt 10000 ] && note "the open-files limit here is $limit (hard), so the relay holds $n sessions, not 10,000"
  bg ns pr "$BIN/np-relay" --as @relay --home "$WORK/home-relay" --listen 198.18.0.2:7449 \
    --max-sessions $((n + 64)) --max-sessions-per-identity $((n + 64)) --pairing-timeout 60s
  wait_port pr 198.18.0.2 7449
  relay=$(pid_of "$BIN/np-relay .*198.18.0.2:7449")
  ns pc "$BIN/examples/relay_idle" --relay 198.18.0.2:7449 --sessions "$n" --relay-pid "$relay" \
    --client-home "$WORK/home-bench_client" --client @bench_client \
    --device-home "$WORK/home-bench_device" --device @bench_device >"$WORK/idle.out" 2>>"$WORK/logs/bg.log" \
    || note "relay_idle failed (see $WORK/logs/bg.log)"
  local l; while IFS= read -r l; do note "$l"; done <"$WORK/idle.out"
  stop_since "$m"
}

# --- abuse ---------------------------------------------------------------------------------------
# A manager's np forward beside a permitted client (@bench_mallory) that floods its own session
# with Pings and never reads (tests/examples/ping_flood): throughput, connect-to-first-byte and
# cold setup with and without the flood, as ratios within this run, and npd's memory.
section_abuse() {
  log "np forward beside a Ping flood"
  local m; m=$(mark)
  bg ns pr "$BIN/np-relay" --as @relay --home "$WORK/home-relay" --listen 198.18.0.2:7448
  wait_port pr 198.18.0.2 7448
  bg ns pd "$BIN/npd" --as @bench_device --device bench --manager @bench_client --manager @bench_mallory \
    --permit-open localhost:5201,localhost:22 --home "$WORK/home-bench_device"
  sleep 1
  local npd; npd=$(pgrep -f 'npd --as @bench_device .*--manager @bench_mallory' | head -1)
  bg ns pc "$BIN/np" forward --as @bench_client --to bench@bench_device --relay @relay \
    -L 127.0.0.1:15501:localhost:5201 -L 127.0.0.1:15502:localhost:22 --home "$WORK/home-bench_client"
  wait_port pc 127.0.0.1 15501
  sleep 0.5
  local quiet flood q_setup f_setup rss0 rss1
  measure "np forward, no flood beside it" 127.0.0.1 15501 15502
  quiet=$(tail -1 "$OURS")
  q_setup=$(cold_setup 16100 "np forward cold setup, no flood beside it")
  rss0=$(awk '/VmRSS/ {print $2}' "/proc/$npd/status" 2>/dev/null)
  # Up to three tries at the flooder's session setup (it exits with an error when setup fails).
  bg ns pc bash -c 'trap "kill \$c 2>/dev/null; exit 0" TERM
    for i in 1 2 3; do "$@" & c=$!; wait $c && exit 0; sleep 1; done; exit 1' ping_flood \
    "$BIN/examples/ping_flood" "$WORK/home-bench_mallory" @bench_mallory bench@bench_device @relay localhost:22
  local i; for i in $(seq 100); do grep -q '^ping_flood: session up' "$WORK/logs/bg.log" && break; sleep 0.1; done
  grep -q '^ping_flood: session up' "$WORK/logs/bg.log" || log "ping_flood did not get its session: the flooded figures below are without a flood"
  sleep 2
  measure "np forward, a permitted client flooding Pings beside it" 127.0.0.1 15501 15502
  flood=$(tail -1 "$OURS")
  f_setup=$(cold_setup 16200 "np forward cold setup, Ping flood beside it")
  rss1=$(awk '/VmRSS/ {print $2}' "/proc/$npd/status" 2>/dev/null)
  note "$q_setup"; note "$f_setup"
  note "$(python3 - "$quiet" "$flood" "$q_setup" "$f_setup" "${rss0:-0}" "${rss1:-0}" <<'PY'
import re, sys
quiet, flood, qs, fs, r0, r1 = sys.argv[1:7]
def num(pat, s):
    m = re.search(pat, s)
    try:
        return float(m.group(1)) if m else None
    except ValueError:
        return None
def ratio(a, b):
    return "%.2f" % (a / b) if a is not None and b else "-"
g = r"([0-9.]+) Gbit/s"; c = r"first-byte ([0-9.]+) ms"; t = r": ([0-9.]+) ms"
print("Ping flood beside a manager's np forward (flooded / quiet): throughput %s, connect-to-first-byte %s, cold setup %s; npd RSS %s"
      % (ratio(num(g, flood), num(g, quiet)), ratio(num(c, flood), num(c, quiet)), ratio(num(t, fs), num(t, qs)),
         ratio(float(r1), float(r0))))
PY
)"
  stop_since "$m"
}

# --- control-plane backlog --------------------------------------------------------------------
# 5,000 notifications queued for an offline identity, drained from its connect until all are
# received, against the same 5,000 delivered live (crates/control-client/examples/notify_bench).
# Before issue 12 such a backlog cut the recipient off (each push cost ~20 s of timeouts).
section_backlog() {
  log "control-plane backlog"
  enrol @bench_sender; enrol @bench_inbox
  local line
  line=$(ns pc "$BIN/examples/notify_bench" --sender-home "$WORK/home-bench_sender" --sender @bench_sender \
    --recipient-home "$WORK/home-bench_inbox" --recipient @bench_inbox -n 5000 2>>"$WORK/logs/bg.log") \
    || line="control plane: 5000 queued notifications: FAIL"
  # Per queued notification, against one cold session setup of `np forward` from this run.
  local cold; cold=$(awk -F'\t' '$2 ~ /^np forward cold setup/ && $3 ~ /^[0-9.]+$/ {v = $3} END {print v}' "$METRICS")
  local each; each=$(echo "$line" | sed -n 's/.*(\([0-9.]*\) µs each).*/\1/p')
  if [ -n "$cold" ] && [ -n "$each" ]; then
    line="$line; whole drain / one cold np forward setup $(python3 -c "print('%.1f' % ($each * 5000 / 1000 / $cold))")"
  fi
  note "$line"
}

# --- control plane under load -------------------------------------------------------------------
# CONTROL_N simulated devices (default 10,000; real keys, TLS and authentication) against one
# node on redb, one on PostgreSQL and two on one PostgreSQL (tests/examples/control_load,
# on loopback outside the hosts): RSS per connected device, connect storm after a node's
# SIGKILL, notification latency p50/p99 across nodes, session-request rate, and the PostgreSQL
# set-ups as ratios to redb. Each device holds a socket in the tool and one in a node, so the
# open-file limit is raised first.
section_control() {
  local n=${CONTROL_N:-10000} line
  log "control plane under load: $n devices"
  # As far as the hard limit allows; the tool says so if that is too few for $n.
  ( ulimit -n $((2 * n + 4096)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
    "$BIN/examples/control_load" -n "$n" --bin "$BIN" ) 2>>"$WORK/logs/bg.log" \
    | while IFS= read -r line; do note "$line"; done
  [ "${PIPESTATUS[0]}" = 0 ] || note "control plane under load ($n devices): FAIL (see $WORK/logs/bg.log)"
}

# --- report ------------------------------------------------------------------------------------
# Our paths: the median over the rounds of each figure, ratios to the peers from those medians,
# and each round's figure beside it; then the other figures the same way, and the notes.
report() {
  python3 - "$PEERS_OUT" "$OURS" "$METRICS" "$SETUP" <<'PY'
import re, statistics, sys
peers_path, ours_path, metrics_path, notes_path = sys.argv[1:5]
def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None
def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
def parse(line):
    m = re.match(r"(.*?): (\S+) Gbit/s, connect-to-first-byte (\S+) ms", line.strip())
    return (m.group(1), num(m.group(2)), num(m.group(3))) if m else None
def tagged(path):
    for line in open(path):
        tag, _, rest = line.rstrip("\n").partition("\t")
        yield tag, rest
peers = [p for p in map(parse, open(peers_path)) if p]
ours = {}
for tag, rest in tagged(ours_path):
    p = parse(rest)
    if p:
        ours.setdefault(p[0], []).append((tag,) + p[1:])
rows = [(l, med([g for _, g, _ in v]), med([c for _, _, c in v]), [g for _, g, _ in v]) for l, v in ours.items()]
def find(prefix):
    return next((g for l, g, _ in peers if l.startswith(prefix)), None)
direct, ssh, socat = find("direct kernel TCP"), find("reverse SSH tunnel"), find("plain TCP relay")
wg = find("wireguard-go")
ssh_cfb = next((c for l, _, c in peers if l.startswith("reverse SSH tunnel")), None)
def ratio(a, b):
    return "%.2f" % (a / b) if a is not None and b else "-"
def f(x, spec="%.2f"):
    return "-" if x is None else spec % x
rounds = max((len(v) for v in ours.values()), default=0)
w = max([len(l) for l, _, _ in peers] + [len(l) for l, *_ in rows] + [40])
hdr = (w, "path", "Gbit/s", "cfb ms", "/direct", "/rev-ssh", "/socat", "/wg-go", "cfb/rev-ssh", "Gbit/s each round")
fmt = "%-*s  %8s  %9s  %8s  %8s  %8s  %8s  %11s  %s"
print()
print("our paths: median of %d round(s); peers: one run; ratios from the medians" % rounds)
print(fmt % hdr)
print("-" * (w + 100))
for l, g, c, each in rows:
    print(fmt % (w, l, f(g), f(c), ratio(g, direct), ratio(g, ssh), ratio(g, socat), ratio(g, wg), ratio(c, ssh_cfb),
                 " / ".join(f(x) for x in each)))
print("-" * (w + 100))
for l, g, c in peers:
    print(fmt % (w, l, f(g), f(c), ratio(g, direct), ratio(g, ssh), ratio(g, socat), ratio(g, wg), ratio(c, ssh_cfb), ""))
print("-" * (w + 100))
# Paired ratios: each round's figure over the same round's tunnel and socat relay.
yard = [(n, {t: g for t, g, _ in ours.get(l, [])}) for n, l in (("/rev-ssh", "reverse SSH tunnel via relay host (this round)"),
                                                              ("/socat", "plain TCP relay via relay host (socat, this round)"))]
if any(b for _, b in yard):
    print("paired with each round's own tunnel and socat relay (median, then each round):")
    for l, v in ours.items():
        if "(this round)" in l:
            continue
        parts = []
        for n, b in yard:
            r = [g / b[t] for t, g, _ in v if g is not None and b.get(t)]
            if r:
                parts.append("%s %.2f (%s)" % (n, statistics.median(r), ", ".join("%.2f" % x for x in r)))
        if parts:
            print("  %-*s  %s" % (w, l, "   ".join(parts)))
    print()
one = next((g for l, g, _, _ in rows if l.startswith("np up (TUN + smoltcp, one flow)")), None)
for l, g, _, _ in rows:
    m = re.match(r"np up \(TUN \+ smoltcp, (\d+) flows\)", l)
    if m:
        print("np up, %s flows / one flow (medians): %s" % (m.group(1), ratio(g, one)))
print()
metrics = {}
for tag, rest in tagged(metrics_path):
    label, value, unit = (rest.split("\t") + ["", "", ""])[:3]
    metrics.setdefault(label, ([], unit))[0].append(value)
for label, (values, unit) in metrics.items():
    m = med([num(v) for v in values])
    each = " (each round: %s)" % ", ".join(values) if len(values) > 1 else ""
    print("%s: %s %s%s" % (label, f(m, "%g"), unit, each))
    t = re.match(r"(warm connect-to-first-byte .*), (np up|np forward)$", label)
    if t:
        tunnel = metrics.get("%s, reverse SSH tunnel beside %s" % t.groups())
        if tunnel:
            print("%s: %s / reverse SSH tunnel (medians): %s" % (t.group(1), t.group(2), ratio(m, med([num(v) for v in tunnel[0]]))))
print()
for tag, rest in tagged(notes_path):
    print(rest if tag == "R0" else "round %s: %s" % (tag[1:], rest))
PY
}

[ "$(id -u)" = 0 ] || { echo "bench.sh needs root (network namespaces)" >&2; exit 1; }
# relay_idle and the relay it talks to hold a socket per connection (20,000 for 10,000 sessions).
ulimit -n "$(ulimit -Hn)"
install_deps
build
section_peers
make_hosts
start_control
for n in @relay @bench_client @bench_device @bench_mallory; do enrol $n; done
# Devices trust @relay (the operator's list); each section's relay publishes its own address.
"$BIN/np-control" relay add @relay --data "$WORK/control" >/dev/null || { log "np-control relay add failed"; exit 1; }
# The relay pipes and np forward both look up keys on the control plane from the namespaces.
start_services
start_banner
start_rev_tunnel || log "no reverse SSH tunnel: warm connect-to-first-byte has nothing to compare with"
# Our paths in rounds (each round all of them, so a slow minute of the machine touches every path
# once rather than one path three times), then the sections measured once.
for ROUND in $(seq "$ROUNDS"); do
  for sec in ${SECTIONS:-tunnel relay forward up udp ssh idle backlog abuse fleet control}; do
    case " $ROUNDED " in *" $sec "*) log "round $ROUND of $ROUNDS: $sec"; "section_$sec" ;; esac
  done
done
ROUND=0
for sec in ${SECTIONS:-tunnel relay forward up udp ssh idle backlog abuse fleet control}; do
  case " $ROUNDED " in *" $sec "*) ;; *) "section_$sec" ;; esac
done
teardown_hosts
report
