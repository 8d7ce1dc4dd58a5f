//! The demo page at `/`: its HTTP contract (headers, caching, switch-off) over plain HTTP, and
//! its behaviour in a real browser: headless Chromium driven through WebDriver (fantoccini +
//! chromedriver) against the real service, including a server restart the page must recover
//! from without losing a message.
//!
//! The browser test needs Debian's `chromium` and `chromium-driver` (`.ci/install-browser.sh`).
//! Without them it fails, saying so: a demo nobody has seen working is not tested.

use std::{
    io::Write,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use fantoccini::{Client, ClientBuilder, Locator, key::Key};
use reqwest::header;
use serde_json::{Value, json};

use crate::helpers::{base_settings, spawn_app, spawn_app_with};

const INSTALL_HINT: &str = "the demo browser test needs Chromium and its WebDriver: run \
`.ci/install-browser.sh` (as root; it runs `apt-get install chromium chromium-driver`), or set \
CHROME_BIN and CHROMEDRIVER to existing binaries";

/// Long enough for a reconnect after a few backoff rounds on a busy 2-core CI machine.
const UI_TIMEOUT: Duration = Duration::from_secs(20);

const CHANNEL: &str = "demo-news";

// ---- HTTP contract (no browser) ---------------------------------------------------------------

#[tokio::test]
async fn demo_page_is_served_with_strict_security_and_cache_headers() {
    let app = spawn_app().await;

    let res = app.get("/").await;
    assert_eq!(res.status(), 200);
    let headers = res.headers().clone();
    let text = |name: header::HeaderName| {
        headers
            .get(&name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_else(|| panic!("missing {name}"))
            .to_owned()
    };
    assert_eq!(text(header::CONTENT_TYPE), "text/html; charset=utf-8");
    assert_eq!(text(header::CACHE_CONTROL), "no-cache");
    assert_eq!(text(header::X_CONTENT_TYPE_OPTIONS), "nosniff");
    let csp = text(header::CONTENT_SECURITY_POLICY);
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "CSP `{csp}` lacks `{directive}`");
    }
    assert!(
        !csp.contains("unsafe"),
        "CSP `{csp}` must not allow unsafe-*"
    );
    let etag = text(header::ETAG);
    let html = res.text().await.expect("body");
    assert!(html.contains("<title>relay · live demo</title>"));

    // Revalidation is a 304 without a body.
    let res = app
        .http
        .get(app.url("/"))
        .header(header::IF_NONE_MATCH, &etag)
        .send()
        .await
        .expect("request");
    assert_eq!(res.status(), 304);

    // The page names its assets by content version: those URLs may be cached for good.
    let script_url = asset_url(&html, "/demo/app.js?v=");
    let style_url = asset_url(&html, "/demo/app.css?v=");
    for (url, content_type) in [
        (script_url.as_str(), "text/javascript; charset=utf-8"),
        (style_url.as_str(), "text/css; charset=utf-8"),
    ] {
        let res = app.get(url).await;
        assert_eq!(res.status(), 200, "{url}");
        assert_eq!(res.headers()[header::CONTENT_TYPE], content_type, "{url}");
        assert_eq!(
            res.headers()[header::CACHE_CONTROL],
            "public, max-age=31536000, immutable",
            "{url}"
        );
    }
    // An unversioned (or stale) URL must not be pinned in caches.
    let res = app.get("/demo/app.js").await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()[header::CACHE_CONTROL], "no-cache");
}

#[tokio::test]
async fn demo_page_switched_off_is_a_json_404() {
    let app = spawn_app_with(|s| s.demo.enabled = false).await;
    for path in ["/", "/demo/app.js", "/demo/app.css"] {
        let res = app.get(path).await;
        assert_eq!(res.status(), 404, "{path}");
        let body: Value = res.json().await.expect("JSON error body");
        assert_eq!(body["error"]["code"], "not_found", "{path}: {body}");
    }
}

#[test]
fn demo_is_on_by_default_and_off_in_production() {
    assert!(
        base_settings().demo.enabled,
        "local config enables the demo"
    );
    let production = relay::config::Settings::load(&relay::config::LoadOptions {
        dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config"),
        app_env: "production".to_owned(),
        env: Default::default(),
    })
    .expect("production config loads");
    assert!(
        !production.demo.enabled,
        "production must not serve the demo"
    );
}

