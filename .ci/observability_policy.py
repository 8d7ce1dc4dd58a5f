"""Static checks of relay's observability files, and the PrometheusRule generator.

  observability_policy.py prometheusrule [--write]
      Render k8s/components/prometheus-rules/prometheusrule.yaml from
      deploy/prometheus/alerts.yml (text: the rules' comments stay). Without --write, compare
      with the committed file and exit 1 on any difference (CI); --write updates it.

  observability_policy.py check --compose compose.json NAME=monitoring-render.yaml ...
      (.ci/deploy-checks.sh, with the tools venv's Python, which has PyYAML)
      * deploy/grafana/relay.json: importable (schemaVersion, uid, a `datasource` variable of
        type prometheus that every panel and target uses), unique panel ids, every target has an
        expr; every metric it queries exists (telemetry::metrics::METRICS in
        src/telemetry/metrics.rs); the panels the runbook and issue 17 name are there.
      * deploy/prometheus/alerts.yml: every alert has severity, summary, description and a
        runbook_url whose anchor is a heading of docs/operations.md; only existing metrics; the
        PrometheusRule has the same groups (content, not text).
      * the compose `observability` profile: Prometheus loads alerts.yml and scrapes relay as job
        `relay`; Grafana is provisioned with that Prometheus and with relay.json.
      * each monitoring render (an overlay with both components): the ServiceMonitor's port
        reaches the API pods' metrics port through its Service, its job label is `relay`, and a
        NetworkPolicy admits that port from the scraper.
Prints one line per finding; exits 1 if there is any.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy/grafana/relay.json"
ALERTS = ROOT / "deploy/prometheus/alerts.yml"
PROM_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
RULE = ROOT / "k8s/components/prometheus-rules/prometheusrule.yaml"
RUNBOOK = ROOT / "docs/operations.md"
METRICS_RS = ROOT / "src/telemetry/metrics.rs"
GRAFANA_PROVISIONING = ROOT / "deploy/grafana/provisioning"
# The metric prefix and the scrape job's name (scripts/rename.sh changes both with the service).
PREFIX = "relay_"
JOB = "relay"
# Metrics the dashboard must show (issue 17's panel list).
DASHBOARD_MUST_USE = [
    f"{PREFIX}ws_connections", f"{PREFIX}sse_connections",          # connections by transport
    f"{PREFIX}messages_delivered_total",                              # deliveries/s
    f"{PREFIX}messages_committed_total", f"{PREFIX}publish_commit_seconds",  # publish rate, latency
    f"{PREFIX}publish_batch_messages", f"{PREFIX}publish_queue_messages",
    f"{PREFIX}publish_queue_full_total",
    f"{PREFIX}listener_lag_seconds",                                  # fan-out lag
    f"{PREFIX}messages_dropped_total", f"{PREFIX}slow_consumer_disconnects_total",  # drops
    f"{PREFIX}dependency_up", f"{PREFIX}pubsub_listener_connected",   # Redis and Postgres health
    f"{PREFIX}db_pool_connections",
    f"{PREFIX}access_log_dropped_total",                              # access-log drops
    f"{PREFIX}history_messages", f"{PREFIX}history_bytes",            # history size
]
# PromQL words that are not metric names.
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

RULE_HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by `python3 .ci/observability_policy.py
# prometheusrule --write`: edit that file, not this one (.ci/deploy-checks.sh compares them).
# The same rules for the Prometheus Operator; see kustomization.yaml beside this file.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: relay
  labels:
    app.kubernetes.io/name: relay
    app.kubernetes.io/part-of: relay
    app.kubernetes.io/component: alerts
spec:
"""


def rendered_rule(alerts_text: str) -> str:
    """The PrometheusRule: the header, then alerts.yml from `groups:` on, under `spec:`."""
    lines = alerts_text.splitlines()
    start = next((i for i, l in enumerate(lines) if l.startswith("groups:")), None)
    if start is None:
        raise SystemExit(f"{ALERTS}: no top-level `groups:`")
    body = "".join(f"  {l}\n" if l.strip() else "\n" for l in lines[start:])
    return RULE_HEADER + body


def cmd_prometheusrule(args: argparse.Namespace) -> int:
    want = rendered_rule(ALERTS.read_text(encoding="utf-8"))
    if args.write:
        RULE.write_text(want, encoding="utf-8")
        print(f"wrote {RULE.relative_to(ROOT)}")
        return 0
    have = RULE.read_text(encoding="utf-8") if RULE.exists() else ""
    if have != want:
        print(f"ERROR {RULE.relative_to(ROOT)} is not generated from the current "
              f"{ALERTS.relative_to(ROOT)}: run `python3 .ci/observability_policy.py "
              "prometheusrule --write`")
        return 1
    print(f"{RULE.relative_to(ROOT)} is generated from {ALERTS.relative_to(ROOT)}")
    return 0


