//! Console sessions: signing in with an API token (typed in, or redeemed from a
//! one-time link that `tanjiren up` prints), the session cookie and CSRF.
//!
//! The session is one cookie, `tanjiren_session`, encrypted and authenticated with
//! AES-256-GCM (axum-extra's private cookie jar; the key comes from
//! `gateway_console_secret`), `HttpOnly`, `SameSite=Strict`, `Path=/`, `Secure`
//! when the console is served over TLS, and good for [`SESSION_TTL`]. It holds the
//! API token (never readable by scripts or other sites), a per-session CSRF
//! token and its expiry. Every request re-checks the token with `auth.whoami`
//! (cached 10 s), so revoking the token ends the session. Every state-changing
//! request must carry the CSRF token (a form's `csrf` field or the
//! `X-CSRF-Token` header htmx sends); the sign-in form itself is protected by a
//! double-submit token in a short-lived cookie of its own.

use super::Console;
use super::view;
use crate::upstream::Caller;
use axum::Form;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::PrivateCookieJar;
use axum_extra::extract::cookie::{Cookie, SameSite};
use cookie::time;
use maud::html;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tanjiren_shared::error::ErrorCode;

/// The session cookie's name.
pub const SESSION_COOKIE: &str = "tanjiren_session";
/// The sign-in form's double-submit cookie.
pub const SIGN_IN_COOKIE: &str = "tanjiren_sign_in";
/// How long a session lasts after signing in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// How long a one-time sign-in link stays good.
pub const LINK_TTL: Duration = Duration::from_secs(15 * 60);
/// The largest form the console reads, in bytes.
pub const MAX_FORM_BYTES: usize = 1024 * 1024;

/// What the session cookie holds (encrypted).
#[derive(Serialize, Deserialize)]
struct SessionData {
    /// The API token.
    t: String,
    /// The CSRF token.
    c: String,
    /// Expiry, Unix seconds.
    e: i64,
}

/// The signed-in session, in the request's extensions for handlers.
#[derive(Clone, Debug)]
pub struct Session {
    pub csrf: String,
}

/// One-time sign-in links: a random code standing for a token, good once and for
/// [`LINK_TTL`] (checked on use: the cache's own expiry only evicts lazily), kept
/// in this process only.
#[derive(Clone)]
pub struct SignInLinks(moka::sync::Cache<String, (String, std::time::Instant)>);

impl std::fmt::Debug for SignInLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SignInLinks").finish_non_exhaustive()
    }
}

impl Default for SignInLinks {
    fn default() -> Self {
        Self(
            moka::sync::Cache::builder()
                .max_capacity(1_000)
                .time_to_live(LINK_TTL)
                .build(),
        )
    }
}

impl SignInLinks {
    /// A new code for `token` (the path is `/sign-in/{code}`).
    pub fn issue(&self, token: &str) -> String {
        let code = random_hex();
        self.0
            .insert(code.clone(), (token.to_string(), std::time::Instant::now()));
        code
    }

    /// The token of `code`, once, within [`LINK_TTL`] of its issue.
    fn take(&self, code: &str) -> Option<String> {
        self.take_within(code, LINK_TTL)
    }

    fn take_within(&self, code: &str, ttl: Duration) -> Option<String> {
        self.0
            .remove(code)
            .filter(|(_, issued)| issued.elapsed() < ttl)
            .map(|(token, _)| token)
    }
}

/// 32 random bytes in hex.
pub fn random_hex() -> String {
    hex::encode(rand::rng().random::<[u8; 32]>())
}

/// Compares secrets in time independent of where they differ.
fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Whether the request came over TLS (directly configured, or said by the proxy).
fn over_tls(console: &Console, headers: &HeaderMap) -> bool {
    console.secure
        || headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

fn cookie(name: &'static str, value: String, max_age: Duration, secure: bool) -> Cookie<'static> {
    Cookie::build((name, value))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .max_age(time::Duration::seconds(max_age.as_secs() as i64))
        .build()
}

fn removal(name: &'static str) -> Cookie<'static> {
    Cookie::build((name, "")).path("/").build()
}

/// A local path to go back to after signing in (never another site).
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n)
            if n.starts_with('/')
                && !n.starts_with("//")
                && !n.contains('\\')
                && !n.chars().any(char::is_control)
                && !n.starts_with("/sign-") =>
        {
            n.to_string()
        }
        _ => "/".to_string(),
    }
}

fn is_htmx(headers: &HeaderMap) -> bool {
    headers.contains_key("hx-request")
}

