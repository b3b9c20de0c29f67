//! Durable submission: integrations publish on `tasks.submit` without waiting;
//! the submit stream keeps the message until ingest has committed the task and
//! acknowledged it, so a request published while ingest was down is created once
//! it is back. Duplicates are folded by the idempotency key (and by JetStream's
//! `Nats-Msg-Id` window); the outcome of each is published on
//! `events.{org}.submit.outcome`.

use async_nats::jetstream::AckKind;
use futures::{FutureExt, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tanjiren_bus::Authenticate;
use tanjiren_bus::streams::{durable_messages, ensure_streams};
use tanjiren_ops::metrics::Count;
use tanjiren_shared::WireError;
use tanjiren_shared::codec::{CONTENT_TYPE, Encoding, TextPolicy};
use tanjiren_shared::model::TaskSpec;
use tanjiren_shared::protocol::{AUTHORIZATION, Principal, SubmitOutcome};
use tanjiren_store::{Access, Connections, Shutdown, StartupError};

/// Durable consumer name shared by every ingest replica.
pub const CONSUMER: &str = "ingest";
/// How long a delivered message may stay unacknowledged before redelivery.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Delay before a message that hit a transient error is delivered again.
const RETRY_DELAY: Duration = Duration::from_secs(2);

pub(crate) async fn start(
    conns: &Connections,
    auth: Arc<dyn Authenticate>,
    shutdown: Shutdown,
) -> Result<tokio::task::JoinHandle<()>, StartupError> {
    let js = ensure_streams(&conns.nats, &conns.subjects).await?;
    let stream = conns.subjects.stream_name("submit");
    let mut messages = durable_messages(&js, &stream, CONSUMER, None, ACK_WAIT, conns.config.batch_max).await?;
    let conns = conns.clone();
    let batch_max = conns.config.batch_max;
    Ok(tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                m = messages.next() => m,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            while batch.len() < batch_max {
                match messages.next().now_or_never() {
                    Some(Some(m)) => batch.push(m),
                    _ => break,
                }
            }
            let batch: Vec<_> = batch
                .into_iter()
                .filter_map(|m| m.map_err(|e| tracing::warn!(error = %e, "submit stream error")).ok())
                .collect();
            process(&conns, &*auth, batch).await;
        }
    }))
}

async fn process(conns: &Connections, auth: &dyn Authenticate, batch: Vec<async_nats::jetstream::Message>) {
    let mut accepted = Vec::with_capacity(batch.len());
    let mut requests: Vec<(Principal, TaskSpec)> = Vec::with_capacity(batch.len());
    for msg in batch {
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_string())
        };
        let principal = match auth.authenticate(header(AUTHORIZATION).as_deref()).await {
            Ok(p) => p,
            Err(e) if e.code.is_retryable() => {
                let _ = msg.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await;
                continue;
            }
            Err(e) => {
                // Without a valid token there is no organisation to report to: log, count, drop.
                tracing::warn!(error = %e, "dropping unauthenticated submission");
                count(conns, e.code.as_str());
                let _ = msg.ack_with(AckKind::Term).await;
                continue;
            }
        };
        // The rule of `tasks.create`: the same role and scope.
        if !Access::Operators.allows(&principal) {
            let e = Access::Operators.refusal(&principal);
            report(conns, &principal, None, Err(e)).await;
            let _ = msg.ack_with(AckKind::Term).await;
            continue;
        }
        let encoding = Encoding::from_content_type(header(CONTENT_TYPE).as_deref());
        match encoding.decode_request::<TaskSpec>(&msg.payload, TextPolicy::Refuse) {
            Ok(spec) => {
                accepted.push(msg);
                requests.push((principal, spec));
            }
            Err(e) => {
                report(conns, &principal, None, Err(e)).await;
                let _ = msg.ack_with(AckKind::Term).await;
            }
        }
    }
    if requests.is_empty() {
        return;
    }
    let keys: Vec<Option<String>> = requests.iter().map(|(_, s)| s.idempotency_key.clone()).collect();
    let principals: Vec<Principal> = requests.iter().map(|(p, _)| p.clone()).collect();
    let results = tanjiren_store::tasks::create_tasks(conns, requests).await;
    for (((msg, result), key), principal) in accepted.into_iter().zip(results).zip(keys).zip(principals) {
        match result {
            Err(e) if e.code.is_retryable() => {
                // Not committed: leave it in the stream for another try.
                let _ = msg.ack_with(AckKind::Nak(Some(RETRY_DELAY))).await;
            }
            result => {
                // Committed (or permanently refused): acknowledge, then report.
                if let Err(e) = msg.double_ack().await {
                    tracing::warn!(error = %e, "submit ack failed; a redelivery will be folded by its idempotency key");
                }
                report(conns, &principal, key, result).await;
            }
        }
    }
}

async fn report(
    conns: &Connections,
    principal: &Principal,
    idempotency_key: Option<String>,
    result: Result<tanjiren_shared::protocol::CreateTaskReply, WireError>,
) {
    let outcome = match result {
        Ok(r) => SubmitOutcome {
            idempotency_key,
            task_id: Some(r.task_id),
            created: r.created,
            error: None,
        },
        Err(e) => SubmitOutcome {
            idempotency_key,
            task_id: None,
            created: false,
            error: Some(e),
        },
    };
    count(conns, outcome.error.as_ref().map(|e| e.code.as_str()).unwrap_or("ok"));
    let subject = conns.subjects.submit_outcome(principal.org_id);
    if let Err(e) = tanjiren_bus::publish(&conns.nats, subject, &outcome).await {
        tracing::warn!(error = %e, "could not publish submit outcome");
    }
}

fn count(conns: &Connections, outcome: &str) {
    conns.metrics.count(Count::Submissions { outcome }, 1);
}
