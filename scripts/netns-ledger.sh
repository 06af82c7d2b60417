#!/usr/bin/env bash
# Checks a volunteer's data-use ledger against the kernel: the volunteer runs
# alone in a network namespace, linked to the host's by a veth pair, so the
# interface's byte counters see exactly its traffic. Over a run that includes
# a checkpoint download, the ledger (usage.json) must match the counters
# within 5% in each direction.
#
# The kernel counts Ethernet frames; a home link bills IP packets, and the
# ledger counts IP packets (payload plus IP and UDP headers), so the 14-byte
# Ethernet header of every frame is taken off the counters before comparing.
#
# Needs root and `ip netns` (iproute2); skipped with a message otherwise.
# Usage: scripts/netns-ledger.sh [path/to/starling]
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${1:-${CARGO_TARGET_DIR:-target}/debug/starling}"
tolerance_pct=5

skip() {
  echo "netns ledger check skipped: $*"
  exit 0
}
[ "$(id -u)" -eq 0 ] || skip "needs root to create a network namespace"
command -v ip >/dev/null 2>&1 || skip "ip (iproute2) is not installed"
command -v python3 >/dev/null 2>&1 || skip "python3 is not installed"
probe="starling-probe-$$"
ip netns add "$probe" 2>/dev/null || skip "this kernel or container does not allow network namespaces"
ip netns del "$probe"
[ -x "$bin" ] || { echo "no starling binary at $bin" >&2; exit 1; }

ns="starling-ledger-$$"
outer="sl-h$$"
inner="sl-v$$"
dir="$(mktemp -d)"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$ns" 2>/dev/null || true
  ip link del "$outer" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

ip netns add "$ns"
ip link add "$outer" type veth peer name "$inner"
ip link set "$inner" netns "$ns"
# IPv6 would add neighbour discovery chatter that no ledger sees.
sysctl -qw "net.ipv6.conf.$outer.disable_ipv6=1" 2>/dev/null || true
ip netns exec "$ns" sysctl -qw "net.ipv6.conf.$inner.disable_ipv6=1" 2>/dev/null || true
# Segment UDP in software before the veth (as a real NIC puts one datagram
# per frame on the wire), so its counters see every datagram's headers.
ip link set dev "$outer" gso_max_segs 1 2>/dev/null || true
ip netns exec "$ns" ip link set dev "$inner" gso_max_segs 1 2>/dev/null || true
ip addr add 10.213.0.1/24 dev "$outer"
ip link set "$outer" up
ip netns exec "$ns" ip addr add 10.213.0.2/24 dev "$inner"
ip netns exec "$ns" ip link set "$inner" up
ip netns exec "$ns" ip link set lo up

cat >"$dir/run.toml" <<'EOF'
[run]
name = "netns ledger check"
model = "nano"
batch = 4
micro_batch = 4
seq_len = 32
lr = 3e-3
warmup = 3
corpus_bytes = 262144
eval_sequences = 8

[rounds]
window_secs = 6.0
checkpoint_every = 3
report_every = 5
eval_every = 1000
EOF

common=(--json --device cpu)
"$bin" host "$dir/run.toml" --state-dir "$dir/host" --ticket-file "$dir/ticket" \
  --listen 10.213.0.1:0 "${common[@]}" >"$dir/host.out" 2>"$dir/host.log" &
pids+=($!)
for _ in $(seq 600); do [ -s "$dir/ticket" ] && break; sleep 0.2; done
[ -s "$dir/ticket" ] || { echo "the host printed no ticket:" >&2; tail -20 "$dir/host.log" >&2; exit 1; }
ticket="$(cat "$dir/ticket")"

# A first volunteer outside the namespace trains past the first checkpoint,
# so the one inside joins by downloading it.
"$bin" join "$ticket" --key-file "$dir/steady/node.key" --listen 10.213.0.1:0 \
  "${common[@]}" >"$dir/steady.out" 2>"$dir/steady.log" &
pids+=($!)
for _ in $(seq 900); do
  grep -q '"event":"checkpoint"' "$dir/host.out" 2>/dev/null && break
  sleep 0.2
done
grep -q '"event":"checkpoint"' "$dir/host.out" ||
  { echo "the host wrote no checkpoint:" >&2; tail -20 "$dir/host.log" >&2; exit 1; }

counter() { ip netns exec "$ns" cat "/sys/class/net/$inner/statistics/$1"; }
rx0=$(counter rx_bytes); tx0=$(counter tx_bytes)
rxp0=$(counter rx_packets); txp0=$(counter tx_packets)
ip netns exec "$ns" "$bin" join "$ticket" --key-file "$dir/inside/node.key" \
  --listen 0.0.0.0:0 --rounds 8 "${common[@]}" >"$dir/inside.out" 2>"$dir/inside.log" || {
  echo "the volunteer in the namespace failed:" >&2
  tail -20 "$dir/inside.log" >&2
  exit 1
}
rx1=$(counter rx_bytes); tx1=$(counter tx_bytes)
rxp1=$(counter rx_packets); txp1=$(counter tx_packets)

grep -q '"event":"checkpoint"' "$dir/inside.out" ||
  { echo "the volunteer loaded no checkpoint: the check needs one" >&2; exit 1; }

usage="$dir/inside/usage.json"
[ -s "$usage" ] || { echo "no ledger at $usage" >&2; exit 1; }
python3 - "$usage" "$((tx1 - tx0))" "$((txp1 - txp0))" "$((rx1 - rx0))" "$((rxp1 - rxp0))" "$tolerance_pct" <<'EOF'
import json, sys
usage = json.load(open(sys.argv[1]))
tx, txp, rx, rxp, tol = (int(a) for a in sys.argv[2:7])
rows = [
    ("up", usage["month_up"], tx, tx - 14 * txp, txp),
    ("down", usage["month_down"], rx, rx - 14 * rxp, rxp),
]
ok = True
print(f"{'':5} {'ledger':>10} {'kernel (frames)':>16} {'kernel (IP)':>12} {'packets':>8} {'ledger/IP':>10}")
for name, ledger, frames, ip, packets in rows:
    ratio = ledger / ip if ip else float("inf")
    print(f"{name:5} {ledger:>10} {frames:>16} {ip:>12} {packets:>8} {ratio:>10.4f}")
    ok &= abs(ratio - 1) * 100 <= tol
print(f"netns ledger check: {'passed' if ok else 'FAILED'} (within {tol}% of the kernel's IP bytes)")
sys.exit(0 if ok else 1)
EOF
