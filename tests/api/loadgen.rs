//! Smoke test of `relay-loadgen` (the binary, as CI and people run it) against a test instance:
//! 50 subscribers over 5 channels, 200 msg/s for 1 s, through the HTTP API and straight through
//! Redis, and nothing may be lost, duplicated or reordered.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use serde_json::Value;

use crate::helpers::{TestApp, redis_url, spawn_app};

/// The `relay-loadgen` binary. It is another package of the workspace (`loadgen/`), and cargo
/// sets `CARGO_BIN_EXE_<name>` only for the tested package's own binaries, so the first caller
/// builds it: `cargo build -p relay-loadgen` in this test binary's profile (a no-op when it is up
/// to date), the path taken from cargo's own report of the artifact.
fn loadgen_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(build_loadgen)
}

fn build_loadgen() -> PathBuf {
    // `<target>/<profile dir>/deps/api-…`; cargo names the `dev` profile's directory `debug`.
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile = match exe
        .parent()
        .and_then(Path::parent)
        .and_then(Path::file_name)
        .and_then(|name| name.to_str())
    {
        None | Some("debug") => "dev",
        Some(dir) => dir,
    };
    // The cargo running this test (`CARGO`), in the workspace, so the same toolchain, config and
    // target directory (`CARGO_TARGET_DIR` and the rest of cargo's own settings are inherited);
    // `--locked`: the lock file already covers the whole workspace.
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    command.args(["build", "--locked", "-p", "relay-loadgen", "--profile"]);
    command
        .arg(profile)
        .arg("--message-format=json-render-diagnostics");
    // Minus what cargo set for this test process about its own package: build scripts that track
    // such a variable (ring's track CARGO_MANIFEST_DIR and OUT_DIR) would otherwise run again, and
    // everything above them be rebuilt, each time this build and one from a shell alternate.
    for (name, _) in std::env::vars_os() {
        if let Some(name) = name.to_str().filter(|name| set_for_this_test(name)) {
            command.env_remove(name);
        }
    }
    let output = command.output().expect("run cargo");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{stderr}",
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|msg| {
            msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "relay-loadgen"
        })
        .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("{command:?} reported no relay-loadgen executable:\n{stderr}"))
}

/// The variables cargo sets for a test process that describe the tested package (as opposed to
/// cargo's own settings, `CARGO_HOME`, `CARGO_TARGET_DIR`, …, which the nested cargo keeps).
fn set_for_this_test(name: &str) -> bool {
    ["CARGO_PKG_", "CARGO_MANIFEST_", "CARGO_BIN_EXE_"]
        .iter()
        .any(|prefix| name.starts_with(prefix))
        || matches!(
            name,
            "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR"
        )
}

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
    // Built off the runtime, and with tokio's Command: the server under test runs on this
    // test's runtime and must keep serving while we wait.
    let bin = tokio::task::spawn_blocking(loadgen_bin)
        .await
        .expect("build relay-loadgen");
    let output = tokio::process::Command::new(bin)
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
