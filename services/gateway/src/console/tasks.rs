//! The tasks list (filters, counts by status, cursor paging, live refresh) and a
//! task's page (payload, targets, approval, attempts, timing, one panel per step
//! with its lease and live output, artifacts) with its actions: cancel, retry and
//! add a note; plus the deduplicated output view and the raw log download.

use super::view::{self, Ctx, Nav, badge, csrf, duration_ms, time, time_or_dash};
use super::{Console, markdown};
use crate::upstream::decode;
use axum::Form;
use axum::body::Body;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use tanjiren_shared::WireError;
use tanjiren_shared::approvals::ApprovalSnapshot;
use tanjiren_shared::artifacts::{AddArtifactReply, AddArtifactRequest, ArtifactContent, ArtifactKind};
use tanjiren_shared::ids::{StepId, TaskId};
use tanjiren_shared::model::{ApprovalStatus, Mode, TaskStatus};
use tanjiren_shared::protocol::{
    CancelTaskReply, CancelTaskRequest, GetTaskRequest, ListTasksReply, ListTasksRequest, LogView, RuntimeOverview,
    RuntimeOverviewRequest, StepView, TaskLogsReply, TaskLogsRequest, TaskSummary, TaskView,
};
use tanjiren_shared::schedules::{RetryTaskReply, RetryTaskRequest};

/// Tasks per page of the list.
const PAGE: u32 = 50;

/// The filters of the tasks list, as the form sends them (empty means "any").
#[derive(Debug, Default, Deserialize)]
pub struct Filters {
    #[serde(default)]
    status: String,
    #[serde(default)]
    mode: String,
    #[serde(default)]
    approval_status: String,
    #[serde(default)]
    workstation: String,
    #[serde(default)]
    investigation_id: String,
    #[serde(default)]
    schedule_id: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    before: String,
}