/// Answers a request that has no (good) session.
fn sign_in_first(req: &Request) -> Response {
    if is_htmx(req.headers()) {
        // htmx follows this header with a full page load.
        return (StatusCode::UNAUTHORIZED, [("hx-redirect", "/sign-in")]).into_response();
    }
    let wants_stream = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/event-stream"));
    if wants_stream {
        return (StatusCode::UNAUTHORIZED, "sign in first\n").into_response();
    }
    let here = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let next = if req.method() == Method::GET { here } else { "/" };
    Redirect::to(&format!(
        "/sign-in?{}",
        serde_urlencoded::to_string([("next", next)]).unwrap_or_default()
    ))
    .into_response()
}

#[derive(Deserialize)]
struct CsrfField {
    #[serde(default)]
    csrf: String,
}

/// Middleware: admits a request with a live session (its [`Caller`] and
/// [`Session`] in the extensions); a state-changing request must also carry the
/// session's CSRF token. Anything else is sent to sign in.
pub async fn require(State(console): State<Console>, jar: PrivateCookieJar, req: Request, next: Next) -> Response {
    let data = jar
        .get(SESSION_COOKIE)
        .and_then(|c| serde_json::from_str::<SessionData>(c.value()).ok())
        .filter(|d| d.e > now_secs());
    let Some(data) = data else {
        return sign_in_first(&req);
    };
    let caller = match console.auth.caller(&data.t).await {
        Ok(c) => c,
        Err(e) if matches!(e.code, ErrorCode::Unauthorized | ErrorCode::Forbidden) => {
            return (jar.remove(removal(SESSION_COOKIE)), sign_in_first(&req)).into_response();
        }
        Err(e) => return view::failure(None, &e),
    };
    let req = if matches!(*req.method(), Method::GET | Method::HEAD) {
        req
    } else {
        let header_token = req
            .headers()
            .get("x-csrf-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let (parts, body) = req.into_parts();
        let bytes = match axum::body::to_bytes(body, MAX_FORM_BYTES).await {
            Ok(b) => b,
            Err(_) => {
                return view::refusal(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "The form is larger than the console accepts (1 MiB).",
                );
            }
        };
        let presented = header_token.or_else(|| serde_urlencoded::from_bytes::<CsrfField>(&bytes).ok().map(|f| f.csrf));
        if !presented.is_some_and(|p| same_secret(&p, &data.c)) {
            return view::refusal(
                StatusCode::FORBIDDEN,
                "This form's security token does not match your session (it may be from an older page): reload the page and try again.",
            );
        }
        Request::from_parts(parts, Body::from(bytes))
    };
    let mut req = req;
    req.extensions_mut().insert::<Caller>(caller);
    req.extensions_mut().insert(Session { csrf: data.c });
    next.run(req).await
}

#[derive(Deserialize)]
pub struct SignInQuery {
    #[serde(default)]
    next: Option<String>,
}

fn sign_in_page(csrf: &str, next: &str, code: Option<&str>, error: Option<&str>) -> maud::Markup {
    let body = html! {
        section.sign-in {
            h1 { "Sign in to Tanjiren" }
            @if let Some(e) = error { p.error role="alert" { (e) } }
            form method="post" action="/sign-in" {
                input type="hidden" name="csrf" value=(csrf);
                input type="hidden" name="next" value=(next);
                @if let Some(code) = code {
                    input type="hidden" name="code" value=(code);
                    p { "This one-time link signs you in with the token that " code { "tanjiren up" } " created. It works once, for 15 minutes." }
                    button type="submit" { "Sign in" }
                } @else {
                    label for="token" { "API token" }
                    input #token type="password" name="token" autocomplete="off" required placeholder="tjr_…";
                    p.hint { "Create one with " code { "tanjiren token create --name you --role member" } " (an admin or owner can approve tasks here). The token stays on the server, in an encrypted cookie that scripts cannot read." }
                    button type="submit" { "Sign in" }
                }
            }
        }
    };
    view::bare("Sign in", body)
}

/// The sign-in page with a new double-submit token (its cookie and its field),
/// and `error` when there is one.
fn fresh_form(
    console: &Console,
    jar: PrivateCookieJar,
    headers: &HeaderMap,
    status: StatusCode,
    next: &str,
    code: Option<&str>,
    error: Option<&str>,
) -> Response {
    let csrf = random_hex();
    let jar = jar.add(cookie(
        SIGN_IN_COOKIE,
        csrf.clone(),
        LINK_TTL,
        over_tls(console, headers),
    ));
    (status, jar, sign_in_page(&csrf, next, code, error)).into_response()
}

/// `GET /sign-in`: the form.
pub async fn form(
    State(console): State<Console>,
    jar: PrivateCookieJar,
    headers: HeaderMap,
    Query(q): Query<SignInQuery>,
) -> Response {
    let next = safe_next(q.next.as_deref());
    fresh_form(&console, jar, &headers, StatusCode::OK, &next, None, None)
}

/// `GET /sign-in/{code}`: a one-time link asks before it is spent (link
/// previewers and scanners fetch links; only a person presses the button).
pub async fn link(
    State(console): State<Console>,
    jar: PrivateCookieJar,
    headers: HeaderMap,
    Path(code): Path<String>,
) -> Response {
    let code: String = code.chars().filter(char::is_ascii_hexdigit).take(64).collect();
    fresh_form(&console, jar, &headers, StatusCode::OK, "/", Some(&code), None)
}

#[derive(Deserialize)]
pub struct SignInForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    code: String,
    #[serde(default)]
    next: Option<String>,
}

