//! The fleet: workstations (labels, agent, last seen, steps running) and the
//! runtime overview (the figures of the MCP resource `tanjiren://runtime-overview`)
//! as a small dashboard with throughput and duration charts drawn as inline SVG
//! on the server (no script, no chart library).

use super::Console;
use super::view::{self, Ctx, Nav, badge, duration_ms, time, time_or_dash};
use axum::extract::State;
use maud::{Markup, html};
use tanjiren_shared::model::TaskStatus;
use tanjiren_shared::protocol::{RuntimeOverview, RuntimeOverviewRequest, TimelineBucket};

/// `GET /fleet`.
pub async fn page(State(c): State<Console>, ctx: Ctx) -> Markup {
    let listed = super::create::list_workstations(&c, &ctx).await;
    let body = html! {
        h1 { "Fleet" }
        div #overview hx-get="/fleet/overview" hx-trigger="every 10s" hx-swap="innerHTML" {
            (overview_markup(&c, &ctx).await)
        }
        h2 { "Workstations" }
        @match listed {
            Err(e) => (view::error_box(&e)),
            Ok(r) => {
                @if r.workstations.is_empty() {
                    p.empty { "No workstation has registered yet: run " code { "tanjiren-worker" } " on one (docs/operations.md)." }
                } @else {
                    table.fleet {
                        thead { tr { th { "Name" } th { "Labels" } th { "Agent" } th { "Last seen" } th { "Steps running" } th { "Registered" } } }
                        tbody {
                            @for w in &r.workstations {
                                tr data-workstation=(w.name) {
                                    td { a href=(format!("/tasks?workstation={}", w.name)) { (w.name) } }
                                    td { @for (k, v) in &w.labels { span.kv { (k) "=" (v) } " " } }
                                    td {
                                        @match &w.agent_adapter {
                                            Some(a) => { (a) @if let Some(m) = &w.agent_model { " · " (m) } }
                                            None => "—",
                                        }
                                    }
                                    td { (time_or_dash(w.last_seen_at)) }
                                    td.n { (w.steps_executing) }
                                    td { (time(w.registered_at)) }
                                }
                            }
                        }
                    }
                    @if r.next_after.is_some() { p.hint { "More workstations than shown (the first 500 by name)." } }
                }
            }
        }
    };
    view::page(&ctx, "Fleet", Nav::Fleet, body)
}

/// `GET /fleet/overview`: the dashboard (what the page refreshes).
pub async fn overview(State(c): State<Console>, ctx: Ctx) -> Markup {
    overview_markup(&c, &ctx).await
}

async fn overview_markup(c: &Console, ctx: &Ctx) -> Markup {
    let o =
        c.up.call::<_, RuntimeOverview>(
            &ctx.caller,
            c.up.subjects.tasks_overview(),
            &RuntimeOverviewRequest::default(),
        )
        .await;
    let o = match o {
        Ok(o) => o,
        Err(e) => return view::error_box(&e),
    };
    let ms = |v: Option<u64>| v.map(|v| duration_ms(v as i64)).unwrap_or_else(|| "—".into());
    html! {
        section.dashboard {
            div.figures {
                div.figure { span.value { (o.steps_executing) } span.label { "steps running" } }
                div.figure { span.value { (o.queue_depth) } span.label { "steps queued" } }
                div.figure { span.value { (ms(o.oldest_queued_age_ms)) } span.label { "oldest queued" } }
                div.figure { span.value { (o.live_leases) } span.label { "live leases" } }
                div.figure { span.value { (o.expired_leases) } span.label { "expired leases" } }
                div.figure { span.value { (o.stale_lease_rejections) } span.label { "stale-lease refusals (24 h)" } }
                div.figure { span.value { (ms(o.durations.p50_ms)) } span.label { "p50 duration" } }
                div.figure { span.value { (ms(o.durations.p99_ms)) } span.label { "p99 duration" } }
            }
            p.counts {
                @for status in TaskStatus::ALL.iter().map(|s| s.as_str()) {
                    a.count href=(format!("/tasks?status={status}")) { (badge(status)) " " (o.tasks_by_status.get(status).copied().unwrap_or(0)) }
                }
            }
            div.charts {
                figure { figcaption { "Tasks finished per hour (last 24 h)" } (throughput_chart(&o.timeline)) }
                figure { figcaption { "Median duration per hour" } (duration_chart(&o.timeline)) }
            }
            @if !o.schedules_due_next_hour.is_empty() {
                h3 { "Schedules due within the hour (" (o.schedules_due_next_hour_count) ")" }
                ul { @for s in &o.schedules_due_next_hour { li { a href=(format!("/schedules/{}", s.schedule_id)) { (s.name) } " at " (time(s.next_run_at)) } } }
            }
            p.hint { "As of " (time(o.generated_at)) "." }
        }
    }
}

