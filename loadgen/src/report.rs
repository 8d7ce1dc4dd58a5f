//! The result of a run against relay: one serialisable object (`--json`) and its table, plus
//! the pass/fail verdict that decides the exit code.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{floor::per, stats::LatencyMs};

#[derive(Debug, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub url: String,
    pub publish_via: &'static str,
    pub channels: usize,
    pub rate: f64,
    pub connections: Connections,
    pub published: u64,
    pub publish_errors: u64,
    pub publish_error_kinds: BTreeMap<String, u64>,
    /// Redis PUBLISHes that reached no subscriber (relay not subscribed: wrong --redis-prefix?).
    pub publish_no_receivers: u64,
    pub publish_seconds: f64,
    pub publish_rate: f64,
    /// What the server acknowledged, how fast and how quickly (added for issue 15; the fields
    /// above keep their meaning).
    pub publish: PublishStats,
    /// Σ over subscribed connections of the messages published on their channel.
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// `error` frames on subscriber connections.
    pub error_frames: u64,
    /// Frames without our stamp (someone else publishing on the channels).
    pub foreign_frames: u64,
    pub latency_ms: LatencyMs,
    /// Deliveries over the window from the first publish to the last delivery.
    pub deliveries_per_second: f64,
    /// The generator's own CPU while publishing and draining (a busy generator skews latency).
    pub loadgen_cpu_seconds: f64,
    pub server: Option<ServerCost>,
}

/// The publish side of the run as the server acknowledged it.
#[derive(Debug, Serialize)]
pub struct PublishStats {
    /// --batch-size (batch mode).
    pub batch_size: Option<usize>,
    /// Requests in flight at once: --http-concurrency (batch mode; http mode when given).
    pub http_concurrency: Option<usize>,
    /// --pipeline (ws mode).
    pub pipeline: Option<usize>,
    pub idempotency: bool,
    /// Messages acknowledged as committed: 201s (one per item of a batch), ws acks, Redis
    /// replies; fire-and-forget ws: sent minus error frames, confirmed by the final pong.
    pub committed: u64,
    /// `committed` over `publish_seconds` (first send to last acknowledgement).
    pub committed_per_second: f64,
    /// Successful requests: HTTP requests, Redis pipelines, acked ws publishes.
    pub requests: u64,
    /// Request sent (first attempt) → success answer (201 / ack / Redis reply), one sample per
    /// request; empty for fire-and-forget ws.
    pub latency_ms: LatencyMs,
    /// Attempts after the first (--idempotency), ws resends included.
    pub retries: u64,
    /// Messages answered as a repeat of a committed one (`replayed: true`).
    pub replays: u64,
}

#[derive(Debug, Serialize)]
pub struct Connections {
    pub requested: usize,
    pub ok: usize,
    pub failed: usize,
    /// From the first connect to the last `subscribed` (or failure).
    pub connect_seconds: f64,
    pub connect_p50_ms: f64,
    pub connect_p99_ms: f64,
    /// Failures grouped by reason.
    pub connect_errors: BTreeMap<String, u64>,
    /// Subscribed connections that ended before the run stopped them, by how (e.g. `close 4008`).
    pub ended_early: BTreeMap<String, u64>,
}

/// Totals over all connections.
#[derive(Debug, Default)]
pub struct Deliveries {
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub error_frames: u64,
    pub foreign_frames: u64,
}

/// What the server process paid, from `/proc/<pid>`.
#[derive(Debug, Serialize)]
pub struct ServerCost {
    pub pid: u32,
    pub rss_before_kib: Option<u64>,
    pub rss_after_subscribe_kib: Option<u64>,
    pub kib_per_connection: Option<f64>,
    /// Server CPU from the first publish to the end of the drain.
    pub cpu_seconds: Option<f64>,
    pub deliveries_per_cpu_second: Option<f64>,
}

impl ServerCost {
    pub fn new(
        pid: u32,
        rss_before: Option<u64>,
        rss_after: Option<u64>,
        connections: usize,
        cpu_seconds: Option<f64>,
        delivered: u64,
    ) -> Self {
        let kib_per_connection = match (rss_before, rss_after) {
            (Some(b), Some(a)) if connections > 0 => {
                Some(((a as f64 - b as f64) / connections as f64 * 100.0).round() / 100.0)
            }
            _ => None,
        };
        Self {
            pid,
            rss_before_kib: rss_before,
            rss_after_subscribe_kib: rss_after,
            kib_per_connection,
            cpu_seconds,
            deliveries_per_cpu_second: cpu_seconds
                .filter(|_| delivered > 0)
                .map(|cpu| per(delivered as f64, cpu)),
        }
    }
}