impl Filters {
    fn pairs(&self) -> [(&'static str, &str); 8] {
        [
            ("status", &self.status),
            ("mode", &self.mode),
            ("approval_status", &self.approval_status),
            ("workstation", &self.workstation),
            ("investigation_id", &self.investigation_id),
            ("schedule_id", &self.schedule_id),
            ("text", &self.text),
            ("before", &self.before),
        ]
    }

    /// The `tasks.list` request, checked by the services' own decoding rule (ids
    /// first, with messages for people).
    fn request(&self) -> Result<ListTasksRequest, WireError> {
        for (field, what, hint) in [
            (
                "investigation_id",
                &self.investigation_id,
                "an investigation's id (its page links to its tasks)",
            ),
            (
                "schedule_id",
                &self.schedule_id,
                "a schedule's id (its page links to its tasks)",
            ),
            ("before", &self.before, "a task id (the pager's link)"),
        ] {
            let v = what.trim();
            if !v.is_empty() && v.parse::<uuid::Uuid>().is_err() {
                return Err(WireError::invalid(format!("{field}: `{v}` is not {hint}")));
            }
        }
        for (field, v, allowed) in [
            (
                "status",
                self.status.trim(),
                TaskStatus::ALL.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            ),
            (
                "approval_status",
                self.approval_status.trim(),
                ApprovalStatus::ALL.iter().map(|s| s.as_str()).collect(),
            ),
            ("mode", self.mode.trim(), vec!["command", "prompt", "investigate"]),
        ] {
            if !v.is_empty() && !allowed.contains(&v) {
                return Err(WireError::invalid(format!(
                    "{field}: `{v}` is not one of {}",
                    allowed.join(", ")
                )));
            }
        }
        let mut object = serde_json::Map::new();
        for (k, v) in self.pairs() {
            let v = v.trim();
            if !v.is_empty() {
                object.insert(k.into(), v.into());
            }
        }
        object.insert("limit".into(), PAGE.into());
        decode(&object)
    }

    /// The query string of these filters, with `before` replaced.
    fn query(&self, before: Option<&str>) -> String {
        let pairs: Vec<(&str, &str)> = self
            .pairs()
            .into_iter()
            .filter(|(k, v)| *k != "before" && !v.trim().is_empty())
            .chain(before.map(|b| ("before", b)))
            .collect();
        serde_urlencoded::to_string(pairs).unwrap_or_default()
    }
}

/// `GET /`: the console for browsers, a JSON index of the gateway for others.
pub async fn home(headers: HeaderMap) -> Response {
    if super::wants_html(&headers) {
        return Redirect::to("/tasks").into_response();
    }
    axum::Json(serde_json::json!({
        "name": "tanjiren",
        "console": "/tasks",
        "mcp": "/mcp",
        "http_api": "/v1",
        "openapi": "/v1/openapi.json",
        "docs": ["docs/console.md", "docs/mcp.md", "docs/http.md"]
    }))
    .into_response()
}

fn select(name: &str, label: &str, current: &str, options: &[&str]) -> Markup {
    html! {
        label { (label)
            select name=(name) {
                option value="" selected[current.is_empty()] { "any" }
                @for o in options {
                    option value=(o) selected[current == *o] { (o) }
                }
            }
        }
    }
}

/// `GET /tasks`.
pub async fn list(State(c): State<Console>, ctx: Ctx, Query(f): Query<Filters>, RawQuery(raw): RawQuery) -> Response {
    let statuses: Vec<&str> = TaskStatus::ALL.iter().map(|s| s.as_str()).collect();
    let approvals: Vec<&str> = ApprovalStatus::ALL.iter().map(|s| s.as_str()).collect();
    let rows_url = format!("/tasks/rows?{}", raw.unwrap_or_default());
    let body = html! {
        h1 { "Tasks" }
        form.filters method="get" action="/tasks" {
            (select("status", "Status", &f.status, &statuses))
            (select("mode", "Mode", &f.mode, &["command", "prompt", "investigate"]))
            (select("approval_status", "Approval", &f.approval_status, &approvals))
            label { "Workstation" input name="workstation" value=(f.workstation) placeholder="name or id"; }
            label { "Investigation" input name="investigation_id" value=(f.investigation_id) placeholder="id"; }
            label { "Schedule" input name="schedule_id" value=(f.schedule_id) placeholder="id"; }
            label { "Text" input name="text" type="search" value=(f.text) placeholder="in the intent"; }
            button type="submit" { "Filter" }
            a href="/tasks" { "Clear" }
        }
        div sse-connect="/events" {
            div #task-table hx-get=(rows_url) hx-trigger="sse:task throttle:1s" hx-swap="innerHTML" {
                (rows_markup(&c, &ctx, &f).await)
            }
        }
    };
    view::page(&ctx, "Tasks", Nav::Tasks, body).into_response()
}

/// `GET /tasks/rows`: the counts and the table (what the list refreshes live).
pub async fn rows(State(c): State<Console>, ctx: Ctx, Query(f): Query<Filters>) -> Markup {
    rows_markup(&c, &ctx, &f).await
}

async fn rows_markup(c: &Console, ctx: &Ctx, f: &Filters) -> Markup {
    let listed = match f.request() {
        Ok(req) => {
            c.up.call::<_, ListTasksReply>(&ctx.caller, c.up.subjects.tasks_list(), &req)
                .await
        }
        Err(e) => Err(e),
    };
    let overview =
        c.up.call::<_, RuntimeOverview>(
            &ctx.caller,
            c.up.subjects.tasks_overview(),
            &RuntimeOverviewRequest::default(),
        )
        .await;
    html! {
        @if let Ok(o) = &overview {
            p.counts {
                "Live and the last 24 h: "
                @for status in TaskStatus::ALL.iter().map(|s| s.as_str()) {
                    @let n = o.tasks_by_status.get(status).copied().unwrap_or(0);
                    a.count href=(format!("/tasks?status={status}")) data-status=(status) { (badge(status)) " " span.n { (n) } }
                }
            }
        }
        @match listed {
            Err(e) => (view::error_box(&e)),
            Ok(page) => {
                @if page.tasks.is_empty() {
                    p.empty { "No tasks match." }
                } @else {
                    (task_table(&page.tasks))
                }
                nav.pager {
                    @if !f.before.is_empty() { a href=(format!("/tasks?{}", f.query(None))) { "← Newest" } }
                    @if let Some(next) = page.next_before {
                        a href=(format!("/tasks?{}", f.query(Some(&next.to_string())))) rel="next" { "Older →" }
                    }
                }
            }
        }
    }
}

