//! The command line: `relay [serve|migrate|check-config|healthcheck|openapi|token]`.

use std::{process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};

use crate::{
    app::{Application, StartupError},
    auth::{Authenticator, ChannelClaims},
    config::{LoadOptions, Settings},
    lifecycle::shutdown_signal,
    store, telemetry,
};

#[derive(Debug, Parser)]
#[command(
    name = "relay",
    version,
    about = "Realtime fan-out service: Redis pub/sub to WebSocket and SSE"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Load and validate configuration, print it with secrets redacted, and exit.
    CheckConfig,
    /// Print the OpenAPI document of the HTTP API (the one served at /api-docs/openapi.json).
    Openapi,
    /// Print a signed HS256 token (with auth.hs256_secret) for development and tests.
    Token {
        /// The `sub` claim.
        #[arg(long)]
        sub: String,
        /// Channel (or `prefix*`) the token may subscribe to; repeat for more.
        #[arg(long)]
        subscribe: Vec<String>,
        /// Channel (or `prefix*`) the token may publish on; repeat for more.
        #[arg(long)]
        publish: Vec<String>,
        /// Channel (or `prefix*`) whose history the token may read; repeat for more.
        #[arg(long)]
        history: Vec<String>,
        /// Lifetime, e.g. `1h`, `15m`.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Add the `admin` claim: the token may manage webhooks (`/api/v1/webhooks`).
        #[arg(long)]
        admin: bool,
    },
    /// GET the service's own /readyz; exit 0 when ready, 1 otherwise.
    Healthcheck {
        /// URL to check instead of http://127.0.0.1:{server.port}/readyz.
        #[arg(long)]
        url: Option<String>,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

/// Parse arguments, load configuration and run the chosen command.
pub fn main() -> ExitCode {
    // Before any TLS client exists: the webhook, healthcheck and trace-export HTTP clients and
    // Redis all take the process's rustls provider (see crate::tls).
    crate::tls::install_crypto_provider();
    let cli = Cli::parse();
    let settings = match Settings::load(&LoadOptions::from_process_env()) {
        Ok(settings) => settings,
        Err(err) => {
            eprintln!("relay: invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => check_config(&settings),
        Command::Token {
            sub,
            subscribe,
            publish,
            history,
            ttl,
            admin,
        } => {
            let channels = crate::auth::ChannelClaims {
                subscribe,
                publish,
                history,
            };
            token(&settings, &sub, channels, admin, ttl)
        }
        Command::Openapi => match crate::http::openapi(&(&settings).into()).to_pretty_json() {
            Ok(json) => {
                println!("{json}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("relay: cannot render the OpenAPI document: {err}");
                ExitCode::FAILURE
            }
        },
        Command::Healthcheck { url, timeout } => {
            runtime(1).block_on(healthcheck(&settings, url, timeout))
        }
        Command::Migrate => with_telemetry(settings, migrate),
        Command::Serve => with_telemetry(settings, serve),
    }
}

fn runtime(worker_threads: usize) -> tokio::runtime::Runtime {
    let mut builder = if worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    // A runtime that cannot start is an unrecoverable environment problem.
    builder
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime")
}

/// Run `command` on a multi-threaded runtime with logging (and trace export) installed, then
/// flush the trace exporter within `shutdown.flush_timeout`.
fn with_telemetry<F, Fut>(settings: Settings, command: F) -> ExitCode
where
    F: FnOnce(Settings) -> Fut,
    Fut: Future<Output = ExitCode>,
{
    let rt = runtime(0);
    // Inside the runtime: the gRPC exporter needs it.
    let telemetry = match rt.block_on(async { telemetry::init(&settings) }) {
        Ok(telemetry) => telemetry,
        Err(err) => {
            eprintln!("relay: {err}");
            return ExitCode::FAILURE;
        }
    };
    let flush_timeout = settings.shutdown.flush_timeout;
    let code = rt.block_on(command(settings));
    // Flushing blocks; do it where blocking is allowed but the runtime is still around.
    let flushing = rt.spawn_blocking(move || telemetry.shutdown(flush_timeout));
    let _ = rt.block_on(flushing);
    code
}

fn check_config(settings: &Settings) -> ExitCode {
    // The key files are part of the configuration: refuse what startup would refuse.
    if let Err(err) = Authenticator::from_settings(&settings.auth) {
        eprintln!("relay: invalid configuration: {err}");
        return ExitCode::from(2);
    }
    // So are the configured webhooks (URLs, patterns, secrets, allowed hosts).
    if let Err(err) = crate::webhooks::configured(settings) {
        eprintln!("relay: invalid configuration: {err}");
        return ExitCode::from(2);
    }
    // So are the CA files.
    if let Some(path) = &settings.redis.tls_ca_file
        && let Err(err) = crate::tls::read_ca_pem(path)
    {
        eprintln!("relay: invalid configuration: redis.tls_ca_file: {err}");
        return ExitCode::from(2);
    }
    if !settings.database.url.is_empty()
        && let Err(err) = store::connect_options(&settings.database)
    {
        eprintln!("relay: invalid configuration: {err}");
        return ExitCode::from(2);
    }
    match serde_json::to_string_pretty(settings) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("relay: cannot print configuration: {err}");
            ExitCode::FAILURE
        }
    }
}

fn token(
    settings: &Settings,
    sub: &str,
    channels: ChannelClaims,
    admin: bool,
    ttl: Duration,
) -> ExitCode {
    // Refuse bad patterns here rather than mint a token every server would reject.
    if let Err(err) = crate::auth::Permissions::from_claims(&channels) {
        eprintln!("relay token: {err}");
        return ExitCode::from(2);
    }
    if sub.is_empty() {
        eprintln!("relay token: --sub must not be empty");
        return ExitCode::from(2);
    }
    let auth = match Authenticator::from_settings(&settings.auth) {
        Ok(auth) => auth,
        Err(err) => {
            eprintln!("relay: invalid configuration: {err}");
            return ExitCode::from(2);
        }
    };
    match auth.issue_with(sub, channels, admin, ttl) {
        Some(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        None => {
            eprintln!("relay token: no HS256 key: set auth.hs256_secret (APP__AUTH__HS256_SECRET)");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(settings: Settings) -> ExitCode {
    if settings.database.url.is_empty() {
        tracing::error!(
            "database.url is empty (embedded mode keeps history in memory): nothing to migrate"
        );
        return ExitCode::FAILURE;
    }
    let result = async {
        let pool = store::connect(&settings.database).await?;
        store::migrate(&pool).await?;
        pool.close().await;
        Ok::<_, store::StoreError>(())
    };
    match result.await {
        Ok(()) => {
            tracing::info!("migrations applied");
            ExitCode::SUCCESS
        }
        Err(err) => {
            tracing::error!(%err, "migration failed");
            ExitCode::FAILURE
        }
    }
}

async fn serve(settings: Settings) -> ExitCode {
    raise_fd_limit();
    let grace = settings.shutdown.readiness_grace;
    let app = match Application::build(settings).await {
        Ok(app) => app,
        Err(err) => {
            tracing::error!(%err, "startup failed");
            return ExitCode::FAILURE;
        }
    };
    // The only app of this process: it also takes what is recorded outside its tasks.
    if !app.metrics().install_global() {
        tracing::warn!("a process-wide metrics recorder was already installed");
    }
    let lifecycle = app.lifecycle();
    // Runs beside the app (not spawned): first signal starts the graceful shutdown, a second one
    // exits at once.
    let signals = async move {
        shutdown_signal().await;
        tokio::select! {
            _ = lifecycle.begin_shutdown(grace) => {}
            _ = shutdown_signal() => exit_now(),
        }
        shutdown_signal().await;
        exit_now();
    };
    tokio::select! {
        result = app.run_until_stopped() => serve_exit_code(result),
        () = signals => ExitCode::FAILURE,
    }
}

/// How `serve` exits once the app stopped: 0 after a signalled shutdown, 1 (logged) when the
/// server or a critical task failed, so the orchestrator restarts the process. (A second signal
/// exits 130 without getting here.)
fn serve_exit_code(result: Result<(), StartupError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(%err, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// Every connection is a file descriptor; many systems start processes with a soft limit of
/// 1024. Raise it to the hard limit (what the administrator allows) and say what we got.
fn raise_fd_limit() {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
                return;
            }
            let before = limit.rlim_cur;
            if limit.rlim_cur < limit.rlim_max {
                limit.rlim_cur = limit.rlim_max;
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    limit.rlim_cur = before;
                }
            }
        }
        tracing::info!(open_files_limit = limit.rlim_cur, "file descriptor limit");
    }
}

fn exit_now() -> ! {
    tracing::warn!("second signal: exiting immediately");
    std::process::exit(130);
}

async fn healthcheck(settings: &Settings, url: Option<String>, timeout: Duration) -> ExitCode {
    let url = url.unwrap_or_else(|| format!("http://127.0.0.1:{}/readyz", settings.server.port));
    let client = match reqwest::Client::builder().timeout(timeout).build() {
        Ok(client) => client,
        Err(err) => {
            eprintln!("healthcheck: {err}");
            return ExitCode::FAILURE;
        }
    };
    match client.get(&url).send().await {
        Ok(res) if res.status().is_success() => {
            println!("healthcheck: {url} ready ({})", res.status());
            ExitCode::SUCCESS
        }
        Ok(res) => {
            let status = res.status();
            let body = res.text().await.unwrap_or_default();
            eprintln!("healthcheck: {url} not ready ({status}): {body}");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("healthcheck: {url} unreachable: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_exits_zero_after_shutdown_and_one_after_a_failure() {
        assert_eq!(serve_exit_code(Ok(())), ExitCode::SUCCESS);
        let failed = Err(StartupError::TaskFailed {
            task: "pubsub_core",
        });
        assert_eq!(serve_exit_code(failed), ExitCode::from(1));
    }
}
