//! Investigations: the list, and one investigation with its tasks, its evidence
//! grouped by question, and its summaries and notes.

use super::Console;
use super::markdown;
use super::tasks::task_table;
use super::view::{self, Ctx, Nav, badge, time, time_or_dash};
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use std::collections::BTreeMap;
use tanjiren_shared::WireError;
use tanjiren_shared::artifacts::{ArtifactKind, ArtifactView, ListArtifactsReply, ListArtifactsRequest};
use tanjiren_shared::investigations::{
    GetInvestigationRequest, InvestigationView, ListInvestigationsReply, ListInvestigationsRequest,
};

/// `GET /investigations`.
pub async fn list(State(c): State<Console>, ctx: Ctx) -> Markup {
    let listed =
        c.up.call::<_, ListInvestigationsReply>(
            &ctx.caller,
            c.up.subjects.investigations_list(),
            &ListInvestigationsRequest {
                status: None,
                before: None,
                limit: Some(100),
            },
        )
        .await;
    let body = html! {
        h1 { "Investigations" }
        @match listed {
            Err(e) => (view::error_box(&e)),
            Ok(r) => {
                @if r.investigations.is_empty() {
                    p.empty { "No investigations yet. An " code { "investigate" } " task opens one." }
                } @else {
                    table.investigations {
                        thead { tr { th { "Title" } th { "Status" } th { "Tasks" } th { "Artifacts" } th { "Opened" } th { "Closed" } } }
                        tbody {
                            @for i in &r.investigations {
                                tr {
                                    td { a href=(format!("/investigations/{}", i.investigation_id)) { (i.title) } }
                                    td { (badge(&i.status.to_string())) }
                                    td { (i.task_count) }
                                    td { (i.artifact_count) }
                                    td { (time(i.opened_at)) " by " (i.opened_by) }
                                    td { (time_or_dash(i.closed_at)) }
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    view::page(&ctx, "Investigations", Nav::Investigations, body)
}

/// `GET /investigations/{investigation_id}`.
pub async fn page(State(c): State<Console>, ctx: Ctx, Path(id): Path<String>) -> Response {
    let loaded = async {
        let investigation_id = id
            .parse::<uuid::Uuid>()
            .map_err(|_| WireError::invalid("investigation_id: not an investigation id"))?;
        let inv: InvestigationView =
            c.up.call(
                &ctx.caller,
                c.up.subjects.investigations_get(),
                &GetInvestigationRequest { investigation_id },
            )
            .await?;
        let artifacts: ListArtifactsReply =
            c.up.call(
                &ctx.caller,
                c.up.subjects.artifacts_list(),
                &ListArtifactsRequest {
                    task_id: None,
                    investigation_id: Some(investigation_id),
                    kind: None,
                    after: None,
                    limit: Some(500),
                },
            )
            .await?;
        Ok::<_, WireError>((inv, artifacts))
    }
    .await;
    let (inv, artifacts) = match loaded {
        Ok(x) => x,
        Err(e) => return view::failure(Some(&ctx), &e),
    };
    // Evidence by question (in question order), then everything else.
    let mut by_question: BTreeMap<(u32, String), Vec<&ArtifactView>> = BTreeMap::new();
    let mut summaries = Vec::new();
    let mut others = Vec::new();
    for a in &artifacts.artifacts {
        match (a.kind, a.question_index) {
            (ArtifactKind::Evidence, Some(i)) => by_question
                .entry((i, a.question.clone().unwrap_or_default()))
                .or_default()
                .push(a),
            (ArtifactKind::Summary, _) => summaries.push(a),
            _ => others.push(a),
        }
    }
    let body = html! {
        h1 { (inv.title) " " (badge(&inv.status.to_string())) }
        dl.facts {
            dt { "Opened" } dd { (time(inv.opened_at)) " by " (inv.opened_by) }
            @if let Some(at) = inv.closed_at {
                dt { "Closed" } dd { (time(at)) @if let Some(by) = &inv.closed_by { " by " (by) } @if let Some(r) = &inv.close_reason { ": " (r) } }
            }
            dt { "Tasks" } dd { (inv.task_count) } dt { "Artifacts" } dd { (inv.artifact_count) }
        }
        h2 { "Summary" }
        @if summaries.is_empty() { p.empty { "No summary yet." } }
        @for a in &summaries { (markdown::artifact(a, true)) }
        h2 { "Evidence by question" }
        @if by_question.is_empty() { p.empty { "No evidence yet." } }
        @for ((index, question), items) in &by_question {
            section.question {
                h3 { (index + 1) ". " (question) }
                @for a in items { (markdown::artifact(a, true)) }
            }
        }
        @if !others.is_empty() {
            h2 { "Notes, links and responses" }
            @for a in &others { (markdown::artifact(a, true)) }
        }
        h2 { "Tasks" }
        (task_table(&inv.tasks))
        p { a href=(format!("/tasks?investigation_id={}", inv.investigation_id)) { "All its tasks" } }
    };
    view::page(&ctx, &inv.title, Nav::Investigations, body).into_response()
}
