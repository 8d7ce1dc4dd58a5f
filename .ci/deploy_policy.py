"""Project-specific deployment rules that generic scanners do not know about.

Used by .ci/deploy-checks.sh (run with the tools venv's Python, which has PyYAML):

  deploy_policy.py policy --config-dir config --base base.yaml --compose compose.json \
      NAME=rendered-overlay.yaml ...
  deploy_policy.py config-env --binary BIN --config-dir config --compose compose.json \
      NAME=rendered-overlay.yaml ...

`policy` checks the termination arithmetic, probes, rollout strategy and secret handling of the
rendered manifests and the compose file. `config-env` feeds every environment the deployment
files give relay (each overlay's ConfigMap + placeholder secrets, each compose relay service) to
`relay check-config`, so an unknown or malformed APP__ key fails here instead of at startup.
Prints one line per finding; exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

# Seconds relay may spend after draining (flushing logs/traces) before it exits.
FLUSH_SECONDS = 5
# Placeholder values for the Secret `relay-secrets`, which is never committed.
PLACEHOLDER_SECRETS = {
    "APP__DATABASE__URL": "postgres://relay:placeholder@postgres.invalid:5432/relay",
    "APP__REDIS__URL": "redis://redis.invalid:6379",
    "APP__AUTH__HS256_SECRET": "placeholder-placeholder-placeholder-0123",
}
UNITS = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def seconds(value: str | int | float) -> float:
    """Parse a humantime-style duration ("5s", "1m 15s", "250ms") or a number of seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", value.strip())
    if not parts or "".join(f"{n}{u}" for n, u in parts) != re.sub(r"\s+", "", value):
        raise ValueError(f"cannot parse duration {value!r}")
    return sum(float(n) * UNITS[u] for n, u in parts)


def load_docs(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def find(docs: list[dict], kind: str, name_prefix: str) -> list[dict]:
    return [
        d for d in docs
        if d.get("kind") == kind and d.get("metadata", {}).get("name", "").startswith(name_prefix)
    ]


def effective_shutdown(config_dir: Path, env: dict[str, str]) -> tuple[float, float]:
    """shutdown.readiness_grace and drain_timeout as relay would load them (APP_ENV=production)."""
    merged: dict = {}
    for name in ("default.toml", "production.toml"):
        path = config_dir / name
        if path.exists():
            for section, values in tomllib.loads(path.read_text()).items():
                merged.setdefault(section, {}).update(values)
    shutdown = dict(merged.get("shutdown", {}))
    for key in ("readiness_grace", "drain_timeout"):
        override = env.get(f"APP__SHUTDOWN__{key.upper()}")
        if override is not None:
            shutdown[key] = override
    return seconds(shutdown["readiness_grace"]), seconds(shutdown["drain_timeout"])


def container_env(cm: dict, container: dict) -> dict[str, str]:
    env = dict(cm.get("data", {}))
    env.update(PLACEHOLDER_SECRETS)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = "placeholder"
    return env


def overlay_env(docs: list[dict]) -> dict[str, str]:
    cms = find(docs, "ConfigMap", "relay-config")
    deps = find(docs, "Deployment", "relay")
    if not cms or not deps:
        return {}
    return container_env(cms[0], deps[0]["spec"]["template"]["spec"]["containers"][0])


def compose_relay_services(compose: dict) -> dict[str, dict]:
    return {
        name: svc for name, svc in compose.get("services", {}).items()
        if svc.get("image", "").startswith("relay") or "build" in svc
    }


def check_overlay(name: str, docs: list[dict], config_dir: Path, errors: list[str]) -> None:
    def err(msg: str) -> None:
        errors.append(f"{name}: {msg}")

    if find(docs, "Secret", ""):
        err("renders a Secret: real secret values must never be committed (reference relay-secrets)")
    deps = find(docs, "Deployment", "relay")
    cms = find(docs, "ConfigMap", "relay-config")
    jobs = find(docs, "Job", "relay-migrate")
    if len(deps) != 1 or len(cms) != 1 or len(jobs) != 1:
        err("expected exactly one relay Deployment, relay-config ConfigMap and relay-migrate Job")
        return
    dep, cm, job = deps[0], cms[0], jobs[0]
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    ctr = pod["containers"][0]

    if spec.get("strategy", {}).get("rollingUpdate", {}).get("maxUnavailable") != 0:
        err("Deployment rollingUpdate.maxUnavailable must be 0")
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"),
                        ("readinessProbe", "/readyz")):
        got = ctr.get(probe, {}).get("httpGet", {}).get("path")
        if got != path:
            err(f"{probe} must GET {path} (found {got!r})")

    env = container_env(cm, ctr)
    grace, drain = effective_shutdown(config_dir, env)
    pre_stop = ctr.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds")
    if pre_stop is None:
        err("preStop must use the native sleep action (no shell in the image)")
        pre_stop = 0
    elif pre_stop < grace:
        err(f"preStop sleep {pre_stop}s must be >= shutdown.readiness_grace {grace:g}s")
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    budget = pre_stop + grace + drain + FLUSH_SECONDS
    if not tgps > budget:
        err(f"terminationGracePeriodSeconds {tgps} must exceed preStop {pre_stop} + readiness_grace "
            f"{grace:g} + drain_timeout {drain:g} + flush {FLUSH_SECONDS} = {budget:g}")
    else:
        print(f"{name}: termination budget {pre_stop} + {grace:g} + {drain:g} + {FLUSH_SECONDS} = "
              f"{budget:g}s < terminationGracePeriodSeconds {tgps}s")

    if cm.get("data", {}).get("APP__DATABASE__MIGRATE_ON_START") != "false":
        err("API pods must not migrate on start (APP__DATABASE__MIGRATE_ON_START=false); the Job does")
    if job["spec"]["template"]["spec"]["containers"][0].get("args") != ["migrate"]:
        err("relay-migrate Job must run `relay migrate`")
    for kind, obj in (("Deployment", dep), ("Job", job)):
        refs = [e.get("secretRef", {}).get("name")
                for e in obj["spec"]["template"]["spec"]["containers"][0].get("envFrom", [])]
        if "relay-secrets" not in refs:
            err(f"{kind} must take its secrets from the Secret relay-secrets (envFrom)")
    hpa = find(docs, "HorizontalPodAutoscaler", "relay")
    if not hpa or "stabilizationWindowSeconds" not in hpa[0]["spec"].get("behavior", {}).get("scaleDown", {}):
        err("HPA must set behavior.scaleDown.stabilizationWindowSeconds")
        return
    if "replicas" in spec:
        err("the HPA owns the replica count: the overlay must drop Deployment spec.replicas")
    floor = hpa[0]["spec"].get("minReplicas", 1)
    if name == "production" and floor < 2:
        err(f"production must keep at least 2 replicas (HPA minReplicas is {floor})")


