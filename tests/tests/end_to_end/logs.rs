//! Stored output over real servers: order across batches, deduplication by
//! signature (counts, exemplar, raw and dedup views), the per-step cap and its
//! marker, long lines and bad UTF-8, fencing of log batches, the preview kept
//! current while a step runs, `logs -f` across the live/stored seam, and a
//! durable consumer replaying the lifecycle events it missed.

use chrono::Utc;
use futures::StreamExt;
use std::collections::HashMap;
use std::time::Duration;
use tanjiren_shared::ErrorCode;
use tanjiren_shared::codec::Encoding;
use tanjiren_shared::ids::{StepId, TaskId};
use tanjiren_shared::logs::{INVALID_UTF8_MARK, MAX_LINE_BYTES, TRUNCATED_MARK, cap_marker};
use tanjiren_shared::model::TaskStatus;
use tanjiren_shared::protocol::*;
use tanjiren_tests::{TestEnv, command};

const WAIT: Duration = Duration::from_secs(30);

/// A queued step of a new task on `ws` (no worker runs there), claimed at generation 1.
async fn claimed_step(env: &TestEnv, ws: &str) -> (TaskId, StepId) {
    env.workstation(ws).await;
    let task = env.create(&command("true", &[ws])).await.unwrap().task_id;
    let mut step = None;
    for _ in 0..200 {
        if let Some(s) = env.get(task).await.unwrap().steps.first() {
            step = Some(s.step_id);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let step = step.expect("task queued");
    assert_eq!(claim(env, step).await.lease_generation, 1);
    (task, step)
}

/// Claims a fresh step as `test-worker`.
async fn claim(env: &TestEnv, step: StepId) -> ClaimGranted {
    env.call(
        &env.conns.subjects.lease_claim(),
        &env.step_credential(step).await,
        &ClaimRequest {
            step_id: step,
            lease_generation: 0,
            worker_id: "test-worker".into(),
        },
    )
    .await
    .unwrap()
}

fn line(seq: i64, stream: LogStream, text: &str) -> LogLine {
    LogLine {
        seq,
        stream,
        text: text.into(),
        at: Utc::now(),
    }
}

async fn send(
    env: &TestEnv,
    step: StepId,
    generation: i64,
    lines: Vec<LogLine>,
) -> Result<LogBatchReply, tanjiren_shared::WireError> {
    env.call(
        &env.conns.subjects.ingest_logs(),
        &env.step_credential(step).await,
        &LogBatch {
            step_id: step,
            lease_generation: generation,
            worker_id: "test-worker".into(),
            lines,
        },
    )
    .await
}

async fn logs(env: &TestEnv, task: TaskId, view: LogView, after: i64, limit: u32) -> TaskLogsReply {
    env.call(
        &env.conns.subjects.tasks_logs(),
        &env.member_token,
        &TaskLogsRequest {
            task_id: task,
            step_id: None,
            after_seq: Some(after),
            after_step_id: None,
            limit: Some(limit),
            view,
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn lines_keep_their_order_across_batches_and_fold_by_signature() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let (task, step) = claimed_step(&env, "ws-order").await;

    // Three batches of 100: odd seqs are unique stdout lines, even seqs one repeated
    // stderr error with a changing timestamp, counter and request id.
    let mut batches = Vec::new();
    for b in 0..3 {
        let lines: Vec<LogLine> = (1..=100)
            .map(|i| b * 100 + i)
            .map(|seq| {
                if seq % 2 == 1 {
                    line(
                        seq,
                        LogStream::Stdout,
                        &format!("compiling unit {}{seq}", "x".repeat(seq as usize % 7)),
                    )
                } else {
                    line(
                        seq,
                        LogStream::Stderr,
                        &format!(
                            "2026-11-26T08:00:{:02}.{seq}Z error: retry {seq} for request {}",
                            seq % 60,
                            uuid::Uuid::new_v4()
                        ),
                    )
                }
            })
            .collect();
        batches.push(lines);
    }
    for lines in &batches {
        assert_eq!(send(&env, step, 1, lines.clone()).await.unwrap().stored, 100);
    }
    // A retried batch is harmless: nothing stored twice, nothing counted twice.
    send(&env, step, 1, batches[1].clone()).await.unwrap();
    assert_eq!(env.count("task_logs").await, 300);

    // The raw view, page by page, is every line in order.
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = logs(&env, task, LogView::Raw, after, 70).await;
        if page.lines.is_empty() {
            break;
        }
        assert!(page.signatures.is_empty());
        after = page.lines.last().unwrap().line.seq;
        seen.extend(page.lines.into_iter().map(|l| l.line));
    }
    let seqs: Vec<i64> = seen.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>());
    assert_eq!(seen[1].text, batches[0][1].text);

    // The dedup view: one row for the 150 errors, with the first as exemplar.
    let dedup = logs(&env, task, LogView::Dedup, 0, 1000).await;
    assert!(dedup.lines.is_empty());
    let err = dedup
        .signatures
        .iter()
        .find(|s| s.stream == LogStream::Stderr)
        .expect("an error signature");
    assert_eq!(
        dedup
            .signatures
            .iter()
            .filter(|s| s.stream == LogStream::Stderr)
            .count(),
        1,
        "{dedup:?}"
    );
    assert_eq!(err.count, 150);
    assert_eq!(err.first_seq, 2);
    assert_eq!(err.last_seq, 300);
    assert_eq!(err.exemplar, batches[0][1].text);
    assert_eq!(err.signature, "<ts> error: retry <n> for request <uuid>");
    // Stdout lines differ only in a number and in trailing x's: 7 distinct shapes.
    let outs: i64 = dedup
        .signatures
        .iter()
        .filter(|s| s.stream == LogStream::Stdout)
        .map(|s| s.count)
        .sum();
    assert_eq!(outs, 150);
    // Ordered by first occurrence.
    let firsts: Vec<i64> = dedup.signatures.iter().map(|s| s.first_seq).collect();
    assert!(firsts.windows(2).all(|w| w[0] < w[1]), "{firsts:?}");
    // Paging the dedup view on first_seq.
    let page2 = logs(&env, task, LogView::Dedup, 2, 1000).await;
    assert!(page2.signatures.iter().all(|s| s.first_seq > 2));
    env.finish(services).await;
}

#[tokio::test]
async fn the_cap_stores_one_marker_and_long_or_odd_lines_are_kept_marked() {
    let env = TestEnv::with(|c| c.log_cap_bytes = 10_000).await;
    let services = env.start_all().await;
    let (task, step) = claimed_step(&env, "ws-cap").await;

    // A long line is cut and marked server-side; NUL becomes U+FFFD.
    let long = "z".repeat(MAX_LINE_BYTES + 5000);
    let r = send(&env, step, 1, vec![line(1, LogStream::Stdout, "a\0b")])
        .await
        .unwrap();
    assert_eq!(r.stored, 1);
    let page = logs(&env, task, LogView::Raw, 0, 10).await;
    assert_eq!(page.lines[0].line.text, "a\u{FFFD}b");

    // 15 lines of 1000 bytes against a 10 000-byte cap: 9 fit, then the marker, then nothing.
    let lines: Vec<LogLine> = (2..=16)
        .map(|s| line(s, LogStream::Stdout, &"k".repeat(1000)))
        .collect();
    let r = send(&env, step, 1, lines).await.unwrap();
    assert!(r.truncated);
    assert_eq!(r.stored, 10, "9 lines and the marker");
    let r = send(&env, step, 1, vec![line(17, LogStream::Stdout, "after the cap")])
        .await
        .unwrap();
    assert_eq!((r.stored, r.truncated), (0, true));
    let all = logs(&env, task, LogView::Raw, 0, 100).await.lines;
    let markers: Vec<_> = all.iter().filter(|l| l.line.text == cap_marker(10_000)).collect();
    assert_eq!(markers.len(), 1, "the marker is stored once");
    assert_eq!(markers[0].line.seq, 11);
    assert!(all.iter().all(|l| l.line.text != "after the cap"));
    let t = env.get(task).await.unwrap();
    assert!(t.steps[0].log_truncated);
    assert!(t.steps[0].log_bytes <= 10_000 + cap_marker(10_000).len() as i64);
    env.finish(services).await;

    // The long line on a step with the default cap.
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let (task, step) = claimed_step(&env, "ws-long").await;
    send(&env, step, 1, vec![line(1, LogStream::Stdout, &long)])
        .await
        .unwrap();
    let stored = &logs(&env, task, LogView::Raw, 0, 10).await.lines[0].line.text;
    assert_eq!(stored.len(), MAX_LINE_BYTES + TRUNCATED_MARK.len());
    assert!(stored.ends_with(TRUNCATED_MARK));
    // An oversized batch is refused whole.
    let many: Vec<LogLine> = (2..=10_002).map(|s| line(s, LogStream::Stdout, "x")).collect();
    assert_eq!(send(&env, step, 1, many).await.unwrap_err().code, ErrorCode::TooLarge);
    env.finish(services).await;
}

#[tokio::test]
async fn bad_utf8_from_a_real_command_is_kept_lossily_and_marked() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let w = env.worker("ws-utf8").await;
    let task = env
        .create(&command(r"printf 'bad \377 byte\n'; echo fine", &["ws-utf8"]))
        .await
        .unwrap()
        .task_id;
    let t = env.wait_released(task, WAIT).await;
    assert_eq!(t.status, TaskStatus::Completed);
    let texts: Vec<String> = logs(&env, task, LogView::Raw, 0, 10)
        .await
        .lines
        .into_iter()
        .map(|l| l.line.text)
        .collect();
    assert_eq!(
        texts,
        [format!("bad \u{FFFD} byte{INVALID_UTF8_MARK}"), "fine".to_string()]
    );
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn a_stale_generation_batch_is_rejected_and_leaves_nothing() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let (task, step) = claimed_step(&env, "ws-stale").await;
    let e = send(&env, step, 0, vec![line(1, LogStream::Stderr, "zombie")])
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::StaleLease);
    let e = send(&env, step, 2, vec![line(1, LogStream::Stderr, "from the future")])
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::StaleLease);
    assert_eq!(env.count("task_logs").await, 0);
    assert_eq!(env.count("task_log_signatures").await, 0);
    assert!(logs(&env, task, LogView::Dedup, 0, 10).await.signatures.is_empty());
    let t = env.get(task).await.unwrap();
    assert_eq!(t.steps[0].log_bytes, 0);
    env.finish(services).await;
}

