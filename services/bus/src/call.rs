//! Calling a request/reply subject: MessagePack, a bearer token, a timeout, and
//! transport failures as `unavailable` errors that say what was not answering.

use async_nats::HeaderMap;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::Duration;
use tanjiren_shared::WireError;
use tanjiren_shared::codec::{Encoding, Reply};
use tanjiren_shared::protocol::AUTHORIZATION;

/// Sends a request in MessagePack with a bearer token and decodes the reply.
/// Transport failures become `unavailable` errors that say what was not answering.
pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
    nats: &async_nats::Client,
    subject: &str,
    token: &str,
    request: &Req,
    timeout: Duration,
) -> Result<Resp, WireError> {
    let mut headers = HeaderMap::new();
    headers.insert(AUTHORIZATION, format!("Bearer {token}").as_str());
    let req = async_nats::Request::new()
        .payload(Encoding::MsgPack.encode(request)?.into())
        .headers(headers)
        .timeout(Some(timeout));
    let msg = nats.send_request(subject.to_string(), req).await.map_err(|e| {
        use async_nats::client::RequestErrorKind as K;
        match e.kind() {
            K::NoResponders => WireError::unavailable(format!("no service is answering on {subject}; is it running?")),
            K::TimedOut => WireError::unavailable(format!("no reply on {subject} within {timeout:?}")),
            _ => WireError::unavailable(format!("request on {subject} failed: {e}")),
        }
    })?;
    Encoding::MsgPack.decode::<Reply<Resp>>(&msg.payload)?.into_result()
}