const W: f64 = 480.0;
const H: f64 = 120.0;

/// Stacked bars per bucket: completed, failed, cancelled.
pub fn throughput_chart(buckets: &[TimelineBucket]) -> Markup {
    let max = buckets
        .iter()
        .map(|b| b.completed + b.failed + b.cancelled)
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let bw = W / buckets.len().max(1) as f64;
    // (x, y, height, class, tooltip), stacked from the bottom.
    let mut bars = Vec::new();
    for (i, b) in buckets.iter().enumerate() {
        let mut y = H;
        for (n, class) in [
            (b.completed, "completed"),
            (b.failed, "failed"),
            (b.cancelled, "cancelled"),
        ] {
            if n > 0 {
                let h = n as f64 / max * (H - 4.0);
                y -= h;
                bars.push((
                    i as f64 * bw + 1.0,
                    y,
                    h,
                    class,
                    format!("{}: {n} {class}", b.start.format("%H:%M")),
                ));
            }
        }
    }
    html! {
        svg.chart viewBox=(format!("0 0 {W} {}", H + 14.0)) role="img" aria-label="Tasks finished per bucket" {
            @for (x, y, h, class, tip) in &bars {
                rect class=(format!("bar-{class}")) x=(format!("{x:.1}")) y=(format!("{y:.1}")) width=(format!("{:.1}", bw - 2.0)) height=(format!("{h:.1}")) {
                    title { (tip) }
                }
            }
            text.axis x="0" y=(H + 12.0) { "max " (max as u64) }
        }
    }
}

/// The median duration per bucket as a line (buckets with no task are gaps).
pub fn duration_chart(buckets: &[TimelineBucket]) -> Markup {
    let max = buckets.iter().filter_map(|b| b.p50_ms).max().unwrap_or(0).max(1) as f64;
    let bw = W / buckets.len().max(1) as f64;
    let points: Vec<String> = buckets
        .iter()
        .enumerate()
        .filter_map(|(i, b)| {
            b.p50_ms
                .map(|ms| format!("{:.1},{:.1}", i as f64 * bw + bw / 2.0, H - ms as f64 / max * (H - 4.0)))
        })
        .collect();
    html! {
        svg.chart viewBox=(format!("0 0 {W} {}", H + 14.0)) role="img" aria-label="Median task duration per bucket" {
            polyline.line points=(points.join(" ")) {}
            @for p in &points {
                @let (x, y) = p.split_once(',').unwrap_or(("0", "0"));
                circle.dot cx=(x) cy=(y) r="2.5" {}
            }
            text.axis x="0" y=(H + 12.0) { "max " (duration_ms(max as i64)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_draw_one_mark_per_outcome_and_point() {
        let now = chrono::Utc::now();
        let buckets = vec![
            TimelineBucket {
                start: now,
                completed: 3,
                failed: 1,
                cancelled: 0,
                p50_ms: Some(40),
            },
            TimelineBucket {
                start: now,
                ..Default::default()
            },
            TimelineBucket {
                start: now,
                completed: 2,
                failed: 0,
                cancelled: 0,
                p50_ms: Some(80),
            },
        ];
        let bars = throughput_chart(&buckets).into_string();
        assert_eq!(bars.matches("<rect").count(), 3, "{bars}");
        assert!(bars.contains("max 4"));
        let line = duration_chart(&buckets).into_string();
        assert_eq!(line.matches("<circle").count(), 2, "{line}");
    }
}
