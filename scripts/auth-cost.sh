#!/usr/bin/env bash
# What authentication costs on the steady fan-out case: 1,000 subscribers over 10 channels,
# 300 msg/s published straight to Redis for 10 s, once with `auth.mode = disabled` and once with
# `required` (every subscriber connects with an HS256 token via ?token=). Runs interleaved
# (off, on, off, on, …) so both see the same machine state, then prints deliveries per server
# CPU-second and p99 of each run.
#
#   cargo build --release -p relay -p relay-loadgen && scripts/auth-cost.sh        # RUNS=3 by default
#
# Needs Postgres (DATABASE_URL, default the local one) and Redis on 127.0.0.1:6379.
set -euo pipefail
cd "$(dirname "$0")/.."
RELAY=${RELAY:-target/release/relay}
LOADGEN=${LOADGEN:-target/release/relay-loadgen}
DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/relay}
RUNS=${RUNS:-3}
PORT=${PORT:-18284}
SECRET=auth-cost-benchmark-secret-0123456789abcdef
ulimit -n 20000
OUT=$(mktemp -d)

run() { # $1 = off | on, $2 = run number
  local mode=disabled token_args=()
  if [ "$1" = on ]; then
    mode=required
    token_args=(--token "$(APP__AUTH__HS256_SECRET=$SECRET "$RELAY" token --sub bench \
      --subscribe '*' --publish '*' --history '*' --ttl 1h)")
  fi
  local prefix="authcost$1$2x$$"
  APP_ENV=local APP__LOG__LEVEL=warn APP__SERVER__PORT=$PORT APP__SERVER__ADMIN_PORT=$((PORT + 1000)) \
  APP__ACCESS_LOG__SINKS= APP__REDIS__CHANNEL_PREFIX="$prefix:" APP__DATABASE__URL="$DATABASE_URL" \
  APP__REDIS__URL=redis://127.0.0.1:6379 APP__AUTH__MODE=$mode APP__AUTH__HS256_SECRET=$SECRET \
    "$RELAY" serve >"$OUT/server-$1-$2.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$PORT/readyz" >/dev/null && break; sleep 0.1; done
  "$LOADGEN" --url "http://127.0.0.1:$PORT" --redis-prefix "$prefix:" --pid $pid --json \
    --connections 1000 --channels 10 --rate 300 --duration 10 --publish-via redis \
    --expect-lossless "${token_args[@]}" >"$OUT/report-$1-$2.json" 2>"$OUT/loadgen-$1-$2.log"
  kill -TERM $pid; wait $pid || true
  python3 - "$OUT/report-$1-$2.json" "$1" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"auth {sys.argv[2]:>3}: {r['server']['deliveries_per_cpu_second']:>9.0f} deliveries per CPU-second, "
      f"p99 {r['latency_ms']['p99']:.2f} ms, delivered {r['delivered']}, lost {r['lost']}")
EOF
}

for i in $(seq 1 "$RUNS"); do
  run off "$i"
  run on "$i"
done
echo "reports in $OUT"
