//! The MCP tools: one table, each tool a wire subject with the wire request as its
//! input and the wire reply as its output (so `docs/protocol.md` describes both,
//! and the JSON Schemas come from the same Rust types as the HTTP API's). A tool
//! call forwards the caller's token; the service decides, and a refusal or a
//! business failure comes back as an `isError` result carrying the wire error code.

use crate::schema;
use crate::upstream::{Caller, Upstream};
use futures::future::BoxFuture;
use rmcp::model::{CallToolResult, JsonObject, Tool, ToolAnnotations};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::sync::Arc;
use tanjiren_shared::WireError;
use tanjiren_shared::approvals::{DecideTaskReply, DecideTaskRequest, PendingApprovalsReply, PendingApprovalsRequest};
use tanjiren_shared::artifacts::{
    AddArtifactReply, AddArtifactRequest, ArtifactView, GetArtifactRequest, ListArtifactsReply, ListArtifactsRequest,
};
use tanjiren_shared::error::ErrorCode;
use tanjiren_shared::investigations::{
    CloseInvestigationRequest, CreateInvestigationRequest, GetInvestigationRequest, InvestigationView,
    ListInvestigationsReply, ListInvestigationsRequest,
};
use tanjiren_shared::model::TaskSpec;
use tanjiren_shared::protocol::{
    CancelTaskReply, CancelTaskRequest, CreateTaskReply, GetTaskRequest, ListTasksReply, ListTasksRequest,
    ListWorkstationsReply, ListWorkstationsRequest, RuntimeOverview, RuntimeOverviewRequest, TaskLogsReply,
    TaskLogsRequest, TaskView,
};
use tanjiren_shared::schedules::{RetryTaskReply, RetryTaskRequest};
use tanjiren_shared::scopes::Needs;
use tanjiren_shared::subjects::Subjects;

/// What a tool does to the world, for its annotations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Reads only.
    Reads,
    /// Adds something (a task, an artifact, an attempt); repeating adds again
    /// unless the request carries an idempotency key.
    Adds,
    /// Changes or ends something that exists; repeating changes nothing more.
    Changes,
    /// Ends something for good (cancel, reject); repeating changes nothing more.
    Ends,
}

type Call = for<'a> fn(&'a Upstream, &'a Caller, String, JsonObject) -> BoxFuture<'a, CallToolResult>;

/// One tool.
pub struct ToolSpec {
    pub name: &'static str,
    pub title: &'static str,
    pub description: &'static str,
    /// What a scoped token needs to call it (`mcp:read` or `mcp:operate`).
    pub needs: Needs,
    pub effect: Effect,
    subject: fn(&Subjects) -> String,
    input: fn() -> JsonObject,
    output: fn() -> JsonObject,
    call: Call,
}

impl std::fmt::Debug for ToolSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ToolSpec")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ToolSpec {
    /// The tool as `tools/list` shows it.
    pub fn tool(&self) -> Tool {
        let annotations = ToolAnnotations::with_title(self.title)
            .read_only(self.effect == Effect::Reads)
            .destructive(self.effect == Effect::Ends)
            .idempotent(self.effect != Effect::Adds)
            // Tanjiren's own tasks; what a created task runs is up to its command.
            .open_world(self.effect == Effect::Adds && self.name == "create_task");
        Tool::new(self.name, self.description, Arc::new((self.input)()))
            .with_title(self.title)
            .with_raw_output_schema(Arc::new((self.output)()))
            .with_annotations(annotations)
    }

    /// Calls the tool as `caller`.
    pub async fn call(&self, upstream: &Upstream, caller: &Caller, arguments: JsonObject) -> CallToolResult {
        if !self.needs.granted_by(&caller.principal.scopes) {
            return failure(WireError::new(
                ErrorCode::Forbidden,
                format!(
                    "insufficient_scope: {} needs the scope `{}`",
                    self.name,
                    self.needs.scope()
                ),
            ));
        }
        (self.call)(upstream, caller, (self.subject)(&upstream.subjects), arguments).await
    }
}