#[tokio::test]
async fn the_preview_is_kept_current_while_the_step_runs() {
    let env = TestEnv::with(|c| c.progress_interval_ms = 200).await;
    let services = env.start_all().await;
    let w = env.worker("ws-preview").await;
    let task = env
        .create(&command(
            "for i in $(seq 1 40); do echo tick $i; sleep 0.1; done",
            &["ws-preview"],
        ))
        .await
        .unwrap()
        .task_id;
    let mut seen_running = None;
    for _ in 0..200 {
        let t = env.get(task).await.unwrap();
        if t.status == TaskStatus::Executing
            && let Some(s) = t.steps.first()
            && s.stdout_tail.contains("tick")
        {
            seen_running = Some(s.stdout_tail.clone());
            break;
        }
        if t.status.is_terminal() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let tail = seen_running.expect("the preview was updated before the step ended");
    assert!(!tail.contains("tick 40"), "{tail}");
    let t = env.wait_released(task, WAIT).await;
    assert!(t.steps[0].stdout_tail.contains("tick 40"));
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn following_logs_across_the_live_and_stored_seam_has_no_gap_and_no_duplicate() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let w = env.worker("ws-follow").await;
    let task = env
        .create(&command(
            "for i in $(seq 1 80); do echo line $i; sleep 0.02; done",
            &["ws-follow"],
        ))
        .await
        .unwrap()
        .task_id;
    // Join mid-run: part of the output is stored already, the rest arrives live.
    for _ in 0..200 {
        let page = logs(&env, task, LogView::Raw, 0, 1).await;
        if !page.lines.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let follower = tanjiren_bus::log_follow::LogFollower {
        nats: &env.conns.nats,
        subjects: &env.conns.subjects,
        token: &env.member_token,
        poll: Duration::from_millis(100),
    };
    let mut got: Vec<(StepId, i64, String)> = Vec::new();
    tokio::time::timeout(
        WAIT,
        follower.run(task, true, |s, l| got.push((s, l.seq, l.text.clone()))),
    )
    .await
    .expect("follow ends when the task ends")
    .unwrap();
    let texts: Vec<&str> = got.iter().map(|(_, _, t)| t.as_str()).collect();
    let want: Vec<String> = (1..=80).map(|i| format!("line {i}")).collect();
    assert_eq!(texts, want.iter().map(String::as_str).collect::<Vec<_>>());
    let seqs: Vec<i64> = got.iter().map(|(_, s, _)| *s).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
    w.stop().await;
    env.finish(services).await;
}

#[tokio::test]
async fn a_consumer_that_was_away_replays_every_lifecycle_event_in_order() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    let js = async_nats::jetstream::new(env.conns.nats.clone());
    let stream = js.get_stream(env.conns.subjects.stream_name("events")).await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: Some("auditor".into()),
            filter_subject: env.conns.subjects.all_task_events(),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await
        .unwrap();

    // While the consumer reads nothing: two tasks complete, one fails, one is cancelled.
    let w = env.worker("ws-events").await;
    env.workstation("ws-idle").await;
    let ok1 = env.create(&command("echo one", &["ws-events"])).await.unwrap().task_id;
    let ok2 = env.create(&command("echo two", &["ws-events"])).await.unwrap().task_id;
    let bad = env.create(&command("exit 4", &["ws-events"])).await.unwrap().task_id;
    let idle = env.create(&command("true", &["ws-idle"])).await.unwrap().task_id;
    for t in [ok1, ok2, bad] {
        env.wait_released(t, WAIT).await;
    }
    for _ in 0..200 {
        if env.get(idle).await.unwrap().status == TaskStatus::Queued {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.cancel(idle, Some("not needed")).await.unwrap();
    env.wait_terminal(idle, WAIT).await;
    w.stop().await;

    // Back: everything missed is there, in order per task.
    let mut per_task: HashMap<TaskId, Vec<TaskStatus>> = HashMap::new();
    let mut msgs = consumer
        .fetch()
        .max_messages(100)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    while let Some(Ok(m)) = msgs.next().await {
        let e: TaskEventMessage = Encoding::MsgPack.decode(&m.payload).unwrap();
        per_task.entry(e.task_id).or_default().push(e.status);
        m.ack().await.unwrap();
    }
    use TaskStatus::*;
    // No doctrine: each task is evaluated in its creation transaction, so its first
    // stored state, and its first event, is `queued`.
    assert_eq!(per_task[&ok1], [Queued, Executing, Completed]);
    assert_eq!(per_task[&ok2], [Queued, Executing, Completed]);
    assert_eq!(per_task[&bad], [Queued, Executing, Failed]);
    assert_eq!(per_task[&idle], [Queued, Cancelled]);
    env.finish(services).await;
}

#[tokio::test]
async fn pages_across_steps_follow_the_step_and_seq_cursor() {
    let env = TestEnv::new().await;
    let services = env.start_all().await;
    env.workstation("page-a").await;
    env.workstation("page-b").await;
    let task = env
        .create(&command("true", &["page-a", "page-b"]))
        .await
        .unwrap()
        .task_id;
    let mut steps = Vec::new();
    for _ in 0..200 {
        steps = env.get(task).await.unwrap().steps.iter().map(|s| s.step_id).collect();
        if steps.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(steps.len(), 2, "task queued with two steps");
    let mut want = Vec::new();
    for step in &steps {
        let grant = claim(&env, *step).await;
        let lines = (1..=5)
            .map(|seq| line(seq, LogStream::Stdout, &format!("{step} line {seq}")))
            .collect();
        send(&env, *step, grant.lease_generation, lines).await.unwrap();
        want.extend((1..=5).map(|seq| (*step, seq)));
    }
    want.sort();

    // Three lines a page, no step named: the (step, seq) cursor reaches every line once.
    let mut got = Vec::new();
    let mut cursor: Option<(StepId, i64)> = None;
    loop {
        let page: TaskLogsReply = env
            .call(
                &env.conns.subjects.tasks_logs(),
                &env.member_token,
                &TaskLogsRequest {
                    task_id: task,
                    step_id: None,
                    after_seq: cursor.map(|c| c.1),
                    after_step_id: cursor.map(|c| c.0),
                    limit: Some(3),
                    view: LogView::Raw,
                },
            )
            .await
            .unwrap();
        let Some(last) = page.lines.last() else { break };
        cursor = Some((last.step_id, last.line.seq));
        got.extend(page.lines.iter().map(|l| (l.step_id, l.line.seq)));
        assert!(got.len() <= want.len(), "a line came twice: {got:?}");
    }
    assert_eq!(got, want);
    env.finish(services).await;
}
