//! NATS subject names. Every subject is `{prefix}.v1.…`; the prefix is
//! configurable (default `tanjiren`) so tests and tenants can isolate themselves.

use crate::ids::{OrgId, TaskId, WorkstationId};
use crate::model::TaskStatus;

/// Builds every subject Tanjiren uses from one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subjects {
    root: String,
    prefix: String,
}

impl Subjects {
    /// `prefix` must be a valid NATS token sequence without wildcards.
    pub fn new(prefix: &str) -> Self {
        Self {
            root: format!("{prefix}.v1"),
            prefix: prefix.to_string(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A stream- or consumer-safe name derived from the prefix (JetStream names may not contain dots).
    pub fn stream_name(&self, what: &str) -> String {
        let clean: String = self
            .prefix
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        format!("{}_{}", clean.to_uppercase(), what.to_uppercase())
    }

    fn s(&self, rest: &str) -> String {
        format!("{}.{rest}", self.root)
    }

    pub fn tasks_create(&self) -> String {
        self.s("tasks.create")
    }
    pub fn tasks_submit(&self) -> String {
        self.s("tasks.submit")
    }
    pub fn tasks_get(&self) -> String {
        self.s("tasks.get")
    }
    pub fn tasks_cancel(&self) -> String {
        self.s("tasks.cancel")
    }
    /// `tasks.overview`: the organisation's runtime overview ([`crate::protocol::RuntimeOverview`]).
    pub fn tasks_overview(&self) -> String {
        self.s("tasks.overview")
    }
    /// `auth.whoami`: the caller's own principal (how the gateway checks a bearer token).
    pub fn auth_whoami(&self) -> String {
        self.s("auth.whoami")
    }
    pub fn tasks_list(&self) -> String {
        self.s("tasks.list")
    }
    pub fn tasks_logs(&self) -> String {
        self.s("tasks.logs")
    }
    pub fn workstations_register(&self) -> String {
        self.s("workstations.register")
    }
    /// `workstations.list`: the organisation's workstations (operators).
    pub fn workstations_list(&self) -> String {
        self.s("workstations.list")
    }
    pub fn dispatch(&self, org: OrgId, workstation: WorkstationId) -> String {
        self.s(&format!("dispatch.{org}.{workstation}"))
    }
    pub fn control(&self, org: OrgId, workstation: WorkstationId) -> String {
        self.s(&format!("control.{org}.{workstation}"))
    }
    pub fn lease_claim(&self) -> String {
        self.s("lease.claim")
    }
    pub fn lease_heartbeat(&self) -> String {
        self.s("lease.heartbeat")
    }
    pub fn lease_release(&self) -> String {
        self.s("lease.release")
    }
    pub fn ingest_logs(&self) -> String {
        self.s("ingest.logs")
    }
    pub fn ingest_progress(&self) -> String {
        self.s("ingest.progress")
    }
    pub fn ingest_artifacts(&self) -> String {
        self.s("ingest.artifacts")
    }
    // Artifacts (served by ingest, operators).
    pub fn artifacts_add(&self) -> String {
        self.s("artifacts.add")
    }
    pub fn artifacts_list(&self) -> String {
        self.s("artifacts.list")
    }
    pub fn artifacts_get(&self) -> String {
        self.s("artifacts.get")
    }
    // Investigations (served by ingest, operators).
    pub fn investigations_create(&self) -> String {
        self.s("investigations.create")
    }
    pub fn investigations_get(&self) -> String {
        self.s("investigations.get")
    }
    pub fn investigations_list(&self) -> String {
        self.s("investigations.list")
    }
    pub fn investigations_close(&self) -> String {
        self.s("investigations.close")
    }
    /// Task events of every organisation and status (one filter subject, NATS 2.9-safe).
    pub fn all_task_events(&self) -> String {
        self.s("events.*.task.*")
    }
    /// Every organisation's task events of one status.
    pub fn all_task_events_with(&self, status: TaskStatus) -> String {
        self.s(&format!("events.*.task.{status}"))
    }
    pub fn event(&self, org: OrgId, status: TaskStatus) -> String {
        self.s(&format!("events.{org}.task.{status}"))
    }
    /// Every task event of every organisation (for the events stream).
    pub fn all_events(&self) -> String {
        self.s("events.>")
    }
    /// Planned-task events of every organisation (what the approval service consumes).
    pub fn all_planned_events(&self) -> String {
        self.s("events.*.task.planned")
    }
    /// Every event of one organisation: task status changes, approval requests and
    /// decisions, submission outcomes (what the gateway's subscriptions watch).
    pub fn org_events(&self, org: OrgId) -> String {
        self.s(&format!("events.{org}.>"))
    }
    /// Outcome events of durable submissions.
    pub fn submit_outcome(&self, org: OrgId) -> String {
        self.s(&format!("events.{org}.submit.outcome"))
    }
    pub fn logs(&self, org: OrgId, task: TaskId) -> String {
        self.s(&format!("logs.{org}.{task}"))
    }

    // Approvals and doctrine (served by the approval service).
    pub fn tasks_approve(&self) -> String {
        self.s("tasks.approve")
    }
    pub fn tasks_reject(&self) -> String {
        self.s("tasks.reject")
    }
    pub fn approvals_mint(&self) -> String {
        self.s("approvals.mint")
    }
    pub fn approvals_pending(&self) -> String {
        self.s("approvals.pending")
    }
    pub fn approvals_list(&self) -> String {
        self.s("approvals.list")
    }
    pub fn doctrine_get(&self) -> String {
        self.s("doctrine.get")
    }
    pub fn doctrine_publish(&self) -> String {
        self.s("doctrine.publish")
    }
    pub fn doctrine_dry_run(&self) -> String {
        self.s("doctrine.dry_run")
    }
    /// A planned task started waiting for a decision (notifiers listen here).
    pub fn approval_requested(&self, org: OrgId) -> String {
        self.s(&format!("events.{org}.approval.requested"))
    }
    /// A pending task was approved, rejected or expired (the requester listens here).
    pub fn approval_decided(&self, org: OrgId) -> String {
        self.s(&format!("events.{org}.approval.decided"))
    }

    // Schedules and retries (served by the scheduler).
    pub fn tasks_retry(&self) -> String {
        self.s("tasks.retry")
    }
    pub fn schedules_create(&self) -> String {
        self.s("schedules.create")
    }
    pub fn schedules_list(&self) -> String {
        self.s("schedules.list")
    }
    pub fn schedules_get(&self) -> String {
        self.s("schedules.get")
    }
    pub fn schedules_pause(&self) -> String {
        self.s("schedules.pause")
    }
    pub fn schedules_resume(&self) -> String {
        self.s("schedules.resume")
    }
    pub fn schedules_delete(&self) -> String {
        self.s("schedules.delete")
    }
}

impl Default for Subjects {
    fn default() -> Self {
        Self::new("tanjiren")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_carry_prefix_and_version() {
        let s = Subjects::new("t_abc");
        assert_eq!(s.tasks_create(), "t_abc.v1.tasks.create");
        let org = OrgId::new();
        let ws = WorkstationId::new();
        assert_eq!(s.dispatch(org, ws), format!("t_abc.v1.dispatch.{org}.{ws}"));
        assert_eq!(
            s.event(org, TaskStatus::Queued),
            format!("t_abc.v1.events.{org}.task.queued")
        );
        assert_eq!(Subjects::default().lease_claim(), "tanjiren.v1.lease.claim");
        assert_eq!(s.doctrine_dry_run(), "t_abc.v1.doctrine.dry_run");
        assert_eq!(s.schedules_pause(), "t_abc.v1.schedules.pause");
        assert_eq!(s.tasks_retry(), "t_abc.v1.tasks.retry");
        assert_eq!(
            s.approval_decided(org),
            format!("t_abc.v1.events.{org}.approval.decided")
        );
    }

    #[test]
    fn stream_names_are_safe() {
        assert_eq!(Subjects::new("t.a-b").stream_name("submit"), "T_A-B_SUBMIT");
    }
}