/// A table of task summaries.
pub fn task_table(tasks: &[TaskSummary]) -> Markup {
    html! {
        table.tasks {
            thead { tr { th { "Status" } th { "Intent" } th { "Mode" } th { "Approval" } th { "Targets" } th { "Attempt" } th { "Created" } th { "Finished" } } }
            tbody {
                @for t in tasks {
                    tr data-task-id=(t.task_id) {
                        td { (badge(t.status.as_str())) }
                        td.intent { a href=(format!("/tasks/{}", t.task_id)) { (t.intent) } }
                        td { (t.mode) }
                        td { (badge(t.approval_status.as_str())) }
                        td { (t.targets.len()) }
                        td { (t.attempt) }
                        td { (time(t.created_at)) }
                        td { (time_or_dash(t.finished_at)) }
                    }
                }
            }
        }
    }
}

fn parse_task(id: &str) -> Result<TaskId, WireError> {
    id.parse::<uuid::Uuid>()
        .map(TaskId::from)
        .map_err(|_| WireError::invalid("task_id: not a task id"))
}

async fn get_task(c: &Console, ctx: &Ctx, id: &str) -> Result<TaskView, WireError> {
    let task_id = parse_task(id)?;
    c.up.call(&ctx.caller, c.up.subjects.tasks_get(), &GetTaskRequest::new(task_id))
        .await
}

/// The mode and its payload, as the worker gets it.
pub fn payload(mode: &Mode) -> Markup {
    html! {
        @match mode {
            Mode::Command { command } => { span.mode { "command" } pre.payload { (command) } }
            Mode::Prompt { prompt } => { span.mode { "prompt" } pre.payload { (prompt) } }
            Mode::Investigate { questions } => {
                span.mode { "investigate" }
                ol.payload { @for q in questions { li { (q) } } }
            }
        }
    }
}

/// Doctrine's verdict as held in the task: class, rules, version, digest, deadline.
pub fn approval_snapshot(s: &ApprovalSnapshot) -> Markup {
    html! {
        dl.approval {
            dt { "Class" } dd { (badge(s.verdict.approval_class.as_str())) }
            dt { "Doctrine" } dd { @match s.doctrine_version { Some(v) => { "version " (v) }, None => "none published" } }
            dt { "Rules matched" }
            dd {
                @if s.verdict.matched_rules.is_empty() { "none" }
                ul.rules {
                    @for r in &s.verdict.matched_rules {
                        li {
                            code { (r.name) } " → " (r.class.as_str())
                            @if r.require_reason { span.flag { "reason required" } }
                            @if r.require_owner { span.flag { "owner must approve" } }
                        }
                    }
                }
            }
            dt { "Payload digest" } dd { code.digest { (s.payload_digest) } }
            @if let Some(at) = s.requested_at { dt { "Requested" } dd { (time(at)) } }
            @if let Some(at) = s.deadline { dt { "Deadline" } dd { (time(at)) } }
        }
    }
}

