//! Serving a request/reply subject, and calling one.
//!
//! [`serve`] subscribes in a queue group (replicas share the subject), and folds
//! every request already waiting into one batch so a service can commit many
//! requests in one transaction (group commit). Each request is decoded in the
//! caller's encoding and authenticated before the handler sees it; bad ones get
//! a typed error at once. Decoding applies the one request rule of
//! [`Encoding::decode_request`] (structs as maps, no NUL in text, errors that
//! name the field) to every subject. Every request gets exactly one reply — a
//! handler panic becomes an `internal` error, and a reply larger than the
//! server's max payload a `too_large` error, never silence. On shutdown the
//! subscription is drained: what was received is finished and answered,
//! nothing new is taken.

use crate::auth::Authenticate;
use crate::connect::StartupError;
use crate::shutdown::{ServiceHandle, Shutdown};
use crate::{Bus, ServeLimits};
use async_nats::HeaderMap;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tanjiren_ops::Metrics;
use tanjiren_shared::codec::{CONTENT_TYPE, Encoding, Reply, TextPolicy};
use tanjiren_shared::model::Role;
use tanjiren_shared::protocol::{AUTHORIZATION, Principal};
use tanjiren_shared::scopes::Needs;
use tanjiren_shared::{ErrorCode, WireError};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// Who may call a subject (documented per subject in `docs/protocol.md` §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Operators and integrations reading: member, admin, owner (a scoped token needs
    /// `mcp:read` or `mcp:operate`).
    Readers,
    /// Operators and integrations changing something: member, admin, owner (a scoped
    /// token needs `mcp:operate`).
    Operators,
    /// Enrolling a workstation: a `worker`-role organisation token (an enrolment
    /// token), an admin's or owner's token, or the workstation's own credential.
    Enrol,
    /// Workstation agents: only a workstation credential (role `worker`, bound to one
    /// workstation); handlers then check every step against that workstation.
    Workstation,
    /// Those who may decide approvals and publish doctrine: admin, owner (a scoped
    /// token needs `mcp:operate`).
    Approvers,
    /// Minting approval tokens: admin, owner, and never a scoped token — an AI
    /// agent's token may carry a person's approval token, but never mint one.
    Minters,
    /// Any valid token or credential, whatever its role and scopes (`auth.whoami`).
    Anyone,
}

impl Access {
    /// Whether `principal` may call a subject of this kind: its role, then its scopes.
    pub fn allows(&self, principal: &Principal) -> bool {
        let role = principal.role;
        let by_role = match self {
            Access::Readers | Access::Operators => matches!(role, Role::Member | Role::Admin | Role::Owner),
            Access::Enrol => matches!(role, Role::Worker | Role::Admin | Role::Owner),
            Access::Workstation => role == Role::Worker && principal.workstation_id.is_some(),
            Access::Approvers | Access::Minters => matches!(role, Role::Admin | Role::Owner),
            Access::Anyone => return true,
        };
        let by_scope = match self.needs() {
            Some(needs) => needs.granted_by(&principal.scopes),
            None => principal.scopes.is_empty(),
        };
        by_role && by_scope
    }

    /// What a scoped token needs here; `None`: scoped tokens may not (enrolment and
    /// workstation subjects are for unscoped worker tokens and credentials).
    fn needs(&self) -> Option<Needs> {
        match self {
            Access::Readers => Some(Needs::Read),
            Access::Operators | Access::Approvers => Some(Needs::Operate),
            Access::Enrol | Access::Workstation | Access::Minters | Access::Anyone => None,
        }
    }

