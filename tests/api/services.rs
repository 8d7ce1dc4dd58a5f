//! Where the tests find Postgres and Redis, so that `cargo test` works on a machine that has
//! the server binaries but nothing running (a laptop, a CI image).
//!
//! For each service, in order:
//! 1. the URL in the environment (`TEST_DATABASE_URL`, `TEST_REDIS_URL`), used as given;
//! 2. the default port on 127.0.0.1 (5432, 6379), if something answers there;
//! 3. a private throwaway server started from the local binaries (`initdb` + `pg_ctl`,
//!    `redis-server`) under `target/tmp/`, on an unused port, shared by the whole test run. A
//!    small watcher process stops it and deletes its files when the test process exits, however
//!    it exits (a panic, an abort, Ctrl-C);
//! 4. with no binaries either, a panic that gives the exact command to run.
//!
//! The choice is made once per test process, on first use.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

const START_SERVICES: &str = "start them with `docker compose up -d --wait postgres redis`, or \
install the server packages (Debian/Ubuntu: `apt-get install postgresql redis-server`; macOS: \
`brew install postgresql redis`) so the tests can start private ones";

/// The Postgres URL the tests use (its `postgres` database; tests create their own).
pub fn postgres_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        resolve(
            "TEST_DATABASE_URL",
            5432,
            "postgres://postgres@127.0.0.1:5432/postgres",
            start_postgres,
        )
    })
}

/// The Redis URL the tests use.
pub fn redis_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        resolve(
            "TEST_REDIS_URL",
            6379,
            "redis://127.0.0.1:6379",
            start_redis,
        )
    })
}

fn resolve(var: &str, port: u16, default: &str, start: fn() -> Result<String, String>) -> String {
    if let Some(url) = std::env::var(var).ok().filter(|url| !url.is_empty()) {
        return url;
    }
    if answers(port) {
        return default.to_owned();
    }
    match start() {
        Ok(url) => {
            // Straight to stderr, past the test harness's capture: the run should say it.
            let _ = writeln!(
                std::io::stderr(),
                "tests: nothing on 127.0.0.1:{port}; started a private server at {url}"
            );
            url
        }
        Err(why) => panic!(
            "no server on 127.0.0.1:{port} and {var} is not set, and a private one could not be \
             started ({why}); {START_SERVICES}"
        ),
    }
}

fn answers(port: u16) -> bool {
    TcpStream::connect_timeout(
        &SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .is_ok()
}

pub fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// A fresh directory for this process's private servers, under cargo's per-target temp dir.
fn private_dir(what: &str) -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("services-{}-{what}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// Run `command`, or say what it printed.
fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", command.get_program()))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{:?} failed: {}{}",
        command.get_program(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// Once this process is gone, run `cleanup` (a shell snippet). The watcher is its own process,
/// so it outlives a test binary that aborts.
fn on_exit(cleanup: &str) -> Result<(), String> {
    let script = format!(
        "while kill -0 {} 2>/dev/null; do sleep 1; done; {cleanup}",
        std::process::id()
    );
    Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(drop)
        .map_err(|e| format!("cannot start the cleanup watcher: {e}"))
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

// ---- Redis ------------------------------------------------------------------------------------

fn start_redis() -> Result<String, String> {
    let server = on_path("redis-server").ok_or("redis-server is not on PATH")?;
    let dir = private_dir("redis")?;
    let port = unused_port();
    let pidfile = dir.join("redis.pid");
    run(Command::new(&server)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "yes"])
        .arg("--dir")
        .arg(&dir)
        .arg("--pidfile")
        .arg(&pidfile)
        .arg("--logfile")
        .arg(dir.join("redis.log")))?;
    on_exit(&format!(
        "kill $(cat {pid}) 2>/dev/null; sleep 1; rm -rf {dir}",
        pid = quote(&pidfile),
        dir = quote(&dir)
    ))?;
    wait_until(Duration::from_secs(10), || redis_pings(port))
        .map_err(|_| format!("redis-server did not answer on port {port}"))?;
    Ok(format!("redis://127.0.0.1:{port}"))
}

fn redis_pings(port: u16) -> bool {
    let Ok(mut conn) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
    let mut reply = [0u8; 7];
    conn.write_all(b"PING\r\n").is_ok()
        && conn.read_exact(&mut reply).is_ok()
        && &reply == b"+PONG\r\n"
}

fn wait_until(limit: Duration, mut ready: impl FnMut() -> bool) -> Result<(), ()> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(())
}

// ---- Postgres ---------------------------------------------------------------------------------

/// The directory with `initdb` and `pg_ctl`: `$TEST_PG_BIN`, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian's layout), else `PATH`.
pub fn postgres_bin() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|version| root.join(format!("{version}/bin/initdb")).is_file())
        .max();
    if let Some(version) = newest {
        return Ok(root.join(format!("{version}/bin")));
    }
    on_path("initdb")
        .and_then(|initdb| initdb.parent().map(Path::to_path_buf))
        .ok_or_else(|| {
            "no initdb under /usr/lib/postgresql/<version>/bin or on PATH (point TEST_PG_BIN at \
             the directory holding initdb and pg_ctl)"
                .to_owned()
        })
}

/// Postgres refuses to run as root: as root, its tools run as the `postgres` user.
pub fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.starts_with(b"0\n"))
}

/// `bin/<name>`, run as `postgres` when the tests run as root.
pub fn postgres_tool(bin: &Path, name: &str, as_root: bool) -> Command {
    let program = bin.join(name);
    if as_root {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

fn start_postgres() -> Result<String, String> {
    let bin = postgres_bin()?;
    let as_root = running_as_root();
    let dir = private_dir("postgres")?;
    if as_root {
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(&dir))?;
    }
    let data = dir.join("data");
    run(postgres_tool(&bin, "initdb", as_root)
        .arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]))?;
    let port = unused_port();
    // Throwaway data: no fsync. Enough connections for the whole suite's pools at once.
    let options = format!(
        "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={dir} -c fsync=off \
         -c max_connections=300",
        dir = dir.display()
    );
    let pg_ctl = postgres_tool(&bin, "pg_ctl", as_root);
    let stop = format!(
        "{runas}{pg_ctl} -D {data} -m immediate -w stop; rm -rf {dir}",
        runas = if as_root {
            "runuser -u postgres -- "
        } else {
            ""
        },
        pg_ctl = quote(&bin.join("pg_ctl")),
        data = quote(&data),
        dir = quote(&dir)
    );
    let mut start = pg_ctl;
    run(start
        .arg("-D")
        .arg(&data)
        .arg("-l")
        .arg(dir.join("server.log"))
        .args(["-w", "-t", "30", "-o", &options, "start"]))?;
    on_exit(&stop)?;
    Ok(format!("postgres://postgres@127.0.0.1:{port}/postgres"))
}