/// The summary box; `oob` marks it for htmx's out-of-band swap (by its id).
fn summary(ctx: &Ctx, t: &TaskView, oob: bool) -> Markup {
    let terminal = t.status.is_terminal();
    html! {
        section #summary.summary hx-swap-oob=[oob.then_some("true")] {
            div.status-line {
                (badge(t.status.as_str()))
                " approval " (badge(t.approval_status.as_str()))
                @if let Some(r) = &t.failure_reason { span.reason { (r) } }
            }
            dl.facts {
                dt { "Task" } dd { code { (t.task_id) } }
                dt { "Targets" } dd.targets {
                    @if t.steps.is_empty() {
                        (t.targets.len()) " workstation(s)"
                    } @else {
                        @for (i, s) in t.steps.iter().enumerate() {
                            @if i > 0 { ", " }
                            a href=(format!("/tasks?workstation={}", s.workstation_id)) {
                                (s.workstation_name.clone().unwrap_or_else(|| s.workstation_id.to_string()))
                            }
                        }
                        @if t.next_steps_after.is_some() { " …" }
                    }
                }
                dt { "Created" } dd { (time(t.created_at)) " by " (t.created_by) }
                dt { "Queued" } dd { (time_or_dash(t.queued_at)) }
                dt { "Started" } dd { (time_or_dash(t.started_at)) }
                dt { "Finished" } dd { (time_or_dash(t.finished_at)) }
                @if let (Some(s), Some(f)) = (t.started_at, t.finished_at) {
                    dt { "Ran for" } dd { (duration_ms((f - s).num_milliseconds())) }
                }
                dt { "Timeout" } dd { (t.timeout_secs) " s (queue " (t.queue_timeout_secs) " s)" }
                @if let Some(r) = &t.cancel_reason {
                    dt { "Cancelled" } dd { (r) @if let Some(by) = &t.cancelled_by { " — " (by) } }
                }
                @if let Some(at) = t.retry_at { dt { "Next attempt" } dd { (time(at)) } }
                @if let Some(s) = t.schedule_id { dt { "Schedule" } dd { a href=(format!("/schedules/{s}")) { (s) } } }
                @if let Some(i) = t.investigation_id { dt { "Investigation" } dd { a href=(format!("/investigations/{i}")) { (i) } } }
            }
            @if ctx.may_operate() {
                div.actions {
                    @if !terminal {
                        form.cancel method="post" action=(format!("/tasks/{}/cancel", t.task_id)) {
                            (csrf(ctx))
                            input name="reason" placeholder="why (optional)" aria-label="Reason for cancelling";
                            button.danger type="submit" { "Cancel task" }
                        }
                    }
                    @if matches!(t.status, TaskStatus::Failed | TaskStatus::Cancelled) {
                        form method="post" action=(format!("/tasks/{}/retry", t.task_id)) {
                            (csrf(ctx))
                            button type="submit" { "Retry" }
                        }
                    }
                }
            }
        }
    }
}

/// A step's facts and the agent's response; `oob` as for [`summary`].
fn step_meta(s: &StepView, oob: bool) -> Markup {
    html! {
        div #(format!("step-{}", s.step_id)) hx-swap-oob=[oob.then_some("true")] {
        dl.step-meta {
            dt { "Status" } dd { (badge(s.status.as_str())) @if let Some(r) = &s.failure_reason { " " span.reason { (r) } } }
            dt { "Exit code" } dd.exit { @match s.exit_code { Some(c) => (c), None => "—" } }
            dt { "Duration" } dd { @match s.duration_ms { Some(ms) => (duration_ms(ms)), None => "—" } }
            dt { "Lease" } dd {
                @match &s.lease_owner {
                    Some(owner) => { code { (owner) } }
                    None => "not held",
                }
                " · generation " code.generation { (s.lease_generation) }
                @if let Some(ms) = s.lease_expires_in_ms { " · " (duration_ms(ms)) " left" }
            }
            dt { "Last heartbeat" } dd {
                @match s.last_heartbeat_age_ms { Some(ms) => { (duration_ms(ms)) " ago" }, None => "—" }
            }
            @if let Some(m) = &s.agent_model { dt { "Agent" } dd { (m) @if let Some(u) = &s.usage { " · " (u.input_tokens) " in / " (u.output_tokens) " out tokens" } } }
        }
        @if let Some(m) = &s.message {
            @if s.agent_model.is_some() || s.usage.is_some() {
                div.response { h4 { "Response" } div.markdown { (markdown::render(m)) } }
            } @else {
                p.step-message { (m) }
            }
        }
        }
    }
}

/// One panel per step: its facts, the agent's response, and its live output.
fn step_panel(t: &TaskView, s: &StepView) -> Markup {
    let name = s
        .workstation_name
        .clone()
        .unwrap_or_else(|| s.workstation_id.to_string());
    html! {
        section.step data-step-id=(s.step_id) {
            h3 { "Step on " (name) }
            (step_meta(s, false))
            div.output-head {
                span.legend { span.ln-out { "stdout" } " " span.ln-err { "stderr" } }
                a href=(format!("/tasks/{}/output?step_id={}", t.task_id, s.step_id)) { "Deduplicated view" }
                a href=(format!("/tasks/{}/log.txt?step_id={}", t.task_id, s.step_id)) download { "Download raw log" }
            }
            pre.output #(format!("out-{}", s.step_id)) sse-swap=(format!("line-{}", s.step_id)) hx-swap="beforeend" {}
        }
    }
}

