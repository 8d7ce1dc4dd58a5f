#!/usr/bin/env bash
# Static checks of the deployment files: Dockerfile, docker-compose.yml and k8s/.
#
#   .ci/deploy-checks.sh            # from the repository root (or anywhere: it cds there)
#
# Needs no Docker engine and no cluster. Installs its own pinned tools (.ci/deploy-requirements.txt)
# into a git-ignored venv (.ci/.venv, or $DEPLOY_CHECKS_VENV) on first run or when the pins change;
# later runs reuse it. Checks:
#   hadolint        Dockerfile lint
#   rust-version    the Dockerfile's Rust image tag equals rust-toolchain.toml's channel
#   compose         docker-compose.yml (default, `replicas` and `observability` profiles) against
#                   the Compose spec
#   kustomize       `kubectl kustomize` of k8s/base and every k8s/overlays/*
#   k8s-schema      kubernetes-validate --strict of each render, for every $KUBE_VERSIONS
#   checkov         security scan of the renders and the Dockerfile (skips need inline reasons)
#   policy          project rules: termination arithmetic, probes, rollout, secrets, skip reasons
#   observability   .ci/observability_policy.py: the Grafana dashboard and the alert rules use only
#                   metrics relay exports, every alert links to its runbook section, the
#                   PrometheusRule is generated from alerts.yml, the compose profile provisions
#                   Prometheus and Grafana; every overlay rendered with k8s/components/*
#                   (ServiceMonitor, PrometheusRule) passes the schema, checkov and the
#                   scrape-path rules (monitor -> Service -> metrics port, NetworkPolicy admits it)
#   config-env      `relay check-config` on every environment the files give relay; SKIP unless a
#                   relay binary exists ($RELAY_BIN, target/release/relay or target/debug/relay);
#                   uses config/ unless $RELAY_CONFIG_DIR names the config matching that binary
# Prints PASS/FAIL/SKIP per check and exits non-zero if any check failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${DEPLOY_CHECKS_VENV:-$ROOT/.ci/.venv}"
REQS="$ROOT/.ci/deploy-requirements.txt"
# Oldest Kubernetes the manifests support (native preStop sleep needs 1.30) and the newest schema.
KUBE_VERSIONS="${KUBE_VERSIONS:-1.30.0 1.37.0}"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

declare -a RESULTS=()
FAILED=0
START=$SECONDS

say() { printf '%s\n' "$*"; }
# shellcheck source=.ci/venv.sh
source "$ROOT/.ci/venv.sh"

# run_check NAME COMMAND...: run a check, show its output indented, record PASS/FAIL/SKIP.
# A command exiting 3 means SKIP (its last output line says why).
run_check() {
  local name="$1"; shift
  local log="$WORK/$name.log" rc=0 t0=$SECONDS
  say ""
  say "=== $name"
  # In the background, not in an `||` list: that would switch off `set -e` inside the check.
  ( "$@" ) >"$log" 2>&1 &
  wait $! || rc=$?
  sed 's/^/    /' "$log"
  local detail findings
  detail="$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-100 || true)"
  if [[ $rc -ne 0 && $rc -ne 3 ]]; then
    # For a failure, show the first finding and how many there were.
    findings="$(grep -cE '^(ERROR|.*FAILED for|Dockerfile:[0-9]+ DL|.*did not validate)' "$log" || true)"
    detail="$(grep -m 1 -E '^(ERROR|.*FAILED for|Dockerfile:[0-9]+ DL|.*did not validate)' "$log" \
                | sed -E 's/^[[:space:]]+//' | cut -c1-90 || true)"
    [[ -n "$detail" ]] || detail="$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-90 || true)"
    [[ "${findings:-0}" -le 1 ]] || detail="$findings findings, first: $detail"
  fi
  if [[ $rc -eq 0 ]]; then
    RESULTS+=("PASS  $(printf '%-13s' "$name") $((SECONDS - t0))s  $detail")
  elif [[ $rc -eq 3 ]]; then
    RESULTS+=("SKIP  $(printf '%-13s' "$name") $((SECONDS - t0))s  $detail")
  else
    RESULTS+=("FAIL  $(printf '%-13s' "$name") $((SECONDS - t0))s  exit $rc: $detail")
    FAILED=1
  fi
}

# --- tools ----------------------------------------------------------------------------------------
setup_tools() {
  ensure_venv "$VENV" "$REQS" || return 1
  say "tools: ready in $VENV"
}

# --- checks ---------------------------------------------------------------------------------------
check_hadolint() {
  "$VENV/bin/hadolint" --version
  "$VENV/bin/hadolint" --no-color --failure-threshold info Dockerfile
  say "Dockerfile: no hadolint findings"
}

