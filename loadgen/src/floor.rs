//! `--bare-write-floor`: what the same fan-out costs with no relay at all.
//!
//! The generator opens N loopback TCP connections to a child process of itself (`--floor-sink`)
//! that only reads and discards, so the draining CPU is spent in another process. Then, at the
//! same rate and round-robin, for each message it does one `write` of a relay-message-sized
//! WebSocket frame to every socket "subscribed" to that message's channel — the bursts relay's
//! fan-out would produce. Writes per CPU-second of this process is the kernel's floor for one
//! delivery, to compare with relay's deliveries per server CPU-second on the same machine.

use std::{
    cell::RefCell,
    io::{BufRead, BufReader, Write},
    net::TcpStream,
    process::{Child, Command, ExitCode, Stdio},
    time::{Duration, Instant},
};

use serde::Serialize;

use crate::{
    args::Args,
    stats::{padding, write_stamp},
    sys::{CpuTime, cpu_seconds, raise_fd_limit},
};

/// The floor measurement.
#[derive(Debug, Serialize)]
pub struct FloorReport {
    pub mode: &'static str,
    pub sockets: usize,
    pub channels: usize,
    pub rate: f64,
    pub frame_bytes: usize,
    pub messages: u64,
    pub writes: u64,
    pub short_writes: u64,
    pub write_errors: u64,
    pub seconds: f64,
    pub writer_cpu_user_seconds: f64,
    pub writer_cpu_system_seconds: f64,
    pub writer_cpu_seconds: f64,
    pub writes_per_cpu_second: f64,
    pub writes_per_second: f64,
    /// The draining child's CPU, for information (relay's clients pay this too).
    pub sink_cpu_seconds: Option<f64>,
}

/// The WebSocket frame relay would send for a message of this run: `{"type":"message",…}`,
/// unmasked, with its 2-, 4- or 10-byte header.
fn frame_bytes(args: &Args) -> Vec<u8> {
    let mut data = String::new();
    let typical_seq = args.total_messages() / args.channels as u64;
    write_stamp(
        &mut data,
        typical_seq,
        None,
        1_700_000_000_000_000,
        &padding(args.payload_bytes, None),
    );
    let text = format!(
        r#"{{"type":"message","channel":"{}-{}","data":{data},"id":null}}"#,
        args.channel_prefix,
        args.channels - 1
    );
    let len = text.len();
    let mut frame = vec![0x81u8]; // FIN + text
    if len < 126 {
        frame.push(len as u8);
    } else if len <= u16::MAX as usize {
        frame.push(126);
        frame.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        frame.push(127);
        frame.extend_from_slice(&(len as u64).to_be_bytes());
    }
    frame.extend_from_slice(text.as_bytes());
    frame
}

/// The child: print the port of a fresh listener, then accept and drain connections until
/// stdin closes (the parent finished or died).
pub fn sink() -> ExitCode {
    if let Err(err) = raise_fd_limit(1024) {
        eprintln!("relay-loadgen floor sink: {err}");
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("relay-loadgen floor sink: cannot start a runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind("127.0.0.1:0").await {
            Ok(l) => l,
            Err(err) => {
                eprintln!("relay-loadgen floor sink: bind: {err}");
                return ExitCode::FAILURE;
            }
        };
        let port = match listener.local_addr() {
            Ok(addr) => addr.port(),
            Err(err) => {
                eprintln!("relay-loadgen floor sink: {err}");
                return ExitCode::FAILURE;
            }
        };
        println!("{port}");
        let _ = std::io::stdout().flush();
        let accept = async {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(drain(stream));
            }
        };
        let parent_gone = async {
            let mut buf = [0u8; 64];
            let mut stdin = tokio::io::stdin();
            while let Ok(n) = tokio::io::AsyncReadExt::read(&mut stdin, &mut buf).await {
                if n == 0 {
                    break;
                }
            }
        };
        tokio::select! {
            () = accept => {}
            () = parent_gone => {}
        }
        ExitCode::SUCCESS
    })
}

thread_local! {
    /// One read buffer for every connection: the sink is single-threaded and never holds it
    /// across an await, so 10,000 connections cost no buffer each.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; 64 * 1024]);
}