def known_metrics() -> set[str]:
    """The names in telemetry::metrics::METRICS (the first string of each entry)."""
    text = METRICS_RS.read_text(encoding="utf-8")
    table = text[text.index("pub const METRICS"):]
    table = table[:table.index("\n];")]
    return set(re.findall(r'(?:counter|gauge|histogram)\(\s*"(' + PREFIX + r'[a-z0-9_]+)"', table))


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression, with histogram suffixes removed."""
    names = set()
    for name in re.findall(r"(?<![A-Za-z0-9_:])" + PREFIX + r"[a-z0-9_]+", expr):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                name = name[: -len(suffix)]
                break
        names.add(name)
    return names


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = heading.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def runbook_anchors() -> set[str]:
    anchors = set()
    if not RUNBOOK.exists():
        return anchors
    for line in RUNBOOK.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^#{1,6}\s+(.*)$", line)
        if m:
            anchors.add(github_anchor(m.group(1)))
    return anchors


def dashboard_panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows
    return out


def check_dashboard(known: set[str], errors: list[str]) -> int:
    def err(msg: str) -> None:
        errors.append(f"{DASHBOARD.relative_to(ROOT)}: {msg}")

    try:
        dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        err(f"not readable JSON: {e}")
        return 0
    for key in ("schemaVersion", "uid", "title", "panels", "templating"):
        if key not in dashboard:
            err(f"missing `{key}`")
    variables = {v.get("name"): v for v in dashboard.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        err("needs a template variable `datasource` of type datasource with query `prometheus`")
    ids = set()
    queries = 0
    used: set[str] = set()
    for panel in dashboard_panels(dashboard):
        title = panel.get("title", "?")
        if panel.get("id") in ids:
            err(f"panel id {panel.get('id')} is not unique")
        ids.add(panel.get("id"))
        if "gridPos" not in panel:
            err(f"panel `{title}` has no gridPos")
        if panel.get("type") == "row":
            continue
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            err(f"panel `{title}` does not use the ${{datasource}} variable")
        targets = panel.get("targets", [])
        if not targets:
            err(f"panel `{title}` has no query")
        for target in targets:
            expr = target.get("expr", "")
            if not expr.strip():
                err(f"panel `{title}` target {target.get('refId')} has no expr")
                continue
            if target.get("datasource", {}).get("uid", "${datasource}") != "${datasource}":
                err(f"panel `{title}` target {target.get('refId')} names another datasource")
            queries += 1
            names = metric_names(expr)
            if not names and not re.search(r"(?<![A-Za-z0-9_:])up\{", expr):
                err(f"panel `{title}`: `{expr}` queries no {PREFIX}* metric")
            for name in sorted(names - known):
                err(f"panel `{title}`: `{name}` is not a metric relay exports")
            used |= names
    for name in DASHBOARD_MUST_USE:
        if name not in used:
            err(f"no panel shows {name}")
    panels = sum(1 for p in dashboard_panels(dashboard) if p.get("type") != "row")
    print(f"dashboard: {panels} panels, {queries} queries of {len(used)} metrics")
    return queries


def check_alerts(known: set[str], errors: list[str]) -> None:
    import yaml

    def err(msg: str) -> None:
        errors.append(f"{ALERTS.relative_to(ROOT)}: {msg}")

    alerts = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    anchors = runbook_anchors()
    names = []
    for group in alerts.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert")
            if not name:
                err(f"group {group.get('name')}: a rule without `alert` (recording rules belong elsewhere)")
                continue
            names.append(name)
            if not rule.get("labels", {}).get("severity") in ("critical", "warning", "info"):
                err(f"{name}: labels.severity must be critical, warning or info")
            notes = rule.get("annotations", {})
            for key in ("summary", "description", "runbook_url"):
                if not notes.get(key):
                    err(f"{name}: annotations.{key} is missing")
            url = notes.get("runbook_url", "")
            doc, _, anchor = url.partition("#")
            if not doc.endswith("docs/operations.md") or not anchor:
                err(f"{name}: runbook_url must link to a section of docs/operations.md ({url})")
            elif anchor not in anchors:
                err(f"{name}: docs/operations.md has no heading with the anchor #{anchor}")
            for metric in sorted(metric_names(str(rule.get("expr", ""))) - known):
                err(f"{name}: `{metric}` is not a metric relay exports")
    if len(set(names)) != len(names):
        err("alert names are not unique")
    print(f"alerts: {len(names)} ({', '.join(names)}), each with a runbook section")
    if RULE.exists():
        rule_doc = yaml.safe_load(RULE.read_text(encoding="utf-8"))
        if rule_doc.get("kind") != "PrometheusRule":
            errors.append(f"{RULE.relative_to(ROOT)}: not a PrometheusRule")
        elif rule_doc.get("spec", {}).get("groups") != alerts.get("groups"):
            errors.append(f"{RULE.relative_to(ROOT)}: its groups differ from {ALERTS.relative_to(ROOT)} "
                          "(run `python3 .ci/observability_policy.py prometheusrule --write`)")
        else:
            print(f"PrometheusRule: the same {len(names)} rules as alerts.yml")
    else:
        errors.append(f"{RULE.relative_to(ROOT)} is missing")


def mounts(svc: dict) -> dict[str, Path]:
    """Container path -> host path of a compose service's bind mounts."""
    out = {}
    for vol in svc.get("volumes", []) or []:
        if isinstance(vol, dict) and vol.get("type") == "bind":
            out[vol["target"]] = Path(vol["source"])
    return out