/// `POST /sign-in`: a token (typed, or a one-time link's) becomes a session.
pub async fn sign_in(
    State(console): State<Console>,
    jar: PrivateCookieJar,
    headers: HeaderMap,
    Form(f): Form<SignInForm>,
) -> Response {
    let next = safe_next(f.next.as_deref());
    let expected = jar.get(SIGN_IN_COOKIE).map(|c| c.value().to_string());
    let again = |jar: PrivateCookieJar, status: StatusCode, error: &str| {
        fresh_form(&console, jar, &headers, status, &next, None, Some(error))
    };
    if !expected.is_some_and(|e| same_secret(&e, &f.csrf)) {
        return again(jar, StatusCode::FORBIDDEN, "The sign-in form expired: try again.");
    }
    let token = if f.code.is_empty() {
        f.token.trim().to_string()
    } else {
        match console.links.take(&f.code) {
            Some(t) => t,
            None => {
                return again(
                    jar,
                    StatusCode::UNAUTHORIZED,
                    "That sign-in link was already used or has expired: sign in with a token, or restart tanjiren up for a new link.",
                );
            }
        }
    };
    if token.is_empty() {
        return again(jar, StatusCode::UNAUTHORIZED, "Enter an API token.");
    }
    match console.auth.caller(&token).await {
        Ok(_) => {
            let data = SessionData {
                t: token,
                c: random_hex(),
                e: now_secs() + SESSION_TTL.as_secs() as i64,
            };
            let value = serde_json::to_string(&data).unwrap_or_default();
            let jar = jar.remove(removal(SIGN_IN_COOKIE)).add(cookie(
                SESSION_COOKIE,
                value,
                SESSION_TTL,
                over_tls(&console, &headers),
            ));
            (jar, Redirect::to(&next)).into_response()
        }
        Err(e) if e.code == ErrorCode::Unauthorized => {
            again(jar, StatusCode::UNAUTHORIZED, "That token is unknown or revoked.")
        }
        Err(e) if e.code == ErrorCode::Forbidden => again(
            jar,
            StatusCode::FORBIDDEN,
            "A worker's token or workstation credential cannot sign in: use a member, admin or owner token.",
        ),
        Err(e) => again(
            jar,
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("Tanjiren's services did not answer: {}", e.message),
        ),
    }
}

/// `POST /sign-out`.
pub async fn sign_out(jar: PrivateCookieJar) -> Response {
    (jar.remove(removal(SESSION_COOKIE)), Redirect::to("/sign-in")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(safe_next(Some("/tasks?status=failed")), "/tasks?status=failed");
        for bad in [
            "https://evil.example",
            "//evil.example",
            "/\\evil.example",
            "/sign-out",
            "tasks",
        ] {
            assert_eq!(safe_next(Some(bad)), "/", "{bad}");
        }
        assert_eq!(safe_next(None), "/");
    }

    #[test]
    fn links_work_once() {
        let links = SignInLinks::default();
        let code = links.issue("tjr_x");
        assert_eq!(code.len(), 64);
        assert_eq!(links.take(&code).as_deref(), Some("tjr_x"));
        assert_eq!(links.take(&code), None);
        let stale = links.issue("tjr_y");
        assert_eq!(
            links.take_within(&stale, Duration::ZERO),
            None,
            "an expired link is refused"
        );
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abc", "abd"));
        assert!(!same_secret("abc", "ab"));
    }
}
