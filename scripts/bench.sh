#!/usr/bin/env bash
# np benchmark: our paths beside the peers of ../shared/bench/peers.sh, measured in one run on the
# same three network namespaces, reported as ratios (not absolute figures).
#
#   sudo scripts/bench.sh            # T=seconds per throughput test (default 5)
#   RELAY_FLAGS="--forward-buffer 1048576" NP_PEERS=/bin/true scripts/bench.sh   # tune, no peers
#   SECTIONS="forward" scripts/bench.sh        # only some of our paths (default: all, backlog last)
#
# Hosts (bridge pbr0, 198.18.0.0/24, same as peers.sh): pc client 198.18.0.1, pr relay 198.18.0.2,
# pd device 198.18.0.3. np-control and np-relay run in pr; identities are enrolled with the real
# `np keys new`; iperf3 -s and sshd run in pd.
#
# Layout: one "section" per path of ours. A section starts what it needs (bg), measures with
# `measure LABEL HOST IPERF_PORT SSH_PORT` (or prints its own `LABEL: X Gbit/s, ...` line into
# $OURS) and stops what it started (stop_bg). Add `np forward`, `np up`, ... as new sections.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
export T=${T:-5}
TARGET=${CARGO_TARGET_DIR:-$REPO/target}
BIN=$TARGET/release
WORK=$(mktemp -d /tmp/np-bench.XXXXXX)
OURS=$WORK/ours.txt
SETUP=$WORK/setup.txt
PEERS_OUT=$WORK/peers.txt
CONTROL=198.18.0.2:7443
: >"$OURS"; : >"$SETUP"; : >"$WORK/pids"

ns() { ip netns exec "$@"; }
log() { echo "bench: $*" >&2; }

