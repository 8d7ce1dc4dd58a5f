#!/usr/bin/env bash
# relay's dashboard and alert rules against a real Prometheus scraping a real relay.
#
#   .ci/prometheus-check.sh          # from anywhere; RELAY_BIN / LOADGEN_BIN pick the binaries
#                                    # (default target/debug/relay and target/debug/relay-loadgen)
#
# Needs Postgres ($TEST_DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres) and the
# `redis-server` binary; installs Debian's `prometheus` (prometheus + promtool) and `curl` when
# missing.
# Everything else is private and removed at the end: a database, a redis-server, relay and a
# Prometheus of its own (not the system service: temporary config and TSDB, 1 s scrape and
# evaluation interval), each on an unused loopback port. Steps:
#   1. promtool check rules deploy/prometheus/alerts.yml, promtool check config of the compose
#      stack's deploy/prometheus/prometheus.yml.
#   2. relay serve (Postgres, its own Redis; access log to stdout and to a file that cannot be
#      created), Prometheus scraping its admin port with a copy of alerts.yml whose `for:` are 1s.
#   3. Traffic: relay-loadgen (WebSocket subscribers, HTTP publishes) and an SSE subscriber.
#   4. Every panel query of deploy/grafana/relay.json through /api/v1/query: each must return a
#      series with a number.
#   5. Alerts fired on purpose: RelayAccessLogDrops (the file sink fails) while the Redis alerts
#      stay quiet; then Redis is killed: RelayListenerDisconnected, RelayNotReady, and with
#      publishes during the outage RelayPublishErrors. Waits until /api/v1/alerts shows them
#      firing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$SECONDS
RELAY_BIN="${RELAY_BIN:-$ROOT/target/debug/relay}"
LOADGEN_BIN="${LOADGEN_BIN:-$ROOT/target/debug/relay-loadgen}"
PG_ADMIN_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}"
WORK="$(mktemp -d)"
DB="relay_promcheck_$$"
PIDS=()

say() { printf '%s\n' "$*"; }
fail() { say "FAIL  $*"; exit 1; }

