//! The operator console: server-rendered HTML pages at `/` (tasks, a task with its
//! live output, approvals, schedules, investigations, the fleet and a form to
//! create tasks), with vendored htmx and its server-sent-events extension for the
//! live parts ([`assets`]). It is one more client of the services: every page and
//! action forwards the signed-in person's own API token over NATS, so roles,
//! scopes and organisations decide exactly as on NATS. The token lives only in an
//! encrypted `HttpOnly`, `SameSite=Strict` cookie ([`session`]); every
//! state-changing request carries a CSRF token; every page is sent with a strict
//! Content-Security-Policy ([`security_headers`]) and all text is escaped by maud.

pub mod approvals;
pub mod assets;
pub mod create;
pub mod fleet;
pub mod investigations;
pub mod live;
pub mod markdown;
pub mod schedules;
pub mod session;
pub mod tasks;
pub mod view;

use crate::auth::Authenticator;
use crate::upstream::Upstream;
use axum::Router;
use axum::extract::{FromRef, Request};
use axum::http::{HeaderValue, header};
use axum::middleware::{Next, from_fn, from_fn_with_state};
use axum::response::Response;
use axum::routing::{get, post};
use axum_extra::extract::cookie::Key;

pub use session::SignInLinks;

/// The console's shared state (cheap to clone).
#[derive(Clone)]
pub struct Console {
    pub up: Upstream,
    pub auth: Authenticator,
    /// Encrypts and signs the session cookies.
    pub key: Key,
    /// One-time sign-in links (`tanjiren up` prints one).
    pub links: SignInLinks,
    /// Whether cookies get `Secure` (the gateway's public URL is `https://`).
    pub secure: bool,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").finish_non_exhaustive()
    }
}

impl FromRef<Console> for Key {
    fn from_ref(c: &Console) -> Self {
        c.key.clone()
    }
}

/// The cookie key from `gateway_console_secret` (SHA-512 of it), or a random key
/// when it is empty.
pub fn key_from_secret(secret: &str) -> Key {
    use sha2::{Digest, Sha512};
    if secret.is_empty() {
        Key::generate()
    } else {
        Key::from(&Sha512::digest(secret.as_bytes()))
    }
}

/// The console's routes (pages need a session; sign-in and assets do not).
pub fn router(console: Console) -> Router {
    let signed_in = Router::new()
        .route("/tasks", get(tasks::list))
        .route("/tasks/rows", get(tasks::rows))
        .route("/tasks/new", get(create::form).post(create::submit))
        .route("/tasks/dry-run", post(create::dry_run))
        .route("/tasks/{task_id}", get(tasks::page))
        .route("/tasks/{task_id}/panel", get(tasks::panel))
        .route("/tasks/{task_id}/live", get(live::task))
        .route("/tasks/{task_id}/output", get(tasks::output))
        .route("/tasks/{task_id}/log.txt", get(tasks::raw_log))
        .route("/tasks/{task_id}/cancel", post(tasks::cancel))
        .route("/tasks/{task_id}/retry", post(tasks::retry))
        .route("/tasks/{task_id}/notes", post(tasks::note))
        .route("/approvals", get(approvals::page))
        .route("/approvals/queue", get(approvals::queue))
        .route("/approvals/{task_id}/approve", post(approvals::approve))
        .route("/approvals/{task_id}/reject", post(approvals::reject))
        .route("/schedules", get(schedules::list).post(schedules::create))
        .route("/schedules/{schedule}", get(schedules::page))
        .route("/schedules/{schedule}/pause", post(schedules::pause))
        .route("/schedules/{schedule}/resume", post(schedules::resume))
        .route("/investigations", get(investigations::list))
        .route("/investigations/{investigation_id}", get(investigations::page))
        .route("/fleet", get(fleet::page))
        .route("/fleet/overview", get(fleet::overview))
        .route("/events", get(live::org))
        .route("/sign-out", post(session::sign_out))
        .layer(from_fn_with_state(console.clone(), session::require));
    let open = Router::new()
        .route("/sign-in", get(session::form).post(session::sign_in))
        .route("/sign-in/{code}", get(session::link))
        .route("/assets/{file}", get(assets::serve));
    signed_in
        .merge(open)
        .layer(from_fn(security_headers))
        .with_state(console)
}

/// Whether a request comes from a browser navigating (it accepts HTML).
pub fn wants_html(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/html"))
}

/// The Content-Security-Policy of every console response: scripts, styles and
/// connections from the gateway itself only, no inline script or style, no
/// framing, forms posting only back here.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self' data:; connect-src 'self'; font-src 'self'; form-action 'self'; \
     frame-ancestors 'none'; base-uri 'none'";

/// Middleware: CSP, no sniffing, no framing, no referrer to other sites, and no
/// caching of pages (assets set their own caching).
pub async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    res
}
