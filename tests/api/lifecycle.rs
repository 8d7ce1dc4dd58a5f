//! Process-level shutdown: the built binary, a real SIGTERM.

use std::time::{Duration, Instant};

use crate::helpers::{RelayProcess, create_database};

#[tokio::test]
async fn sigterm_turns_readiness_off_then_exits_zero_within_the_deadline() {
    let db = create_database().await;
    let mut relay = RelayProcess::start(&[
        ("APP__DATABASE__URL", db.url.clone()),
        ("APP__SHUTDOWN__READINESS_GRACE", "1s".into()),
        ("APP__SHUTDOWN__DRAIN_TIMEOUT", "5s".into()),
    ]);
    relay.wait_ready().await;
    let readyz = format!("http://{}/readyz", relay.addr);

    relay.terminate();
    let signalled = Instant::now();
    let res = reqwest::get(&readyz)
        .await
        .expect("still serving during the readiness grace");
    assert_eq!(res.status(), 503);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["shutting_down"], true);

    // readiness grace + drain deadline + flush, with a margin for process start-up noise.
    let status = relay.wait_exit(Duration::from_secs(1 + 5 + 5 + 2)).await;
    assert!(status.success(), "exit status {status}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(1),
        "the readiness grace was honoured"
    );
}
