//! Firing due schedules, exactly once per tick with any number of replicas.
//!
//! Replicas share the due schedules: a pass claims them in batches — the first
//! of [`FIRST_CLAIM`], each next one twice as large up to `batch_max` — and loops
//! while a full batch came back. Replicas poll together (`Pace::Aligned` in `tanjiren_bus::periodic`),
//! so the small first claims split a burst of due ticks between them instead of
//! the first to wake taking it all, and the growing ones keep a large backlog
//! down to few transactions.
//!
//! One transaction per batch: lock the due schedules (`FOR NO KEY UPDATE SKIP
//! LOCKED`: replicas share them and never wait on each other, while a retry that
//! inserts a task referencing a locked schedule is not blocked), plan each one (which ticks
//! fire, which were missed), create the tasks through ingest's creation code with
//! the idempotency key `schedule:{id}:{tick}`, write one ledger row per tick and
//! advance `next_run_at` — then commit, and only then publish the planned events.
//! A replica that dies before the commit leaves nothing behind and the tick stays
//! due; a tick replayed after a commit meets the ledger's primary key and the
//! task's idempotency key, so it can never make a second task.

use crate::new_tasks::{TaskRequest, create_in_tx};
use crate::{Scheduler, principal_of};
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use std::collections::HashMap;
use tanjiren_ops::metrics::Count;
use tanjiren_shared::WireError;
use tanjiren_shared::cron_rules::{CronExpr, DuePlan, parse_zone, plan_due, tick_key};
use tanjiren_shared::ids::{OrgId, TaskId};
use tanjiren_shared::schedules::{OverlapPolicy, TaskTemplate, TickOutcome};
use tanjiren_store::db_error;
use tanjiren_store::tasks::publish_planned;
use uuid::Uuid;

/// Due schedules the first transaction of a pass claims (then 2×, 4×, … up to
/// `batch_max`): small, so that replicas polling at the same moment each get part
/// of a burst of due ticks (many schedules on the same minute).
pub const FIRST_CLAIM: usize = 32;

/// What one pass over the due schedules did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FireReport {
    /// Schedules found due and processed by this replica.
    pub schedules: usize,
    pub fired: usize,
    pub skipped_overlap: usize,
    pub missed: usize,
    pub failed: usize,
}

impl FireReport {
    fn add(&mut self, o: &FireReport) {
        self.schedules += o.schedules;
        self.fired += o.fired;
        self.skipped_overlap += o.skipped_overlap;
        self.missed += o.missed;
        self.failed += o.failed;
    }
}

#[derive(sqlx::FromRow)]
struct DueSchedule {
    id: Uuid,
    org_id: Uuid,
    cron_normalized: String,
    timezone: String,
    template: Json<TaskTemplate>,
    overlap: String,
    catch_up_ticks: i32,
    next_run_at: DateTime<Utc>,
    created_by: String,
    created_by_token_id: Uuid,
    /// The token the schedule acts for was revoked (or deleted): its ticks create nothing.
    creator_revoked: bool,
}

/// A schedule's new `next_run_at` and the newest tick this pass recorded.
type Advance = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// One ledger row to write.
struct Tick {
    schedule_id: Uuid,
    org_id: Uuid,
    tick_at: DateTime<Utc>,
    outcome: TickOutcome,
    task_id: Option<Uuid>,
    reason: Option<String>,
}

impl Scheduler {
    /// Fires every schedule due at `now` that no other replica holds (growing
    /// batches from [`FIRST_CLAIM`] to `batch_max`, one transaction each) and records
    /// every tick in the ledger.
    pub async fn fire_schedules(&self, now: DateTime<Utc>) -> Result<FireReport, WireError> {
        let most = self.conns.config.batch_max.max(1);
        let mut limit = FIRST_CLAIM.min(most);
        let mut report = FireReport::default();
        loop {
            let (batch, created) = self.fire_batch(now, limit).await?;
            publish_planned(&self.conns, &created).await;
            report.add(&batch);
            if batch.schedules < limit {
                break;
            }
            limit = (limit * 2).min(most);
        }
        let m = &self.conns.metrics;
        for (outcome, n) in [
            (TickOutcome::Fired, report.fired),
            (TickOutcome::SkippedOverlap, report.skipped_overlap),
            (TickOutcome::Missed, report.missed),
            (TickOutcome::Failed, report.failed),
        ] {
            if n > 0 {
                m.count(
                    Count::ScheduleTicks {
                        outcome: outcome.as_str(),
                    },
                    n as u64,
                );
            }
        }
        if report.failed > 0 {
            tracing::warn!(
                failed = report.failed,
                "schedule ticks could not create their task; see the ledger"
            );
        }
        Ok(report)
    }