/// A tool's result: the reply as structured content (and as text for clients that
/// read only text).
fn success(reply: &impl Serialize) -> CallToolResult {
    match serde_json::to_value(reply) {
        Ok(v) => CallToolResult::structured(v),
        Err(e) => failure(WireError::new(
            ErrorCode::Internal,
            format!("cannot encode the reply: {e}"),
        )),
    }
}

/// A failed call: `isError`, `{"error": {"code", "message"}}` as structured content,
/// and `code: message` as text.
pub fn failure(e: WireError) -> CallToolResult {
    CallToolResult::structured_error(serde_json::json!({
        "error": { "code": e.code.as_str(), "message": e.message }
    }))
}

/// Decodes the arguments as `Req`, calls the subject, and returns the reply.
async fn forward<Req, Resp>(
    upstream: &Upstream,
    caller: &Caller,
    subject: String,
    arguments: JsonObject,
) -> CallToolResult
where
    Req: DeserializeOwned + Serialize,
    Resp: DeserializeOwned + Serialize,
{
    let req: Req = match crate::upstream::decode(&arguments) {
        Ok(r) => r,
        Err(e) => return failure(e),
    };
    match upstream.call::<Req, Resp>(caller, subject, &req).await {
        Ok(reply) => success(&reply),
        Err(e) => failure(e),
    }
}

macro_rules! tool {
    ($name:literal, $title:literal, $needs:ident, $effect:ident, $subject:ident, $req:ty => $resp:ty, $description:literal) => {
        ToolSpec {
            name: $name,
            title: $title,
            description: $description,
            needs: Needs::$needs,
            effect: Effect::$effect,
            subject: Subjects::$subject,
            input: schema::input::<$req>,
            output: schema::output::<$resp>,
            call: |u, c, s, a| Box::pin(forward::<$req, $resp>(u, c, s, a)),
        }
    };
}