def check_compose(compose: dict, config_dir: Path, errors: list[str]) -> None:
    for name, svc in compose_relay_services(compose).items():
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        grace, drain = effective_shutdown(config_dir, env)
        budget = grace + drain + FLUSH_SECONDS
        stop = seconds(svc.get("stop_grace_period", "10s"))
        if not stop > budget:
            errors.append(f"compose {name}: stop_grace_period {stop:g}s must exceed readiness_grace "
                          f"{grace:g} + drain_timeout {drain:g} + flush {FLUSH_SECONDS} = {budget:g}s")
        test = (svc.get("healthcheck") or {}).get("test") or []
        if test[:3] != ["CMD", "/usr/local/bin/relay", "healthcheck"]:
            errors.append(f"compose {name}: healthcheck must run `relay healthcheck` (found {test})")


def parse_overlays(items: list[str]) -> dict[str, list[dict]]:
    out = {}
    for item in items:
        name, _, path = item.partition("=")
        out[name] = load_docs(path)
    return out


def cmd_policy(args: argparse.Namespace) -> int:
    errors: list[str] = []
    config_dir = Path(args.config_dir)
    base = load_docs(args.base)
    if find(base, "Secret", ""):
        errors.append("base: renders a Secret (secret.example.yaml must stay out of kustomization.yaml)")
    for dep in find(base, "Deployment", "relay"):
        if dep["spec"].get("replicas", 1) < 2:
            errors.append("base: Deployment must run at least 2 replicas")
    for name, docs in parse_overlays(args.overlays).items():
        check_overlay(name, docs, config_dir, errors)
    with open(args.compose, encoding="utf-8") as f:
        check_compose(json.load(f), config_dir, errors)
    for e in errors:
        print(f"ERROR {e}")
    return 1 if errors else 0


def cmd_config_env(args: argparse.Namespace) -> int:
    sets: list[tuple[str, dict[str, str]]] = []
    for name, docs in parse_overlays(args.overlays).items():
        sets.append((f"k8s {name}", overlay_env(docs)))
    with open(args.compose, encoding="utf-8") as f:
        compose = json.load(f)
    for name, svc in compose_relay_services(compose).items():
        sets.append((f"compose {name}", {k: str(v) for k, v in (svc.get("environment") or {}).items()}))
    failures = 0
    for label, env in sets:
        # Exactly what the image provides, plus the deployment's variables.
        full = {"PATH": "/usr/bin:/bin", "APP_ENV": "production",
                "APP_CONFIG_DIR": str(Path(args.config_dir).resolve()), **env}
        res = subprocess.run([args.binary, "check-config"], env=full, capture_output=True,
                             text=True, timeout=30, check=False)
        if res.returncode == 0:
            keys = sorted(k for k in env if k.startswith("APP__"))
            print(f"ok    {label}: relay check-config accepted {len(keys)} APP__ variables")
        else:
            failures += 1
            print(f"ERROR {label}: relay check-config exited {res.returncode}: {res.stderr.strip()}")
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("policy")
    p.add_argument("--config-dir", required=True)
    p.add_argument("--base", required=True)
    p.add_argument("--compose", required=True)
    p.add_argument("overlays", nargs="+", metavar="NAME=FILE")
    p.set_defaults(func=cmd_policy)
    c = sub.add_parser("config-env")
    c.add_argument("--binary", required=True)
    c.add_argument("--config-dir", required=True)
    c.add_argument("--compose", required=True)
    c.add_argument("overlays", nargs="+", metavar="NAME=FILE")
    c.set_defaults(func=cmd_config_env)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
