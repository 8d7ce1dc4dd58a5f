#!/usr/bin/env bash
# Measure recovery after a broker outage: relay on a private redis-server, 1,000 subscribers over
# 10 channels, HTTP publishes at 1,000 messages/s for 30 s, Redis shut down 9 s in and started
# again 10 s later. Prints whether everything arrived, and how long after Redis came back the last
# subscriber had caught up (the largest publish-to-delivery latency minus the outage).
#
#   cargo build --release -p relay -p relay-loadgen && scripts/outage-catchup.sh
#
# Needs redis-server and redis-cli on PATH and Postgres (DATABASE_URL, default the local one).
set -euo pipefail
cd "$(dirname "$0")/.."
RELAY=${RELAY:-target/release/relay}
LOADGEN=${LOADGEN:-target/release/relay-loadgen}
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/relay}
REDIS_PORT=${REDIS_PORT:-16390}
PORT=${PORT:-18283}
CONNECTIONS=${CONNECTIONS:-1000}
OUT=$(mktemp -d)
ulimit -n 20000

start_redis() { redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes >/dev/null; }
start_redis
sleep 0.5
PREFIX="outage$(date +%s)"
APP__LOG__LEVEL=warn APP__SERVER__PORT=$PORT APP__SERVER__ADMIN_PORT=$((PORT + 1000)) APP__ACCESS_LOG__SINKS= \
APP__REDIS__CHANNEL_PREFIX="$PREFIX:" APP__DATABASE__URL="$DATABASE_URL" \
APP__REDIS__URL="redis://127.0.0.1:$REDIS_PORT" APP__REDIS__RECONNECT_MAX_DELAY=1s \
  "$RELAY" serve >"$OUT/server.log" 2>&1 &
PID=$!
trap 'kill -TERM $PID 2>/dev/null; redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true' EXIT
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
"$LOADGEN" --url "http://127.0.0.1:$PORT" --channel-prefix "$PREFIX" --pid $PID --json \
  --connections "$CONNECTIONS" --channels 10 --rate 1000 --duration 30 --publish-via http \
  --expect-lossless >"$OUT/report.json" 2>"$OUT/loadgen.log" &
LG=$!
sleep 9
DOWN=$(date +%s.%N); redis-cli -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
sleep 10
UP=$(date +%s.%N); start_redis
wait $LG || echo "relay-loadgen reported loss (see $OUT)"
python3 - "$OUT/report.json" "$DOWN" "$UP" <<'PY'
import json, sys
report, down, up = json.load(open(sys.argv[1])), float(sys.argv[2]), float(sys.argv[3])
outage = (up - down) * 1000
latency = report["latency_ms"]
print(f"outage {outage:.0f} ms; delivered {report['delivered']}/{report['expected']}, "
      f"lost {report['lost']}, duplicated {report['duplicated']}, out of order {report['out_of_order']}, "
      f"connections ended early {report['connections']['ended_early']}")
print(f"caught up {latency['max'] - outage:.0f} ms after Redis came back "
      f"(max latency {latency['max']:.0f} ms, p50 {latency['p50']} ms)")
PY
