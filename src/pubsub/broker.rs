//! The broker seam: where messages travel between replicas. Redis pub/sub, or — in embedded
//! mode, when `redis.url` is empty — an in-process queue for a single replica.
//!
//! Everything above this module (listener, registry, sequencing, sessions) is the same for both.
//! [`Publisher`] is the sending side (kept in [`super::PubSub`]); [`Source`], [`Sink`] and
//! [`Stream`] are the listener's receiving side.

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, PubSubSink, PubSubStream};
use tokio::sync::mpsc;

use super::PubSubError;
use crate::config::{RedisSettings, RedisTls};

/// Messages waiting in the embedded broker. Publishers wait when it is full (backpressure,
/// counted); the listener drains it as fast as Redis would.
pub const MEMORY_QUEUE: usize = 8192;

/// A message on the embedded broker: full channel name (with prefix) and payload.
#[derive(Debug)]
pub struct MemoryMessage {
    channel: String,
    payload: String,
}

/// Create the sending and receiving halves of the broker chosen by `redis.url`.
pub fn open(
    settings: &RedisSettings,
    publisher_config: redis::aio::ConnectionManagerConfig,
) -> Result<(Publisher, Source), PubSubError> {
    if settings.url.is_empty() {
        let (tx, rx) = mpsc::channel(MEMORY_QUEUE);
        return Ok((Publisher::Memory(tx), Source::Memory(Some(rx))));
    }
    let client = redis_client(settings)?;
    // Lazily connected: startup does not fail while Redis is down; readiness reports it.
    let publisher = client.get_connection_manager_lazy(publisher_config)?;
    Ok((Publisher::Redis(publisher), Source::Redis(Box::new(client))))
}

/// The Redis client for `settings`. `rediss://` is TLS with the server's certificate verified
/// against `redis.tls_ca_file` when set, the built-in Mozilla roots otherwise; the CA file is
/// read here, so a bad one stops startup instead of failing every connection later.
pub fn redis_client(settings: &RedisSettings) -> Result<redis::Client, PubSubError> {
    let url = settings.url.expose();
    match settings.tls() {
        RedisTls::Off => return Ok(redis::Client::open(url)?),
        RedisTls::Verified => {}
        RedisTls::Unverified => tracing::warn!(
            "redis.url ends in `#insecure`: TLS to Redis WITHOUT certificate verification, so \
             anyone on the network path can impersonate the server; configure \
             redis.tls_ca_file instead"
        ),
    }
    crate::tls::install_crypto_provider();
    let Some(path) = &settings.tls_ca_file else {
        return Ok(redis::Client::open(url)?);
    };
    let root_cert = crate::tls::read_ca_pem(path).map_err(PubSubError::TlsCaFile)?;
    let certificates = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(root_cert),
    };
    Ok(redis::Client::build_with_tls(url, certificates)?)
}

/// The sending side; cheap to clone.
#[derive(Clone)]
pub enum Publisher {
    Redis(ConnectionManager),
    Memory(mpsc::Sender<MemoryMessage>),
}

impl Publisher {
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Redis(_) => "redis",
            Self::Memory(_) => "memory",
        }
    }

    /// PUBLISH each `(channel, payload)` (full channel names), in order: to Redis as one
    /// pipeline, one round trip for the whole batch.
    pub async fn publish_all(&self, messages: Vec<(String, String)>) -> Result<(), PubSubError> {
        match self {
            Self::Redis(manager) => {
                let mut conn = manager.clone();
                let mut pipe = redis::pipe();
                for (channel, payload) in messages {
                    pipe.cmd("PUBLISH").arg(channel).arg(payload).ignore();
                }
                pipe.query_async::<()>(&mut conn).await?;
                Ok(())
            }
            Self::Memory(queue) => {
                for (channel, payload) in messages {
                    let message = MemoryMessage { channel, payload };
                    match queue.try_send(message) {
                        Ok(()) => {}
                        Err(mpsc::error::TrySendError::Full(message)) => {
                            metrics::counter!("relay_memory_broker_full_total").increment(1);
                            queue
                                .send(message)
                                .await
                                .map_err(|_| PubSubError::ListenerStopped)?;
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => {
                            return Err(PubSubError::ListenerStopped);
                        }
                    }
                }
                Ok(())
            }
        }
    }

    pub async fn ping(&self) -> Result<(), PubSubError> {
        match self {
            Self::Redis(manager) => {
                let mut conn = manager.clone();
                let cmd = redis::cmd("PING");
                cmd.query_async::<String>(&mut conn).await?;
                Ok(())
            }
            Self::Memory(queue) if queue.is_closed() => Err(PubSubError::ListenerStopped),
            Self::Memory(_) => Ok(()),
        }
    }
}

/// What the listener connects to.
pub enum Source {
    /// Boxed: with its TLS parameters the client dwarfs the other variant.
    Redis(Box<redis::Client>),
    /// Taken by the first (and only) connect: the embedded broker never disconnects.
    Memory(Option<mpsc::Receiver<MemoryMessage>>),
}

impl Source {
    /// Open the receiving connection.
    pub async fn connect(&mut self) -> Result<(Sink, Stream), PubSubError> {
        match self {
            Self::Redis(client) => {
                let (sink, stream) = client.get_async_pubsub().await?.split();
                Ok((Sink::Redis(sink), Stream::Redis(stream)))
            }
            Self::Memory(queue) => queue
                .take()
                .map(|queue| (Sink::Memory, Stream::Memory(queue)))
                .ok_or(PubSubError::ListenerStopped),
        }
    }
}

/// Subscription control of a connection.
#[derive(Clone)]
pub enum Sink {
    Redis(PubSubSink),
    /// Every message reaches the listener; the registry filters by channel.
    Memory,
}

impl Sink {
    pub async fn subscribe(&mut self, channels: &[String]) -> redis::RedisResult<()> {
        match self {
            Self::Redis(sink) => sink.subscribe(channels).await,
            Self::Memory => Ok(()),
        }
    }

    pub async fn unsubscribe(&mut self, channel: &str) -> redis::RedisResult<()> {
        match self {
            Self::Redis(sink) => sink.unsubscribe(channel).await,
            Self::Memory => Ok(()),
        }
    }
}

/// Incoming messages of a connection.
pub enum Stream {
    Redis(PubSubStream),
    Memory(mpsc::Receiver<MemoryMessage>),
}

/// One received message.
#[derive(Debug)]
pub enum Incoming {
    Redis(redis::Msg),
    Memory(MemoryMessage),
}

impl Incoming {
    pub fn channel(&self) -> &str {
        match self {
            Self::Redis(msg) => msg.get_channel_name(),
            Self::Memory(msg) => &msg.channel,
        }
    }

    pub fn payload(&self) -> &[u8] {
        match self {
            Self::Redis(msg) => msg.get_payload_bytes(),
            Self::Memory(msg) => msg.payload.as_bytes(),
        }
    }
}

impl Stream {
    /// Whether the driver keeps buffering while nobody reads (Redis: without bound). The
    /// in-process queue is bounded and makes its publishers wait instead.
    pub fn buffers_without_bound(&self) -> bool {
        matches!(self, Self::Redis(_))
    }

    /// The next message; None when the connection is gone.
    pub async fn next(&mut self) -> Option<Incoming> {
        match self {
            Self::Redis(stream) => stream.next().await.map(Incoming::Redis),
            Self::Memory(queue) => match queue.recv().await {
                Some(msg) => Some(Incoming::Memory(msg)),
                // All publishers are gone (shutdown): nothing more will come.
                None => std::future::pending().await,
            },
        }
    }
}
