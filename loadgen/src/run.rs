//! One measurement against relay: connect and subscribe every connection, publish, drain,
//! stop the connections and add everything up into a [`Report`].

use std::{collections::BTreeMap, sync::Arc, time::Instant};

use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::{
    args::{Args, Via},
    floor::{micros, per},
    publisher,
    report::{Connections, Deliveries, PublishStats, Report, ServerCost},
    stats::{LatencyMs, Shards, new_histogram},
    subscriber::{self, Connected, End, Shared},
    sys::{self, CpuTime, cpu_seconds, now_micros, raise_fd_limit, rss_kib},
};

/// Histogram shards per worker thread: enough that connections on different workers rarely
/// share one.
const SHARDS_PER_THREAD: usize = 16;

/// How often the drain checks whether everything arrived.
const DRAIN_POLL: std::time::Duration = std::time::Duration::from_millis(10);

/// Descriptors beyond one per subscriber and HTTP publishing connection: the runtime, Redis,
/// the ws publisher, stdio.
const SPARE_FDS: u64 = 64;

/// TIME_WAIT sockets to the server's port beyond which the connect figure is suspect.
const TIME_WAIT_WARNING: usize = 1000;

/// Say so when an earlier run's connections still linger: the connect time would include the
/// kernel's port reuse, not only relay.
fn warn_of_time_wait(args: &Args) {
    let Some(port) = url::Url::parse(&args.url)
        .ok()
        .and_then(|url| url.port_or_known_default())
    else {
        return;
    };
    let lingering = sys::time_wait_sockets(port);
    if lingering >= TIME_WAIT_WARNING {
        eprintln!(
            "relay-loadgen: warning: {lingering} sockets to port {port} are still in TIME_WAIT \
             from an earlier run; connect times may include the kernel's port reuse (wait about \
             60 s between runs for a clean figure)"
        );
    }
}

