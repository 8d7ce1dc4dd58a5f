//! Bounds on realtime connections (WebSocket and SSE together): at most `ws.max_connections`
//! per replica, and at most `ws.max_connections_per_ip` per client address.
//!
//! A connection takes a [`ConnectionPermit`] before the upgrade (or before the stream starts)
//! and holds it until it ends, so a client that opens thousands of sockets is refused at the
//! door — `503` when the replica is full (another replica may have room), `429` for one address
//! over its share — and never costs the others their file descriptors. Refusals are counted in
//! `relay_connections_refused_total{reason}`.
//!
//! [`RateLimitHttp`] applies `limits.http_per_ip` to every request but the probes.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{
    extract::{ConnectInfo, Request},
    http::StatusCode,
    response::{IntoResponse, Response},
};

use crate::{
    http::{
        around::{After, Around},
        error::ApiError,
        middleware::client_ip,
    },
    state::AppState,
};

/// `limits.http_per_ip`: 429 with `Retry-After` for an address over its rate. Probes are
/// exempt, so a kubelet or load balancer sharing an address with clients never fails them.
#[derive(Clone)]
pub struct RateLimitHttp(pub AppState);

impl Around for RateLimitHttp {
    type Carry = ();

    fn before(&self, req: &mut Request) -> Result<(), Response> {
        let state = &self.0;
        if state.limits.limits_http() && !matches!(req.uri().path(), "/healthz" | "/readyz") {
            let peer = req
                .extensions()
                .get::<ConnectInfo<std::net::SocketAddr>>()
                .map(|ConnectInfo(addr)| addr.ip());
            if let Some(ip) = client_ip(peer, req.headers(), &state.access_log.trusted_proxies)
                && let Err(limited) = state.limits.check_http(ip)
            {
                return Err(ApiError::RateLimited(limited).into_response());
            }
        }
        Ok(())
    }

    fn after(&self, (): (), res: Response) -> After {
        After::Ready(res)
    }
}

#[derive(Debug)]
pub struct ConnectionLimits {
    open: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    max: usize,
    /// 0: no per-address limit.
    max_per_ip: usize,
}

/// Counts as one open connection until dropped.
#[derive(Debug)]
pub struct ConnectionPermit {
    limits: Arc<ConnectionLimits>,
    ip: Option<IpAddr>,
}

impl ConnectionLimits {
    pub fn new(max: usize, max_per_ip: usize) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            per_ip: Mutex::default(),
            max,
            max_per_ip,
        })
    }

    /// Take a slot for a connection from `ip` (the client address, proxies resolved).
    pub fn acquire(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<ConnectionPermit, ApiError> {
        if self.open.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            metrics::counter!("relay_connections_refused_total", "reason" => "replica_full")
                .increment(1);
            return Err(ApiError::Unavailable(
                "this replica is at its connection limit; retry (another replica may have room)"
                    .to_owned(),
            ));
        }
        // From here on, dropping the permit gives the slot back.
        let mut permit = ConnectionPermit {
            limits: Arc::clone(self),
            ip: None,
        };
        if let (Some(ip), true) = (ip, self.max_per_ip > 0) {
            let mut per_ip = self.per_ip.lock().unwrap_or_else(PoisonError::into_inner);
            let count = per_ip.entry(ip).or_default();
            if *count >= self.max_per_ip {
                drop(per_ip);
                metrics::counter!("relay_connections_refused_total", "reason" => "per_ip")
                    .increment(1);
                return Err(ApiError::Rejected {
                    status: StatusCode::TOO_MANY_REQUESTS,
                    message: format!(
                        "at most {} realtime connections per client address",
                        self.max_per_ip
                    ),
                });
            }
            *count += 1;
            permit.ip = Some(ip);
        }
        Ok(permit)
    }

    /// Open connections on this replica.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.limits.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(ip) = self.ip {
            let mut per_ip = self
                .limits
                .per_ip
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(count) = per_ip.get_mut(&ip) {
                *count -= 1;
                if *count == 0 {
                    per_ip.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_replica_and_per_address_slots_come_back() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let first = limits.acquire(Some(a)).unwrap();
        let _second = limits.acquire(Some(a)).unwrap();
        assert!(matches!(
            limits.acquire(Some(a)),
            Err(ApiError::Rejected { status, .. }) if status == StatusCode::TOO_MANY_REQUESTS
        ));
        let _third = limits.acquire(Some(b)).unwrap();
        assert!(matches!(
            limits.acquire(Some(b)),
            Err(ApiError::Unavailable(_))
        ));
        assert_eq!(limits.open(), 3);
        drop(first);
        assert_eq!(limits.open(), 2);
        assert!(limits.acquire(Some(a)).is_ok());
        assert_eq!(limits.open(), 2, "the temporary permit was dropped");
    }
}