/// The task's artifacts (refreshed as the task runs: the agent's response and the
/// summary arrive when it ends); `oob` as for [`summary`].
fn artifact_list(t: &TaskView, oob: bool) -> Markup {
    html! {
        div #artifact-list hx-swap-oob=[oob.then_some("true")] {
            @if t.artifacts.is_empty() { p.empty { "None yet." } }
            @for a in &t.artifacts { (markdown::artifact(a, false)) }
            @if t.artifacts_truncated { p.hint { "More artifacts than shown here; " code { "tanjiren artifact list" } " lists them all." } }
        }
    }
}

/// The approval (verdict, decisions) and the attempts chain; `oob` as for [`summary`].
fn approval_and_attempts(t: &TaskView, oob: bool) -> Markup {
    html! {
        div #approval-and-attempts hx-swap-oob=[oob.then_some("true")] {
            @if let Some(s) = &t.approval {
                section.approval-box {
                    h2 { "Approval" }
                    (approval_snapshot(s))
                    @if !t.approvals.is_empty() {
                        h3 { "Decisions" }
                        ul.decisions {
                            @for a in &t.approvals {
                                li {
                                    (badge(a.decision.as_str())) " by " (a.decided_by)
                                    @if let Some(p) = a.presented_by.as_ref().filter(|p| **p != a.decided_by) { " (presented by " (p) ")" }
                                    " at " (time(a.decided_at))
                                    @if let Some(r) = &a.reason { ": " q { (r) } }
                                }
                            }
                        }
                    }
                    @if t.approval_status == ApprovalStatus::Pending { p { a href="/approvals" { "Decide on the approvals page" } } }
                }
            }
            @if t.attempts.len() > 1 || t.retry_of_task_id.is_some() {
                section.attempts {
                    h2 { "Attempts" }
                    @if let Some(prev) = t.retry_of_task_id { p { "Retry of " a href=(format!("/tasks/{prev}")) { (prev) } } }
                    @if t.root_task_id != t.task_id { p { "First attempt: " a href=(format!("/tasks/{}", t.root_task_id)) { (t.root_task_id) } } }
                    (task_table(&t.attempts))
                }
            }
        }
    }
}

/// The invisible element that refreshes a task page's summary and step facts: on
/// every change of the task, and every 5 s while it lives (lease time left, heartbeats).
fn refresher(t: &TaskView) -> Markup {
    let trigger = if t.status.is_terminal() {
        "sse:task throttle:500ms"
    } else {
        "sse:task throttle:500ms, every 5s"
    };
    html! {
        div #refresher hx-get=(format!("/tasks/{}/panel?steps={}", t.task_id, t.steps.len())) hx-trigger=(trigger) hx-swap="outerHTML" {}
    }
}

/// The part of the task page that refreshes: a new refresher (it stops polling
/// once the task has ended), the summary and each step's facts (out of band).
fn refreshed(ctx: &Ctx, t: &TaskView) -> Markup {
    html! {
        (refresher(t))
        (summary(ctx, t, true))
        @for s in &t.steps { (step_meta(s, true)) }
        (artifact_list(t, true))
        (approval_and_attempts(t, true))
    }
}

/// `GET /tasks/{task_id}`.
pub async fn page(State(c): State<Console>, ctx: Ctx, Path(id): Path<String>) -> Response {
    let t = match get_task(&c, &ctx, &id).await {
        Ok(t) => t,
        Err(e) => return view::failure(Some(&ctx), &e),
    };
    let body = html! {
        div.task sse-connect=(format!("/tasks/{}/live", t.task_id)) sse-close="end" {
            (refresher(&t))
            h1.intent { (t.intent) }
            (summary(&ctx, &t, false))
            section.payload-box { h2 { "What it runs" } (payload(&t.mode)) }
            (approval_and_attempts(&t, false))
            section.steps {
                h2 { "Steps (" (t.steps.len()) ")" }
                @for s in &t.steps { (step_panel(&t, s)) }
                div.stream-end sse-swap="end" hx-swap="innerHTML" {}
                @if t.next_steps_after.is_some() { p.hint { "More steps than shown here (the first " (t.steps.len()) "); " code { "tanjiren task get" } " and the HTTP API page through all of them." } }
            }
            section #artifacts.artifacts {
                h2 { "Artifacts" }
                (artifact_list(&t, false))
                @if ctx.may_operate() {
                    form.note method="post" action=(format!("/tasks/{}/notes", t.task_id)) {
                        (csrf(&ctx))
                        input name="title" required placeholder="Note title" aria-label="Note title";
                        textarea name="body" rows="3" placeholder="Markdown" aria-label="Note" {}
                        button type="submit" { "Add note" }
                    }
                }
            }
        }
    };
    view::page(&ctx, &t.intent, Nav::Tasks, body).into_response()
}