    /// Why a principal was refused.
    pub fn refusal(&self, principal: &Principal) -> WireError {
        if !principal.scopes.is_empty() {
            let scopes: Vec<&str> = principal.scopes.iter().map(|s| s.as_str()).collect();
            let message = match self.needs() {
                Some(n) if !n.granted_by(&principal.scopes) => format!(
                    "insufficient_scope: this operation needs the scope `{}`; the token has {}",
                    n.scope(),
                    scopes.join(", ")
                ),
                None if *self == Access::Minters => format!(
                    "insufficient_scope: approval tokens are minted by people; a scoped token ({}) \
                     can only carry one a person minted",
                    scopes.join(", ")
                ),
                None => format!(
                    "insufficient_scope: a scoped token ({}) may not do this",
                    scopes.join(", ")
                ),
                Some(_) => format!("a {} token may not use this subject", principal.role),
            };
            return WireError::new(ErrorCode::Forbidden, message);
        }
        let message = match self {
            Access::Workstation if principal.role == Role::Worker => {
                "this subject needs a workstation credential: an enrolment token may only call \
                 workstations.register, whose reply carries the credential"
                    .to_string()
            }
            Access::Workstation => format!(
                "a {} token may not use this subject: workers use their workstation's credential \
                 (enrol with workstations.register)",
                principal.role
            ),
            _ if principal.workstation_id.is_some() => {
                "a workstation credential may only use the lease, ingest and workstations.register subjects".to_string()
            }
            _ => format!("a {} token may not use this subject", principal.role),
        };
        WireError::new(ErrorCode::Forbidden, message)
    }
}

/// One decoded, authenticated request.
#[derive(Debug)]
pub struct Incoming<T> {
    pub principal: Principal,
    pub body: T,
}

/// How to serve one subject.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub subject: String,
    pub queue_group: String,
    pub access: Access,
    /// Most requests folded into one handler call.
    pub batch_max: usize,
    /// A batch closes once its payloads reach this many bytes (the first request always fits).
    pub batch_max_bytes: usize,
    /// Handler calls running at once.
    pub concurrent_batches: usize,
    /// What decoding does with NUL in text: refuse (every subject but worker output).
    pub text: TextPolicy,
}

impl ServeOptions {
    /// Options for `subject` under `limits`, refusing NUL in text.
    pub fn new(limits: &ServeLimits, subject: String, queue_group: &str, access: Access) -> Self {
        let batch_max = limits.batch_max.max(1);
        Self {
            subject,
            queue_group: queue_group.to_string(),
            access,
            batch_max,
            batch_max_bytes: limits.batch_max_bytes,
            concurrent_batches: (limits.max_in_flight / batch_max).max(1),
            text: TextPolicy::Refuse,
        }
    }
}

struct Pending {
    reply: Option<async_nats::Subject>,
    encoding: Encoding,
}

/// Returns once the server has applied every subscription this connection made so
/// far. `Client::flush` only writes the buffer to the socket: a request from another
/// connection can still reach the server before it has processed our SUB (and get
/// "no responders"). The server handles one connection's operations in order, so a
/// message we publish to ourselves comes back only after the earlier SUBs took effect.
pub async fn subscriptions_live(nats: &async_nats::Client) -> Result<(), String> {
    let inbox = nats.new_inbox();
    let mut echo = nats.subscribe(inbox.clone()).await.map_err(|e| e.to_string())?;
    nats.publish(inbox, bytes::Bytes::new())
        .await
        .map_err(|e| e.to_string())?;
    nats.flush().await.map_err(|e| e.to_string())?;
    let back = tokio::time::timeout(Duration::from_secs(10), echo.next()).await;
    let _ = echo.unsubscribe().await;
    match back {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err("the NATS connection closed".into()),
        Err(_) => Err("the NATS server did not answer within 10 s".into()),
    }
}

