#!/usr/bin/env bash
# Tunnel benchmark (not a test): Ferry's two-hop tunnel (enterprise -> gateway -> app)
# against OpenSSH `ssh -N -L` (aes128-gcm@openssh.com, no compression) and a direct
# connection, on loopback. Endpoints (iperf3, echo, dnsmasq) are pinned to CPU 0 and the
# tunnel processes to CPU 1. It measures iperf3 throughput (1 and 8 streams), the
# p50/p99 round trip of 1 B ping-pong (idle, and beside bulk traffic on another
# service), RSS idle and with 1,000 idle connections, and DNS through the UDP path
# (OpenSSH has no UDP forwarding). Needs root, iperf3, openssh-server, dnsmasq.
# Usage: tests/bench/tunnel.sh [WORKDIR]
# Env: FERRY_FIRST_TUNNEL=False (one hop), WINDOW_KIB (both tables' window_kib),
# TUNNEL_LOG (RUST_LOG of the three roles, warn by default).
set -euo pipefail
cd "$(dirname "$0")/../.."
W=${1:-/tmp/ferry-bench/tunnel}
B=${CARGO_TARGET_DIR:-$PWD/target}/release
cargo build --release -p ferry-tunnel >/dev/null
ulimit -n "$(ulimit -Hn)"

cleanup() {
  pkill -f "ferry-tunnel .* --config $W/" 2>/dev/null || true
  pkill -f "sshd -f $W/sshd_config" 2>/dev/null || true
  pkill -f "ssh -N -F /dev/null -i $W/" 2>/dev/null || true
  pkill -f "iperf3 -s -p 15201" 2>/dev/null || true
  pkill -f "dnsmasq .*--pid-file=$W/" 2>/dev/null || true
  pkill -f "$W/echo.py" 2>/dev/null || true
}
trap cleanup EXIT
cleanup
rm -rf "$W"; mkdir -p "$W"
E0="taskset -c 0"; E1="taskset -c 1"

# Endpoints: iperf3, a 1-byte echo, dnsmasq.
$E0 iperf3 -s -p 15201 -D
cat > "$W/echo.py" <<'EOF'
import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 17000)); s.listen(2048)
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
EOF
$E0 python3 "$W/echo.py" & 
$E0 dnsmasq --conf-file=/dev/null --port=15353 --listen-address=127.0.0.1 --bind-interfaces \
  --no-resolv --no-hosts --host-record=ldap.corp.example,198.18.60.7 --cache-size=0 \
  --pid-file="$W/dnsmasq.pid"

# Ferry: keys, Table B, gateway, Table A.
"$B/ferry-tunnel" keys --out "$W/keys" > "$W/keys.json"
FP=$(python3 -c "import json;print(json.load(open('$W/keys.json'))['host_key_fingerprint'])")
cat > "$W/table.ini" <<EOF
[ssh_tunnel]
listen_ip=127.0.0.1
listen_port=17022
${WINDOW_KIB:+window_kib=$WINDOW_KIB}
host_key_file=$W/keys/host_key
authorized_keys_file=$W/keys/authorized_keys
[service_iperf]
protocol=TCP
real_server_ip=127.0.0.1
real_server_port=15201
proxy_server_ip=127.0.0.1
proxy_server_port=25201
[service_echo]
protocol=TCP
real_server_ip=127.0.0.1
real_server_port=17000
proxy_server_ip=127.0.0.1
proxy_server_port=27000
[service_dns]
protocol=UDP
real_server_ip=127.0.0.1
real_server_port=15353
proxy_server_ip=127.0.0.1
proxy_server_port=25353
EOF
printf '[gateway]\nlisten_ip=127.0.0.1\nlisten_port=17550\napp_servers=127.0.0.1:17022\n' > "$W/gateway.ini"
cat > "$W/table-a.ini" <<EOF
remote_ssh_ip=127.0.0.1
remote_ssh_port=17550
forward_tunnel_remote_destination_ip=127.0.0.1
forward_tunnel_remote_destination_port=17022
is_first_establish_forward_tunnel=${FERRY_FIRST_TUNNEL:-True}
ssh_key_file=$W/keys/client_key
host_key=$FP
service_table=$W/table.ini
allow=127.0.0.1:15201,127.0.0.1:17000,127.0.0.1:15353/udp
${WINDOW_KIB:+window_kib=$WINDOW_KIB}
EOF
RUST_LOG=${TUNNEL_LOG:-warn} $E1 "$B/ferry-tunnel" app --config "$W/table.ini" 2>"$W/app.log" &
RUST_LOG=${TUNNEL_LOG:-warn} $E1 "$B/ferry-tunnel" gateway --config "$W/gateway.ini" 2>"$W/gateway.log" &
RUST_LOG=${TUNNEL_LOG:-warn} $E1 "$B/ferry-tunnel" enterprise --config "$W/table-a.ini" 2>"$W/enterprise.log" &

# OpenSSH: its own sshd on 127.0.0.1:17023 and a client forwarding the same endpoints.
mkdir -p /run/sshd
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh_host_key"
ssh-keygen -q -t ed25519 -N '' -f "$W/ssh_client_key"
cp "$W/ssh_client_key.pub" "$W/ssh_authorized_keys"
cat > "$W/sshd_config" <<EOF
Port 17023
ListenAddress 127.0.0.1
HostKey $W/ssh_host_key
AuthorizedKeysFile $W/ssh_authorized_keys
PidFile $W/sshd.pid
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
Ciphers aes128-gcm@openssh.com
Compression no
MaxStartups 2000
MaxSessions 2000
EOF
$E1 /usr/sbin/sshd -f "$W/sshd_config"
sleep 1
$E1 ssh -N -F /dev/null -i "$W/ssh_client_key" -p 17023 -c aes128-gcm@openssh.com \
  -o Compression=no -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
  -L 127.0.0.1:35201:127.0.0.1:15201 -L 127.0.0.1:37000:127.0.0.1:17000 root@127.0.0.1 &
