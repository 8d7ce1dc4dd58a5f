//! Process-level shutdown: the built binary, a real SIGTERM.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::helpers::{create_database, redis_url};

#[tokio::test]
async fn sigterm_turns_readiness_off_then_exits_zero_within_the_deadline() {
    let db = create_database().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_relay"))
        .arg("serve")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("APP__SERVER__PORT", "0")
        .env("APP__DATABASE__URL", &db.url)
        .env("APP__REDIS__URL", redis_url())
        .env("APP__LOG__FORMAT", "json")
        .env("APP__LOG__LEVEL", "info")
        .env("APP__SHUTDOWN__READINESS_GRACE", "1s")
        .env("APP__SHUTDOWN__DRAIN_TIMEOUT", "5s")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start relay");

    // Learn the bound port from the "listening" log line.
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && v["message"] == "listening"
            {
                let _ = tx.send(v["addr"].as_str().unwrap_or_default().to_owned());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("relay logs its address");
    let http = reqwest::Client::new();
    let readyz = format!("http://{addr}/readyz");
    let mut ready = false;
    for _ in 0..100 {
        if http
            .get(&readyz)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "relay became ready");

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let signalled = Instant::now();
    let res = http
        .get(&readyz)
        .send()
        .await
        .expect("still serving during the readiness grace");
    assert_eq!(res.status(), 503);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["shutting_down"], true);

    let deadline = Duration::from_secs(1 + 5 + 2);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            signalled.elapsed() < deadline,
            "relay did not exit within {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