async fn drain(stream: tokio::net::TcpStream) {
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        let read = SCRATCH.with(|buf| stream.try_read(&mut buf.borrow_mut()));
        match read {
            Ok(0) => return,
            Ok(_) => {}
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Ends the child when dropped, whatever happened.
struct SinkProcess(Child);

impl Drop for SinkProcess {
    fn drop(&mut self) {
        // Closing its stdin asks it to exit; kill it if it has not after a moment.
        drop(self.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: &Args) -> Result<FloorReport, String> {
    raise_fd_limit(args.connections as u64 + 64)?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let child = Command::new(exe)
        .arg("--floor-sink")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the sink process: {e}"))?;
    let mut sink = SinkProcess(child);
    let port: u16 = {
        let stdout = sink
            .0
            .stdout
            .take()
            .ok_or("the sink process has no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .map_err(|e| format!("sink process: {e}"))?;
        line.trim()
            .parse()
            .map_err(|_| format!("sink process did not report a port (got `{}`)", line.trim()))?
    };

    // Socket i "subscribes" to channel i mod K, as the relay run's connection i does.
    let mut by_channel: Vec<Vec<TcpStream>> = (0..args.channels).map(|_| Vec::new()).collect();
    for i in 0..args.connections {
        let sock = TcpStream::connect(("127.0.0.1", port))
            .map_err(|e| format!("floor socket {i}: {e}"))?;
        // relay's sessions flush each batch as soon as it is written; do not let Nagle merge.
        sock.set_nodelay(true)
            .map_err(|e| format!("floor socket {i}: {e}"))?;
        by_channel[i % args.channels].push(sock);
    }
    let frame = frame_bytes(args);
    let total = args.total_messages();
    let sink_cpu_before = cpu_seconds(sink.0.id()).ok();
    let cpu_before = CpuTime::of_self();
    let started = Instant::now();
    let (mut writes, mut short_writes, mut write_errors) = (0u64, 0u64, 0u64);
    let mut sent = 0u64;
    let mut turn = 0usize;
    while sent < total {
        let elapsed = started.elapsed().as_secs_f64();
        let due = ((elapsed * args.rate) as u64 + 1).min(total);
        if due <= sent {
            let at = started + Duration::from_secs_f64(sent as f64 / args.rate);
            std::thread::sleep(at.saturating_duration_since(Instant::now()));
            continue;
        }
        for _ in sent..due {
            for sock in &mut by_channel[turn] {
                match sock.write(&frame) {
                    Ok(n) if n == frame.len() => writes += 1,
                    Ok(_) => {
                        writes += 1;
                        short_writes += 1;
                    }
                    Err(_) => write_errors += 1,
                }
            }
            turn = (turn + 1) % args.channels;
        }
        sent = due;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = CpuTime::of_self().since(cpu_before);
    let sink_cpu_seconds = match (sink_cpu_before, cpu_seconds(sink.0.id()).ok()) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    drop(by_channel);
    drop(sink);
    Ok(FloorReport {
        mode: "bare_write_floor",
        sockets: args.connections,
        channels: args.channels,
        rate: args.rate,
        frame_bytes: frame.len(),
        messages: total,
        writes,
        short_writes,
        write_errors,
        seconds: micros(seconds),
        writer_cpu_user_seconds: micros(cpu.user),
        writer_cpu_system_seconds: micros(cpu.system),
        writer_cpu_seconds: micros(cpu.total()),
        writes_per_cpu_second: per(writes as f64, cpu.total()),
        writes_per_second: per(writes as f64, seconds),
        sink_cpu_seconds: sink_cpu_seconds.map(micros),
    })
}

/// Seconds rounded to microseconds (keeps float noise out of the JSON).
pub fn micros(seconds: f64) -> f64 {
    (seconds * 1e6).round() / 1e6
}

pub fn per(count: f64, seconds: f64) -> f64 {
    if seconds > 0.0 {
        (count / seconds).round()
    } else {
        0.0
    }
}

pub fn print(r: &FloorReport) {
    println!(
        "relay-loadgen bare-write floor: {} sockets over {} channels, {} msg/s, {}-byte frames",
        r.sockets, r.channels, r.rate, r.frame_bytes
    );
    println!("  messages       {} in {:.2} s", r.messages, r.seconds);
    println!(
        "  writes         {} ({} short, {} failed), {} writes/s",
        r.writes, r.short_writes, r.write_errors, r.writes_per_second
    );
    println!(
        "  writer CPU     {:.3} s (user {:.3}, system {:.3}) -> {} writes per CPU-second",
        r.writer_cpu_seconds,
        r.writer_cpu_user_seconds,
        r.writer_cpu_system_seconds,
        r.writes_per_cpu_second
    );
    if let Some(sink) = r.sink_cpu_seconds {
        println!("  sink CPU       {sink:.3} s (the reading side, another process)");
    }
}
