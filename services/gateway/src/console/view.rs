//! The console's page frame and small shared pieces (status badges, times,
//! durations, error boxes). Every value goes into the page through maud, which
//! escapes it; nothing here writes raw HTML except [`super::markdown`]'s
//! sanitised output.

use super::session::Session;
use crate::problem::status_of;
use crate::upstream::Caller;
use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};
use tanjiren_shared::WireError;
use tanjiren_shared::model::Role;
use tanjiren_shared::scopes::Needs;

/// The signed-in person, for a handler: who they are and the CSRF token their
/// forms carry.
#[derive(Clone, Debug)]
pub struct Ctx {
    pub caller: Caller,
    pub csrf: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Ctx {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Response> {
        let caller = parts.extensions.get::<Caller>().cloned();
        let session = parts.extensions.get::<Session>().cloned();
        match (caller, session) {
            (Some(caller), Some(session)) => Ok(Ctx {
                caller,
                csrf: session.csrf,
            }),
            _ => Err(refusal(StatusCode::UNAUTHORIZED, "Sign in first.")),
        }
    }
}

impl Ctx {
    /// Whether this person may change things (create, cancel, retry, notes, schedules).
    pub fn may_operate(&self) -> bool {
        self.caller.principal.role != Role::Worker && Needs::Operate.granted_by(&self.caller.principal.scopes)
    }

    /// Whether this person may approve or reject here: the console mints an
    /// approval token for them, which only an admin or owner with an unscoped
    /// token may do (`approvals.mint`).
    pub fn may_decide(&self) -> bool {
        matches!(self.caller.principal.role, Role::Admin | Role::Owner) && self.caller.principal.scopes.is_empty()
    }

    pub fn is_owner(&self) -> bool {
        self.caller.principal.role == Role::Owner
    }
}

/// The console's sections, for the navigation bar.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nav {
    Tasks,
    New,
    Approvals,
    Schedules,
    Investigations,
    Fleet,
}

const NAV: [(Nav, &str, &str); 6] = [
    (Nav::Tasks, "/tasks", "Tasks"),
    (Nav::New, "/tasks/new", "New task"),
    (Nav::Approvals, "/approvals", "Approvals"),
    (Nav::Schedules, "/schedules", "Schedules"),
    (Nav::Investigations, "/investigations", "Investigations"),
    (Nav::Fleet, "/fleet", "Fleet"),
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · Tanjiren" }
            // htmx without eval, inline styles or script tags in swapped content (CSP).
            meta name="htmx-config" content=r#"{"includeIndicatorStyles":false,"allowEval":false,"allowScriptTags":false,"historyCacheSize":0,"selfRequestsOnly":true}"#;
            link rel="icon" href=(super::assets::ICON) type="image/svg+xml";
            link rel="stylesheet" href=(super::assets::CSS);
            script src=(super::assets::HTMX) defer {}
            script src=(super::assets::HTMX_SSE) defer {}
            script src=(super::assets::JS) defer {}
        }
    }
}

/// A full page of the signed-in console.
pub fn page(ctx: &Ctx, title: &str, nav: Nav, body: Markup) -> Markup {
    let p = &ctx.caller.principal;
    let headers = serde_json::json!({ "x-csrf-token": ctx.csrf }).to_string();
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body hx-headers=(headers) hx-ext="sse" {
                header.top {
                    a.brand href="/" { "Tanjiren" }
                    nav {
                        @for (section, href, label) in NAV {
                            a href=(href) aria-current=[(section == nav).then_some("page")] { (label) }
                        }
                    }
                    div.who {
                        span.identity title=(format!("organisation {}", p.org_id)) {
                            @if p.token_name != p.role.to_string() { (p.token_name) " · " }
                            span.role { (p.role.to_string()) }
                            @if !p.scopes.is_empty() { " · " (p.scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(" ")) }
                        }
                        form method="post" action="/sign-out" {
                            input type="hidden" name="csrf" value=(ctx.csrf);
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// A page without the navigation (sign-in, errors before sign-in).
pub fn bare(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title))
            body.bare { main { (body) } }
        }
    }
}

/// The hidden CSRF field of a form.
pub fn csrf(ctx: &Ctx) -> Markup {
    html! { input type="hidden" name="csrf" value=(ctx.csrf); }
}

/// A status as a coloured badge (`completed`, `failed`, `pending`, …).
pub fn badge(status: &str) -> Markup {
    html! { span class=(format!("badge s-{status}")) data-status=(status) { (status) } }
}

/// An instant as UTC text, machine-readable in `datetime`.
pub fn time(at: DateTime<Utc>) -> Markup {
    html! { time datetime=(at.to_rfc3339()) { (at.format("%Y-%m-%d %H:%M:%S UTC")) } }
}

/// An optional instant, or a dash.
pub fn time_or_dash(at: Option<DateTime<Utc>>) -> Markup {
    match at {
        Some(at) => time(at),
        None => html! { "—" },
    }
}

/// Milliseconds as `850 ms`, `12.3 s`, `4 min 05 s`, `2 h 03 min`.
pub fn duration_ms(ms: i64) -> String {
    let ms = ms.max(0);
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.1} s", ms as f64 / 1000.0)
    } else if ms < 3_600_000 {
        format!("{} min {:02} s", ms / 60_000, (ms / 1000) % 60)
    } else {
        format!("{} h {:02} min", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

/// A service's refusal or failure as a box on a page.
pub fn error_box(e: &WireError) -> Markup {
    html! {
        div.error role="alert" {
            strong { (e.code.as_str()) } ": " (e.message)
        }
    }
}

/// A whole page for a failed request, with the status the HTTP API would give.
pub fn failure(ctx: Option<&Ctx>, e: &WireError) -> Response {
    let body = html! { h1 { "Something went wrong" } (error_box(e)) p { a href="/" { "Back to the tasks" } } };
    let page = match ctx {
        Some(ctx) => page(ctx, "Error", Nav::Tasks, body),
        None => bare("Error", body),
    };
    (status_of(e.code), page).into_response()
}

/// A short refusal page (bad form, too large).
pub fn refusal(status: StatusCode, message: &str) -> Response {
    (
        status,
        bare(
            "Refused",
            html! { h1 { "Refused" } p.error role="alert" { (message) } p { a href="/" { "Back to the console" } } },
        ),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_well() {
        assert_eq!(duration_ms(850), "850 ms");
        assert_eq!(duration_ms(12_345), "12.3 s");
        assert_eq!(duration_ms(245_000), "4 min 05 s");
        assert_eq!(duration_ms(7_380_000), "2 h 03 min");
        assert_eq!(duration_ms(-5), "0 ms");
    }

    #[test]
    fn text_is_escaped() {
        let m = badge("<script>alert(1)</script>").into_string();
        assert!(!m.contains("<script>"), "{m}");
        assert!(m.contains("&lt;script&gt;"), "{m}");
    }
}