#[derive(Deserialize)]
pub struct PanelQuery {
    /// How many steps the page shows.
    #[serde(default)]
    steps: usize,
}

/// `GET /tasks/{task_id}/panel`: the refreshed parts of a task page; when the
/// task has gained steps since the page was made (it was planned, or waiting for
/// approval), the whole page reloads instead, and its live output starts from the
/// first stored line, so nothing printed in between is missed.
pub async fn panel(
    State(c): State<Console>,
    ctx: Ctx,
    Path(id): Path<String>,
    Query(q): Query<PanelQuery>,
) -> Response {
    match get_task(&c, &ctx, &id).await {
        Ok(t) if t.steps.len() != q.steps => ([("hx-refresh", "true")], "").into_response(),
        Ok(t) => refreshed(&ctx, &t).into_response(),
        Err(e) => view::error_box(&e).into_response(),
    }
}

#[derive(Deserialize)]
pub struct OutputQuery {
    #[serde(default)]
    step_id: Option<String>,
}

fn logs_request(task_id: TaskId, step: Option<&str>, view: LogView) -> Result<TaskLogsRequest, WireError> {
    let step_id = match step.filter(|s| !s.is_empty()) {
        Some(s) => Some(
            s.parse::<uuid::Uuid>()
                .map(StepId::from)
                .map_err(|_| WireError::invalid("step_id: not a step id"))?,
        ),
        None => None,
    };
    Ok(TaskLogsRequest {
        task_id,
        step_id,
        after_seq: None,
        after_step_id: None,
        limit: Some(1000),
        view,
    })
}

