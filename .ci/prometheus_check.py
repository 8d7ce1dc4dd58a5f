"""The Prometheus side of .ci/prometheus-check.sh (standard library only).

  prometheus_check.py ci-rules ALERTS OUT
      Copy the alert rules with every `for:` set to 1s, so alerts fire within seconds in CI.
      Only that line changes; expressions, labels and annotations stay as shipped.
  prometheus_check.py queries --url URL DASHBOARD
      Run every panel's query (targets[].expr) of the Grafana dashboard through /api/v1/query,
      with the dashboard's variables replaced as Grafana would with "All" selected
      ($job, $instance: `.+`) and $__rate_interval etc. by fixed windows. Each must return at
      least one series with a number (not NaN). Prints each query's result count; exits 1 on any
      empty or NaN-only result.
  prometheus_check.py wait-alerts --url URL --timeout SECONDS [--quiet NAME]... NAME...
      Wait until every NAME is firing in /api/v1/alerts; prints what fired and when. Fails if an
      alert given with --quiet is pending or firing meanwhile (a healthy part must not alert).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request

# What Grafana would put in; the windows suit a 1 s scrape interval and a run of about a minute.
SUBSTITUTIONS = {
    "$__rate_interval": "1m",
    "$__interval": "5s",
    "$__range": "5m",
    "${job}": ".+",
    "$job": ".+",
    "${instance}": ".+",
    "$instance": ".+",
}


def get(url: str, path: str, params: dict | None = None) -> dict:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}{path}{query}", timeout=10) as res:
        return json.load(res)


def cmd_ci_rules(args: argparse.Namespace) -> int:
    text = open(args.alerts, encoding="utf-8").read()
    out, n = re.subn(r"(?m)^(\s*for:\s*)\S+\s*$", r"\g<1>1s", text)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(out)
    print(f"CI copy of {args.alerts}: {n} `for:` durations set to 1s -> {args.out}")
    return 0


def substitute(expr: str) -> str:
    # Longest names first, so `$__rate_interval` is not read as `$__rate` + `_interval`.
    for key in sorted(SUBSTITUTIONS, key=len, reverse=True):
        expr = expr.replace(key, SUBSTITUTIONS[key])
    return expr


def panel_queries(path: str) -> list[tuple[str, str, str]]:
    with open(path, encoding="utf-8") as f:
        dashboard = json.load(f)
    panels = []
    for panel in dashboard.get("panels", []):
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    out = []
    for panel in panels:
        for target in panel.get("targets", []):
            if target.get("expr", "").strip():
                out.append((panel.get("title", "?"), target.get("refId", "?"), target["expr"]))
    return out


def cmd_queries(args: argparse.Namespace) -> int:
    queries = panel_queries(args.dashboard)
    failed = 0
    for title, ref, expr in queries:
        promql = substitute(expr)
        if "$" in promql:
            print(f"FAIL  {title} [{ref}]: unknown variable left in `{promql}`")
            failed += 1
            continue
        try:
            body = get(args.url, "/api/v1/query", {"query": promql})
        except Exception as e:  # noqa: BLE001 - the reason is printed
            print(f"FAIL  {title} [{ref}]: {e}")
            failed += 1
            continue
        result = body.get("data", {}).get("result", []) if body.get("status") == "success" else []
        numbers = [float(r["value"][1]) for r in result if "value" in r]
        real = [v for v in numbers if not math.isnan(v)]
        if not result:
            print(f"FAIL  {title} [{ref}]: no data for `{promql}` ({body.get('error', 'empty result')})")
            failed += 1
        elif not real:
            print(f"FAIL  {title} [{ref}]: only NaN for `{promql}`")
            failed += 1
        else:
            print(f"ok    {title} [{ref}]: {len(result)} series, e.g. {real[0]:.6g}")
    print(f"dashboard queries: {len(queries) - failed} of {len(queries)} returned data")
    return 1 if failed else 0


def cmd_wait_alerts(args: argparse.Namespace) -> int:
    started = time.monotonic()
    fired: dict[str, float] = {}
    while True:
        body = get(args.url, "/api/v1/alerts")
        states = {}
        for alert in body.get("data", {}).get("alerts", []):
            name = alert["labels"].get("alertname", "?")
            if alert.get("state") == "firing" or states.get(name) != "firing":
                states[name] = alert.get("state")
        noisy = [n for n in args.quiet if states.get(n) in ("pending", "firing")]
        if noisy:
            print(f"FAIL  {', '.join(noisy)} alerting while it should not: {json.dumps(states)}")
            return 1
        for name in args.names:
            if states.get(name) == "firing" and name not in fired:
                fired[name] = time.monotonic() - started
                print(f"firing after {fired[name]:.1f}s: {name}")
        if len(fired) == len(args.names):
            others = sorted(n for n, s in states.items() if s == "firing" and n not in fired)
            print(f"firing on purpose: {', '.join(args.names)}"
                  + (f" (also firing: {', '.join(others)})" if others else "")
                  + (f"; quiet as they should be: {', '.join(args.quiet)}" if args.quiet else ""))
            return 0
        if time.monotonic() - started > args.timeout:
            missing = [n for n in args.names if n not in fired]
            print(f"FAIL  not firing within {args.timeout:g}s: {', '.join(missing)} "
                  f"(states: {json.dumps(states)})")
            return 1
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ci-rules")
    r.add_argument("alerts")
    r.add_argument("out")
    r.set_defaults(func=cmd_ci_rules)
    q = sub.add_parser("queries")
    q.add_argument("--url", required=True)
    q.add_argument("dashboard")
    q.set_defaults(func=cmd_queries)
    w = sub.add_parser("wait-alerts")
    w.add_argument("--url", required=True)
    w.add_argument("--timeout", type=float, default=90)
    w.add_argument("--quiet", action="append", default=[], metavar="NAME")
    w.add_argument("names", nargs="+")
    w.set_defaults(func=cmd_wait_alerts)
    args = parser.parse_args()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
