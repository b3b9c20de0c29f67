//! Schedules: the list with a form to create one, and a schedule's page with its
//! cron and time zone, next runs, tick ledger (fired, skipped, missed, failed,
//! with reasons) and counts, and pause or resume.

use super::Console;
use super::create::{TaskForm, task_fields, workstation_names};
use super::tasks::payload;
use super::view::{self, Ctx, Nav, badge, csrf, time, time_or_dash};
use axum::Form;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Redirect, Response};
use maud::{Markup, html};
use serde::Deserialize;
use tanjiren_shared::WireError;
use tanjiren_shared::schedules::{
    CreateScheduleRequest, GetScheduleRequest, ListSchedulesReply, ListSchedulesRequest, OverlapPolicy, ScheduleDetail,
    ScheduleRef, ScheduleView, TaskTemplate,
};

/// What the schedule form sends: the schedule's fields and its task's.
#[derive(Debug, Default, Deserialize)]
pub struct ScheduleForm {
    #[serde(default)]
    name: String,
    #[serde(default)]
    cron: String,
    #[serde(default)]
    timezone: String,
    #[serde(default)]
    overlap: String,
    #[serde(flatten)]
    task: TaskForm,
}

impl ScheduleForm {
    fn request(&self) -> Result<CreateScheduleRequest, WireError> {
        let overlap = match self.overlap.as_str() {
            "" | "skip" => OverlapPolicy::Skip,
            "allow" => OverlapPolicy::Allow,
            other => return Err(WireError::invalid(format!("overlap: `{other}` is not skip or allow"))),
        };
        Ok(CreateScheduleRequest {
            name: self.name.trim().to_string(),
            cron: self.cron.trim().to_string(),
            timezone: Some(self.timezone.trim())
                .filter(|t| !t.is_empty())
                .unwrap_or("UTC")
                .to_string(),
            template: TaskTemplate {
                intent: self.task.intent.trim().to_string(),
                mode: self.task.mode()?,
                targets: self.task.target_list(),
                timeout_secs: self.task.timeout()?,
                queue_timeout_secs: None,
                retry_policy: None,
                investigation_id: None,
            },
            enabled: true,
            overlap,
            catch_up_ticks: 1,
        })
    }
}

fn table(schedules: &[ScheduleView]) -> Markup {
    html! {
        table.schedules {
            thead { tr { th { "Name" } th { "Cron" } th { "Time zone" } th { "State" } th { "Next run" } th { "Last tick" } } }
            tbody {
                @for s in schedules {
                    tr {
                        td { a href=(format!("/schedules/{}", s.schedule_id)) { (s.name) } }
                        td { code { (s.cron) } }
                        td { (s.timezone) }
                        td { (badge(if s.enabled { "enabled" } else { "paused" })) }
                        td { (time_or_dash(s.next_run_at)) }
                        td { (time_or_dash(s.last_tick_at)) }
                    }
                }
            }
        }
    }
}

async fn list_page(c: &Console, ctx: &Ctx, form: &ScheduleForm, error: Option<&WireError>) -> Markup {
    let listed =
        c.up.call::<_, ListSchedulesReply>(
            &ctx.caller,
            c.up.subjects.schedules_list(),
            &ListSchedulesRequest {
                enabled: None,
                before: None,
                limit: Some(200),
            },
        )
        .await;
    let names = workstation_names(c, ctx).await;
    let body = html! {
        h1 { "Schedules" }
        @match listed {
            Err(e) => (view::error_box(&e)),
            Ok(r) => {
                @if r.schedules.is_empty() { p.empty { "No schedules yet." } } @else { (table(&r.schedules)) }
            }
        }
        @if ctx.may_operate() {
            details.create open[error.is_some()] {
                summary { "Create a schedule" }
                @if let Some(e) = error { (view::error_box(e)) }
                form #new-schedule method="post" action="/schedules" {
                    (csrf(ctx))
                    label { "Name" input name="name" required value=(form.name) placeholder="nightly-disk-check"; }
                    label { "Cron" input name="cron" required value=(form.cron) placeholder="0 3 * * * or @daily"; }
                    label { "Time zone" input name="timezone" value=(form.timezone) placeholder="UTC"; }
                    label { "When a tick finds the last task still running"
                        select name="overlap" {
                            option value="skip" selected[form.overlap != "allow"] { "skip the tick" }
                            option value="allow" selected[form.overlap == "allow"] { "run anyway" }
                        }
                    }
                    (task_fields(&form.task, &names))
                    button type="submit" { "Create schedule" }
                }
            }
        }
    };
    view::page(ctx, "Schedules", Nav::Schedules, body)
}

/// `GET /schedules`.
pub async fn list(State(c): State<Console>, ctx: Ctx) -> Markup {
    list_page(&c, &ctx, &ScheduleForm::default(), None).await
}

