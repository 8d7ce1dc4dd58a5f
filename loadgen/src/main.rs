//! `relay-loadgen`: load generator and cost meter for relay (issue #8).
//!
//! Opens N subscriber WebSockets over K channels, publishes at a fixed rate through Redis, the
//! HTTP API (one message or a batch per request) or a WebSocket (fire and forget, or pipelined
//! with acks), optionally with idempotency keys and retries, and reports publish throughput and
//! latency, completeness (delivered, lost, duplicated, out of order), delivery latency
//! percentiles and, given the server's pid, its memory per connection and deliveries per
//! CPU-second. `--bare-write-floor` measures the same fan-out as raw socket
//! writes without relay, the floor to compare against. `--help` lists every option.
//!
//! Exit codes: 0 success; 1 the run completed but failed a check (a connection failed, or with
//! `--expect-lossless` anything lost, duplicated, reordered or unpublished); 2 the run could not
//! be carried out (bad options, fd limit, Redis unreachable, …).

mod args;
mod batch;
mod floor;
mod http;
#[cfg(test)]
mod mock;
mod pipeline;
mod publisher;
mod report;
mod retry;
mod run;
mod stats;
mod subscriber;
mod sys;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // redis' rustls (`rediss://`) has no provider of its own and takes the process's.
    install_crypto_provider();
    let args = args::Args::parse();
    if args.floor_sink {
        return floor::sink();
    }
    if let Err(err) = args.validate() {
        eprintln!("relay-loadgen: {err}");
        return ExitCode::from(2);
    }
    if args.bare_write_floor {
        return match floor::run(&args) {
            Ok(report) => {
                print_json_or(args.json, &report, || floor::print(&report));
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("relay-loadgen: {err}");
                ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("relay-loadgen: cannot start the runtime: {err}");
            return ExitCode::from(2);
        }
    };
    let report = match runtime.block_on(run::run(&args)) {
        Ok(report) => report,
        Err(err) => {
            eprintln!("relay-loadgen: {err}");
            return ExitCode::from(2);
        }
    };
    // Ten thousand idle sockets close faster by exiting than by joining every task.
    print_json_or(args.json, &report, || report.print());
    let failures = report.failures(args.expect_lossless);
    runtime.shutdown_background();
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!("relay-loadgen: FAILED: {}", failures.join(", "));
        ExitCode::from(1)
    }
}

/// Install ring as rustls' process-wide crypto provider, the one relay installs. `Err` only means
/// a provider is already in place, which is all that is needed.
fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn print_json_or(json: bool, value: &impl serde::Serialize, table: impl FnOnce()) {
    if !json {
        return table();
    }
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(err) => eprintln!("relay-loadgen: cannot encode the report: {err}"),
    }
}