impl Report {
    /// Why the run counts as failed, if it does.
    pub fn failures(&self, expect_lossless: bool) -> Vec<String> {
        let mut out = Vec::new();
        if self.connections.failed > 0 {
            out.push(format!("{} connections failed", self.connections.failed));
        }
        if expect_lossless {
            let bad = [
                ("lost", self.lost),
                ("duplicated", self.duplicated),
                ("out of order", self.out_of_order),
                ("publish errors", self.publish_errors),
            ];
            for (what, n) in bad {
                if n > 0 {
                    out.push(format!("{n} {what}"));
                }
            }
            if self.delivered != self.expected {
                out.push(format!(
                    "delivered {} of {} expected",
                    self.delivered, self.expected
                ));
            }
        }
        out
    }

    pub fn print(&self) {
        let c = &self.connections;
        println!(
            "relay-loadgen: {} connections over {} channels at {}, publish via {} at {} msg/s",
            c.requested, self.channels, self.url, self.publish_via, self.rate
        );
        println!(
            "  connections     ok {}  failed {}  (all subscribed in {:.2} s; each p50 {:.1} ms, p99 {:.1} ms)",
            c.ok, c.failed, c.connect_seconds, c.connect_p50_ms, c.connect_p99_ms
        );
        for (err, n) in &c.connect_errors {
            println!("    failed: {n} × {err}");
        }
        for (how, n) in &c.ended_early {
            println!("    ended early: {n} × {how}");
        }
        println!(
            "  published       {} in {:.2} s ({} msg/s), errors {}",
            self.published, self.publish_seconds, self.publish_rate, self.publish_errors
        );
        for (err, n) in &self.publish_error_kinds {
            println!("    {n} × {err}");
        }
        let p = &self.publish;
        let mut shape = String::new();
        if let Some(n) = p.batch_size {
            shape.push_str(&format!(", batches of {n}"));
        }
        if let Some(n) = p.http_concurrency {
            shape.push_str(&format!(", {n} requests in flight"));
        }
        if let Some(n) = p.pipeline {
            shape.push_str(&format!(", pipeline {n}"));
        }
        if p.idempotency {
            shape.push_str(", idempotent");
        }
        let requests = if p.requests > 0 {
            format!(" in {} requests", p.requests)
        } else {
            String::new()
        };
        println!(
            "  committed       {} ({} msg/s){requests}{shape}; retries {}  replays {}",
            p.committed, p.committed_per_second, p.retries, p.replays
        );
        if p.latency_ms.samples > 0 {
            let l = &p.latency_ms;
            println!(
                "  publish ms      p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (request sent -> answer)",
                l.p50, l.p90, l.p99, l.p999, l.max
            );
        }
        if self.publish_no_receivers > 0 {
            println!(
                "    {} PUBLISHes reached no subscriber (wrong --redis-prefix, or every subscriber of the channel had gone)",
                self.publish_no_receivers
            );
        }
        println!(
            "  deliveries      expected {}  delivered {}  lost {}  duplicated {}  out of order {}",
            self.expected, self.delivered, self.lost, self.duplicated, self.out_of_order
        );
        if self.error_frames + self.foreign_frames > 0 {
            println!(
                "    error frames {}  foreign frames {}",
                self.error_frames, self.foreign_frames
            );
        }
        let l = &self.latency_ms;
        println!(
            "  delivery ms     p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (mean {:.3})",
            l.p50, l.p90, l.p99, l.p999, l.max, l.mean
        );
        println!(
            "  throughput      {} deliveries/s",
            self.deliveries_per_second
        );
        println!(
            "  loadgen CPU     {:.2} s while publishing and draining",
            self.loadgen_cpu_seconds
        );
        if let Some(s) = &self.server {
            let kib = |v: Option<u64>| v.map_or("?".to_owned(), |v| format!("{v} KiB"));
            println!(
                "  server pid {}  RSS {} before, {} subscribed{}",
                s.pid,
                kib(s.rss_before_kib),
                kib(s.rss_after_subscribe_kib),
                s.kib_per_connection
                    .map_or(String::new(), |k| format!(" ({k:.2} KiB per connection)"))
            );
            if let Some(cpu) = s.cpu_seconds {
                println!(
                    "  server CPU      {cpu:.2} s while publishing and draining{}",
                    s.deliveries_per_cpu_second
                        .map_or(String::new(), |d| format!(
                            " -> {d} deliveries per CPU-second"
                        ))
                );
            }
        }
    }
}