pub async fn run(args: &Args) -> Result<Report, String> {
    // HTTP publishing keeps one keep-alive connection per request in flight.
    let publish_sockets = match args.publish_via {
        Via::Http | Via::Batch => args.http_concurrency() as u64,
        Via::Redis | Via::Ws => 0,
    };
    raise_fd_limit(args.connections as u64 + publish_sockets + SPARE_FDS)?;
    warn_of_time_wait(args);
    let channels = args.channel_names();
    let ws_base = args.ws_base()?;
    let rss_before = match args.pid {
        Some(pid) => Some(rss_kib(pid).map_err(|e| format!("--pid {pid}: {e}"))?),
        None => None,
    };

    // Connect and subscribe.
    let (connected_tx, mut connected_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        ws_base,
        token_query: args.token_query(),
        config: subscriber::client_config(),
        connect_timeout: args.connect_timeout,
        gate: Semaphore::new(args.connect_concurrency),
        shards: Shards::new(args.threads * SHARDS_PER_THREAD),
        stop: CancellationToken::new(),
        connected: connected_tx,
    });
    let names: Vec<Arc<str>> = channels.iter().map(|c| Arc::from(c.as_str())).collect();
    let connect_started = Instant::now();
    let tasks: Vec<_> = (0..args.connections)
        .map(|i| {
            let ch = i % args.channels;
            tokio::spawn(subscriber::run(
                Arc::clone(&shared),
                i,
                ch,
                Arc::clone(&names[ch]),
                args.writers_on(ch),
            ))
        })
        .collect();
    let mut connect_latency = new_histogram();
    let mut connect_errors: BTreeMap<String, u64> = BTreeMap::new();
    let (mut ok, mut failed) = (0usize, 0usize);
    // Connections subscribed per channel: who the drain expects deliveries for.
    let mut subscribed = vec![0u64; args.channels];
    let mut next_progress = Instant::now() + std::time::Duration::from_secs(2);
    while ok + failed < args.connections {
        let Some(outcome) = connected_rx.recv().await else {
            break;
        };
        match outcome {
            Connected::Ok { channel, took } => {
                ok += 1;
                subscribed[channel] += 1;
                connect_latency.saturating_record(took.as_micros() as u64);
            }
            Connected::Failed(err) => {
                failed += 1;
                *connect_errors.entry(err).or_default() += 1;
            }
        }
        if Instant::now() >= next_progress {
            eprintln!(
                "relay-loadgen: {ok} subscribed, {failed} failed of {}",
                args.connections
            );
            next_progress += std::time::Duration::from_secs(2);
        }
    }
    let connect_seconds = connect_started.elapsed().as_secs_f64();
    eprintln!(
        "relay-loadgen: {ok} connections subscribed ({failed} failed) in {connect_seconds:.2} s"
    );
    let rss_after = match args.pid {
        Some(pid) => Some(rss_kib(pid).map_err(|e| format!("--pid {pid}: {e}"))?),
        None => None,
    };
    if !args.hold.is_zero() {
        eprintln!("relay-loadgen: holding the connections for {:?}", args.hold);
        tokio::time::sleep(args.hold).await;
    }

    // Publish, then drain.
    let total = if ok == 0 {
        // Nobody would receive anything: report the connection failures right away.
        0
    } else {
        args.total_messages()
    };
    if total > 0 {
        eprintln!(
            "relay-loadgen: publishing {total} messages via {} at {} msg/s",
            args.publish_via.as_str(),
            args.rate
        );
    }
    let server_cpu_before = args.pid.and_then(|pid| cpu_seconds(pid).ok());
    let own_cpu_before = CpuTime::of_self();
    let publish_started_us = now_micros();
    let published = publisher::run(args, &channels, total).await?;

    // Numbered, not acknowledged: a message whose fate is unknown is expected, and lost if it
    // never comes.
    let expected_live: u64 = (0..args.channels)
        .map(|ch| published.numbered_on(ch) * subscribed[ch])
        .sum();
    let drain_started = Instant::now();
    while drain_started.elapsed() < args.drain && shared.shards.delivered() < expected_live {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let server_cpu = match (
        server_cpu_before,
        args.pid.and_then(|p| cpu_seconds(p).ok()),
    ) {
        (Some(before), Some(after)) => Some(micros(after - before)),
        _ => None,
    };
    let own_cpu = CpuTime::of_self().since(own_cpu_before);

    // Stop the connections and collect what each saw.
    shared.stop.cancel();
    let mut d = Deliveries::default();
    let mut ended: BTreeMap<String, u64> = BTreeMap::new();
    for task in tasks {
        let Ok(Some(conn)) = task.await else {
            continue;
        };
        d.expected += published.numbered_on(conn.channel);
        d.delivered += conn.seq.delivered();
        d.lost += conn.seq.lost(&published.numbered[conn.channel]);
        d.duplicated += conn.seq.duplicated();
        d.out_of_order += conn.seq.out_of_order();
        d.error_frames += conn.error_frames;
        d.foreign_frames += conn.foreign;
        let end = match conn.end {
            End::Stopped => continue,
            End::ClosedByServer(Some(code)) => format!("close {code}"),
            End::ClosedByServer(None) => "close without code".to_owned(),
            End::Eof => "eof without close".to_owned(),
            End::Error(err) => format!("error: {err}"),
        };
        *ended.entry(end).or_default() += 1;
    }
    let (latency, last_delivery_us) = shared.shards.merge();
    let delivery_window = last_delivery_us.saturating_sub(publish_started_us) as f64 / 1e6;

    let published_total = published.total();
    let publish_seconds = published.elapsed.as_secs_f64();
    Ok(Report {
        mode: "relay",
        url: args.url.clone(),
        publish_via: args.publish_via.as_str(),
        channels: args.channels,
        rate: args.rate,
        connections: Connections {
            requested: args.connections,
            ok,
            failed,
            connect_seconds: micros(connect_seconds),
            connect_p50_ms: connect_latency.value_at_quantile(0.5) as f64 / 1000.0,
            connect_p99_ms: connect_latency.value_at_quantile(0.99) as f64 / 1000.0,
            connect_errors,
            ended_early: ended,
        },
        published: published_total,
        publish_errors: published.errors,
        publish_error_kinds: published.error_kinds,
        publish_no_receivers: published.no_receivers,
        publish_seconds: micros(publish_seconds),
        publish_rate: per(published_total as f64, publish_seconds),
        publish: PublishStats {
            batch_size: (args.publish_via == Via::Batch).then(|| args.batch_size()),
            http_concurrency: match args.publish_via {
                Via::Batch => Some(args.http_concurrency()),
                // Only when given: the default run reports what it always did.
                Via::Http => args.http_concurrency,
                Via::Redis | Via::Ws => None,
            },
            pipeline: args.pipeline,
            idempotency: args.idempotency,
            committed: published.committed,
            committed_per_second: per(published.committed as f64, publish_seconds),
            requests: published.requests,
            latency_ms: LatencyMs::from_micros(&published.latency),
            retries: published.retries,
            replays: published.replays,
        },
        expected: d.expected,
        delivered: d.delivered,
        lost: d.lost,
        duplicated: d.duplicated,
        out_of_order: d.out_of_order,
        error_frames: d.error_frames,
        foreign_frames: d.foreign_frames,
        latency_ms: LatencyMs::from_micros(&latency),
        deliveries_per_second: per(d.delivered as f64, delivery_window),
        loadgen_cpu_seconds: micros(own_cpu.total()),
        server: args
            .pid
            .map(|pid| ServerCost::new(pid, rss_before, rss_after, ok, server_cpu, d.delivered)),
    })
}