/// Subscribes and serves until `shutdown`; returns once the subscription is live.
/// The returned handle finishes after the drain.
pub async fn serve<Req, Resp, H, Fut>(
    bus: &Bus,
    auth: Arc<dyn Authenticate>,
    opts: ServeOptions,
    handler: H,
    shutdown: Shutdown,
) -> Result<JoinHandle<()>, StartupError>
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    H: Fn(Vec<Incoming<Req>>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Vec<Result<Resp, WireError>>> + Send + 'static,
{
    let nats = bus.nats.clone();
    let metrics = bus.metrics.clone();
    let mut sub = nats
        .queue_subscribe(opts.subject.clone(), opts.queue_group.clone())
        .await
        .map_err(|e| StartupError::Nats {
            url: bus.nats_url.clone(),
            reason: e.to_string(),
        })?;
    // Make sure the server has the subscription before we report it live.
    subscriptions_live(&nats).await.map_err(|reason| StartupError::Nats {
        url: bus.nats_url.clone(),
        reason,
    })?;
    let handler = Arc::new(handler);
    let permits = Arc::new(Semaphore::new(opts.concurrent_batches));
    let name: Arc<str> = Arc::from(short_name(&opts.subject));

    Ok(tokio::spawn(async move {
        let mut draining = false;
        loop {
            let permit = permits.clone().acquire_owned().await.expect("semaphore never closed");
            let first = if draining {
                sub.next().await
            } else {
                tokio::select! {
                    m = sub.next() => m,
                    _ = shutdown.cancelled() => {
                        draining = true;
                        let _ = sub.drain().await;
                        sub.next().await
                    }
                }
            };
            let Some(first) = first else { break };
            let received = Instant::now();
            let mut bytes = first.payload.len();
            let mut batch = vec![first];
            while batch.len() < opts.batch_max && bytes < opts.batch_max_bytes {
                match sub.next().now_or_never() {
                    Some(Some(m)) => {
                        bytes += m.payload.len();
                        batch.push(m);
                    }
                    _ => break,
                }
            }
            let nats = nats.clone();
            let auth = auth.clone();
            let handler = handler.clone();
            let metrics = metrics.clone();
            let name = name.clone();
            let access = opts.access;
            let text = opts.text;
            tokio::spawn(async move {
                let served = Served {
                    nats: &nats,
                    metrics: &metrics,
                    name: &name,
                    received,
                };
                process_batch(&served, &*auth, (access, text), &*handler, batch).await;
                drop(permit);
            });
        }
        // Wait for in-flight batches before reporting drained.
        let _ = permits.acquire_many(opts.concurrent_batches as u32).await;
    }))
}

/// Where a batch's replies go and what they are counted against.
struct Served<'a> {
    nats: &'a async_nats::Client,
    metrics: &'a Metrics,
    /// The subject's short name (metric label).
    name: &'a str,
    /// When the batch's first request arrived.
    received: Instant,
}

async fn process_batch<Req, Resp, H, Fut>(
    served: &Served<'_>,
    auth: &dyn Authenticate,
    (access, text): (Access, TextPolicy),
    handler: &H,
    batch: Vec<async_nats::Message>,
) where
    Req: DeserializeOwned,
    Resp: Serialize,
    H: Fn(Vec<Incoming<Req>>) -> Fut,
    Fut: Future<Output = Vec<Result<Resp, WireError>>>,
{
    let mut accepted = Vec::with_capacity(batch.len());
    let mut pending = Vec::with_capacity(batch.len());
    for msg in batch {
        let encoding = Encoding::from_content_type(header(&msg, CONTENT_TYPE));
        let reply_to = msg.reply.clone();
        match admit::<Req>(auth, access, text, &msg, encoding).await {
            Ok(incoming) => {
                accepted.push(incoming);
                pending.push(Pending {
                    reply: reply_to,
                    encoding,
                });
            }
            Err(e) => respond::<Resp>(served, reply_to, encoding, Err(e)).await,
        }
    }
    served.metrics.batch(served.name);
    let name = served.name;
    if accepted.is_empty() {
        return;
    }
    let n = accepted.len();
    let results = match AssertUnwindSafe(handler(accepted)).catch_unwind().await {
        Ok(r) if r.len() == n => r,
        Ok(r) => {
            tracing::error!(
                subject = name,
                expected = n,
                got = r.len(),
                "handler returned the wrong number of results"
            );
            (0..n).map(|_| Err(WireError::internal("internal error"))).collect()
        }
        Err(_) => {
            tracing::error!(subject = name, "handler panicked");
            (0..n).map(|_| Err(WireError::internal("internal error"))).collect()
        }
    };
    for (p, r) in pending.into_iter().zip(results) {
        respond(served, p.reply, p.encoding, r).await;
    }
}

