#!/usr/bin/env bash
# The classify server's layers under load: the same server with all its layers (LAYERS=on) and
# with none (LAYERS=off), over its in-process mock answering at once, loaded by wrk on
# loopback. Runs alternate, three of each, and the medians are compared: throughput ratio, and
# the p50 and p99 latency the layers add. The server's own token bucket is set far above the
# offered load, so that it decides nothing and only its cost is measured.
#
#   benches/load/classify.sh [seconds per run, default 10] [connections, default 32]
set -euo pipefail
cd "$(dirname "$0")/../.."
seconds="${1:-10}"
connections="${2:-32}"
command -v wrk >/dev/null || { echo "wrk is needed: apt-get install wrk" >&2; exit 2; }
cargo build --release --example classify_server
port=18080
out=$(mktemp -d)

run() {
  local layers=$1 n=$2
  PORT=$port GRPC_PORT=$((port + 1)) LAYERS=$layers RATE_PER_SECOND=10000000 BURST=10000000 \
    MOCK_TTFT_MS=0 MOCK_TOKENS_PER_SECOND=0 RUST_LOG=warn \
    target/release/examples/classify_server &
  local pid=$!
  for _ in $(seq 100); do curl -sf "localhost:$port/health" >/dev/null && break; sleep 0.1; done
  wrk -t2 -c"$connections" -d"${seconds}s" --latency -s benches/load/classify.lua \
    "http://127.0.0.1:$port/v1/classify" >"$out/$layers-$n.txt"
  kill "$pid"; wait "$pid" 2>/dev/null || true
}

for n in 1 2 3; do run off "$n"; run on "$n"; done

# Requests/s, p50 and p99 in µs, of each run.
figures() {
  awk '
    /Requests\/sec/ { rps = $2 }
    /^ +50%/ { p50 = $2 } /^ +99%/ { p99 = $2 }
    function us(v) { if (v ~ /ms$/) return v * 1000; if (v ~ /us$/) return v + 0; if (v ~ /s$/) return v * 1000000; return v }
    END { printf "%s %d %d\n", rps, us(p50), us(p99) }' "$1"
}
median() { sort -n | sed -n 2p; }
rps=(); p50=(); p99=()
for layers in off on; do
  for n in 1 2 3; do figures "$out/$layers-$n.txt"; done >"$out/$layers"
  rps[${#rps[@]}]=$(cut -d' ' -f1 "$out/$layers" | median)
  p50[${#p50[@]}]=$(cut -d' ' -f2 "$out/$layers" | median)
  p99[${#p99[@]}]=$(cut -d' ' -f3 "$out/$layers" | median)
done
echo "| classify server | requests/s | p50 | p99 |"
echo "|---|---|---|---|"
echo "| no layers | ${rps[0]} | ${p50[0]} µs | ${p99[0]} µs |"
echo "| all layers | ${rps[1]} | ${p50[1]} µs | ${p99[1]} µs |"
awk -v a="${rps[1]}" -v b="${rps[0]}" -v p="${p50[1]}" -v q="${p50[0]}" -v r="${p99[1]}" -v s="${p99[0]}" \
  'BEGIN { printf "throughput ratio %.3f; the layers add %d µs at p50 and %d µs at p99\n", a / b, p - q, r - s }'