/// `POST /schedules`.
pub async fn create(State(c): State<Console>, ctx: Ctx, Form(f): Form<ScheduleForm>) -> Response {
    let created = async {
        let req = f.request()?;
        c.up.call::<_, ScheduleView>(&ctx.caller, c.up.subjects.schedules_create(), &req)
            .await
    }
    .await;
    match created {
        Ok(s) => Redirect::to(&format!("/schedules/{}", s.schedule_id)).into_response(),
        Err(e) => (
            crate::problem::status_of(e.code),
            list_page(&c, &ctx, &f, Some(&e)).await,
        )
            .into_response(),
    }
}

/// `GET /schedules/{schedule}` (id or name).
pub async fn page(State(c): State<Console>, ctx: Ctx, Path(schedule): Path<String>) -> Response {
    let req = GetScheduleRequest {
        schedule,
        next_runs: Some(5),
        ticks_limit: Some(100),
        ticks_before: None,
    };
    let d = match c
        .up
        .call::<_, ScheduleDetail>(&ctx.caller, c.up.subjects.schedules_get(), &req)
        .await
    {
        Ok(d) => d,
        Err(e) => return view::failure(Some(&ctx), &e),
    };
    let s = &d.schedule;
    let body = html! {
        h1 { "Schedule " (s.name) " " (badge(if s.enabled { "enabled" } else { "paused" })) }
        dl.facts {
            dt { "Cron" } dd { code { (s.cron) } @if s.cron_normalized != s.cron { " (" code { (s.cron_normalized) } ")" } }
            dt { "Time zone" } dd { (s.timezone) }
            dt { "Overlap" } dd { (s.overlap.to_string()) }
            dt { "Task" } dd { strong { (s.template.intent) } " on " (s.template.targets.join(", ")) }
            dt { "Created" } dd { (time(s.created_at)) " by " (s.created_by) }
            @if let Some(t) = s.last_task_id { dt { "Last task" } dd { a href=(format!("/tasks/{t}")) { (t) } } }
        }
        div.payload-box { (payload(&s.template.mode)) }
        @if ctx.may_operate() {
            @let action = if s.enabled { "pause" } else { "resume" };
            form method="post" action=(format!("/schedules/{}/{action}", s.schedule_id)) {
                (csrf(&ctx))
                button type="submit" { @if s.enabled { "Pause" } @else { "Resume" } }
            }
        }
        p { a href=(format!("/tasks?schedule_id={}", s.schedule_id)) { "Its tasks" } }
        h2 { "Next runs" }
        @if d.next_runs.is_empty() { p.empty { "None (paused)." } }
        @let tz = s.timezone.parse::<chrono_tz::Tz>().ok().filter(|tz| *tz != chrono_tz::UTC);
        ol.next-runs {
            @for at in &d.next_runs {
                li {
                    (time(*at))
                    @if let Some(tz) = tz { " — " (at.with_timezone(&tz).format("%Y-%m-%d %H:%M:%S %Z")) " in " (s.timezone) }
                }
            }
        }
        h2 { "Tick ledger" }
        p.counts {
            "fired " strong { (d.tick_counts.fired) } " · skipped " strong { (d.tick_counts.skipped_overlap) }
            " · missed " strong { (d.tick_counts.missed) } " · failed " strong { (d.tick_counts.failed) }
        }
        @if d.ticks.is_empty() { p.empty { "No ticks yet." } }
        @else {
            table.ledger {
                thead { tr { th { "Tick" } th { "Outcome" } th { "Task" } th { "Reason" } th { "Recorded" } } }
                tbody {
                    @for t in &d.ticks {
                        tr {
                            td { (time(t.tick_at)) }
                            td { (badge(&t.outcome.to_string())) }
                            td { @if let Some(id) = t.task_id { a href=(format!("/tasks/{id}")) { "task" } } @else { "—" } }
                            td { @if let Some(r) = &t.reason { (r) } @else { "—" } }
                            td { (time(t.recorded_at)) }
                        }
                    }
                }
            }
        }
    };
    view::page(&ctx, &s.name, Nav::Schedules, body).into_response()
}

async fn set_enabled(c: Console, ctx: Ctx, schedule: String, enable: bool) -> Response {
    let subject = if enable {
        c.up.subjects.schedules_resume()
    } else {
        c.up.subjects.schedules_pause()
    };
    match c
        .up
        .call::<_, ScheduleView>(&ctx.caller, subject, &ScheduleRef { schedule })
        .await
    {
        Ok(s) => Redirect::to(&format!("/schedules/{}", s.schedule_id)).into_response(),
        Err(e) => view::failure(Some(&ctx), &e),
    }
}

/// `POST /schedules/{schedule}/pause`.
pub async fn pause(State(c): State<Console>, ctx: Ctx, Path(schedule): Path<String>) -> Response {
    set_enabled(c, ctx, schedule, false).await
}

/// `POST /schedules/{schedule}/resume`.
pub async fn resume(State(c): State<Console>, ctx: Ctx, Path(schedule): Path<String>) -> Response {
    set_enabled(c, ctx, schedule, true).await
}