fn asset_url(html: &str, prefix: &str) -> String {
    let start = html
        .find(prefix)
        .unwrap_or_else(|| panic!("page does not reference {prefix}…"));
    let end = html[start..]
        .find('"')
        .map(|n| start + n)
        .expect("attribute ends");
    html[start..end].to_owned()
}

// ---- real browser -----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_page_delivers_live_and_recovers_after_a_server_restart_in_a_browser() {
    let started = Instant::now();
    let Some(tools) = BrowserTools::find() else {
        return;
    };
    let app = spawn_app().await;
    let browser = Browser::start(&tools).await;
    let page = browser.client();

    page.goto(&app.url("/")).await.expect("open the demo page");
    browser
        .wait_until(
            "the page connects",
            "return document.getElementById('status').dataset.state === 'connected'",
        )
        .await;
    // Scripts and styles loaded under the strict CSP (Trusted Types included).
    let radius = browser
        .eval("return getComputedStyle(document.querySelector('.panel')).borderTopLeftRadius")
        .await;
    assert_eq!(radius, "12px", "the stylesheet did not apply");

    // Subscribe through the UI with the keyboard: type the name, press Enter.
    browser
        .type_into("subscribe-channel", &format!("{CHANNEL}{}", Key::Enter))
        .await;
    browser
        .wait_until(
            "the channel is live",
            &format!("return document.querySelector('#channels li[data-channel=\"{CHANNEL}\"][data-state=\"live\"]') !== null"),
        )
        .await;
    let first_tab = page.window().await.expect("window handle");

    // Publish from a second tab, after the page rejected invalid JSON without sending it.
    let second_tab = page.new_window(true).await.expect("open a tab");
    page.switch_to_window(second_tab.handle)
        .await
        .expect("switch tab");
    page.goto(&app.url("/")).await.expect("open the page again");
    browser.type_into("publish-channel", CHANNEL).await;
    browser.type_into("publish-data", "{oops").await;
    browser.click("publish-button").await;
    browser
        .wait_until(
            "the page flags invalid JSON",
            "const e = document.getElementById('publish-data-error'); \
             return !e.hidden && e.textContent.startsWith('Not valid JSON') && \
             document.getElementById('publish-data').getAttribute('aria-invalid') === 'true'",
        )
        .await;
    browser
        .type_into("publish-data", r#"{"text": "hello from the second tab"}"#)
        .await;
    browser.click("publish-button").await;
    browser
        .wait_until(
            "the second tab's publish is acknowledged",
            &format!("return document.getElementById('publish-result').textContent === 'Published #1 to {CHANNEL}'"),
        )
        .await;
    page.close_window().await.expect("close the second tab");
    page.switch_to_window(first_tab)
        .await
        .expect("back to the first tab");

    // And from the HTTP API.
    let id = app
        .publish(CHANNEL, json!({"text": "hello from the HTTP API"}))
        .await;
    assert_eq!(id, 2);
    browser.wait_for_message(2).await;
    let shown = browser.messages().await;
    assert_eq!(
        shown,
        vec![
            (
                1,
                false,
                r#"{"text":"hello from the second tab"}"#.to_owned()
            ),
            (2, false, r#"{"text":"hello from the HTTP API"}"#.to_owned()),
        ]
    );

    // Kill the page's server. While nothing listens on its port, publish through another
    // replica of the same deployment: the page cannot see these live.
    let mut publisher = app.spawn_replica().await;
    let stopped = app.shutdown_keeping_data().await;
    browser
        .wait_until(
            "the page notices the server went away",
            "return document.getElementById('status').dataset.state !== 'connected'",
        )
        .await;
    for n in 3..=5 {
        let id = publisher
            .publish(
                CHANNEL,
                json!({"text": format!("sent while you were away ({n})")}),
            )
            .await;
        assert_eq!(id, n);
    }
    publisher.shutdown().await;

    // Same port, same database: the page reconnects on its own and resumes with `since`.
    let app = stopped.restart().await;
    browser.wait_for_message(5).await;
    let recovered_note = browser
        .eval(&format!(
            "const n = document.querySelector('#log li[data-kind=\"recovered\"][data-channel=\"{CHANNEL}\"]'); \
             return n ? n.textContent : ''"
        ))
        .await;
    assert!(
        recovered_note
            .as_str()
            .is_some_and(|t| t.contains("recovered 3 missed messages (#3–#5). Nothing was lost.")),
        "no recovery notice in the page: {recovered_note}"
    );
    // Live delivery continues after the replay.
    app.publish(CHANNEL, json!({"text": "live again", "after": "restart"}))
        .await;
    browser.wait_for_message(6).await;

    let shown = browser.messages().await;
    let ids: Vec<i64> = shown.iter().map(|m| m.0).collect();
    assert_eq!(ids, [1, 2, 3, 4, 5, 6], "every message once, in order");
    let recovered: Vec<i64> = shown.iter().filter(|m| m.1).map(|m| m.0).collect();
    assert_eq!(
        recovered,
        [3, 4, 5],
        "exactly the missed ones are marked recovered"
    );
    assert_eq!(shown[2].2, r#"{"text":"sent while you were away (3)"}"#);

    let desktop = browser.save_screenshot("demo.png").await;
    println!("demo screenshot: {}", desktop.display());
    page.set_window_size(390, 844).await.expect("phone width");
    browser
        .eval("document.querySelector('.panel-log').scrollIntoView(); return null")
        .await;
    let phone = browser.save_screenshot("demo-phone.png").await;
    println!("demo screenshot (phone width): {}", phone.display());

    browser.close().await;
    println!(
        "browser test finished in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

/// Chromium and chromedriver on this machine. Without them the test is skipped with a message
/// saying how to install them, unless `RELAY_REQUIRE_BROWSER=1` (CI sets it): then it fails, so
/// CI can never pass without having run it.
struct BrowserTools {
    chrome: PathBuf,
    chromedriver: PathBuf,
}

impl BrowserTools {
    fn find() -> Option<Self> {
        let find = |var: &str, names: &[&str]| {
            if let Some(path) = std::env::var_os(var) {
                let path = PathBuf::from(path);
                return path
                    .is_file()
                    .then_some(path.clone())
                    .ok_or_else(|| format!("{var}={} does not exist", path.display()));
            }
            names
                .iter()
                .find_map(|name| on_path(name))
                .ok_or_else(|| format!("{} not found on PATH", names[0]))
        };
        let found = find(
            "CHROME_BIN",
            &["chromium", "chromium-browser", "google-chrome"],
        )
        .and_then(|chrome| Ok((chrome, find("CHROMEDRIVER", &["chromedriver"])?)));
        match found {
            Ok((chrome, chromedriver)) => Some(Self {
                chrome,
                chromedriver,
            }),
            Err(why) if browser_required() => panic!("{why}; {INSTALL_HINT}"),
            Err(why) => {
                // Past the harness's capture, so a passing run still shows the skip.
                let _ = writeln!(
                    std::io::stderr(),
                    "SKIPPED the browser test: {why}; {INSTALL_HINT}. Set \
                     RELAY_REQUIRE_BROWSER=1 to make this a failure (CI does)."
                );
                None
            }
        }
    }
}

fn browser_required() -> bool {
    std::env::var("RELAY_REQUIRE_BROWSER").is_ok_and(|v| v == "1")
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `target/artifacts/`, where the screenshots go (CI keeps them; the README shows one).
fn artifacts_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("artifacts")
}

/// A chromedriver process on a free port with one headless Chromium session. Dropping it kills
/// the driver's whole process group, so a failed test leaves no browser behind.
struct Browser {
    client: Option<Client>,
    driver: Child,
    profile: PathBuf,
    /// chromedriver's log: kept (and named) only when the test fails.
    log_path: PathBuf,
}

impl Browser {
    async fn start(tools: &BrowserTools) -> Self {
        let port = free_port();
        let log_path = std::env::temp_dir().join(format!("relay-chromedriver-{port}.log"));
        let driver = {
            use std::os::unix::process::CommandExt;
            Command::new(&tools.chromedriver)
                .arg(format!("--port={port}"))
                .arg(format!("--log-path={}", log_path.display()))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                // Its own process group: Chromium inherits it and dies with it in Drop.
                .process_group(0)
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                        "cannot start {}: {e}; {INSTALL_HINT}",
                        tools.chromedriver.display()
                    )
                })
        };
        let mut browser = Browser {
            client: None,
            driver,
            profile: std::env::temp_dir()
                .join(format!("relay-demo-chrome-{}", uuid::Uuid::new_v4())),
            log_path,
        };
        browser.wait_for_driver(port).await;
        let client = new_session(port, &tools.chrome, &browser.profile, &browser.log_path).await;
        client
            .set_window_size(1280, 940)
            .await
            .expect("window size");
        browser.client = Some(client);
        browser
    }

    /// Until chromedriver answers `/status` (it takes a moment to listen).
    async fn wait_for_driver(&mut self, port: u16) {
        let log_path = self.log_path.clone();
        let status_url = format!("http://127.0.0.1:{port}/status");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(exit)) = self.driver.try_wait() {
                panic!(
                    "chromedriver exited at start ({exit}); {INSTALL_HINT}\n{}",
                    log_tail(&log_path)
                );
            }
            if let Ok(res) = crate::helpers::http_client().get(&status_url).send().await
                && res.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not listen on port {port} within 20s\n{}",
                log_tail(&log_path)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("session started")
    }

    async fn eval(&self, script: &str) -> Value {
        self.client()
            .execute(script, vec![])
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Poll `condition` (a function body returning a boolean) until it holds.
    async fn wait_until(&self, what: &str, condition: &str) {
        let deadline = Instant::now() + UI_TIMEOUT;
        loop {
            if self.eval(condition).await == Value::Bool(true) {
                return;
            }
            if Instant::now() > deadline {
                let shot = self.save_screenshot("demo-failure.png").await;
                let status = self
                    .eval("return document.getElementById('status').textContent.trim()")
                    .await;
                let log = self
                    .eval("return document.getElementById('log').innerText")
                    .await;
                panic!(
                    "timed out after {UI_TIMEOUT:?} waiting until {what}\nstatus: {status}\n\
                     message log:\n{}\nscreenshot: {}",
                    log.as_str().unwrap_or_default(),
                    shot.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_for_message(&self, id: i64) {
        self.wait_until(
            &format!("message #{id} is shown"),
            &format!("return document.querySelector('#log li.message[data-id=\"{id}\"]') !== null"),
        )
        .await;
    }

    /// Every message shown in the log: (id, marked recovered, data as displayed).
    async fn messages(&self) -> Vec<(i64, bool, String)> {
        let rows = self
            .eval(
                "return [...document.querySelectorAll('#log li.message')].map(li => [\
                 Number(li.dataset.id), li.dataset.recovered === 'true', \
                 li.querySelector('.entry-data').textContent])",
            )
            .await;
        serde_json::from_value(rows).expect("rows of [id, recovered, data]")
    }

    /// Replace a field's content by typing, as a user would.
    async fn type_into(&self, id: &str, text: &str) {
        let field = self
            .client()
            .find(Locator::Id(id))
            .await
            .unwrap_or_else(|e| panic!("#{id}: {e}"));
        field.clear().await.expect("clear field");
        field.send_keys(text).await.expect("type");
    }

    async fn click(&self, id: &str) {
        self.client()
            .find(Locator::Id(id))
            .await
            .unwrap_or_else(|e| panic!("#{id}: {e}"))
            .click()
            .await
            .unwrap_or_else(|e| panic!("click #{id}: {e}"));
    }

    async fn save_screenshot(&self, name: &str) -> PathBuf {
        let png = self.client().screenshot().await.expect("screenshot");
        let dir = artifacts_dir();
        std::fs::create_dir_all(&dir).expect("create target/artifacts");
        let path = dir.join(name);
        std::fs::write(&path, png).expect("write screenshot");
        path
    }

    /// End the session (Chromium quits); Drop then stops chromedriver.
    async fn close(mut self) {
        if let Some(client) = self.client.take()
            && let Err(e) = client.close().await
        {
            eprintln!("closing the browser session: {e}");
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The negative pid addresses the process group created in `start`.
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.driver.id())])
            .status();
        let _ = self.driver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
        if std::thread::panicking() {
            eprintln!("chromedriver log: {}", self.log_path.display());
        } else {
            let _ = std::fs::remove_file(&self.log_path);
        }
    }
}

async fn new_session(port: u16, chrome: &Path, profile: &Path, log_path: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".to_owned(),
        json!({
            "binary": chrome,
            "args": [
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                // The machine has no internet: nothing may try to reach it.
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--hide-scrollbars",
                "--window-size=1280,940",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{port}"))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "chromedriver could not start Chromium: {e}\n{}",
                log_tail(log_path)
            )
        })
}

/// The end of chromedriver's log, for failure messages.
fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free local port")
}