/// `GET /tasks/{task_id}/output`: the deduplicated view (each distinct line once,
/// with its count and first and last time).
pub async fn output(
    State(c): State<Console>,
    ctx: Ctx,
    Path(id): Path<String>,
    Query(q): Query<OutputQuery>,
) -> Response {
    let reply = async {
        let task_id = parse_task(&id)?;
        let req = logs_request(task_id, q.step_id.as_deref(), LogView::Dedup)?;
        c.up.call::<_, TaskLogsReply>(&ctx.caller, c.up.subjects.tasks_logs(), &req)
            .await
    }
    .await;
    let body = html! {
        h1 { "Deduplicated output" }
        p { a href=(format!("/tasks/{id}")) { "← Back to the task" } }
        @match reply {
            Err(e) => (view::error_box(&e)),
            Ok(r) => {
                @if r.signatures.is_empty() { p.empty { "No output." } }
                @else {
                    table.dedup {
                        thead { tr { th { "Count" } th { "Stream" } th { "Line" } th { "First" } th { "Last" } } }
                        tbody {
                            @for s in &r.signatures {
                                tr {
                                    td.n { (s.count) }
                                    td { (s.stream.as_str()) }
                                    td { pre class=(if s.stream.as_str() == "stderr" { "ln-err" } else { "ln-out" }) { (s.exemplar) } }
                                    td { (time(s.first_at)) }
                                    td { (time(s.last_at)) }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    view::page(&ctx, "Output", Nav::Tasks, body).into_response()
}

/// `GET /tasks/{task_id}/log.txt`: the stored output as text, every line as
/// `time stream text`, streamed page by page.
pub async fn raw_log(
    State(c): State<Console>,
    ctx: Ctx,
    Path(id): Path<String>,
    Query(q): Query<OutputQuery>,
) -> Response {
    let first = match parse_task(&id).and_then(|t| logs_request(t, q.step_id.as_deref(), LogView::Raw)) {
        Ok(r) => r,
        Err(e) => return view::failure(Some(&ctx), &e),
    };
    // Check before the 200 goes out: a task of another organisation is not found.
    let reply = match c
        .up
        .call::<_, TaskLogsReply>(&ctx.caller, c.up.subjects.tasks_logs(), &first)
        .await
    {
        Ok(r) => r,
        Err(e) => return view::failure(Some(&ctx), &e),
    };
    let filename = format!("task-{id}.log");
    let state = (c, ctx, first, Some(reply));
    let body = futures::stream::unfold(state, |(c, ctx, mut req, reply)| async move {
        let reply = match reply {
            Some(r) => r,
            None => {
                req.after_seq?;
                match c
                    .up
                    .call::<_, TaskLogsReply>(&ctx.caller, c.up.subjects.tasks_logs(), &req)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        let text = format!("\n[the log stopped: {}: {}]\n", e.code.as_str(), e.message);
                        req.after_seq = None;
                        return Some((Ok::<_, std::io::Error>(text), (c, ctx, req, None)));
                    }
                }
            }
        };
        let mut text = String::new();
        for l in &reply.lines {
            text.push_str(&format!(
                "{} {} {} {}\n",
                l.line.at.to_rfc3339(),
                l.step_id,
                l.line.stream.as_str(),
                l.line.text
            ));
        }
        req.after_seq = reply.next_after_seq;
        req.after_step_id = reply.next_after_step_id;
        if reply.next_after_seq.is_none() && text.is_empty() {
            return None;
        }
        Some((Ok(text), (c, ctx, req, None)))
    });
    (
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8".to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{filename}\""),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

#[derive(Deserialize)]
pub struct CancelForm {
    #[serde(default)]
    reason: String,
}

/// `POST /tasks/{task_id}/cancel`.
pub async fn cancel(State(c): State<Console>, ctx: Ctx, Path(id): Path<String>, Form(f): Form<CancelForm>) -> Response {
    let done = async {
        let req = CancelTaskRequest {
            task_id: parse_task(&id)?,
            reason: Some(f.reason.trim().to_string()).filter(|r| !r.is_empty()),
        };
        c.up.call::<_, CancelTaskReply>(&ctx.caller, c.up.subjects.tasks_cancel(), &req)
            .await
    }
    .await;
    match done {
        Ok(r) => Redirect::to(&format!("/tasks/{}", r.task_id)).into_response(),
        Err(e) => view::failure(Some(&ctx), &e),
    }
}

/// `POST /tasks/{task_id}/retry`: goes to the new attempt.
pub async fn retry(State(c): State<Console>, ctx: Ctx, Path(id): Path<String>) -> Response {
    let done = async {
        let req = RetryTaskRequest {
            task_id: parse_task(&id)?,
        };
        c.up.call::<_, RetryTaskReply>(&ctx.caller, c.up.subjects.tasks_retry(), &req)
            .await
    }
    .await;
    match done {
        Ok(r) => Redirect::to(&format!("/tasks/{}", r.task_id)).into_response(),
        Err(e) => view::failure(Some(&ctx), &e),
    }
}

#[derive(Deserialize)]
pub struct NoteForm {
    #[serde(default)]
    title: String,
    #[serde(default)]
    body: String,
}

/// `POST /tasks/{task_id}/notes`.
pub async fn note(State(c): State<Console>, ctx: Ctx, Path(id): Path<String>, Form(f): Form<NoteForm>) -> Response {
    let done = async {
        let req = AddArtifactRequest {
            kind: ArtifactKind::Note,
            task_id: Some(parse_task(&id)?),
            investigation_id: None,
            content: ArtifactContent {
                title: f.title,
                body: f.body,
                url: None,
            },
        };
        c.up.call::<_, AddArtifactReply>(&ctx.caller, c.up.subjects.artifacts_add(), &req)
            .await
    }
    .await;
    match done {
        Ok(_) => Redirect::to(&format!("/tasks/{id}#artifacts")).into_response(),
        Err(e) => view::failure(Some(&ctx), &e),
    }
}
