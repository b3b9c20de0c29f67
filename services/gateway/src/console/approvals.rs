//! The approvals queue: every held task with what it would run (the exact payload
//! and its digest), who asked, the rules doctrine matched and the deadline, and
//! for an admin or owner an approve and a reject button. Deciding mints a
//! single-use approval token for the signed-in person (`approvals.mint`) and
//! presents it at once (`tasks.approve` / `tasks.reject`), so the token never
//! reaches the browser; `require_owner` and `require_reason` are checked by the
//! approval service as always and explained beside the buttons.

use super::Console;
use super::tasks::{approval_snapshot, payload};
use super::view::{self, Ctx, Nav, csrf, time};
use axum::Form;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use tanjiren_shared::WireError;
use tanjiren_shared::approvals::{
    DecideTaskReply, DecideTaskRequest, MintApprovalTokenReply, MintApprovalTokenRequest, PendingApproval,
    PendingApprovalsReply, PendingApprovalsRequest,
};
use tanjiren_shared::ids::{TaskId, WorkstationId};

/// `GET /approvals`.
pub async fn page(State(c): State<Console>, ctx: Ctx) -> Response {
    let body = html! {
        h1 { "Approvals" }
        @if !ctx.may_decide() {
            p.hint.role-note {
                "You are signed in as a " (ctx.caller.principal.role.to_string())
                @if !ctx.caller.principal.scopes.is_empty() { " with a scoped token" }
                ": you can see what waits, but only an admin or owner signed in with an unscoped token can approve or reject here."
            }
        }
        div sse-connect="/events" {
            div #queue hx-get="/approvals/queue" hx-trigger="sse:task throttle:1s, every 30s" hx-swap="innerHTML" {
                (queue_markup(&c, &ctx).await)
            }
        }
    };
    view::page(&ctx, "Approvals", Nav::Approvals, body).into_response()
}

/// `GET /approvals/queue`: the queue (what the page refreshes).
pub async fn queue(State(c): State<Console>, ctx: Ctx) -> Markup {
    queue_markup(&c, &ctx).await
}

async fn queue_markup(c: &Console, ctx: &Ctx) -> Markup {
    let reply =
        c.up.call::<_, PendingApprovalsReply>(
            &ctx.caller,
            c.up.subjects.approvals_pending(),
            &PendingApprovalsRequest { limit: Some(100) },
        )
        .await;
    let names = super::create::workstation_names_by_id(c, ctx).await;
    html! {
        @match reply {
            Err(e) => (view::error_box(&e)),
            Ok(r) => {
                @if r.pending.is_empty() { p.empty { "Nothing waits for a decision." } }
                @for p in &r.pending { (held(ctx, p, &names)) }
                @if r.truncated { p.hint { "More are waiting than shown (the most urgent 100)." } }
            }
        }
    }
}

fn held(ctx: &Ctx, p: &PendingApproval, names: &std::collections::HashMap<WorkstationId, String>) -> Markup {
    let rules = &p.snapshot.verdict.matched_rules;
    let owner_only = rules.iter().any(|r| r.require_owner);
    let reason_required = rules.iter().any(|r| r.require_reason);
    let may_approve = ctx.may_decide() && (!owner_only || ctx.is_owner());
    html! {
        article.held data-task-id=(p.task_id) {
            h2 { a href=(format!("/tasks/{}", p.task_id)) { (p.intent) } }
            p.meta {
                "Asked by " strong { (p.requested_by) } " to run on "
                @for (i, w) in p.targets.iter().enumerate() {
                    @if i > 0 { ", " }
                    strong.target { (names.get(w).cloned().unwrap_or_else(|| w.to_string())) }
                }
                @if let Some(d) = p.snapshot.deadline { " · decide before " (time(d)) }
            }
            div.payload-box { (payload(&p.mode)) }
            (approval_snapshot(&p.snapshot))
            @if ctx.may_decide() {
                div.decide {
                    form.approve method="post" action=(format!("/approvals/{}/approve", p.task_id)) {
                        (csrf(ctx))
                        input name="reason" placeholder=(if reason_required { "reason (required)" } else { "reason (optional)" })
                            aria-label="Reason for approving" required[reason_required];
                        button.approve type="submit" disabled[!may_approve] { "Approve" }
                    }
                    form.reject method="post" action=(format!("/approvals/{}/reject", p.task_id)) {
                        (csrf(ctx))
                        input name="reason" placeholder="reason (required)" aria-label="Reason for rejecting" required;
                        button.danger type="submit" { "Reject" }
                    }
                }
                @if owner_only && !ctx.is_owner() {
                    p.hint { "A rule it matched says only an owner may approve it (require_owner); you may still reject it." }
                }
                @if reason_required {
                    p.hint { "A rule it matched asks for a reason with the decision (require_reason)." }
                }
            }
        }
    }
}

#[derive(Deserialize)]
pub struct DecideForm {
    #[serde(default)]
    reason: String,
}

async fn decide(c: &Console, ctx: &Ctx, id: &str, reason: String, approve: bool) -> Result<DecideTaskReply, WireError> {
    let task_id = id
        .parse::<uuid::Uuid>()
        .map(TaskId::from)
        .map_err(|_| WireError::invalid("task_id: not a task id"))?;
    let minted: MintApprovalTokenReply =
        c.up.call(
            &ctx.caller,
            c.up.subjects.approvals_mint(),
            &MintApprovalTokenRequest { task_id },
        )
        .await?;
    let req = DecideTaskRequest {
        task_id,
        approval_token: Some(minted.approval_token),
        reason: Some(reason.trim().to_string()).filter(|r| !r.is_empty()),
    };
    let subject = if approve {
        c.up.subjects.tasks_approve()
    } else {
        c.up.subjects.tasks_reject()
    };
    c.up.call(&ctx.caller, subject, &req).await
}

/// `POST /approvals/{task_id}/approve`.
pub async fn approve(
    State(c): State<Console>,
    ctx: Ctx,
    Path(id): Path<String>,
    Form(f): Form<DecideForm>,
) -> Response {
    match decide(&c, &ctx, &id, f.reason, true).await {
        Ok(r) => Redirect::to(&format!("/tasks/{}", r.task_id)).into_response(),
        Err(e) => view::failure(Some(&ctx), &e),
    }
}

/// `POST /approvals/{task_id}/reject`.
pub async fn reject(State(c): State<Console>, ctx: Ctx, Path(id): Path<String>, Form(f): Form<DecideForm>) -> Response {
    match decide(&c, &ctx, &id, f.reason, false).await {
        Ok(_) => Redirect::to("/approvals").into_response(),
        Err(e) => view::failure(Some(&ctx), &e),
    }
}
