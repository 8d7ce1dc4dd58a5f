//! The public port's connection loop: the router served by hyper, with a deadline for the
//! request head.
//!
//! `axum::serve` installs no timer, so hyper's header-read timeout never fires there: a client
//! that sends half a request line and stalls holds a connection (and a file descriptor) for as
//! long as it likes, and a few thousand of them exhaust the process. Here every HTTP/1
//! connection must deliver a complete request head within `http.header_timeout`, or hyper
//! closes it. Each connection is a task of the app's lifecycle; at shutdown the listener stops
//! accepting and every connection finishes its request in flight, then closes (upgraded
//! WebSockets have left hyper by then and are the sessions' own business).

use std::{io, pin::pin, time::Duration};

use axum::{Router, extract::ConnectInfo, http::Request};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tower::ServiceExt;

use crate::lifecycle::Lifecycle;

/// Accept connections until the lifecycle is cancelled, then wait for those still open to
/// finish their requests in flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    lifecycle: Lifecycle,
) -> io::Result<()> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    let mut cancelled = pin!(lifecycle.cancelled());
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut cancelled => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Per-connection failures (the peer reset before we accepted): keep going.
                Err(err) if is_connection_error(&err) => continue,
                Err(err) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::error!(%err, "accept failed; retrying in 1 s");
                    tokio::select! {
                        _ = &mut cancelled => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                    }
                }
            },
        };
        // Realtime frames are small and written one by one: with Nagle's algorithm a frame
        // written while the previous one is unacknowledged waits for the client's delayed ACK
        // (up to 40 ms on Linux). Go servers (Centrifugo, Mercure) disable it by default too.
        if let Err(err) = stream.set_nodelay(true) {
            tracing::debug!(%err, %peer, "could not set TCP_NODELAY");
        }
        // Handlers read the peer address like with `into_make_service_with_connect_info`.
        let service = router
            .clone()
            .map_request(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), TowerToHyperService::new(service))
            .into_owned();
        let connection = graceful.watch(connection);
        lifecycle.spawn("http_connection", async move {
            if let Err(err) = connection.await {
                tracing::debug!(%err, %peer, "HTTP connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

fn is_connection_error(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}