    /// One batch in one transaction; returns what it did and the tasks it created.
    async fn fire_batch(
        &self,
        now: DateTime<Utc>,
        limit: usize,
    ) -> Result<(FireReport, Vec<(OrgId, TaskId)>), WireError> {
        let mut tx = self.conns.db.begin().await.map_err(db_error)?;
        let due: Vec<DueSchedule> = sqlx::query_as(
            "SELECT id, org_id, cron_normalized, timezone, template, overlap, catch_up_ticks, next_run_at,
                    created_by, created_by_token_id,
                    COALESCE((SELECT k.revoked_at IS NOT NULL FROM api_tokens k
                              WHERE k.id = task_schedules.created_by_token_id), true) AS creator_revoked
             FROM task_schedules WHERE enabled AND next_run_at <= $1
             ORDER BY next_run_at LIMIT $2 FOR NO KEY UPDATE SKIP LOCKED",
        )
        .bind(now)
        .bind(limit as i64)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        let mut report = FireReport {
            schedules: due.len(),
            ..FireReport::default()
        };
        if due.is_empty() {
            return Ok((report, Vec::new()));
        }

        // The newest live task of each schedule (or a failed one waiting for its retry).
        let ids: Vec<Uuid> = due.iter().map(|s| s.id).collect();
        let live: HashMap<Uuid, (Uuid, String, bool)> = sqlx::query_as::<_, (Uuid, Uuid, String, bool)>(
            "SELECT DISTINCT ON (schedule_id) schedule_id, id, status, retry_at IS NOT NULL
             FROM tasks
             WHERE schedule_id = ANY($1) AND schedule_id IS NOT NULL
               AND (status IN ('planned', 'queued', 'executing') OR retry_at IS NOT NULL)
             ORDER BY schedule_id, id DESC",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?
        .into_iter()
        .map(|(s, t, status, retrying)| (s, (t, status, retrying)))
        .collect();

        let mut ticks: Vec<Tick> = Vec::new();
        let mut requests: Vec<TaskRequest> = Vec::new();
        let mut fired_meta: Vec<(Uuid, Uuid, DateTime<Utc>)> = Vec::new(); // (schedule, org, tick)
        // Per schedule: its new next_run_at and the newest tick this pass recorded.
        let mut next_runs: HashMap<Uuid, Advance> = HashMap::new();
        for s in &due {
            let plan = match (CronExpr::parse(&s.cron_normalized), parse_zone(&s.timezone)) {
                (Ok(cron), Ok(zone)) => plan_due(&cron, zone, s.next_run_at, now, s.catch_up_ticks.max(1) as u32),
                (Err(e), _) | (_, Err(e)) => {
                    // Stored schedules were validated; one that no longer parses stops here, loudly.
                    tracing::error!(schedule = %s.id, error = %e, "stored schedule cannot be evaluated; it stops");
                    ticks.push(Tick {
                        schedule_id: s.id,
                        org_id: s.org_id,
                        tick_at: s.next_run_at,
                        outcome: TickOutcome::Failed,
                        task_id: None,
                        reason: Some(format!("the schedule cannot be evaluated: {e}")),
                    });
                    next_runs.insert(s.id, (None, Some(s.next_run_at)));
                    continue;
                }
            };
            record_missed(s, &plan, &mut ticks);
            let last_tick = plan.fire.last().or(plan.missed.last()).copied();
            next_runs.insert(s.id, (plan.next_run_at, last_tick));

            let skip = s.overlap.parse::<OverlapPolicy>().unwrap_or_default() == OverlapPolicy::Skip;
            let mut busy: Option<String> = live.get(&s.id).map(|(task, status, retrying)| {
                if *retrying && status == "failed" {
                    format!("task {task} from this schedule is waiting for its retry")
                } else {
                    format!("task {task} from this schedule is still {status}")
                }
            });
            for tick in &plan.fire {
                if s.creator_revoked {
                    // A schedule acts for the token that created it; once that token is
                    // revoked the schedule may not create work in its name.
                    ticks.push(Tick {
                        schedule_id: s.id,
                        org_id: s.org_id,
                        tick_at: *tick,
                        outcome: TickOutcome::Failed,
                        task_id: None,
                        reason: Some(format!(
                            "the token `{}` that created this schedule is revoked; \
                             re-create the schedule with a valid token",
                            s.created_by
                        )),
                    });
                    continue;
                }
                if skip && let Some(why) = &busy {
                    ticks.push(Tick {
                        schedule_id: s.id,
                        org_id: s.org_id,
                        tick_at: *tick,
                        outcome: TickOutcome::SkippedOverlap,
                        task_id: None,
                        reason: Some(why.clone()),
                    });
                    continue;
                }
                requests.push(TaskRequest {
                    principal: principal_of(s.org_id, s.created_by_token_id, &s.created_by),
                    spec: s.template.0.to_spec(tick_key(s.id, *tick)),
                    schedule_id: Some(s.id),
                });
                fired_meta.push((s.id, s.org_id, *tick));
                if skip {
                    busy = Some(format!(
                        "the task of tick {} from this schedule is still planned",
                        tick.to_rfc3339()
                    ));
                }
            }
        }

        let results = create_in_tx(&mut tx, &self.conns.config, requests).await?;
        let mut created = Vec::new();
        let mut last_task: HashMap<Uuid, Uuid> = HashMap::new();
        for ((schedule_id, org_id, tick), result) in fired_meta.into_iter().zip(results) {
            match result {
                Ok(reply) => {
                    if reply.created {
                        created.push((OrgId::from(org_id), reply.task_id));
                    }
                    last_task.insert(schedule_id, reply.task_id.as_uuid());
                    ticks.push(Tick {
                        schedule_id,
                        org_id,
                        tick_at: tick,
                        outcome: TickOutcome::Fired,
                        task_id: Some(reply.task_id.as_uuid()),
                        reason: (!reply.created).then(|| "the task of this tick already existed".to_string()),
                    });
                }
                Err(e) => ticks.push(Tick {
                    schedule_id,
                    org_id,
                    tick_at: tick,
                    outcome: TickOutcome::Failed,
                    task_id: None,
                    reason: Some(format!("could not create the task: {}", e.message)),
                }),
            }
        }
        for t in &ticks {
            match t.outcome {
                TickOutcome::Fired => report.fired += 1,
                TickOutcome::SkippedOverlap => report.skipped_overlap += 1,
                TickOutcome::Missed => report.missed += 1,
                TickOutcome::Failed => report.failed += 1,
            }
        }
        write_ledger(&mut tx, &ticks).await?;

        let (mut s_ids, mut s_next, mut s_last, mut s_task) = (vec![], vec![], vec![], vec![]);
        for (id, (next, last)) in next_runs {
            s_ids.push(id);
            s_next.push(next);
            s_last.push(last);
            s_task.push(last_task.get(&id).copied());
        }
        sqlx::query(
            "UPDATE task_schedules s SET next_run_at = u.next_run_at,
                    last_tick_at = COALESCE(u.last_tick_at, s.last_tick_at),
                    last_task_id = COALESCE(u.last_task_id, s.last_task_id)
             FROM unnest($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::uuid[])
                  AS u(id, next_run_at, last_tick_at, last_task_id)
             WHERE s.id = u.id",
        )
        .bind(&s_ids)
        .bind(&s_next)
        .bind(&s_last)
        .bind(&s_task)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        Ok((report, created))
    }
}

fn record_missed(s: &DueSchedule, plan: &DuePlan, ticks: &mut Vec<Tick>) {
    let why = format!(
        "no scheduler ran while this tick passed, and it is older than the catch-up window ({} tick(s))",
        s.catch_up_ticks
    );
    for t in &plan.missed {
        ticks.push(Tick {
            schedule_id: s.id,
            org_id: s.org_id,
            tick_at: *t,
            outcome: TickOutcome::Missed,
            task_id: None,
            reason: Some(why.clone()),
        });
    }
    if let Some(u) = &plan.unlisted {
        let count = if u.complete {
            format!("{}", u.count)
        } else {
            format!("at least {}", u.count)
        };
        ticks.push(Tick {
            schedule_id: s.id,
            org_id: s.org_id,
            tick_at: u.first,
            outcome: TickOutcome::Missed,
            task_id: None,
            reason: Some(format!(
                "{count} ticks from {} to {} were missed and are not listed one by one",
                u.first.to_rfc3339(),
                u.last.to_rfc3339()
            )),
        });
    }
}

/// One statement for every ledger row of the batch; a tick already recorded stays as it was.
async fn write_ledger(tx: &mut tanjiren_store::settle::Tx<'_>, ticks: &[Tick]) -> Result<(), WireError> {
    if ticks.is_empty() {
        return Ok(());
    }
    let (mut ids, mut orgs, mut at, mut outcomes, mut tasks, mut reasons) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for t in ticks {
        ids.push(t.schedule_id);
        orgs.push(t.org_id);
        at.push(t.tick_at);
        outcomes.push(t.outcome.as_str());
        tasks.push(t.task_id);
        reasons.push(t.reason.clone());
    }
    sqlx::query(
        "INSERT INTO schedule_ticks (schedule_id, org_id, tick_at, outcome, task_id, reason)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[], $4::text[], $5::uuid[], $6::text[])
         ON CONFLICT (schedule_id, tick_at) DO NOTHING",
    )
    .bind(&ids)
    .bind(&orgs)
    .bind(&at)
    .bind(&outcomes)
    .bind(&tasks)
    .bind(&reasons)
    .execute(&mut **tx)
    .await
    .map_err(db_error)?;
    Ok(())
}