def host_path(svc_mounts: dict[str, Path], container_path: str) -> Path | None:
    """The host file behind a container path, through the bind mount that contains it."""
    for target, source in sorted(svc_mounts.items(), key=lambda kv: -len(kv[0])):
        if container_path == target:
            return source
        if container_path.startswith(target.rstrip("/") + "/"):
            return source / container_path[len(target.rstrip("/")) + 1:]
    return None


def check_compose(compose: dict, errors: list[str]) -> None:
    import yaml

    def err(msg: str) -> None:
        errors.append(f"compose observability: {msg}")

    services = compose.get("services", {})
    prom, graf = services.get("prometheus"), services.get("grafana")
    if not prom or not graf:
        err("needs services `prometheus` and `grafana`")
        return
    for name, svc in (("prometheus", prom), ("grafana", graf)):
        if svc.get("profiles") != ["observability"]:
            err(f"{name} must be in the profile `observability` only (found {svc.get('profiles')})")
    pm = mounts(prom)
    command = prom.get("command") or []
    config_path = next((c.split("=", 1)[1] for c in command if c.startswith("--config.file=")),
                       "/etc/prometheus/prometheus.yml")
    config_host = host_path(pm, config_path)
    if config_host is None or config_host.resolve() != PROM_CONFIG.resolve():
        err(f"prometheus must load {PROM_CONFIG.relative_to(ROOT)} as {config_path}")
        return
    config = yaml.safe_load(PROM_CONFIG.read_text(encoding="utf-8"))
    rule_files = config.get("rule_files", [])
    if not any((host_path(pm, f) or Path("/nonexistent")).resolve() == ALERTS.resolve()
               for f in rule_files):
        err(f"prometheus.yml rule_files {rule_files} do not load {ALERTS.relative_to(ROOT)}")
    jobs = {j.get("job_name"): j for j in config.get("scrape_configs", [])}
    if JOB not in jobs:
        err(f"prometheus.yml has no scrape job `{JOB}` (the alerts use up{{job=\"{JOB}\"}})")
    else:
        blob = json.dumps(jobs[JOB])
        for name, svc in services.items():
            if (svc.get("image", "").startswith(JOB) or "build" in svc) and f'"{name}"' not in blob:
                err(f"scrape job `{JOB}` does not find the relay service `{name}`")
    gm = mounts(graf)
    prov = next((Path(s) for t, s in gm.items() if t == "/etc/grafana/provisioning"), None)
    if prov is None or prov.resolve() != GRAFANA_PROVISIONING.resolve():
        err(f"grafana must mount {GRAFANA_PROVISIONING.relative_to(ROOT)} at /etc/grafana/provisioning")
        return
    port = next((p.get("target") for p in prom.get("ports", []) or []), 9090)
    sources = []
    for f in sorted((prov / "datasources").glob("*.y*ml")):
        sources += yaml.safe_load(f.read_text(encoding="utf-8")).get("datasources", [])
    if not any(d.get("type") == "prometheus" and d.get("url") == f"http://prometheus:{port}"
               for d in sources):
        err(f"no provisioned datasource of type prometheus at http://prometheus:{port}")
    providers = []
    for f in sorted((prov / "dashboards").glob("*.y*ml")):
        providers += yaml.safe_load(f.read_text(encoding="utf-8")).get("providers", [])
    found = False
    for p in providers:
        folder = p.get("options", {}).get("path", "").rstrip("/")
        # The dashboard file mounted into the provider's folder, or a folder mount holding it.
        for target, source in gm.items():
            inside = target.startswith(folder + "/") or target == folder
            if inside and source.resolve() in (DASHBOARD.resolve(), DASHBOARD.parent.resolve()):
                found = True
    if not found:
        err(f"no dashboard provider loads {DASHBOARD.relative_to(ROOT)}")
    if not errors:
        print(f"compose: profile observability provisions Prometheus (job {JOB}, alerts.yml) and "
              "Grafana (datasource, dashboard)")


