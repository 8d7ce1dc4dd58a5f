//! The write half of a WebSocket connection, shared by its session and the fan-out.
//!
//! A delivery normally costs a queue push, a wake-up of the session task, a poll and a write.
//! When the connection has nothing queued and its socket has room, the fan-out writes the
//! shared frame itself instead, with one non-blocking `write` ([`DirectWrite`]), and the session
//! task does not run at all. Who may write is decided under the outbox's lock: the fan-out only
//! while the session has *armed* the outbox's lane, the session only after taking it back
//! (`SessionOutbox::reclaim`), so their bytes never interleave.
//!
//! A direct write the socket takes only in part leaves the rest here; the session writes it
//! before anything else, bounded by `ws.write_timeout` like all its writes.

use std::{
    io,
    sync::{Mutex, PoisonError},
};

use bytes::{Buf, Bytes};
use tokio::net::tcp::OwnedWriteHalf;

use crate::{
    protocol::ServerFrame,
    pubsub::outbox::{DirectWrite, Sent},
};

#[derive(Debug)]
pub struct WsWriter {
    half: OwnedWriteHalf,
    /// What a direct write could not finish.
    rest: Mutex<Option<Bytes>>,
}

impl WsWriter {
    pub fn new(half: OwnedWriteHalf) -> Self {
        Self {
            half,
            rest: Mutex::new(None),
        }
    }

    /// Write `rest` and then each buffer of `bufs` completely, waiting for the socket.
    pub async fn write_all(&self, bufs: &mut [Bytes]) -> io::Result<()> {
        let rest = self
            .rest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(mut rest) = rest {
            self.write_one(&mut rest).await?;
        }
        if let [one] = bufs {
            return self.write_one(one).await;
        }
        // Several frames: one syscall for all of them while the socket takes them.
        let mut at = 0;
        while at < bufs.len() {
            self.half.writable().await?;
            let slices: Vec<io::IoSlice<'_>> =
                bufs[at..].iter().map(|b| io::IoSlice::new(b)).collect();
            match self.half.try_write_vectored(&slices) {
                Ok(mut n) => {
                    while n > 0 && at < bufs.len() {
                        let len = bufs[at].len();
                        if n >= len {
                            n -= len;
                            at += 1;
                        } else {
                            bufs[at].advance(n);
                            n = 0;
                        }
                    }
                    while at < bufs.len() && bufs[at].is_empty() {
                        at += 1;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    async fn write_one(&self, buf: &mut Bytes) -> io::Result<()> {
        while !buf.is_empty() {
            self.half.writable().await?;
            match self.half.try_write(buf) {
                Ok(n) => buf.advance(n),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
const SEND_FLAGS: libc::c_int = libc::MSG_NOSIGNAL;
/// Elsewhere there is no such flag (std sets `SO_NOSIGPIPE` on the BSDs' sockets instead).
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const SEND_FLAGS: libc::c_int = 0;

impl DirectWrite for WsWriter {
    fn try_send(&self, frame: &ServerFrame) -> Sent {
        let wire = &frame.wire;
        // A plain send(2) on the socket, not tokio's `try_write`: that one reads and updates
        // the socket's readiness slot, a cache line of its own per connection, on every
        // delivery. Skipping it is safe: if the socket is full, the readiness tokio keeps is
        // merely stale, and the session's first `try_write` refreshes it before waiting.
        // MSG_NOSIGNAL as std's own writes: a peer that reset must be an error here, not a
        // SIGPIPE, whatever the embedding process does with that signal.
        let socket = socket2::SockRef::from(self.half.as_ref());
        match socket.send_with_flags(wire, SEND_FLAGS) {
            Ok(n) if n == wire.len() => Sent::All,
            Ok(n) => {
                *self.rest.lock().unwrap_or_else(PoisonError::into_inner) = Some(wire.slice(n..));
                Sent::Partly
            }
            // Full, or broken: the frame is queued, and the session's own write waits for
            // room or meets the error.
            Err(_) => Sent::Nothing,
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use std::mem::MaybeUninit;

    use super::*;

    /// A direct write to a socket that can no longer send is an error, never a SIGPIPE. The
    /// test harness ignores SIGPIPE, and an ignored signal is dropped at once, so it is blocked
    /// on this thread instead: blocked, it stays pending where the test can see it.
    #[tokio::test(flavor = "current_thread")]
    async fn a_direct_write_to_a_closed_socket_raises_no_sigpipe() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let (_read, write) = server.into_split();
        let writer = WsWriter::new(write);
        // Writing after our own shutdown is EPIPE, which is what raises SIGPIPE.
        socket2::SockRef::from(writer.half.as_ref())
            .shutdown(std::net::Shutdown::Write)
            .unwrap();

        let sigpipe = signal_set(libc::SIGPIPE);
        let mut previous = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: both sets are initialised (`signal_set`) or written by the call itself.
        let blocked =
            unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &sigpipe, previous.as_mut_ptr()) };
        assert_eq!(blocked, 0);
        let sent = writer.try_send(&ServerFrame::error("test", "after shutdown"));
        let mut pending = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigpending writes the set it is given.
        assert_eq!(unsafe { libc::sigpending(pending.as_mut_ptr()) }, 0);
        // SAFETY: initialised by the successful sigpending above.
        let raised = unsafe { libc::sigismember(pending.as_ptr(), libc::SIGPIPE) } == 1;
        if raised {
            // Take it before unblocking, so the failure is this assertion, not a dead process.
            let mut taken = 0;
            // SAFETY: `sigpipe` is initialised; `taken` is written by the call.
            unsafe { libc::sigwait(&sigpipe, &mut taken) };
        }
        // SAFETY: `previous` was written by the first pthread_sigmask.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, previous.as_ptr(), std::ptr::null_mut())
        };
        assert!(!raised, "the direct write raised SIGPIPE");
        assert_eq!(sent, Sent::Nothing);
    }

    fn signal_set(signal: libc::c_int) -> libc::sigset_t {
        let mut set = MaybeUninit::<libc::sigset_t>::uninit();
        // SAFETY: sigemptyset initialises the set, sigaddset then only changes it.
        unsafe {
            libc::sigemptyset(set.as_mut_ptr());
            libc::sigaddset(set.as_mut_ptr(), signal);
            set.assume_init()
        }
    }
}