/// Every tool, in the order `tools/list` gives them.
pub static TOOLS: std::sync::LazyLock<Vec<ToolSpec>> = std::sync::LazyLock::new(|| {
    vec![
        tool!("list_tasks", "List tasks", Read, Reads, tasks_list, ListTasksRequest => ListTasksReply,
            "List the organisation's tasks, newest first. Filters: status, mode, approval_status, \
             lease_owner (the worker running a step now), workstation (id or name), investigation_id, \
             created_after/created_before (RFC 3339), root_task_id (one retry chain), schedule_id. \
             Page with `before` = the previous reply's `next_before`."),
        tool!("get_task", "Get a task", Read, Reads, tasks_get, GetTaskRequest => TaskView,
            "One task with its execution: status, approval (class, matched rules, decisions), every step \
             (status, exit code, lease owner and generation, output tail, the agent's model and usage), \
             the attempts of its retry chain, and its artifacts."),
        tool!("create_task", "Create a task", Operate, Adds, tasks_create, TaskSpec => CreateTaskReply,
            "Create a task: intent, mode (`command` with `command`, `prompt` with `prompt`, or \
             `investigate` with `questions`) and targets (workstation ids or names, as list_workstations \
             gives them; one step each). \
             Optional: timeout_secs, queue_timeout_secs, retry_policy, investigation_id, and an \
             idempotency_key that makes a repeat return the same task. Doctrine may hold the task for \
             approval (approval_status `pending`): a person then approves it."),
        tool!("approve_task", "Approve a task", Operate, Changes, tasks_approve, DecideTaskRequest => DecideTaskReply,
            "Approve a task that doctrine holds (approval_status `pending`) with the approval token a \
             person (admin or owner) minted for it: ask them to run `tanjiren approval mint TASK_ID` (or \
             POST /v1/tasks/{task_id}/approval-token) and give you the `tja_…` token. It is single-use, \
             scoped to this task and its payload, and expires after 15 minutes; an agent cannot mint one. \
             `reason` is required when get_task shows approval.reason_required."),
        tool!("reject_task", "Reject a task", Operate, Ends, tasks_reject, DecideTaskRequest => DecideTaskReply,
            "Reject a task that doctrine holds, with a person's approval token (as for approve_task) and \
             a reason; the task fails with `approval_rejected`."),
        tool!("cancel_task", "Cancel a task", Operate, Ends, tasks_cancel, CancelTaskRequest => CancelTaskReply,
            "Cancel a planned, queued or executing task, with a reason. Running steps are stopped on \
             their workstations (SIGTERM, then SIGKILL)."),
        tool!("retry_task", "Retry a task", Operate, Adds, tasks_retry, RetryTaskRequest => RetryTaskReply,
            "Create the next attempt of a failed or cancelled task (linked by retry_of_task_id and \
             root_task_id). Asking again for the same task returns the attempt already made."),
        tool!("add_task_artifact", "Add an artifact", Operate, Adds, artifacts_add, AddArtifactRequest => AddArtifactReply,
            "Attach a note (markdown body), link (url) or evidence to a task (task_id; it is kept with \
             every attempt of the task) or to an investigation (investigation_id). Artifacts outlive \
             the task."),
        tool!("list_workstations", "List workstations", Read, Reads, workstations_list,
            ListWorkstationsRequest => ListWorkstationsReply,
            "The organisation's workstations by name — the names create_task takes as targets — with \
             their labels, AI agent (prompt and investigate tasks need one), when each was last seen and \
             how many steps it runs now. Page with `after` = next_after."),
        tool!("get_task_logs", "Get a task's output", Read, Reads, tasks_logs, TaskLogsRequest => TaskLogsReply,
            "A task's stored output. view `raw` (default): every line in order, with step, stream \
             (stdout/stderr) and seq; view `dedup`: one entry per line signature with its count and \
             first/last occurrence (repeated lines collapse). Page with after_step_id/after_seq."),
        tool!("list_artifacts", "List artifacts", Read, Reads, artifacts_list, ListArtifactsRequest => ListArtifactsReply,
            "Artifacts of a task (every attempt) or of an investigation, oldest first, optionally of one \
             kind: note, link, evidence, summary, response. Page with `after`."),
        tool!("get_artifact", "Get an artifact", Read, Reads, artifacts_get, GetArtifactRequest => ArtifactView,
            "One artifact with its whole body."),
        tool!("list_investigations", "List investigations", Read, Reads, investigations_list,
            ListInvestigationsRequest => ListInvestigationsReply,
            "The organisation's investigations, newest first, optionally only open or closed ones."),
        tool!("get_investigation", "Get an investigation", Read, Reads, investigations_get,
            GetInvestigationRequest => InvestigationView,
            "One investigation with its tasks (newest 100) and counts of its evidence."),
        tool!("create_investigation", "Open an investigation", Operate, Adds, investigations_create,
            CreateInvestigationRequest => InvestigationView,
            "Open an investigation (a title): group investigate and other tasks and their evidence \
             under it by passing its investigation_id to create_task and add_task_artifact."),
        tool!("close_investigation", "Close an investigation", Operate, Changes, investigations_close,
            CloseInvestigationRequest => InvestigationView,
            "Close an open investigation, with a reason; no new task may join it."),
        tool!("list_pending_approvals", "List tasks waiting for approval", Read, Reads, approvals_pending,
            PendingApprovalsRequest => PendingApprovalsReply,
            "Tasks doctrine holds for a person's decision, most urgent first: what each would run \
             (payload and its digest), its class, the matched rules and its deadline."),
        tool!("get_runtime_overview", "Runtime overview", Read, Reads, tasks_overview,
            RuntimeOverviewRequest => RuntimeOverview,
            "The organisation's execution state (as the tanjiren://tasks/runtime-overview resource): \
             tasks by status and approval status, steps executing, live leases, queue depth and the \
             oldest queued step's age, stale-lease rejections, p50/p99 durations of recent tasks, and \
             schedules due in the next hour."),
    ]
});

/// The tool called `name`.
pub fn find(name: &str) -> Option<&'static ToolSpec> {
    TOOLS.iter().find(|t| t.name == name)
}
