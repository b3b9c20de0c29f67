//! The route table of the HTTP API: method, path, operation, the wire subject it
//! calls and its request and reply types. The router and the OpenAPI document are
//! both made from it, so a route cannot exist without being documented.

use super::{Input, Received, forward};
use crate::upstream::{Caller, Upstream};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use futures::future::BoxFuture;
use std::borrow::Cow;
use tanjiren_shared::approvals::{
    DecideTaskReply, DecideTaskRequest, DoctrineDryRunReply, DoctrineDryRunRequest, DoctrineView, GetDoctrineRequest,
    ListApprovalsReply, ListApprovalsRequest, MintApprovalTokenReply, MintApprovalTokenRequest, PendingApprovalsReply,
    PendingApprovalsRequest, PublishDoctrineReply, PublishDoctrineRequest,
};
use tanjiren_shared::artifacts::{
    AddArtifactReply, AddArtifactRequest, ArtifactView, GetArtifactRequest, ListArtifactsReply, ListArtifactsRequest,
};
use tanjiren_shared::investigations::{
    CloseInvestigationRequest, CreateInvestigationRequest, GetInvestigationRequest, InvestigationView,
    ListInvestigationsReply, ListInvestigationsRequest,
};
use tanjiren_shared::model::TaskSpec;
use tanjiren_shared::protocol::{
    CancelTaskReply, CancelTaskRequest, CreateTaskReply, GetTaskRequest, ListTasksReply, ListTasksRequest,
    ListWorkstationsReply, ListWorkstationsRequest, Principal, RuntimeOverview, RuntimeOverviewRequest, TaskLogsReply,
    TaskLogsRequest, TaskView, WhoAmIRequest,
};
use tanjiren_shared::schedules::{
    CreateScheduleRequest, DeleteScheduleReply, GetScheduleRequest, ListSchedulesReply, ListSchedulesRequest,
    RetryTaskReply, RetryTaskRequest, ScheduleDetail, ScheduleRef, ScheduleView,
};
use tanjiren_shared::subjects::Subjects;
use utoipa::ToSchema;
use utoipa::openapi::{RefOr, Schema};

type Call = for<'a> fn(&'a Upstream, &'a Caller, String, Input, StatusCode, Received) -> BoxFuture<'a, Response>;

/// A type's schema: its name, its own schema and the schemas it refers to.
pub struct TypeSchema {
    pub name: Cow<'static, str>,
    pub schema: RefOr<Schema>,
    pub deps: Vec<(String, RefOr<Schema>)>,
}

fn type_schema<T: ToSchema>() -> TypeSchema {
    let mut deps = Vec::new();
    T::schemas(&mut deps);
    TypeSchema {
        name: T::name(),
        schema: T::schema(),
        deps,
    }
}

/// One route of the HTTP API.
pub struct Route {
    pub method: Method,
    /// axum's path syntax, which is OpenAPI's: `/v1/tasks/{task_id}`.
    pub path: &'static str,
    pub operation_id: &'static str,
    pub tag: &'static str,
    pub summary: &'static str,
    pub input: Input,
    /// 201 for routes that create something, else 200.
    pub status: StatusCode,
    /// The wire subject it calls, named in the document.
    pub subject_name: &'static str,
    subject: fn(&Subjects) -> String,
    pub request: fn() -> TypeSchema,
    pub response: fn() -> TypeSchema,
    call: Call,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

impl Route {
    /// Handles one request of this route.
    pub async fn call(&self, upstream: &Upstream, caller: &Caller, received: Received) -> Response {
        (self.call)(
            upstream,
            caller,
            (self.subject)(&upstream.subjects),
            self.input,
            self.status,
            received,
        )
        .await
    }

    /// The path's `{parameters}`.
    pub fn path_params(&self) -> Vec<&'static str> {
        self.path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .collect()
    }
}

