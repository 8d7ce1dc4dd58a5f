#!/usr/bin/env bash
# A container-like smoke run without Docker: the release binary, run as uid 65532 with only the
# files the Dockerfile copies into the image (owned by root, not writable), the image's
# environment plus the relay service's environment from docker-compose.yml (service hostnames
# mapped to 127.0.0.1). It must pass `relay healthcheck`, serve a WebSocket round trip, and exit 0
# on SIGTERM.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
say() { printf '  %s\n' "$*"; }

cargo build --release --locked --quiet -p relay -p relay-loadgen
image="$(mktemp -d)"
cleanup() {
  [ -n "${pid:-}" ] && kill -9 "$pid" 2>/dev/null || true
  chmod -R u+w "$image" 2>/dev/null || true
  rm -rf "$image"
}
trap cleanup EXIT

# The image's filesystem: exactly the Dockerfile's COPY lines, root-owned and read-only.
install -D -m 0555 target/release/relay "$image/usr/local/bin/relay"
mkdir -p "$image/app"
cp -r config "$image/app/config"
chmod -R a-w "$image"
chmod 0555 "$image" "$image/app"

# The image's ENV, then the compose service's environment with hostnames mapped to loopback.
env_args=(APP_ENV=production "APP_CONFIG_DIR=$image/app/config")
compose_env="$(.ci/.venv/bin/docker-compose -f docker-compose.yml config --format json |
  python3 -c 'import json,sys
env = json.load(sys.stdin)["services"]["relay"]["environment"]
for k, v in sorted(env.items()):
    for host in ("postgres", "redis", "jaeger"):
        v = v.replace(f"//{host}:", "//127.0.0.1:").replace(f"@{host}:", "@127.0.0.1:")
    print(f"{k}={v}")')"
while IFS= read -r line; do env_args+=("$line"); done <<<"$compose_env"
say "environment: ${env_args[*]}"

# The compose database must exist (Postgres creates it from POSTGRES_DB in the real stack).
psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'relay'" | grep -q 1 ||
  psql -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE relay" >/dev/null

as_image_user() {
  # No PATH, no inherited environment: like the distroless image, nothing but what it sets.
  (cd "$image/app" && exec env -i "${env_args[@]}" \
    /usr/bin/setpriv --reuid=65532 --regid=65532 --clear-groups --inh-caps=-all "$@")
}

port=8080 # the image's server.port unless compose overrides it
for kv in "${env_args[@]}"; do
  case "$kv" in APP__SERVER__PORT=*) port="${kv#*=}" ;; esac
done
# A stale process on the port would answer the checks below in relay's place.
if ss -Hltn "sport = :$port" | grep -q .; then
  echo "container smoke: port $port is already in use" >&2
  exit 1
fi

log="$(mktemp)"
# Inline rather than through the function, so that `exec` makes $! the relay process itself.
(cd "$image/app" && exec env -i "${env_args[@]}" \
  /usr/bin/setpriv --reuid=65532 --regid=65532 --clear-groups --inh-caps=-all \
  "$image/usr/local/bin/relay" serve) >"$log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
  if as_image_user "$image/usr/local/bin/relay" healthcheck >/dev/null 2>&1; then break; fi
  sleep 0.2
done
as_image_user "$image/usr/local/bin/relay" healthcheck
say "healthcheck: PASS (as uid 65532, read-only files)"

# The compose environment requires authentication: a token from the image's own CLI.
token="$(as_image_user "$image/usr/local/bin/relay" token --sub smoke --subscribe 'smoke*' \
  --publish 'smoke*' --ttl 10m)"
target/release/relay-loadgen --url "http://127.0.0.1:$port" --connections 2 --channels 1 \
  --channel-prefix smoke --publish-via ws --messages 20 --rate 50 --expect-lossless \
  --token "$token"
say "WebSocket round trip with a token (publish frames -> both subscribers, lossless): PASS"

if ! kill -TERM "$pid"; then cat "$log"; echo "container smoke: FAIL (relay died)" >&2; exit 1; fi
started=$SECONDS
status=0
wait "$pid" || status=$?
pid=
# production: 5s readiness grace + up to 20s drain + 5s flush
if [ "$status" -ne 0 ] || [ $((SECONDS - started)) -gt 31 ]; then
  cat "$log"
  echo "container smoke: FAIL (exit $status after $((SECONDS - started))s)" >&2
  exit 1
fi
say "SIGTERM: exit 0 after $((SECONDS - started))s"
if grep -q '"level":"ERROR"' "$log"; then
  grep '"level":"ERROR"' "$log" >&2
  echo "container smoke: FAIL (errors logged)" >&2
  exit 1
fi
rm -f "$log"
echo "container smoke: PASS"