check_rust_version() {
  local toolchain image
  toolchain="$(sed -nE 's/^[[:space:]]*channel[[:space:]]*=[[:space:]]*"([^"]+)".*/\1/p' rust-toolchain.toml)"
  image="$(sed -nE 's/^FROM[[:space:]]+rust:([0-9][^-[:space:]]*)-.*/\1/p' Dockerfile | head -n 1)"
  say "rust-toolchain.toml channel: ${toolchain:-?}; Dockerfile rust image: ${image:-?}"
  if [[ -z "$toolchain" || "$toolchain" != "$image" ]]; then
    say "Dockerfile must build with FROM rust:$toolchain-... (the toolchain file is not in the build context)"
    return 1
  fi
  say "Dockerfile builds with the pinned toolchain $toolchain"
}

check_compose() {
  local compose="$VENV/bin/docker-compose"
  "$compose" version
  # `config` resolves and validates the file against the Compose specification schema plus
  # Compose's own semantic checks (undefined services, dependency cycles...). No engine needed.
  "$compose" -f docker-compose.yml config --quiet
  say "default services: $("$compose" -f docker-compose.yml config --services | tr '\n' ' ')"
  "$compose" -f docker-compose.yml --profile replicas config --quiet
  say "with profile replicas: $("$compose" -f docker-compose.yml --profile replicas config --services | tr '\n' ' ')"
  "$compose" -f docker-compose.yml --profile observability config --quiet
  say "with profile observability: $("$compose" -f docker-compose.yml --profile observability config --services | tr '\n' ' ')"
  # Every service, for the policy checks.
  "$compose" -f docker-compose.yml --profile replicas --profile observability config --format json \
    >"$WORK/compose.json"
  say "docker-compose.yml is valid (default, replicas and observability profiles)"
}

# Names of the rendered overlays (checks run in subshells, so state lives in files).
overlays() {
  local f
  for f in "$WORK"/render/*.yaml; do [[ -e "$f" ]] && basename "$f" .yaml; done
  return 0
}

overlay_args() {
  local name
  for name in $(overlays); do printf '%s\n' "$name=$WORK/render/$name.yaml"; done
}

check_kustomize() {
  local kubectl="$VENV/bin/kubectl" dir name count=0
  "$kubectl" version --client
  mkdir -p "$WORK/render"
  "$kubectl" kustomize k8s/base >"$WORK/base.yaml"
  say "k8s/base: $(grep -c '^kind:' "$WORK/base.yaml") objects"
  for dir in k8s/overlays/*/; do
    name="$(basename "$dir")"
    "$kubectl" kustomize "$dir" >"$WORK/render/$name.yaml"
    count=$((count + 1))
    say "k8s/overlays/$name: $(grep -c '^kind:' "$WORK/render/$name.yaml") objects ($(grep '^kind:' "$WORK/render/$name.yaml" | cut -d' ' -f2 | sort | tr '\n' ' '))"
  done
  [[ $count -gt 0 ]] || { say "no overlays under k8s/overlays"; return 1; }
  say "rendered base + $count overlays: $(overlays | tr '\n' ' ')"
}

check_k8s_schema() {
  local v f
  for v in $KUBE_VERSIONS; do
    for f in "$WORK/base.yaml" "$WORK"/render/*.yaml; do
      "$VENV/bin/kubernetes-validate" --strict --quiet --kubernetes-version "$v" "$f"
      say "$(basename "$f" .yaml): valid against Kubernetes $v (strict)"
    done
  done
  say "all renders valid against Kubernetes ${KUBE_VERSIONS// /, } (strict)"
}

check_checkov() {
  local out="$WORK/checkov.txt" rc=0
  # --skip-download: no calls to the vendor platform; the built-in policies are in the package.
  "$VENV/bin/checkov" --quiet --compact --skip-download \
    --framework kubernetes --directory "$WORK/render" >"$out" 2>&1 || rc=$?
  cat "$out"
  [[ $rc -eq 0 ]] || return "$rc"
  "$VENV/bin/checkov" --quiet --compact --skip-download \
    --framework dockerfile --file Dockerfile >"$out" 2>&1 || rc=$?
  cat "$out"
  [[ $rc -eq 0 ]] || return "$rc"
  say "no failed checkov checks (skips: $(grep -rhoE 'checkov(\.io/skip[0-9]+: |:skip=)CKV2?_[A-Z0-9_]+' k8s Dockerfile | grep -oE 'CKV2?_[A-Z0-9_]+' | sort -u | tr '\n' ' '))"
}

check_policy() {
  local args=() bad=0
  mapfile -t args < <(overlay_args)
  "$VENV/bin/python" .ci/deploy_policy.py policy --config-dir config --base "$WORK/base.yaml" \
    --compose "$WORK/compose.json" "${args[@]}" || bad=1
  # Every suppressed scanner check carries a reason of its own.
  while IFS= read -r line; do
    say "ERROR checkov skip without a reason: $line"; bad=1
  done < <(grep -rnE 'checkov(\.io/skip[0-9]+:|:skip=)' k8s Dockerfile \
             | grep -vE '(checkov\.io/skip[0-9]+: *CKV2?_[A-Z0-9_]+=|checkov:skip=CKV2?_[A-Z0-9_]+:) *[^ ].{15,}' || true)
  # The example Secret must never be part of a kustomization.
  if grep -rn 'secret.example' k8s --include=kustomization.yaml | grep -vE '^[^:]+:[0-9]+: *#'; then
    say "ERROR secret.example.yaml is listed in a kustomization"; bad=1
  fi
  [[ $bad -eq 0 ]] || return 1
  say "termination budget, probes, rollout, secret references and skip reasons OK"
}

check_observability() {
  local kubectl="$VENV/bin/kubectl" dir name args=() v
  # Each overlay as a user would extend it: the same tree with both components added.
  cp -r k8s "$WORK/k8s-monitoring"
  mkdir -p "$WORK/monitoring"
  for dir in "$WORK"/k8s-monitoring/overlays/*/; do
    name="$(basename "$dir")"
    printf '\ncomponents:\n  - ../../components/servicemonitor\n  - ../../components/prometheus-rules\n' \
      >>"$dir/kustomization.yaml"
    "$kubectl" kustomize "$dir" >"$WORK/monitoring/$name.yaml"
    say "$name + components: $(grep '^kind:' "$WORK/monitoring/$name.yaml" | cut -d' ' -f2 | sort | tr '\n' ' ')"
    args+=("$name=$WORK/monitoring/$name.yaml")
  done
  for v in $KUBE_VERSIONS; do
    # The Operator's kinds have no schema here (a warning); the rest is checked strictly.
    "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn --kubernetes-version "$v" "$WORK"/monitoring/*.yaml
  done
  say "renders with the components: valid against Kubernetes ${KUBE_VERSIONS// /, } (strict)"
  "$VENV/bin/checkov" --quiet --compact --skip-download --framework kubernetes \
    --directory "$WORK/monitoring"
  "$VENV/bin/python" .ci/observability_policy.py prometheusrule
  "$VENV/bin/python" .ci/observability_policy.py check --compose "$WORK/compose.json" "${args[@]}"
  say "dashboard, alert rules, runbook links, compose profile and monitoring components OK"
}

check_config_env() {
  local bin="${RELAY_BIN:-}" args=() candidate
  if [[ -z "$bin" ]]; then
    for candidate in target/release/relay target/debug/relay; do
      [[ -x "$candidate" ]] && { bin="$candidate"; break; }
    done
  fi
  if [[ -z "$bin" || ! -x "$bin" ]]; then
    say "no relay binary (set RELAY_BIN or build target/debug/relay): skipped"
    return 3
  fi
  say "using $bin"
  mapfile -t args < <(overlay_args)
  "$VENV/bin/python" .ci/deploy_policy.py config-env --binary "$bin" \
    --config-dir "${RELAY_CONFIG_DIR:-config}" \
    --compose "$WORK/compose.json" "${args[@]}"
  say "relay accepts every APP__ variable set by docker-compose.yml and the overlays"
}

# --- main -----------------------------------------------------------------------------------------
say "deploy checks in $ROOT"
if ! setup_tools; then
  say "FAIL  tools: could not install .ci/deploy-requirements.txt into $VENV"
  exit 1
fi

run_check hadolint check_hadolint
run_check rust-version check_rust_version
run_check compose check_compose
run_check kustomize check_kustomize
if [[ -f "$WORK/base.yaml" && -n "$(overlays)" ]]; then
  run_check k8s-schema check_k8s_schema
  run_check checkov check_checkov
  if [[ -f "$WORK/compose.json" ]]; then
    run_check policy check_policy
    run_check observability check_observability
    run_check config-env check_config_env
  else
    RESULTS+=("FAIL  policy        0s  needs a valid compose file"); FAILED=1
  fi
else
  RESULTS+=("FAIL  k8s-schema    0s  nothing rendered"); FAILED=1
fi

say ""
say "=== deploy checks summary ($((SECONDS - START))s)"
printf '%s\n' "${RESULTS[@]}"
if [[ $FAILED -ne 0 ]]; then
  say "RESULT: FAIL"
  exit 1
fi
say "RESULT: PASS"
