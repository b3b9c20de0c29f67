//! Creating a task: one form for the three modes (a command, a prompt, or
//! questions one per line), targets by name with the fleet's names offered, and
//! a doctrine dry-run that shows the approval class and rules before submitting.
//! The form carries an idempotency key made when it was shown, so submitting it
//! twice creates one task.

use super::Console;
use super::view::{self, Ctx, Nav, badge, csrf};
use axum::Form;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use std::collections::HashMap;
use tanjiren_shared::WireError;
use tanjiren_shared::approvals::{DoctrineDryRunReply, DoctrineDryRunRequest};
use tanjiren_shared::ids::WorkstationId;
use tanjiren_shared::model::{Mode, TaskSpec};
use tanjiren_shared::protocol::{CreateTaskReply, ListWorkstationsReply, ListWorkstationsRequest, WorkstationView};

/// What the task form sends (shared with the schedule form's template).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct TaskForm {
    #[serde(default)]
    pub intent: String,
    #[serde(default)]
    pub mode: String,
    /// The command, the prompt, or the questions one per line.
    #[serde(default)]
    pub payload: String,
    /// Workstation names or ids, separated by commas or spaces.
    #[serde(default)]
    pub targets: String,
    #[serde(default)]
    pub timeout_secs: String,
    #[serde(default)]
    pub idempotency_key: String,
}

impl TaskForm {
    /// The mode the form describes.
    ///
    /// # Errors
    /// `invalid_request` for an unknown mode.
    pub fn mode(&self) -> Result<Mode, WireError> {
        let payload = self.payload.replace("\r\n", "\n");
        Ok(match self.mode.as_str() {
            "command" => Mode::Command { command: payload },
            "prompt" => Mode::Prompt { prompt: payload },
            "investigate" => Mode::Investigate {
                questions: payload
                    .lines()
                    .map(str::trim)
                    .filter(|q| !q.is_empty())
                    .map(str::to_string)
                    .collect(),
            },
            other => {
                return Err(WireError::invalid(format!(
                    "mode: `{other}` is not one of command, prompt, investigate"
                )));
            }
        })
    }

    /// The targets as a list.
    pub fn target_list(&self) -> Vec<String> {
        self.targets
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect()
    }

    /// The timeout, if one was given.
    ///
    /// # Errors
    /// `invalid_request` when it is not a whole number of seconds.
    pub fn timeout(&self) -> Result<Option<u64>, WireError> {
        let t = self.timeout_secs.trim();
        if t.is_empty() {
            return Ok(None);
        }
        t.parse::<u64>()
            .map(Some)
            .map_err(|_| WireError::invalid("timeout_secs: a whole number of seconds"))
    }

    /// The task spec (the services check the rest).
    ///
    /// # Errors
    /// `invalid_request` for a bad mode or timeout.
    pub fn spec(&self) -> Result<TaskSpec, WireError> {
        Ok(TaskSpec {
            intent: self.intent.trim().to_string(),
            mode: self.mode()?,
            targets: self.target_list(),
            timeout_secs: self.timeout()?,
            queue_timeout_secs: None,
            retry_policy: None,
            investigation_id: None,
            idempotency_key: Some(self.idempotency_key.clone()).filter(|k| !k.is_empty()),
            retry_of_task_id: None,
        })
    }
}

/// The fleet's first 500 workstations by name.
///
/// # Errors
/// The service's error.
pub async fn list_workstations(c: &Console, ctx: &Ctx) -> Result<ListWorkstationsReply, WireError> {
    c.up.call(
        &ctx.caller,
        c.up.subjects.workstations_list(),
        &ListWorkstationsRequest {
            after: None,
            limit: Some(500),
        },
    )
    .await
}

/// [`list_workstations`], or none when it fails (they only help the form and name targets).
async fn workstations(c: &Console, ctx: &Ctx) -> Vec<WorkstationView> {
    list_workstations(c, ctx)
        .await
        .map(|r| r.workstations)
        .unwrap_or_default()
}

/// The fleet's names for the targets field's suggestions.
pub async fn workstation_names(c: &Console, ctx: &Ctx) -> Vec<String> {
    workstations(c, ctx).await.into_iter().map(|w| w.name).collect()
}

/// Workstation names by id, to name targets.
pub async fn workstation_names_by_id(c: &Console, ctx: &Ctx) -> HashMap<WorkstationId, String> {
    workstations(c, ctx)
        .await
        .into_iter()
        .map(|w| (w.workstation_id, w.name))
        .collect()
}

/// The task fields of a form (the task form and the schedule form's template).
pub fn task_fields(f: &TaskForm, names: &[String]) -> Markup {
    let mode = if f.mode.is_empty() { "command" } else { f.mode.as_str() };
    html! {
        label { "Intent" input name="intent" required value=(f.intent) placeholder="What is wanted, in words"; }
        fieldset.modes {
            legend { "Mode" }
            @for (m, help) in [("command", "a shell command; its exit code decides"), ("prompt", "a prompt for the workstation's AI agent"), ("investigate", "questions for the agent, one per line, answers kept as evidence")] {
                label.radio { input type="radio" name="mode" value=(m) checked[mode == m]; " " strong { (m) } " — " (help) }
            }
        }
        label { "Command, prompt or questions" textarea name="payload" rows="4" required { (f.payload) } }
        label { "Targets" input name="targets" required list="workstation-names" value=(f.targets) placeholder="workstation names, comma-separated"; }
        datalist #workstation-names { @for n in names { option value=(n) {} } }
        label { "Timeout (seconds)" input name="timeout_secs" inputmode="numeric" value=(f.timeout_secs) placeholder="service default"; }
    }
}

