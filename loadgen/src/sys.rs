//! Operating-system facts the generator needs: the file-descriptor limit, another process's
//! RSS and CPU time from `/proc`, this process's own CPU time, and the wall clock in the
//! microseconds the messages carry. Linux only, like relay's deployment targets.

use std::{
    io,
    time::{SystemTime, UNIX_EPOCH},
};

/// Microseconds since the Unix epoch. Publisher and subscribers run on the same machine as the
/// server, so one wall clock stamps the send and measures the delivery.
pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Raise the soft `RLIMIT_NOFILE` to the hard limit, and fail with advice if that still leaves
/// fewer than `needed` descriptors. Returns the limit now in force.
pub fn raise_fd_limit(needed: u64) -> Result<u64, String> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(format!(
            "cannot read the file-descriptor limit: {}",
            io::Error::last_os_error()
        ));
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct we pass.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    let limit: u64 = lim.rlim_cur;
    if limit < needed {
        return Err(format!(
            "this run needs about {needed} file descriptors but the limit is {limit} (hard limit \
             {}); raise it, e.g. `ulimit -n {needed}` in the shell that starts relay-loadgen",
            lim.rlim_max
        ));
    }
    Ok(limit)
}

/// TCP sockets in TIME_WAIT from or to `port` (`/proc/net/tcp` and `tcp6`; 0 where they
/// cannot be read). A run right after another one on the same host finds the last run's
/// connections there: thousands of them make the kernel reuse ports whose other end may not be
/// gone yet, and some connects then wait for a resend, which inflates the connect time.
pub fn time_wait_sockets(port: u16) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .map(|table| count_time_wait(&table, port))
        .sum()
}

/// Rows of a `/proc/net/tcp` table in state `06` (TIME_WAIT) with `port` at either end.
fn count_time_wait(table: &str, port: u16) -> usize {
    let port_of = |addr: &str| {
        addr.rsplit_once(':')
            .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok())
    };
    table
        .lines()
        .skip(1)
        .filter(|row| {
            let mut fields = row.split_whitespace().skip(1);
            let (Some(local), Some(remote), Some(state)) =
                (fields.next(), fields.next(), fields.next())
            else {
                return false;
            };
            state == "06" && (port_of(local) == Some(port) || port_of(remote) == Some(port))
        })
        .count()
}

/// Resident set size of `pid` in KiB (`VmRSS` in `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| io::Error::other(format!("no VmRSS in /proc/{pid}/status")))
}

/// User + system CPU time of `pid` in seconds (`utime` + `stime` of `/proc/<pid>/stat`).
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces: count fields after
    // the last `)`. There, utime and stime are the 12th and 13th (fields 14 and 15 overall).
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("unexpected /proc/<pid>/stat format"))?;
    let mut fields = after.split_whitespace().skip(11);
    let mut next = || -> io::Result<u64> {
        fields
            .next()
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| io::Error::other("unexpected /proc/<pid>/stat format"))
    };
    let ticks = next()? + next()?;
    Ok(ticks as f64 / clock_ticks_per_second() as f64)
}

/// `sysconf(_SC_CLK_TCK)`: the unit of `/proc/<pid>/stat` CPU times (100 on every Linux we
/// know, used as the fallback).
fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// CPU time used by this process so far.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTime {
    pub user: f64,
    pub system: f64,
}

impl CpuTime {
    /// `getrusage(RUSAGE_SELF)`: every thread of this process, microsecond resolution.
    pub fn of_self() -> Self {
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage only writes the struct we pass, which lives for the call.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
            return Self::default();
        }
        let secs = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
        Self {
            user: secs(usage.ru_utime),
            system: secs(usage.ru_stime),
        }
    }

    /// CPU used since `earlier`.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            user: self.user - earlier.user,
            system: self.system - earlier.system,
        }
    }

    pub fn total(self) -> f64 {
        self.user + self.system
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_wait_rows_to_or_from_the_port_are_counted() {
        // 0x4762 = 18274, 0x0050 = 80; state 06 = TIME_WAIT, 01 = ESTABLISHED, 0A = LISTEN.
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:4762 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:9C40 0100007F:4762 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0
   2: 0100007F:4762 0100007F:9C41 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0
   3: 0100007F:9C42 0100007F:4762 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0
   4: 0100007F:9C43 0100007F:0050 06 00000000:00000000 03:00001770 00000000     0        0 0 3 0
   5: garbage
";
        assert_eq!(count_time_wait(table, 18274), 2);
        assert_eq!(count_time_wait(table, 80), 1);
        assert_eq!(count_time_wait(table, 9), 0);
        assert_eq!(count_time_wait("", 18274), 0);
    }
}