def labels_match(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_monitoring(name: str, docs: list[dict], errors: list[str]) -> None:
    def err(msg: str) -> None:
        errors.append(f"{name} + monitoring components: {msg}")

    def of(kind: str) -> list[dict]:
        return [d for d in docs if d.get("kind") == kind]

    monitors, rules = of("ServiceMonitor"), of("PrometheusRule")
    if len(monitors) != 1 or len(rules) != 1:
        err("expected one ServiceMonitor and one PrometheusRule")
        return
    monitor = monitors[0]
    services = [s for s in of("Service")
                if labels_match(monitor["spec"].get("selector", {}).get("matchLabels"),
                                s["metadata"].get("labels", {}))]
    if len(services) != 1:
        err(f"the ServiceMonitor selects {len(services)} Services (want 1)")
        return
    svc = services[0]
    job = svc["metadata"].get("labels", {}).get(monitor["spec"].get("jobLabel", ""), svc["metadata"]["name"])
    if job != JOB:
        err(f"the scrape job would be `{job}`; the alert rules expect `{JOB}`")
    deps = [d for d in of("Deployment")
            if labels_match(svc["spec"].get("selector"), d["spec"]["template"]["metadata"].get("labels", {}))]
    if len(deps) != 1:
        err(f"Service {svc['metadata']['name']} selects {len(deps)} Deployments (want the API pods)")
        return
    pod_labels = deps[0]["spec"]["template"]["metadata"].get("labels", {})
    container_ports = {p.get("name"): p["containerPort"]
                       for c in deps[0]["spec"]["template"]["spec"]["containers"]
                       for p in c.get("ports", [])}
    for endpoint in monitor["spec"].get("endpoints", []):
        svc_port = next((p for p in svc["spec"]["ports"] if p.get("name") == endpoint.get("port")), None)
        if svc_port is None:
            err(f"ServiceMonitor port `{endpoint.get('port')}` is not a port of {svc['metadata']['name']}")
            continue
        target = svc_port.get("targetPort", svc_port["port"])
        number = container_ports.get(target) if isinstance(target, str) else target
        if number is None:
            err(f"targetPort `{target}` is not a container port of the API pods")
            continue
        admitted = False
        for policy in of("NetworkPolicy"):
            if not labels_match(policy["spec"].get("podSelector", {}).get("matchLabels"), pod_labels):
                continue
            for rule in policy["spec"].get("ingress", []):
                ports = [p.get("port") for p in rule.get("ports", [])]
                if (number in ports or target in ports) and rule.get("from"):
                    admitted = True
        if not admitted:
            err(f"no NetworkPolicy admits a scraper (`from:` peers) to the metrics port {number}")
        else:
            print(f"{name}: ServiceMonitor -> Service {svc['metadata']['name']}:{svc_port['port']} -> "
                  f"pods' port {number}, admitted by the NetworkPolicy; job `{job}`")


def cmd_check(args: argparse.Namespace) -> int:
    import yaml

    errors: list[str] = []
    known = known_metrics()
    if len(known) < 40:
        errors.append(f"{METRICS_RS.relative_to(ROOT)}: found only {len(known)} metrics in METRICS")
    check_dashboard(known, errors)
    check_alerts(known, errors)
    with open(args.compose, encoding="utf-8") as f:
        check_compose(json.load(f), errors)
    for item in args.renders:
        name, _, path = item.partition("=")
        with open(path, encoding="utf-8") as f:
            docs = [d for d in yaml.safe_load_all(f) if d]
        check_monitoring(name, docs, errors)
    for e in errors:
        print(f"ERROR {e}")
    return 1 if errors else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("prometheusrule")
    r.add_argument("--write", action="store_true")
    r.set_defaults(func=cmd_prometheusrule)
    c = sub.add_parser("check")
    c.add_argument("--compose", required=True)
    c.add_argument("renders", nargs="*", metavar="NAME=FILE")
    c.set_defaults(func=cmd_check)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