fn form_page(ctx: &Ctx, f: &TaskForm, names: &[String], error: Option<&WireError>) -> Markup {
    let key = if f.idempotency_key.is_empty() {
        format!("console-{}", uuid::Uuid::now_v7())
    } else {
        f.idempotency_key.clone()
    };
    let body = html! {
        h1 { "New task" }
        @if let Some(e) = error { (view::error_box(e)) }
        form #new-task.task-form method="post" action="/tasks/new" {
            (csrf(ctx))
            input type="hidden" name="idempotency_key" value=(key);
            (task_fields(f, names))
            div.buttons {
                button.secondary type="button" hx-post="/tasks/dry-run" hx-include="#new-task" hx-target="#dry-run" hx-swap="innerHTML" { "Check doctrine" }
                button type="submit" { "Create task" }
            }
        }
        section #dry-run aria-live="polite" {}
    };
    view::page(ctx, "New task", Nav::New, body)
}

/// `GET /tasks/new`.
pub async fn form(State(c): State<Console>, ctx: Ctx) -> Markup {
    if !ctx.may_operate() {
        let body = html! {
            h1 { "New task" }
            p.hint.role-note { "This token may only read (scope mcp:read): creating tasks needs a token without scopes or with mcp:operate." }
        };
        return view::page(&ctx, "New task", Nav::New, body);
    }
    let names = workstation_names(&c, &ctx).await;
    form_page(&ctx, &TaskForm::default(), &names, None)
}

/// `POST /tasks/new`: creates the task and goes to its page.
pub async fn submit(State(c): State<Console>, ctx: Ctx, Form(f): Form<TaskForm>) -> Response {
    let created = async {
        let spec = f.spec()?;
        c.up.call::<_, CreateTaskReply>(&ctx.caller, c.up.subjects.tasks_create(), &spec)
            .await
    }
    .await;
    match created {
        Ok(r) => Redirect::to(&format!("/tasks/{}", r.task_id)).into_response(),
        Err(e) => {
            let names = workstation_names(&c, &ctx).await;
            (crate::problem::status_of(e.code), form_page(&ctx, &f, &names, Some(&e))).into_response()
        }
    }
}

/// `POST /tasks/dry-run`: what doctrine would decide for the form's task.
pub async fn dry_run(State(c): State<Console>, ctx: Ctx, Form(f): Form<TaskForm>) -> Response {
    let verdict = async {
        let req = DoctrineDryRunRequest {
            task: f.spec()?,
            doctrine: None,
        };
        c.up.call::<_, DoctrineDryRunReply>(&ctx.caller, c.up.subjects.doctrine_dry_run(), &req)
            .await
    }
    .await;
    let body = match verdict {
        Err(e) => view::error_box(&e),
        Ok(v) => html! {
            div.dry-run {
                p {
                    "Doctrine "
                    @match v.doctrine_version { Some(n) => { "version " (n) }, None => "(none published)" }
                    " puts this task in class " (badge(v.verdict.approval_class.as_str())) "."
                }
                @if v.verdict.matched_rules.is_empty() {
                    p { "No rule matches: it will run without waiting for approval." }
                } @else {
                    p { "It will wait for an approval. Rules matched:" }
                    ul.rules {
                        @for r in &v.verdict.matched_rules {
                            li {
                                code { (r.name) } " → " (r.class.as_str())
                                @if r.require_reason { span.flag { "reason required" } }
                                @if r.require_owner { span.flag { "owner must approve" } }
                            }
                        }
                    }
                }
            }
        },
    };
    (StatusCode::OK, body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_form_becomes_a_spec() {
        let f = TaskForm {
            intent: " disk ".into(),
            mode: "investigate".into(),
            payload: "Why full?\r\n\r\n Who writes? \n".into(),
            targets: "ws-1, ws-2 ws-3".into(),
            timeout_secs: "30".into(),
            idempotency_key: "k".into(),
        };
        let spec = f.spec().unwrap();
        assert_eq!(spec.intent, "disk");
        assert_eq!(
            spec.mode,
            Mode::Investigate {
                questions: vec!["Why full?".into(), "Who writes?".into()]
            }
        );
        assert_eq!(spec.targets, ["ws-1", "ws-2", "ws-3"]);
        assert_eq!(spec.timeout_secs, Some(30));
        assert!(
            TaskForm {
                mode: "x".into(),
                ..f.clone()
            }
            .spec()
            .is_err()
        );
        assert!(
            TaskForm {
                timeout_secs: "soon".into(),
                ..f
            }
            .spec()
            .is_err()
        );
    }
}
