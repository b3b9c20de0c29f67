//! The NATS side every Tanjiren process shares, and nothing else (no database,
//! no Redis): connecting ([`connect`]), serving a request/reply subject with
//! batching, authentication and exactly one reply ([`serve`]), calling one
//! ([`call`]), the JetStream streams ([`streams`]), task events ([`events`]),
//! following a task's log ([`log_follow`]), periodic loops ([`periodic`]) and
//! graceful shutdown ([`shutdown`]), and reading configuration ([`config`]) and
//! setting up logs ([`telemetry`]). The worker depends on this crate and on
//! `tanjiren-shared` only.

pub mod auth;
pub mod call;
pub mod config;
pub mod connect;
pub mod events;
pub mod log_follow;
pub mod periodic;
pub mod serve;
pub mod shutdown;
pub mod streams;
pub mod telemetry;

pub use auth::Authenticate;
pub use call::call;
pub use connect::{StartupError, connect_nats};
pub use serve::{Access, Incoming, Router, ServeOptions, each, serve};
pub use shutdown::{ServiceHandle, Shutdown};
pub use tanjiren_ops::Metrics;

use serde::Serialize;
use tanjiren_shared::WireError;
use tanjiren_shared::codec::Encoding;
use tanjiren_shared::config::Config;
use tanjiren_shared::subjects::Subjects;

/// Why [`publish`] did not hand a message to the client.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot encode the message: {0}")]
    Encode(WireError),
    #[error(transparent)]
    Send(#[from] async_nats::PublishError),
}

/// Publishes `value` in MessagePack on `subject`, fire and forget (core NATS: the
/// publishers that need delivery re-derive it from Postgres, see each caller).
///
/// # Errors
/// [`PublishError`]: the value cannot be encoded, or the client cannot queue it.
pub async fn publish<T: Serialize + ?Sized>(
    nats: &async_nats::Client,
    subject: impl async_nats::subject::ToSubject,
    value: &T,
) -> Result<(), PublishError> {
    let body = Encoding::MsgPack.encode(value).map_err(PublishError::Encode)?;
    nats.publish(subject, body.into()).await?;
    Ok(())
}

/// How much a served subject takes at once (from the configuration's
/// `batch_max`, `batch_max_bytes` and `max_in_flight`).
#[derive(Clone, Copy, Debug)]
pub struct ServeLimits {
    /// Most requests folded into one handler call.
    pub batch_max: usize,
    /// A batch closes once its payloads reach this many bytes.
    pub batch_max_bytes: usize,
    /// Requests in handler calls at once, per subject.
    pub max_in_flight: usize,
}

impl ServeLimits {
    pub fn from_config(config: &Config) -> Self {
        Self {
            batch_max: config.batch_max,
            batch_max_bytes: config.batch_max_bytes,
            max_in_flight: config.max_in_flight,
        }
    }
}

/// A process's NATS connection with what serving on it needs. Clones share the connection.
#[derive(Clone, Debug)]
pub struct Bus {
    pub nats: async_nats::Client,
    pub subjects: Subjects,
    pub metrics: Metrics,
    pub limits: ServeLimits,
    /// The server's URL with any password redacted (for error messages).
    pub nats_url: String,
}
