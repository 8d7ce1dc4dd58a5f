//! Smoke test of `relay-loadgen` (the binary, as CI and people run it) against a test instance:
//! 50 subscribers over 5 channels, 200 msg/s for 1 s, through the HTTP API and straight through
//! Redis, and nothing may be lost, duplicated or reordered.

use std::time::Duration;

use serde_json::Value;

use crate::helpers::{TestApp, redis_url, spawn_app};

/// Run the generator against `app` and return its JSON report, asserting it exited 0.
async fn run_loadgen(app: &TestApp, via: &str) -> Value {
    let url = app.url("");
    let redis = redis_url();
    let args = [
        "--url",
        url.as_str(),
        "--connections",
        "50",
        "--channels",
        "5",
        "--rate",
        "200",
        "--duration",
        "1",
        "--publish-via",
        via,
        "--redis-url",
        redis,
        "--redis-prefix",
        app.settings.redis.channel_prefix.as_str(),
        "--drain",
        "5s",
        "--expect-lossless",
        "--json",
    ];
    // tokio's Command: the server under test runs on this test's runtime and must keep serving
    // while we wait.
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_relay-loadgen"))
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), output)
        .await
        .expect("relay-loadgen finishes within 60s")
        .expect("relay-loadgen starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "relay-loadgen exited with {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status.code()
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("report is not JSON ({e}):\n{stdout}\nstderr:\n{stderr}"))
}

fn assert_lossless_report(report: &Value, via: &str) {
    assert_eq!(report["mode"], "relay");
    assert_eq!(report["publish_via"], via);
    assert_eq!(report["connections"]["ok"], 50, "{report:#}");
    assert_eq!(report["connections"]["failed"], 0, "{report:#}");
    assert_eq!(report["published"], 200, "{report:#}");
    assert_eq!(report["publish_errors"], 0, "{report:#}");
    // 40 messages per channel, 10 subscribers per channel, 5 channels.
    assert_eq!(report["expected"], 2000, "{report:#}");
    assert_eq!(report["delivered"], report["expected"], "{report:#}");
    for field in ["lost", "duplicated", "out_of_order", "foreign_frames"] {
        assert_eq!(report[field], 0, "{field}: {report:#}");
    }
    let latency = &report["latency_ms"];
    assert_eq!(latency["samples"], 2000, "{report:#}");
    let (p50, p99, max) = (
        latency["p50"].as_f64().unwrap_or(-1.0),
        latency["p99"].as_f64().unwrap_or(-1.0),
        latency["max"].as_f64().unwrap_or(-1.0),
    );
    assert!(0.0 < p50 && p50 <= p99 && p99 <= max, "{latency}");
    assert!(report["deliveries_per_second"].as_f64().unwrap_or(0.0) > 0.0);
}

#[tokio::test]
async fn loadgen_over_http_is_lossless() {
    let app = spawn_app().await;
    let report = run_loadgen(&app, "http").await;
    assert_lossless_report(&report, "http");
}

#[tokio::test]
async fn loadgen_over_redis_is_lossless() {
    let app = spawn_app().await;
    let report = run_loadgen(&app, "redis").await;
    assert_lossless_report(&report, "redis");
    assert_eq!(report["publish_no_receivers"], 0, "{report:#}");
}
