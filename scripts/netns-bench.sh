#!/usr/bin/env bash
# Round times of a real run over shaped links: a host and N volunteers, each in
# its own network namespace, joined by a bridge. Every volunteer's link is
# shaped with tc tbf to UP Mbit/s out and DOWN Mbit/s in (a home link); the
# host's link is not shaped. Needs root, iproute2 (ip netns, veth, tc tbf) and
# a built `starling` binary. Prints one line per round with its wall time.
#
#   sudo scripts/netns-bench.sh [BIN] [VOLUNTEERS] [ROUNDS] [UP] [DOWN] [MODEL]
set -euo pipefail
BIN=${1:-target/debug/starling}
N=${2:-3}
ROUNDS=${3:-10}
UP=${4:-10}
DOWN=${5:-100}
MODEL=${6:-nano}
BR=stbr0
NET=10.77.0
WORK=$(mktemp -d /tmp/starling-netns.XXXXXX)

cleanup() {
  for ns in $(ip netns list | awk '/^st-/ {print $1}'); do
    ip netns pids "$ns" | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  ip link del "$BR" 2>/dev/null || true
}
trap cleanup EXIT
cleanup

ip link add "$BR" type bridge
ip addr add "$NET.1/24" dev "$BR"
ip link set "$BR" up

# make_ns NAME INDEX SHAPE(0|1)
make_ns() {
  local ns=$1 i=$2 shape=$3
  ip netns add "$ns"
  ip link add "st-h$i" type veth peer name "st-n$i"
  ip link set "st-n$i" netns "$ns"
  ip link set "st-h$i" master "$BR" up
  ip -n "$ns" addr add "$NET.$((10 + i))/24" dev "st-n$i"
  ip -n "$ns" link set "st-n$i" up
  ip -n "$ns" link set lo up
  if [ "$shape" = 1 ]; then
    # Upload: the namespace's egress. Download: the bridge port's egress into it.
    ip netns exec "$ns" tc qdisc add dev "st-n$i" root tbf rate "${UP}mbit" burst 32kbit latency 50ms
    tc qdisc add dev "st-h$i" root tbf rate "${DOWN}mbit" burst 256kbit latency 50ms
  fi
}

make_ns st-host 0 0
for i in $(seq 1 "$N"); do make_ns "st-v$i" "$i" 1; done

cat > "$WORK/run.toml" <<TOML
[run]
name = "netns bench"
model = "$MODEL"
batch = 4
micro_batch = 4
seq_len = 64
values = "f32"
topk = 32

[rounds]
window_secs = 60.0
eval_every = 1000
TOML

stamp() { while IFS= read -r line; do printf '%s %s\n' "$(date +%s.%N)" "$line"; done; }

ip netns exec st-host "$BIN" host "$WORK/run.toml" --state-dir "$WORK/host" --listen "$NET.10:7000" \
  --ticket-file "$WORK/ticket" --rounds "$ROUNDS" --json --device cpu 2>"$WORK/host.err" | stamp >"$WORK/host.jsonl" &
for _ in $(seq 1 600); do [ -s "$WORK/ticket" ] && break; sleep 0.1; done
TICKET=$(cat "$WORK/ticket")
for i in $(seq 1 "$N"); do
  ip netns exec "st-v$i" "$BIN" join "$TICKET" --key-file "$WORK/v$i/node.key" --listen "$NET.$((10 + i)):0" \
    --up-mbit "$UP" --down-mbit "$DOWN" --rounds "$ROUNDS" --json --device cpu 2>"$WORK/v$i.err" | stamp >"$WORK/v$i.jsonl" &
done
wait

echo "model=$MODEL volunteers=$N up=${UP}Mbit/s down=${DOWN}Mbit/s (tc tbf), rounds=$ROUNDS"
python3 - "$WORK" "$N" <<'PY'
import json, sys
work, n = sys.argv[1], int(sys.argv[2])
def events(path):
    out = []
    for line in open(path):
        t, _, rest = line.partition(' ')
        try:
            out.append((float(t), json.loads(rest)))
        except ValueError:
            pass
    return out
host = events(f"{work}/host.jsonl")
opened = {e['round']: t for t, e in host if e.get('event') == 'round_opened'}
closed = {e['round']: (t, e) for t, e in host if e.get('event') == 'round_applied'}
vols = [events(f"{work}/v{i}.jsonl") for i in range(1, n + 1)]
trained = {}
for v in vols:
    for t, e in v:
        if e.get('event') == 'trained':
            trained.setdefault(e['round'], []).append((t, e['bytes']))
print("round  wall_s  updates  update_bytes  volunteer_up_kB/round")
for r in sorted(closed):
    t1, e = closed[r]
    wall = t1 - opened.get(r, t1)
    ups = [x for v in vols for t, x in v if x.get('event') == 'round_applied' and x['round'] == r]
    up = sum(x['bytes_up'] for x in ups) / max(len(ups), 1) / 1000
    size = trained.get(r, [(0, 0)])[0][1]
    print(f"{r:5d}  {wall:6.2f}  {e['updates']:7d}  {size:12d}  {up:10.1f}")
digests = {x['digest'] for v in vols for t, x in v if x.get('event') == 'round_applied' and x['round'] == max(closed)}
digests.add(closed[max(closed)][1]['digest'])
print("identical final weights:", len(digests) == 1)
PY