async fn admit<Req: DeserializeOwned>(
    auth: &dyn Authenticate,
    access: Access,
    text: TextPolicy,
    msg: &async_nats::Message,
    encoding: Encoding,
) -> Result<Incoming<Req>, WireError> {
    let principal = auth.authenticate(header(msg, AUTHORIZATION)).await?;
    if !access.allows(&principal) {
        return Err(access.refusal(&principal));
    }
    let body = encoding.decode_request::<Req>(&msg.payload, text)?;
    Ok(Incoming { principal, body })
}

/// The byte budget of one list page on this connection: [`tanjiren_shared::codec::MAX_PAGE_BYTES`],
/// or half the server's max payload if that is smaller.
pub fn page_budget(nats: &async_nats::Client) -> usize {
    tanjiren_shared::codec::page_budget(nats.max_payload())
}

/// Room left in a message for the reply's headers (`Content-Type` on JSON replies).
const HEADER_ROOM: usize = 256;

async fn respond<Resp: Serialize>(
    served: &Served<'_>,
    reply: Option<async_nats::Subject>,
    encoding: Encoding,
    result: Result<Resp, WireError>,
) {
    let (nats, name) = (served.nats, served.name);
    let (body, outcome) = reply_body(encoding, result, nats.max_payload());
    served.metrics.request(name, outcome, served.received.elapsed());
    let Some(reply) = reply else { return };
    let sent = match encoding {
        Encoding::MsgPack => nats.publish(reply, body.into()).await,
        Encoding::Json => {
            let mut h = HeaderMap::new();
            h.insert(CONTENT_TYPE, encoding.content_type());
            nats.publish_with_headers(reply, h, body.into()).await
        }
    };
    if let Err(e) = sent {
        tracing::warn!(subject = name, error = %e, "could not send reply");
    }
}

/// The encoded reply and its outcome label. A reply the server would refuse
/// (over `max_payload` bytes with its headers) becomes a `too_large` error that
/// tells the caller to narrow the request: the safety net behind every page bound.
pub fn reply_body<Resp: Serialize>(
    encoding: Encoding,
    result: Result<Resp, WireError>,
    max_payload: usize,
) -> (Vec<u8>, &'static str) {
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.code.as_str(),
    };
    // A reply that cannot be encoded becomes an `internal` error reply; a plain
    // error always encodes, so the caller still gets exactly one reply.
    let (body, outcome) = match encoding.encode(&Reply::from(result)) {
        Ok(body) => (body, outcome),
        Err(e) => {
            tracing::error!(error = %e, "a reply could not be encoded");
            (encode_error(encoding, e.clone()), e.code.as_str())
        }
    };
    let limit = max_payload.saturating_sub(HEADER_ROOM);
    if body.len() <= limit {
        return (body, outcome);
    }
    let e = WireError::too_large(format!(
        "the reply would be {} bytes, more than the {limit} bytes this NATS server accepts; \
         narrow the request (a smaller `limit`, the next page, a filter)",
        body.len()
    ));
    (encode_error(encoding, e), ErrorCode::TooLarge.as_str())
}

/// An error reply; a `WireError` always encodes (strings and a code).
fn encode_error(encoding: Encoding, e: WireError) -> Vec<u8> {
    encoding.encode(&Reply::<()>::Error(e)).unwrap_or_default()
}

fn header<'a>(msg: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    msg.headers.as_ref()?.get(name).map(|v| v.as_str())
}

/// `prefix.v1.tasks.create` → `tasks.create` (metric label).
fn short_name(subject: &str) -> String {
    match subject.find(".v1.") {
        Some(i) => subject[i + 4..].to_string(),
        None => subject.to_string(),
    }
}

/// Serves a service's subjects: each route is one subject, its access rule and its
/// batch handler `fn(C, Vec<Incoming<Req>>) -> Vec<Result<Resp, WireError>>` (`C` is
/// the service's context, cloned per batch), all in the service's queue group and
/// stopped by one shutdown token.
pub struct Router<C> {
    bus: Bus,
    auth: Arc<dyn Authenticate>,
    ctx: C,
    queue_group: &'static str,
    shutdown: Shutdown,
    handle: ServiceHandle,
}