macro_rules! route {
    ($method:ident $path:literal, $op:literal, $tag:literal, $input:ident, $status:ident,
     $subject:ident = $subject_name:literal, $req:ty => $resp:ty, $summary:literal) => {
        Route {
            method: Method::$method,
            path: $path,
            operation_id: $op,
            tag: $tag,
            summary: $summary,
            input: Input::$input,
            status: StatusCode::$status,
            subject_name: $subject_name,
            subject: Subjects::$subject,
            request: type_schema::<$req>,
            response: type_schema::<$resp>,
            call: |u, c, s, i, st, r| Box::pin(forward::<$req, $resp>(u, c, s, i, st, r)),
        }
    };
}

/// Every route, in the document's order.
pub static ROUTES: std::sync::LazyLock<Vec<Route>> = std::sync::LazyLock::new(|| {
    vec![
        route!(POST "/v1/tasks", "create_task", "tasks", Body, CREATED, tasks_create = "tasks.create",
            TaskSpec => CreateTaskReply, "Create a task (idempotent with idempotency_key)"),
        route!(GET "/v1/tasks", "list_tasks", "tasks", Query, OK, tasks_list = "tasks.list",
            ListTasksRequest => ListTasksReply, "List tasks, newest first (cursor: before = next_before)"),
        route!(GET "/v1/tasks/{task_id}", "get_task", "tasks", Query, OK, tasks_get = "tasks.get",
            GetTaskRequest => TaskView, "A task with its execution, steps, attempts, artifacts and approvals"),
        route!(POST "/v1/tasks/{task_id}/cancel", "cancel_task", "tasks", Body, OK, tasks_cancel = "tasks.cancel",
            CancelTaskRequest => CancelTaskReply, "Cancel a task, with a reason"),
        route!(POST "/v1/tasks/{task_id}/retry", "retry_task", "tasks", Body, CREATED, tasks_retry = "tasks.retry",
            RetryTaskRequest => RetryTaskReply, "The next attempt of a failed or cancelled task"),
        route!(GET "/v1/tasks/{task_id}/logs", "get_task_logs", "tasks", Query, OK, tasks_logs = "tasks.logs",
            TaskLogsRequest => TaskLogsReply, "A task's stored output: raw lines or the deduplicated view"),
        route!(POST "/v1/tasks/{task_id}/approve", "approve_task", "approvals", Body, OK, tasks_approve = "tasks.approve",
            DecideTaskRequest => DecideTaskReply, "Approve a held task with an approval token"),
        route!(POST "/v1/tasks/{task_id}/reject", "reject_task", "approvals", Body, OK, tasks_reject = "tasks.reject",
            DecideTaskRequest => DecideTaskReply, "Reject a held task with an approval token and a reason"),
        route!(POST "/v1/tasks/{task_id}/approval-token", "mint_approval_token", "approvals", Body, CREATED,
            approvals_mint = "approvals.mint", MintApprovalTokenRequest => MintApprovalTokenReply,
            "Mint a single-use approval token for a held task (admin, owner; never a scoped token)"),
        route!(GET "/v1/approvals/pending", "list_pending_approvals", "approvals", Query, OK,
            approvals_pending = "approvals.pending", PendingApprovalsRequest => PendingApprovalsReply,
            "Tasks waiting for a decision, most urgent first"),
        route!(GET "/v1/approvals", "list_approvals", "approvals", Query, OK, approvals_list = "approvals.list",
            ListApprovalsRequest => ListApprovalsReply, "Decisions, newest first"),
        route!(GET "/v1/doctrine", "get_doctrine", "doctrine", Query, OK, doctrine_get = "doctrine.get",
            GetDoctrineRequest => DoctrineView, "The doctrine in force (or a version)"),
        route!(PUT "/v1/doctrine", "publish_doctrine", "doctrine", Body, OK, doctrine_publish = "doctrine.publish",
            PublishDoctrineRequest => PublishDoctrineReply, "Publish a new doctrine version (admin, owner)"),
        route!(POST "/v1/doctrine/dry-run", "doctrine_dry_run", "doctrine", Body, OK, doctrine_dry_run = "doctrine.dry_run",
            DoctrineDryRunRequest => DoctrineDryRunReply, "What doctrine would decide for a task, without creating it"),
        route!(POST "/v1/artifacts", "add_artifact", "artifacts", Body, CREATED, artifacts_add = "artifacts.add",
            AddArtifactRequest => AddArtifactReply, "Attach a note, link or evidence to a task or an investigation"),
        route!(GET "/v1/artifacts", "list_artifacts", "artifacts", Query, OK, artifacts_list = "artifacts.list",
            ListArtifactsRequest => ListArtifactsReply, "Artifacts of a task or an investigation, oldest first"),
        route!(GET "/v1/artifacts/{artifact_id}", "get_artifact", "artifacts", Query, OK, artifacts_get = "artifacts.get",
            GetArtifactRequest => ArtifactView, "One artifact"),
        route!(POST "/v1/investigations", "create_investigation", "investigations", Body, CREATED,
            investigations_create = "investigations.create", CreateInvestigationRequest => InvestigationView,
            "Open an investigation"),
        route!(GET "/v1/investigations", "list_investigations", "investigations", Query, OK,
            investigations_list = "investigations.list", ListInvestigationsRequest => ListInvestigationsReply,
            "Investigations, newest first"),
        route!(GET "/v1/investigations/{investigation_id}", "get_investigation", "investigations", Query, OK,
            investigations_get = "investigations.get", GetInvestigationRequest => InvestigationView,
            "An investigation with its tasks"),
        route!(POST "/v1/investigations/{investigation_id}/close", "close_investigation", "investigations", Body, OK,
            investigations_close = "investigations.close", CloseInvestigationRequest => InvestigationView,
            "Close an investigation"),
        route!(POST "/v1/schedules", "create_schedule", "schedules", Body, CREATED, schedules_create = "schedules.create",
            CreateScheduleRequest => ScheduleView, "Create a cron schedule"),
        route!(GET "/v1/schedules", "list_schedules", "schedules", Query, OK, schedules_list = "schedules.list",
            ListSchedulesRequest => ListSchedulesReply, "Schedules, newest first"),
        route!(GET "/v1/schedules/{schedule}", "get_schedule", "schedules", Query, OK, schedules_get = "schedules.get",
            GetScheduleRequest => ScheduleDetail, "A schedule (by id or name) with its next runs and tick ledger"),
        route!(POST "/v1/schedules/{schedule}/pause", "pause_schedule", "schedules", Body, OK,
            schedules_pause = "schedules.pause", ScheduleRef => ScheduleView, "Pause a schedule"),
        route!(POST "/v1/schedules/{schedule}/resume", "resume_schedule", "schedules", Body, OK,
            schedules_resume = "schedules.resume", ScheduleRef => ScheduleView, "Resume a schedule"),
        route!(DELETE "/v1/schedules/{schedule}", "delete_schedule", "schedules", Query, OK,
            schedules_delete = "schedules.delete", ScheduleRef => DeleteScheduleReply, "Delete a schedule"),
        route!(GET "/v1/workstations", "list_workstations", "workstations", Query, OK,
            workstations_list = "workstations.list", ListWorkstationsRequest => ListWorkstationsReply,
            "Workstations by name: labels, agent, last seen, steps running"),
        route!(GET "/v1/overview", "runtime_overview", "tasks", Query, OK, tasks_overview = "tasks.overview",
            RuntimeOverviewRequest => RuntimeOverview, "The organisation's runtime overview"),
        route!(GET "/v1/me", "whoami", "auth", Query, OK, auth_whoami = "auth.whoami",
            WhoAmIRequest => Principal, "The caller's organisation, role and scopes"),
    ]
});
