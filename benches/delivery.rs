//! Benchmarks of the WebSocket delivery path that issue 18 rebuilt: what one delivery costs
//! once the delivery core has decided it, measured over real loopback sockets.
//!
//! * `framing`: what a connection did per delivery before (tungstenite framing the message
//!   into its write buffer: a header and a copy of the payload) against what it does now (the
//!   frame was encoded once, with its header, when the message arrived: a reference count).
//! * `deliver_100`: one message fanned out by the core (`Core::message`) to 100 subscribed
//!   WebSocket connections on loopback, until every byte is in a socket:
//!   * `queued`: the lane is not armed, so each delivery is an outbox push, a wake-up of the
//!     connection's session task (on a 2-worker runtime, as relay runs), a drain and a write;
//!   * `direct`: the lane is armed, so the fan-out writes each frame itself, one non-blocking
//!     `write` per connection, and no session task runs.
//!
//!   Another runtime reads every client socket, as clients would. Reported per delivery too.
//!
//! `cargo bench --bench delivery` takes under a minute.

use std::{
    collections::VecDeque,
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use relay::{
    core::{Action, Core, CoreSettings, Frames, subscriptions::Subscriptions},
    protocol::ServerFrame,
    pubsub::outbox::SessionOutbox,
    ws::writer::WsWriter,
};
use serde_json::value::RawValue;
use tokio::{
    io::AsyncReadExt,
    net::{TcpListener, TcpStream},
};

const CONNECTIONS: usize = 100;

fn sample_data() -> Box<RawValue> {
    RawValue::from_string(r#"{"s":12345,"t":1700000000123456}"#.to_owned())
        .unwrap_or_else(|e| panic!("sample data is JSON: {e}"))
}

fn framing(c: &mut Criterion) {
    use tungstenite::protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    };
    let frame = ServerFrame::message("lg-7", &sample_data(), Some(4242));
    let mut group = c.benchmark_group("framing");
    group.bench_function("per_connection_before", |b| {
        let mut buf = Vec::with_capacity(1024);
        b.iter(|| {
            buf.clear();
            let text: bytes::Bytes = frame.text.clone().into();
            let ws = Frame::message(text, OpCode::Data(Data::Text), true);
            ws.format(&mut buf).unwrap_or_else(|e| panic!("{e}"));
            black_box(buf.len())
        })
    });
    group.bench_function("shared_now", |b| b.iter(|| black_box(frame.wire.clone())));
    group.finish();
}

/// One subscribed WebSocket-like connection: the server's outbox and writer, and what the
/// session would know of its subscription.
struct Conn {
    outbox: Arc<SessionOutbox>,
    subs: Subscriptions,
}

/// `n` loopback pairs: the server halves become writers, the client halves are read until the
/// runtime stops, counting bytes.
async fn pairs(n: usize, received: Arc<AtomicU64>) -> Vec<Arc<WsWriter>> {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut writers = Vec::new();
    for _ in 0..n {
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        server.set_nodelay(true).expect("nodelay");
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            let mut buf = vec![0; 64 * 1024];
            while let Ok(n @ 1..) = client.read(&mut buf).await {
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
        let (_read, write) = server.into_split();
        writers.push(Arc::new(WsWriter::new(write)));
    }
    writers
}

fn deliver_100(c: &mut Criterion) {
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let sessions = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let received = Arc::new(AtomicU64::new(0));
    let writers = sessions.block_on(async {
        let received = Arc::clone(&received);
        clients
            .spawn(pairs(CONNECTIONS, received))
            .await
            .expect("pairs")
    });

    let mut core = Core::new(CoreSettings {
        gap_wait: Duration::from_millis(200),
        head_check_interval: Duration::from_secs(3600),
    });
    core.broker_up(Instant::now());
    let mut conns: Vec<Conn> = writers
        .iter()
        .map(|writer| {
            let outbox = Arc::new(SessionOutbox::new(256));
            outbox.set_direct(Arc::clone(writer) as _);
            let mut subs = Subscriptions::new(256);
            subs.request("room");
            core.subscribe("room", &outbox, None);
            Conn { outbox, subs }
        })
        .collect();
    while let Some(action) = core.poll_action() {
        match action {
            Action::Subscribe(ch) => core.subscribe_result(&ch, true),
            Action::ReadHeads(chs) => core.heads(
                chs.into_iter().map(|ch| (ch, Some(0))).collect(),
                Instant::now(),
            ),
            Action::Unsubscribe(_) => {}
        }
    }
    for conn in &mut conns {
        let mut items = VecDeque::new();
        conn.outbox.drain_into(&mut items);
        let mut out = Frames::new();
        for item in items {
            conn.subs.apply(item, &mut out);
        }
    }

    // The session tasks of the queued case: wait, drain, write, count.
    let written = Arc::new(AtomicU64::new(0));
    for (conn, writer) in conns.iter().zip(&writers) {
        let outbox = Arc::clone(&conn.outbox);
        let writer = Arc::clone(writer);
        let written = Arc::clone(&written);
        sessions.spawn(async move {
            let mut items = VecDeque::new();
            loop {
                outbox.ready().await;
                outbox.drain_into(&mut items);
                let mut bufs: Vec<bytes::Bytes> = items
                    .drain(..)
                    .filter_map(|item| match item {
                        relay::core::Outgoing::Message { frame, .. } => Some(frame.wire),
                        _ => None,
                    })
                    .collect();
                let n = bufs.len() as u64;
                if writer.write_all(&mut bufs).await.is_err() {
                    return;
                }
                written.fetch_add(n, Ordering::Release);
            }
        });
    }

    let data = sample_data();
    let mut id = 0;
    let mut group = c.benchmark_group("deliver_100");
    group.throughput(Throughput::Elements(CONNECTIONS as u64));
    // Direct first: it keeps each connection's stream state in step (the queued case does not
    // need it, and runs last).
    for direct in [true, false] {
        let name = if direct { "direct" } else { "queued" };
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    if direct {
                        for conn in &mut conns {
                            if let Some(back) = conn.outbox.reclaim() {
                                conn.subs.absorb(&back.lane);
                            }
                            assert!(conn.outbox.arm(conn.subs.lane()), "nothing queued");
                        }
                    }
                    id += 1;
                    let frame = ServerFrame::message("room", &data, Some(id));
                    let before = written.load(Ordering::Acquire);
                    let started = Instant::now();
                    core.message("room", Some(id), frame, started);
                    if !direct {
                        while written.load(Ordering::Acquire) < before + CONNECTIONS as u64 {
                            std::hint::spin_loop();
                        }
                    }
                    timed += started.elapsed();
                    if direct {
                        for conn in &mut conns {
                            let back = conn.outbox.reclaim().expect("armed");
                            assert_eq!(back.frames, 1, "written directly");
                            conn.subs.absorb(&back.lane);
                        }
                    }
                    let _ = core.take_stats();
                }
                timed
            })
        });
    }
    group.finish();
    drop(sessions);
    drop(clients);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = framing, deliver_100
}
criterion_main!(benches);