impl<C: Clone + Send + Sync + 'static> Router<C> {
    /// A router serving on `bus`, authenticating with `auth`, handing `ctx` to handlers.
    pub fn new(bus: Bus, auth: Arc<dyn Authenticate>, ctx: C, queue_group: &'static str, shutdown: Shutdown) -> Self {
        Self {
            bus,
            auth,
            ctx,
            queue_group,
            shutdown,
            handle: ServiceHandle::new(),
        }
    }

    /// Subscribes `subject`; returns once it is live.
    pub async fn route<Req, Resp, H, Fut>(
        &mut self,
        subject: String,
        access: Access,
        handler: H,
    ) -> Result<(), StartupError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        H: Fn(C, Vec<Incoming<Req>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<Resp, WireError>>> + Send + 'static,
    {
        self.route_with(subject, access, TextPolicy::Refuse, handler).await
    }

    /// Like [`Router::route`], with the decoding's NUL policy chosen: worker output
    /// subjects ([`TextPolicy::ReplaceNul`]) clean text instead of refusing it.
    pub async fn route_with<Req, Resp, H, Fut>(
        &mut self,
        subject: String,
        access: Access,
        text: TextPolicy,
        handler: H,
    ) -> Result<(), StartupError>
    where
        Req: DeserializeOwned + Send + 'static,
        Resp: Serialize + Send + 'static,
        H: Fn(C, Vec<Incoming<Req>>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<Resp, WireError>>> + Send + 'static,
    {
        let mut opts = ServeOptions::new(&self.bus.limits, subject, self.queue_group, access);
        opts.text = text;
        let ctx = self.ctx.clone();
        let served = serve(
            &self.bus,
            self.auth.clone(),
            opts,
            move |batch| handler(ctx.clone(), batch),
            self.shutdown.clone(),
        )
        .await?;
        self.handle.push(served);
        Ok(())
    }

    /// The authenticator the routes use.
    pub fn authenticator(&self) -> Arc<dyn Authenticate> {
        self.auth.clone()
    }

    /// The handle of everything routed so far.
    pub fn into_handle(self) -> ServiceHandle {
        self.handle
    }
}

/// Answers a batch one request at a time, in the caller's organisation: for
/// handlers where folding requests into one statement buys nothing (reads).
pub async fn each<C, Req, Resp>(
    ctx: &C,
    batch: Vec<Incoming<Req>>,
    handler: impl AsyncFn(&C, tanjiren_shared::ids::OrgId, &Req) -> Result<Resp, WireError>,
) -> Vec<Result<Resp, WireError>> {
    let mut out = Vec::with_capacity(batch.len());
    for req in batch {
        out.push(handler(ctx, req.principal.org_id, &req.body).await);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_that_cannot_be_encoded_becomes_an_internal_error_not_a_panic() {
        // JSON cannot have a map with tuple keys.
        let unencodable: std::collections::BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
        let (body, outcome) = reply_body(Encoding::Json, Ok::<_, WireError>(unencodable), 1 << 20);
        assert_eq!(outcome, "internal");
        let e = Encoding::Json
            .decode::<Reply<serde_json::Value>>(&body)
            .unwrap()
            .into_result()
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(e.message.contains("cannot encode"), "{}", e.message);
    }

    #[test]
    fn a_reply_over_the_servers_limit_becomes_too_large() {
        let big = "x".repeat(10_000);
        for enc in [Encoding::MsgPack, Encoding::Json] {
            let (body, outcome) = reply_body(enc, Ok::<_, WireError>(big.clone()), 1 << 20);
            assert_eq!(outcome, "ok");
            assert!(body.len() > 10_000);
            let (body, outcome) = reply_body(enc, Ok::<_, WireError>(big.clone()), 4096);
            assert_eq!(outcome, "too_large");
            let e = enc.decode::<Reply<String>>(&body).unwrap().into_result().unwrap_err();
            assert_eq!(e.code, ErrorCode::TooLarge);
            assert!(e.message.contains("narrow the request"), "{}", e.message);
            assert!(body.len() <= 4096 - HEADER_ROOM);
        }
    }
}
