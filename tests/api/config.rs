use std::{collections::HashMap, path::PathBuf, process::Command};

use relay::config::{ConfigError, LoadOptions, Settings};

/// The shipped config for `app_env` plus these variables (also used by the auth tests).
pub fn load_env(app_env: &str, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    Settings::load(&LoadOptions {
        dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config"),
        app_env: app_env.to_owned(),
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
    })
}

/// The shipped config for `APP_ENV=local` plus these variables.
fn load(env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    load_env("local", env)
}

#[test]
fn shipped_configs_load() {
    assert!(load(&[]).is_ok());
    for app_env in ["local", "production"] {
        load_env(app_env, &[]).unwrap_or_else(|e| panic!("{app_env}: {e}"));
    }
}

#[test]
fn environment_overrides_files() {
    let s = load(&[
        ("APP__SERVER__PORT", "9001"),
        ("APP__SHUTDOWN__DRAIN_TIMEOUT", "7s"),
    ])
    .unwrap();
    assert_eq!(s.server.port, 9001);
    assert_eq!(s.shutdown.drain_timeout, std::time::Duration::from_secs(7));
}

#[test]
fn list_variables_accept_spaces_and_empty() {
    let s = load(&[
        ("APP__ACCESS_LOG__SINKS", "file, postgres"),
        ("APP__HTTP__CORS_ALLOWED_ORIGINS", ""),
        ("APP__DATABASE__URL", "postgres://localhost/relay"),
    ])
    .unwrap();
    assert_eq!(s.access_log.sinks.len(), 2);
    assert!(s.http.cors_allowed_origins.is_empty());
    let s = load(&[("APP__ACCESS_LOG__SINKS", "")]).unwrap();
    assert!(s.access_log.sinks.is_empty());
    assert!(load(&[("APP__ACCESS_LOG__SINKS", "stdout,syslog")]).is_err());
}

#[test]
fn local_runs_embedded_and_production_refuses_to() {
    let local = load_env("local", &[]).unwrap();
    assert!(local.is_embedded());
    assert!(local.database.url.is_empty() && local.redis.url.is_empty());
    let full = load_env(
        "local",
        &[
            ("APP__DATABASE__URL", "postgres://db/relay"),
            ("APP__REDIS__URL", "redis://r:6379"),
        ],
    )
    .unwrap();
    assert!(!full.is_embedded());

    let err = load_env("production", &[("APP__DATABASE__URL", "")])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("database.url") && err.contains("allow_embedded"),
        "{err}"
    );
    let err = load_env("production", &[("APP__REDIS__URL", "")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("redis.url"), "{err}");
    let allowed = load_env(
        "production",
        &[
            ("APP__REDIS__URL", ""),
            ("APP__SERVER__ALLOW_EMBEDDED", "true"),
        ],
    )
    .unwrap();
    assert!(allowed.is_embedded());
    // TLS without certificate verification is a development switch only.
    let insecure = [("APP__REDIS__URL", "rediss://r:6380/#insecure")];
    assert!(load_env("local", &insecure).is_ok());
    let err = load_env("production", &insecure).unwrap_err().to_string();
    assert!(
        err.contains("redis.url") && err.contains("#insecure"),
        "{err}"
    );
    // The Postgres access-log sink needs Postgres.
    let err = load_env("local", &[("APP__ACCESS_LOG__SINKS", "postgres")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("access_log.sinks"), "{err}");
}

#[test]
fn redis_tls_ca_file_is_optional_and_only_for_verified_rediss() {
    use relay::config::RedisTls;
    let s = load(&[]).unwrap();
    assert_eq!(s.redis.tls_ca_file, None, "unset by default");
    assert_eq!(s.redis.tls(), RedisTls::Off);
    let s = load(&[
        ("APP__REDIS__URL", "rediss://cache.example.com:6380"),
        ("APP__REDIS__TLS_CA_FILE", "/etc/relay/redis-ca.pem"),
    ])
    .unwrap();
    assert_eq!(s.redis.tls(), RedisTls::Verified);
    assert_eq!(
        s.redis.tls_ca_file.as_deref(),
        Some(std::path::Path::new("/etc/relay/redis-ca.pem"))
    );
    // An empty variable unsets it.
    let s = load(&[
        ("APP__REDIS__URL", "rediss://cache.example.com:6380"),
        ("APP__REDIS__TLS_CA_FILE", ""),
    ])
    .unwrap();
    assert_eq!(s.redis.tls_ca_file, None);
    let insecure = load(&[(
        "APP__REDIS__URL",
        "rediss://cache.example.com:6380/#insecure",
    )])
    .unwrap();
    assert_eq!(insecure.redis.tls(), RedisTls::Unverified);
    // A CA that would verify nothing is a mistake, not a no-op.
    for url in [
        "redis://cache.example.com:6379",
        "rediss://cache.example.com:6380/#insecure",
        "",
    ] {
        let err = load(&[
            ("APP__REDIS__URL", url),
            ("APP__REDIS__TLS_CA_FILE", "/etc/relay/redis-ca.pem"),
        ])
        .expect_err(url)
        .to_string();
        assert!(err.contains("redis.tls_ca_file"), "{url}: {err}");
    }
}

#[test]
fn invalid_values_name_the_key() {
    let cases: &[(&str, &str, &str)] = &[
        ("APP__SERVER__PORT", "99999", "server.port"),
        ("APP__SERVER__HOST", "not an ip", "server.host"),
        ("APP__DATABASE__URL", "mysql://x", "database.url"),
        ("APP__REDIS__URL", "::::", "redis.url"),
        (
            "APP__SHUTDOWN__DRAIN_TIMEOUT",
            "soon",
            "shutdown.drain_timeout",
        ),
        (
            "APP__DATABASE__MAX_CONNECTIONS",
            "0",
            "database.max_connections",
        ),
        ("APP__LOG__FORMAT", "xml", "log.format"),
        ("APP__WS__IDLE_TIMEOUT", "1s", "ws.idle_timeout"),
        (
            "APP__TELEMETRY__SAMPLING_RATIO",
            "2",
            "telemetry.sampling_ratio",
        ),
        (
            "APP__ACCESS_LOG__TRUSTED_PROXIES",
            "10.0.0.0/8,nonsense",
            "access_log.trusted_proxies",
        ),
        ("APP__SERVER__ADMIN_PORT", "8080", "server.admin_port"),
        // A misspelt key is an error, not a silently ignored default.
        ("APP__SERVER__PROT", "1", "prot"),
    ];
    for (key, value, expected) in cases {
        let err = load(&[(key, value)]).expect_err(key).to_string();
        assert!(
            err.contains(expected),
            "{key}={value}: `{err}` should name `{expected}`"
        );
    }
}

#[test]
fn check_config_command_redacts_secrets_and_fails_on_bad_config() {
    let bin = env!("CARGO_BIN_EXE_relay");
    let ok = Command::new(bin)
        .arg("check-config")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("APP__DATABASE__URL", "postgres://app:hunter2@db:5432/relay")
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert!(
        stdout.contains("postgres://app:***@db:5432/relay"),
        "{stdout}"
    );
    assert!(!stdout.contains("hunter2"));

    let bad = Command::new(bin)
        .arg("check-config")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("APP__SERVER__PORT", "http")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("server.port"), "{stderr}");
}