# --- hosts ----------------------------------------------------------------------------------
teardown_hosts() {
  for p in $(cat "$WORK/pids" 2>/dev/null); do kill "$p" 2>/dev/null; done; : >"$WORK/pids"
  for n in pc pr pd; do ip netns pids $n 2>/dev/null | xargs -r kill 2>/dev/null; ip netns del $n 2>/dev/null; done
  ip link del pbr0 2>/dev/null
}
cleanup() { teardown_hosts; [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# make_hosts: the three namespaces of peers.sh, from scratch.
make_hosts() {
  teardown_hosts
  ip link add pbr0 type bridge && ip link set pbr0 up
  local i=1 n
  for n in pc pr pd; do
    ip netns add $n
    ip link add v$n type veth peer name eth0 netns $n
    ip link set v$n master pbr0 up
    ns $n ip addr add 198.18.0.$i/24 dev eth0; ns $n ip link set eth0 up; ns $n ip link set lo up
    i=$((i+1))
  done
}

# bg CMD...: start in the background, remembered for stop_bg / cleanup; output to $WORK/logs.
bg() { mkdir -p "$WORK/logs"; "$@" >>"$WORK/logs/bg.log" 2>&1 & echo $! >>"$WORK/pids"; }
# mark / stop_since MARK: stop only what was started after `mark` (a section's own processes).
mark() { wc -l <"$WORK/pids" 2>/dev/null || echo 0; }
stop_since() { local m=$1
  for p in $(tail -n +$((m+1)) "$WORK/pids" 2>/dev/null); do kill "$p" 2>/dev/null; done
  head -n "$m" "$WORK/pids" >"$WORK/pids.tmp" 2>/dev/null; mv "$WORK/pids.tmp" "$WORK/pids"; sleep 0.3; }

gbps() { python3 -c 'import json,sys; d=json.load(sys.stdin); print("%.2f" % (d["end"]["sum_received"]["bits_per_second"]/1e9))'; }
# median ms from connect() to the first byte of the SSH banner, 20 tries (as peers.sh)
cfb() { ns pc python3 - "$1" "$2" <<'PY'
import socket,sys,time,statistics
h,p=sys.argv[1],int(sys.argv[2]); r=[]
for _ in range(20):
    t=time.perf_counter(); s=socket.create_connection((h,p),timeout=5); s.recv(1); r.append((time.perf_counter()-t)*1e3); s.close()
print("%.2f" % statistics.median(r))
PY
}
# measure LABEL HOST IPERF_PORT SSH_PORT: iperf3 from pc, one flow, and connect-to-first-byte.
measure() { local label=$1 host=$2 iport=$3 sport=$4 r l
  r=$(ns pc iperf3 -J -t "$T" -c "$host" -p "$iport" 2>/dev/null | gbps 2>/dev/null)
  l=$(cfb "$host" "$sport" 2>/dev/null)
  echo "$label: ${r:-FAIL} Gbit/s, connect-to-first-byte ${l:-FAIL} ms" | tee -a "$OURS" >&2; }

# --- setup ------------------------------------------------------------------------------------
install_deps() {
  local need=0 c
  for c in iperf3 socat sshd wireguard-go wg python3; do command -v $c >/dev/null || [ -x /usr/sbin/$c ] || need=1; done
  [ $need = 0 ] && return
  log "installing missing packages"
  apt-get update -qq >/dev/null 2>&1
  for p in iperf3 openssh-server socat wireguard-go wireguard-tools python3; do
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $p >/dev/null 2>&1 || log "package $p not available; carrying on"
  done
}

build() {
  log "building (release) into $TARGET"
  (cd "$REPO" && cargo build --release --bins --examples -q) || {
    log "workspace build failed; building only what the bench needs"
    (cd "$REPO" && cargo build --release -q -p np-control -p np-cli -p np-relay -p np-control-client -p np-tests --bins --examples) || exit 1
  }
  for b in np-control np npd np-relay examples/relay_pipe examples/notify_bench examples/ping_flood; do [ -x "$BIN/$b" ] || { log "missing $BIN/$b"; exit 1; }; done
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
  echo "np-relay $label alone (one session, no iperf3): $(cat "$sink" 2>/dev/null || echo FAIL) Gbit/s, connect-to-first-byte - ms" \
    | tee -a "$OURS" >&2
  stop_since "$m"
}

section_relay() {
  log "np-relay"
  relay_variant "copy" 7444 15200
  relay_variant "splice" 7445 15300 --zero-copy
}

# cold_setup LOCAL_BASE LABEL: median of 7 runs of `np forward` as @bench_client (through @relay,
# at the address the running relay published), from the command's start to the first byte of
# sshd's banner through it.
cold_setup() {
  ns pc python3 - "$BIN/np" "$WORK/home-bench_client" "$1" "$2" 2>>"$WORK/logs/bg.log" <<'PY'
import socket, subprocess, sys, time, statistics
np, home, base, label = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
r = []
for i in range(7):
    port = base + i
    t = time.perf_counter()
    p = subprocess.Popen([np, "forward", "--as", "@bench_client", "--to", "bench@bench_device", "--relay", "@relay",
                          "-L", "127.0.0.1:%d:localhost:22" % port, "--home", home], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
  bg ns pr "$BIN/np-relay" --as @relay --home "$WORK/home-relay" --listen 198.18.0.2:7446
  wait_port pr 198.18.0.2 7446
  bg ns pd "$BIN/npd" --as @bench_device --device bench --manager @bench_client \
    --permit-open localhost:5201,localhost:22 --home "$WORK/home-bench_device"
  sleep 1
  # Cold setup: from starting `np forward` to the first byte of sshd's banner through it.
  cold_setup 16000 "np forward cold setup" >>"$SETUP"
  tail -1 "$SETUP" >&2
  bg ns pc "$BIN/np" forward --as @bench_client --to bench@bench_device --relay @relay \
    -L 127.0.0.1:15401:localhost:5201 -L 127.0.0.1:15402:localhost:22 --home "$WORK/home-bench_client"
  wait_port pc 127.0.0.1 15401
  sleep 0.5
  measure "np forward (one session, AES-256-GCM, via np-relay)" 127.0.0.1 15401 15402
  stop_since "$m"
}

# --- np up --------------------------------------------------------------------------------------
# np up in pc: a TUN with smoltcp terminating each flow, one session to the device via np-relay.
section_up() {
  log "np up"
  local m; m=$(mark)
  bg ns pr "$BIN/np-relay" --as @relay --home "$WORK/home-relay" --listen 198.18.0.2:7447
  wait_port pr 198.18.0.2 7447
  bg ns pd "$BIN/npd" --as @bench_device --device bench --manager @bench_client \
    --permit-open localhost:5201,localhost:22 --home "$WORK/home-bench_device"
  sleep 1
  ns pc "$BIN/np" up --as @bench_client --relay @relay --device bench@bench_device=100.80.0.2 \
    --home "$WORK/home-bench_client" >"$WORK/up.out" 2>>"$WORK/logs/bg.log" &
  local up=$!; echo $up >>"$WORK/pids"
  local i; for i in $(seq 100); do grep -q '^ready' "$WORK/up.out" 2>/dev/null && break; sleep 0.05; done
  # Cold first flow: the session is set up by the first SYN (no --eager).
  ns pc python3 - >>"$SETUP" <<'PY'
import socket, time
t = time.perf_counter()
s = socket.create_connection(("100.80.0.2", 22), timeout=10); s.recv(1)
print("np up cold first flow (SYN to first sshd byte, session set up on demand): %.1f ms" % ((time.perf_counter() - t) * 1e3))
PY
  tail -1 "$SETUP" >&2
  measure "np up (TUN + smoltcp, one flow)" 100.80.0.2 5201 22
  local r; r=$(ns pc iperf3 -J -t "$T" -P 8 -c 100.80.0.2 -p 5201 2>/dev/null | gbps 2>/dev/null)
  echo "np up (TUN + smoltcp, 8 flows): ${r:-FAIL} Gbit/s, connect-to-first-byte - ms" | tee -a "$OURS" >&2
  rss() { awk '/VmRSS/ {print $2, $3}' "/proc/$1/status" 2>/dev/null || echo "?"; }
  echo "RSS after the runs: np up $(rss $up), np-relay $(rss "$(pgrep -f 'np-relay .*198.18.0.2:7447' | head -1)"), npd $(rss "$(pgrep -f 'npd --as @bench_device' | head -1)"), np-control $(rss "$(pgrep -f 'np-control serve --listen 198.18' | head -1)")" >>"$SETUP"
  tail -1 "$SETUP" >&2
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
  bg ns pc bash -c 'for i in 1 2 3; do "$@" && exit 0; sleep 1; done; exit 1' ping_flood \
    "$BIN/examples/ping_flood" "$WORK/home-bench_mallory" @bench_mallory bench@bench_device @relay localhost:22
  local i; for i in $(seq 100); do grep -q '^ping_flood: session up' "$WORK/logs/bg.log" && break; sleep 0.1; done
  grep -q '^ping_flood: session up' "$WORK/logs/bg.log" || log "ping_flood did not get its session: the flooded figures below are without a flood"
  sleep 2
  measure "np forward, a permitted client flooding Pings beside it" 127.0.0.1 15501 15502
  flood=$(tail -1 "$OURS")
  f_setup=$(cold_setup 16200 "np forward cold setup, Ping flood beside it")
  rss1=$(awk '/VmRSS/ {print $2}' "/proc/$npd/status" 2>/dev/null)
  echo "$q_setup" >>"$SETUP"; echo "$f_setup" >>"$SETUP"
  python3 - "$quiet" "$flood" "$q_setup" "$f_setup" "${rss0:-0}" "${rss1:-0}" >>"$SETUP" <<'PY'
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
  tail -3 "$SETUP" >&2
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
  local cold; cold=$(sed -n 's/^np forward cold setup.*: \([0-9.]*\) ms$/\1/p' "$SETUP" | tail -1)
  local each; each=$(echo "$line" | sed -n 's/.*(\([0-9.]*\) µs each).*/\1/p')
  if [ -n "$cold" ] && [ -n "$each" ]; then
    line="$line; whole drain / one cold np forward setup $(python3 -c "print('%.1f' % ($each * 5000 / 1000 / $cold))")"
  fi
  echo "$line" | tee -a "$SETUP" >&2
}

# --- report ------------------------------------------------------------------------------------
report() {
  python3 - "$PEERS_OUT" "$OURS" <<'PY'
import re, sys
def parse(path):
    out = []
    for line in open(path):
        m = re.match(r"(.*?): (\S+) Gbit/s, connect-to-first-byte (\S+) ms", line.strip())
        if m:
            g = m.group(2)
            out.append((m.group(1), float(g) if re.match(r"^[0-9.]+$", g) else None, m.group(3)))
    return out
peers, ours = parse(sys.argv[1]), parse(sys.argv[2])
def find(prefix):
    return next((g for l, g, _ in peers if l.startswith(prefix)), None)
direct, ssh, socat = find("direct kernel TCP"), find("reverse SSH tunnel"), find("plain TCP relay")
wg = find("wireguard-go")
def ratio(a, b):
    return "%.2f" % (a / b) if a is not None and b else "-"
w = max(len(l) for l, _, _ in peers + ours) if peers + ours else 40
print()
ssh_cfb = next((c for l, _, c in peers if l.startswith("reverse SSH tunnel")), None)
def cratio(c):
    try:
        return "%.2f" % (float(c) / float(ssh_cfb))
    except (TypeError, ValueError):
        return "-"
hdr = (w, "path", "Gbit/s", "cfb ms", "/direct", "/rev-ssh", "/socat", "/wg-go", "cfb/rev-ssh")
fmt = "%-*s  %8s  %9s  %8s  %8s  %8s  %8s  %11s"
print(fmt % hdr)
print("-" * (w + 79))
for rows in (ours, peers):
    for l, g, c in rows:
        print(fmt % (w, l, "FAIL" if g is None else "%.2f" % g, c, ratio(g, direct), ratio(g, ssh), ratio(g, socat), ratio(g, wg), cratio(c)))
    print("-" * (w + 79))
PY
  echo
  cat "$SETUP"
}

[ "$(id -u)" = 0 ] || { echo "bench.sh needs root (network namespaces)" >&2; exit 1; }
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
for sec in ${SECTIONS:-relay forward up backlog abuse}; do "section_$sec"; done
teardown_hosts
report
