//! TLS to Redis (`rediss://`) and Postgres (`sslmode=`), against real local servers that speak
//! only TLS: a private `redis-server` with just a TLS port, and a private Postgres cluster with
//! `ssl=on` whose `pg_hba.conf` rejects plaintext. Each test makes a throwaway CA and a server
//! certificate for `localhost`/`127.0.0.1` with the `openssl` CLI, so verification is real: the
//! CA is in no trust store, and without it configured the connection must be refused.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use relay::{
    app::Application,
    config::{SecretUrl, Settings},
};
use serde_json::{Value, json};

use crate::{
    helpers::{TestApp, base_settings, spawn_app_unready, spawn_app_with},
    services::{self, unused_port},
};

/// Run `command`, panicking with its output if it fails: a missing tool must fail the test
/// loudly, never skip it.
fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "relay-test-{what}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&path).expect("create a temp dir");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A throwaway CA and a server certificate it signed for `localhost` and `127.0.0.1` (P-256
/// keys: quick to make).
struct TestCa {
    dir: TempDir,
}

impl TestCa {
    fn generate() -> Self {
        let dir = TempDir::new("ca");
        let openssl = |args: &[&str]| {
            run(Command::new("openssl").args(args).current_dir(&dir.0));
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        openssl(
            &[
                &["req", "-x509"][..],
                &ec,
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
                &["-subj", "/CN=relay test CA"],
                &["-addext", "basicConstraints=critical,CA:TRUE"],
                &["-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ]
            .concat(),
        );
        openssl(
            &[
                &["req", "-new"][..],
                &ec,
                &["-keyout", "server.key", "-out", "server.csr"],
                &["-subj", "/CN=localhost"],
            ]
            .concat(),
        );
        std::fs::write(
            dir.0.join("server.ext"),
            "basicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature\n\
             extendedKeyUsage = serverAuth\n\
             subjectAltName = DNS:localhost, IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ]);
        Self { dir }
    }

    fn ca_pem(&self) -> PathBuf {
        self.dir.0.join("ca.pem")
    }

    fn server_pem(&self) -> PathBuf {
        self.dir.0.join("server.pem")
    }

    fn server_key(&self) -> PathBuf {
        self.dir.0.join("server.key")
    }
}

/// A private `redis-server` listening only on a TLS port, with the test CA's server certificate.
struct TlsRedis {
    port: u16,
    child: Child,
}

impl TlsRedis {
    async fn start(ca: &TestCa) -> Self {
        let port = unused_port();
        let path = |p: PathBuf| p.to_str().expect("a UTF-8 temp path").to_owned();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1"])
            .args(["--tls-port", &port.to_string()])
            .args(["--tls-cert-file", &path(ca.server_pem())])
            .args(["--tls-key-file", &path(ca.server_key())])
            .args(["--tls-ca-cert-file", &path(ca.ca_pem())])
            .args([
                "--tls-auth-clients",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed (see README: Test)");
        let redis = Self { port, child };
        redis.wait_up(ca).await;
        redis
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    /// A client of the test's own that trusts the test CA.
    fn client(&self, ca: &TestCa) -> redis::Client {
        relay::tls::install_crypto_provider();
        let certificates = redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(std::fs::read(ca.ca_pem()).unwrap()),
        };
        redis::Client::build_with_tls(self.url(), certificates).unwrap()
    }

    async fn wait_up(&self, ca: &TestCa) {
        if crate::helpers::answers_ping(&self.client(ca)).await {
            return;
        }
        panic!(
            "redis-server did not answer over TLS on port {}: is it built with TLS support?",
            self.port
        );
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private Postgres cluster on an unused port of 127.0.0.1 and 127.0.0.2 with `ssl=on`;
/// `pg_hba.conf` accepts TCP only over TLS (`hostssl`) and rejects everything else. Stopped and
/// deleted on drop.
struct TlsPostgres {
    port: u16,
    dir: TempDir,
    bin: PathBuf,
    as_root: bool,
}

impl TlsPostgres {
    fn start(ca: &TestCa) -> Self {
        let dir = TempDir::new("pg");
        let bin = services::postgres_bin().unwrap_or_else(|why| panic!("{why}"));
        let as_root = services::running_as_root();
        let pg = Self {
            port: unused_port(),
            dir,
            bin,
            as_root,
        };
        // The server reads its key as the postgres user and refuses one others can read.
        std::fs::copy(ca.server_pem(), pg.dir.0.join("server.pem")).unwrap();
        std::fs::copy(ca.server_key(), pg.dir.0.join("server.key")).unwrap();
        run(Command::new("chmod")
            .arg("600")
            .arg(pg.dir.0.join("server.key")));
        if as_root {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&pg.dir.0));
        }
        let data = pg.data();
        run(pg.tool("initdb").arg("-D").arg(&data).args([
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        ]));
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all all 127.0.0.0/8 trust\n\
             host all all all reject\n",
        )
        .unwrap();
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1,127.0.0.2 -c unix_socket_directories={dir} \
             -c ssl=on -c ssl_cert_file={dir}/server.pem -c ssl_key_file={dir}/server.key \
             -c fsync=off",
            port = pg.port,
            dir = pg.dir.0.display(),
        );
        run(pg
            .tool("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(pg.dir.0.join("server.log"))
            .args(["-w", "-t", "20", "-o", &options, "start"]));
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.0.join("data")
    }

    /// `bin/<name>`, run as `postgres` when the tests run as root.
    fn tool(&self, name: &str) -> Command {
        services::postgres_tool(&self.bin, name, self.as_root)
    }

    /// A URL for the `postgres` database over TCP with this query string.
    fn url(&self, query: &str) -> SecretUrl {
        SecretUrl::new(format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{query}",
            self.port
        ))
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Build the app and return why startup failed (Postgres gets 500 ms, not the default 30 s).
async fn startup_error(customise: impl FnOnce(&mut Settings)) -> String {
    let mut settings = base_settings();
    settings.database.connect_timeout = Duration::from_millis(500);
    customise(&mut settings);
    match Application::build(settings).await {
        Ok(_) => panic!("startup succeeded"),
        Err(err) => err.to_string(),
    }
}

async fn history(app: &TestApp, channel: &str) -> Vec<Value> {
    let page: Value = app
        .get(&format!("/api/v1/channels/{channel}/messages"))
        .await
        .json()
        .await
        .unwrap();
    page["messages"].as_array().unwrap().clone()
}

#[tokio::test]
async fn rediss_with_the_ca_file_carries_publishes_and_deliveries() {
    let ca = TestCa::generate();
    let redis = TlsRedis::start(&ca).await;
    let app = spawn_app_with(|s| {
        s.redis.url = SecretUrl::new(redis.url());
        s.redis.tls_ca_file = Some(ca.ca_pem());
    })
    .await;
    let mut ws = app.subscribed_ws(&["secure"]).await;
    let id = app.publish("secure", json!({"over": "tls"})).await;
    assert_eq!(
        ws.recv_json().await,
        json!({"type": "message", "channel": "secure", "data": {"over": "tls"}, "id": id})
    );
    // Straight from the TLS server: the subscription itself lives there.
    let mut conn = redis
        .client(&ca)
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let receivers: i64 = redis::cmd("PUBLISH")
        .arg(format!("{}secure", app.settings.redis.channel_prefix))
        .arg(r#"{"data":"from the TLS server"}"#)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(receivers, 1);
    assert_eq!(
        ws.recv_json().await,
        json!({"type": "message", "channel": "secure", "data": "from the TLS server", "id": null})
    );
}

#[tokio::test]
async fn rediss_without_the_ca_file_refuses_the_unknown_certificate() {
    let ca = TestCa::generate();
    let redis = TlsRedis::start(&ca).await;
    // The built-in roots do not know the test CA: Redis is unreachable as far as relay goes,
    // which (as for any Redis outage) means running but not ready.
    let app = spawn_app_unready(|s| s.redis.url = SecretUrl::new(redis.url())).await;
    let started = Instant::now();
    let err = app.pubsub.ping().await.unwrap_err().to_string();
    assert!(
        err.contains("certificate") && err.contains("UnknownIssuer"),
        "not a certificate error: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(1), "no hang");
    for _ in 0..10 {
        let res = app.get("/readyz").await;
        assert_eq!(res.status(), 503);
        let body: Value = res.json().await.unwrap();
        assert_eq!(body["checks"]["redis"]["error"], "error", "{body}");
        assert_eq!(
            body["checks"]["pubsub_listener"]["status"], "fail",
            "{body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A CA file that cannot be read stops startup, naming the key and the path.
    let err = startup_error(|s| {
        s.database.url = SecretUrl::new("");
        s.redis.url = SecretUrl::new(redis.url());
        s.redis.tls_ca_file = Some(PathBuf::from("/nonexistent/relay-ca.pem"));
    })
    .await;
    assert!(
        err.contains("redis.tls_ca_file") && err.contains("/nonexistent/relay-ca.pem"),
        "{err}"
    );
    // So does one without a certificate in it (here: a private key).
    let err = startup_error(|s| {
        s.database.url = SecretUrl::new("");
        s.redis.url = SecretUrl::new(redis.url());
        s.redis.tls_ca_file = Some(ca.server_key());
    })
    .await;
    assert!(err.contains("no PEM certificate"), "{err}");
}

#[tokio::test]
async fn rediss_insecure_still_skips_verification_as_the_crate_documents() {
    let ca = TestCa::generate();
    let redis = TlsRedis::start(&ca).await;
    // `#insecure` is the redis crate's switch; relay keeps it (and warns at startup).
    let app =
        spawn_app_with(|s| s.redis.url = SecretUrl::new(format!("{}/#insecure", redis.url())))
            .await;
    let mut ws = app.subscribed_ws(&["lax"]).await;
    let id = app.publish("lax", json!(1)).await;
    assert_eq!(ws.expect_type("message").await["id"], id);
}

#[tokio::test]
async fn postgres_sslmode_require_and_verify_full_connect_over_tls() {
    let ca = TestCa::generate();
    let pg = TlsPostgres::start(&ca);

    // `require`: encrypted (the certificate is not checked, as in libpq).
    let app = spawn_app_with(|s| s.database.url = pg.url("sslmode=require")).await;
    let pool = app.store.pool().expect("a Postgres store").clone();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl, "the pool's connection is not encrypted");
    let migrated: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(migrated > 0, "startup ran the migrations");
    assert_eq!(app.publish("vault", json!({"n": 1})).await, 1);
    let messages = history(&app, "vault").await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["data"], json!({"n": 1}));
    drop(app);

    // `verify-full` with the test CA as `sslrootcert`: certificate and host name verified.
    let ca_file = ca.ca_pem();
    let url = pg.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        ca_file.display()
    ));
    let app = spawn_app_with(|s| s.database.url = url).await;
    assert_eq!(app.publish("vault", json!({"n": 2})).await, 2);
    let ids: Vec<i64> = history(&app, "vault")
        .await
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2]);
}

#[tokio::test]
async fn postgres_refuses_plaintext_and_unverified_certificates() {
    let ca = TestCa::generate();
    let pg = TlsPostgres::start(&ca);

    // Plaintext: the server's pg_hba.conf rejects it, and startup says so.
    let err = startup_error(|s| s.database.url = pg.url("sslmode=disable")).await;
    assert!(
        err.contains("pg_hba.conf rejects connection") && err.contains("no encryption"),
        "{err}"
    );
    // `verify-full` without the CA: the built-in roots do not know it.
    let err = startup_error(|s| s.database.url = pg.url("sslmode=verify-full")).await;
    assert!(err.contains("UnknownIssuer"), "{err}");
    // Another address of the same server under `verify-full`: the certificate names
    // localhost and 127.0.0.1 only.
    let ca_file = ca.ca_pem();
    let err = startup_error(|s| {
        s.database.url = SecretUrl::new(format!(
            "postgres://postgres@127.0.0.2:{}/postgres?sslmode=verify-full&sslrootcert={}",
            pg.port,
            ca_file.display()
        ))
    })
    .await;
    assert!(err.contains("not valid for name \"127.0.0.2\""), "{err}");
    // An `sslrootcert` that does not exist stops startup at once, not after the retries.
    let started = Instant::now();
    let err = startup_error(|s| {
        s.database.connect_timeout = Duration::from_secs(30);
        s.database.url = pg.url("sslmode=verify-full&sslrootcert=/nonexistent/root.pem");
    })
    .await;
    assert!(
        err.contains("sslrootcert") && err.contains("/nonexistent/root.pem"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
}