cleanup() {
  local pid
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  psql "$PG_ADMIN_URL" -qtAc "DROP DATABASE IF EXISTS \"$DB\" WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# wait_for WHAT SECONDS COMMAND...: retry COMMAND every 0.2 s.
wait_for() {
  local what="$1" seconds="$2" i; shift 2
  for ((i = 0; i < seconds * 5; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  fail "$what not within ${seconds}s"
}

# --- tools ----------------------------------------------------------------------------------------
missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v curl >/dev/null || missing+=(curl)
if [[ ${#missing[@]} -gt 0 ]]; then
  say "installing ${missing[*]} (Debian packages)"
  apt-get update -qq
  # Without recommends: no node exporter and its timers; the service is never started here.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
command -v redis-server >/dev/null || fail "redis-server is not installed"
for bin in "$RELAY_BIN" "$LOADGEN_BIN"; do
  [[ -x "$bin" ]] || fail "$bin is missing (cargo build -p relay -p relay-loadgen, or set RELAY_BIN / LOADGEN_BIN)"
done
say "$(prometheus --version 2>&1 | head -n 1)"

# --- 1. static checks with promtool ---------------------------------------------------------------
promtool check rules deploy/prometheus/alerts.yml
# The compose stack's config, with its container path of the rules replaced by the real file.
sed "s#/etc/prometheus/alerts.yml#$ROOT/deploy/prometheus/alerts.yml#" deploy/prometheus/prometheus.yml \
  >"$WORK/compose-prometheus.yml"
promtool check config "$WORK/compose-prometheus.yml"

# --- 2. relay and Prometheus ----------------------------------------------------------------------
REDIS_PORT="$(free_port)"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  >"$WORK/redis.log" 2>&1 &
REDIS_PID=$!
PIDS+=("$REDIS_PID")
wait_for "redis-server on :$REDIS_PORT" 10 redis-cli -p "$REDIS_PORT" ping

psql "$PG_ADMIN_URL" -qtAc "CREATE DATABASE \"$DB\"" >/dev/null
DB_URL="$(python3 -c 'import sys, urllib.parse as u; p = u.urlsplit(sys.argv[1]); print(u.urlunsplit(p._replace(path="/" + sys.argv[2])))' "$PG_ADMIN_URL" "$DB")"

PORT="$(free_port)"
ADMIN="$(free_port)"
# A file sink under /dev/null cannot be created (not a directory, even for root): every batch
# fails its attempts and is dropped, which RelayAccessLogDrops must notice.
env APP__DATABASE__URL="$DB_URL" \
  APP__REDIS__URL="redis://127.0.0.1:$REDIS_PORT" \
  APP__REDIS__CHANNEL_PREFIX="promcheck:" \
  APP__REDIS__RECONNECT_MAX_DELAY=500ms \
  APP__REDIS__COMMAND_TIMEOUT=500ms \
  APP__SERVER__PORT="$PORT" \
  APP__SERVER__ADMIN_PORT="$ADMIN" \
  APP__LOG__FORMAT=json \
  APP__ACCESS_LOG__SINKS=stdout,file \
  APP__ACCESS_LOG__FILE_PATH=/dev/null/relay-promcheck/access.log \
  APP__ACCESS_LOG__FLUSH_INTERVAL=200ms \
  APP__LIMITS__PUBLISH_PER_SUBJECT=0 \
  "$RELAY_BIN" serve >"$WORK/relay.log" 2>&1 &
PIDS+=("$!")
wait_for "relay ready on :$PORT" 60 curl -sf "http://127.0.0.1:$PORT/readyz"
say "relay: API 127.0.0.1:$PORT, admin 127.0.0.1:$ADMIN, Redis :$REDIS_PORT, database $DB"

python3 .ci/prometheus_check.py ci-rules deploy/prometheus/alerts.yml "$WORK/alerts.ci.yml"
promtool check rules "$WORK/alerts.ci.yml" >/dev/null
PROM_PORT="$(free_port)"
cat >"$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $WORK/alerts.ci.yml
scrape_configs:
  - job_name: relay # the rules' up{job="relay"}
    static_configs:
      - targets: ["127.0.0.1:$ADMIN"]
EOF
promtool check config "$WORK/prometheus.yml" >/dev/null
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM_PORT" --log.level=warn >"$WORK/prometheus.log" 2>&1 &
PIDS+=("$!")
PROM="http://127.0.0.1:$PROM_PORT"
wait_for "Prometheus ready on :$PROM_PORT" 30 curl -sf "$PROM/-/ready"
target_up() {
  curl -sf "$PROM/api/v1/query?query=up%7Bjob%3D%22relay%22%7D" | grep -q '"value":\[[0-9.]*,"1"\]'
}
wait_for "Prometheus scraping relay" 30 target_up
say "Prometheus $PROM scrapes relay every 1s (rules: a copy of alerts.yml with for: 1s)"

# --- 3. traffic -----------------------------------------------------------------------------------
curl -sN "http://127.0.0.1:$PORT/sse?channels=pc-0,pc-1" >"$WORK/sse.log" 2>&1 &
PIDS+=("$!")
"$LOADGEN_BIN" --url "http://127.0.0.1:$PORT" --channel-prefix pc --connections 20 --channels 4 \
  --rate 40 --duration 15s --publish-via http --json >"$WORK/loadgen.json" 2>"$WORK/loadgen.err" \
  || { cat "$WORK/loadgen.err"; fail "relay-loadgen failed"; }
python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print("traffic: relay-loadgen published", r.get("published"), "messages to 20 WebSocket subscribers; delivered", r.get("delivered"))' "$WORK/loadgen.json"
grep -q '^data:' "$WORK/sse.log" || fail "the SSE subscriber received nothing"
# Two scrapes after the last publish, so every rate and quantile sees the whole run.
sleep 2

# --- 4. every dashboard query ---------------------------------------------------------------------
python3 .ci/prometheus_check.py queries --url "$PROM" deploy/grafana/relay.json
# /metrics runs the readiness checks; a slow scrape (timeout 1s) would read as up == 0.
curl -sf "$PROM/api/v1/query" --data-urlencode 'query=max_over_time(scrape_duration_seconds{job="relay"}[5m])' \
  | python3 -c 'import json, sys; r = json.load(sys.stdin)["data"]["result"]; print("slowest scrape of /metrics: %.1f ms" % (float(r[0]["value"][1]) * 1000))'

# --- 5. alerts on purpose -------------------------------------------------------------------------
# The broken file sink, while Redis is healthy: only the access-log alert may fire.
python3 .ci/prometheus_check.py wait-alerts --url "$PROM" --timeout 30 \
  --quiet RelayListenerDisconnected --quiet RelayNotReady --quiet RelayPublishErrors \
  RelayAccessLogDrops
kill "$REDIS_PID"
wait "$REDIS_PID" 2>/dev/null || true
say "killed the private redis-server; publishing during the outage"
# Committed (201) but not PUBLISHed: relay_publish_failures_total.
for i in $(seq 1 30); do
  curl -s -o /dev/null -H 'content-type: application/json' -d "{\"data\":$i}" \
    "http://127.0.0.1:$PORT/api/v1/channels/pc-outage/messages" || true
  sleep 0.2
done &
PIDS+=("$!")
python3 .ci/prometheus_check.py wait-alerts --url "$PROM" --timeout 60 \
  RelayListenerDisconnected RelayNotReady RelayPublishErrors

say "prometheus check: PASS in $((SECONDS - START))s"