up=
for _ in $(seq 1 100); do
  if (exec 3<>/dev/tcp/127.0.0.1/27000) 2>/dev/null && (exec 3<>/dev/tcp/127.0.0.1/37000) 2>/dev/null; then up=1; break; fi
  sleep 0.2
done
[ -n "$up" ] || { echo "tunnels did not come up; see $W/*.log" >&2; exit 1; }
sleep 1

iperf() { # PORT STREAMS -> Gbit/s received
  $E0 iperf3 -c 127.0.0.1 -p "$1" -P "$2" -t 5 -J | python3 -c \
    "import json,sys;print('%.2f' % (json.load(sys.stdin)['end']['sum_received']['bits_per_second']/1e9))"
}
pingpong() { # PORT [SECONDS] -> "p50 p99" in microseconds (and the count when timed)
  # 3000 round trips; with SECONDS, as many as fit in that time and no more, so that
  # beside a bulk transfer every one is measured while the bulk runs.
  $E0 python3 - "$1" "${2:-0}" <<'EOF'
import socket, sys, time
c = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
secs = float(sys.argv[2]); end = time.perf_counter() + secs
ts = []
while (len(ts) < 3000) if secs == 0 else (time.perf_counter() < end):
    t = time.perf_counter(); c.sendall(b"x"); c.recv(1); ts.append(time.perf_counter() - t)
ts = sorted(ts[200:] if secs == 0 else ts[20:])
print("%.0f %.0f" % (ts[len(ts)//2]*1e6, ts[int(len(ts)*0.99)]*1e6) + ("" if secs == 0 else " (%d round trips)" % len(ts)))
EOF
}
rss_kb() { # PIDS... -> total RSS in KiB
  local t=0; for p in "$@"; do t=$((t + $(awk '/VmRSS/{print $2}' /proc/$p/status))); done; echo $t
}
hold() { # PORT N: open N idle connections, hold them 8 s
  python3 - "$1" "$2" <<'EOF' &
import socket, sys, time
cs = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(int(sys.argv[2]))]
time.sleep(8)
EOF
}
dnsload() { # PORT -> "qps loss%": 64 queries in flight; one unanswered for 0.5 s is lost
  $E0 python3 - "$1" <<'EOF'
import socket, struct, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.connect(("127.0.0.1", int(sys.argv[1])))
s.settimeout(0.5)
q = lambda i: struct.pack(">HHHHHH", i, 0x0100, 1, 0, 0, 0) + b"\x04ldap\x04corp\x07example\x00\x00\x01\x00\x01"
N, window, sent, got, lost = 20000, 64, 0, 0, 0
t = time.perf_counter()
while sent < N or got + lost < sent:
    while sent < N and sent - got - lost < window:
        s.send(q(sent & 0xffff)); sent += 1
    try:
        s.recv(512); got += 1
    except socket.timeout:
        lost = sent - got
el = time.perf_counter() - t
print("%.0f %.2f" % (got / el, 100.0 * lost / N))
EOF
}

FERRY_PIDS=$(pgrep -f "ferry-tunnel .* --config $W/" | tr '\n' ' ')
ssh_pids() { pgrep -f "sshd -f $W/sshd_config|ssh -N -F /dev/null -i $W/|sshd: root" | tr '\n' ' '; }

echo "== throughput (Gbit/s), 1 stream / 8 streams"
printf 'direct   %s / %s\n' "$(iperf 15201 1)" "$(iperf 15201 8)"
printf 'openssh  %s / %s\n' "$(iperf 35201 1)" "$(iperf 35201 8)"
printf 'ferry    %s / %s\n' "$(iperf 25201 1)" "$(iperf 25201 8)"

echo "== 1 B ping-pong round trip (us), p50 p99"
printf 'direct   %s\n' "$(pingpong 17000)"
printf 'openssh  %s\n' "$(pingpong 37000)"
printf 'ferry    %s\n' "$(pingpong 27000)"

echo "== ping-pong beside bulk on another service (us), p50 p99: 5 s of round trips inside 8 s of bulk"
$E0 iperf3 -c 127.0.0.1 -p 35201 -t 8 >/dev/null & bulk=$!; sleep 1
printf 'openssh  %s\n' "$(pingpong 37000 5)"; wait $bulk
$E0 iperf3 -c 127.0.0.1 -p 25201 -t 8 >/dev/null & bulk=$!; sleep 1
printf 'ferry    %s\n' "$(pingpong 27000 5)"; wait $bulk

echo "== RSS (KiB), idle / 1000 idle connections"
ferry_idle=$(rss_kb $FERRY_PIDS); ssh_idle=$(rss_kb $(ssh_pids))
hold 27000 1000; sleep 5; ferry_busy=$(rss_kb $FERRY_PIDS); wait $!
hold 37000 1000; sleep 5; ssh_busy=$(rss_kb $(ssh_pids)); wait $!
printf 'openssh  %s / %s\n' "$ssh_idle" "$ssh_busy"
printf 'ferry    %s / %s\n' "$ferry_idle" "$ferry_busy"

echo "== DNS over the UDP path: queries/s, loss % (20000 queries, 64 in flight)"
printf 'direct   %s\n' "$(dnsload 15353)"
printf 'ferry    %s\n' "$(dnsload 25353)"
