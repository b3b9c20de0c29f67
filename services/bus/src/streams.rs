//! The JetStream streams Tanjiren relies on, created idempotently at start:
//! `{PREFIX}_SUBMIT` captures `tasks.submit` (work-queue retention: a message is
//! gone once ingest has committed and acked it); `{PREFIX}_EVENTS` keeps every
//! `events.>` message for replay by consumers that were down (7 days, 1 GiB).

use crate::connect::StartupError;
use async_nats::jetstream::{self, stream};
use std::time::Duration;
use tanjiren_shared::subjects::Subjects;

pub const SUBMIT_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
pub const EVENTS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);
pub const EVENTS_MAX_BYTES: i64 = 1 << 30;

pub fn submit_stream_config(subjects: &Subjects) -> stream::Config {
    stream::Config {
        name: subjects.stream_name("submit"),
        subjects: vec![subjects.tasks_submit()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: stream::StorageType::File,
        max_age: SUBMIT_MAX_AGE,
        // Publishers may set Nats-Msg-Id; JetStream drops repeats within this window.
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

pub fn events_stream_config(subjects: &Subjects) -> stream::Config {
    stream::Config {
        name: subjects.stream_name("events"),
        subjects: vec![subjects.all_events()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: EVENTS_MAX_AGE,
        max_bytes: EVENTS_MAX_BYTES,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    }
}

/// Creates both streams if they do not exist yet.
pub async fn ensure_streams(
    nats: &async_nats::Client,
    subjects: &Subjects,
) -> Result<jetstream::Context, StartupError> {
    let js = jetstream::new(nats.clone());
    for config in [submit_stream_config(subjects), events_stream_config(subjects)] {
        let name = config.name.clone();
        js.get_or_create_stream(config).await.map_err(|e| {
            StartupError::JetStream(format!(
                "stream {name}: {e} (is JetStream enabled? start nats-server with -js)"
            ))
        })?;
    }
    Ok(js)
}

/// Deletes both streams (tests clean up after themselves).
pub async fn delete_streams(nats: &async_nats::Client, subjects: &Subjects) {
    let js = jetstream::new(nats.clone());
    for name in [subjects.stream_name("submit"), subjects.stream_name("events")] {
        let _ = js.delete_stream(&name).await;
    }
}

/// A durable pull consumer's messages, shared by every replica that opens the same
/// `durable` name: explicit acks (a message not acked within `ack_wait` is
/// redelivered), at most `batch_max` per pull, heartbeats so a dead connection is noticed.
pub async fn durable_messages(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
    filter_subject: Option<String>,
    ack_wait: Duration,
    batch_max: usize,
) -> Result<jetstream::consumer::pull::Stream, StartupError> {
    let err = |e: String| StartupError::JetStream(format!("consumer {durable} on {stream}: {e}"));
    let stream = js.get_stream(stream).await.map_err(|e| err(e.to_string()))?;
    let consumer = stream
        .get_or_create_consumer(
            durable,
            jetstream::consumer::pull::Config {
                durable_name: Some(durable.to_string()),
                filter_subject: filter_subject.unwrap_or_default(),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| err(e.to_string()))?;
    consumer
        .stream()
        .max_messages_per_batch(batch_max)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| err(e.to_string()))
}
