//! The console's static files, embedded in the binary: its stylesheet and script,
//! and the vendored htmx and htmx SSE extension (`services/gateway/assets/README.md`
//! says where they come from). Vendored files carry their version in their name
//! and are cached for a year; the console's own are revalidated.

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The stylesheet's path.
pub const CSS: &str = "/assets/console.css";
/// The console's icon.
pub const ICON: &str = "/assets/favicon.svg";
/// The console's own script's path.
pub const JS: &str = "/assets/console.js";
/// htmx's path.
pub const HTMX: &str = "/assets/htmx-2.0.11.min.js";
/// The htmx SSE extension's path.
pub const HTMX_SSE: &str = "/assets/htmx-ext-sse-2.2.4.min.js";

/// `(file name, content type, body, immutable)`.
const FILES: [(&str, &str, &[u8], bool); 5] = [
    ("favicon.svg", "image/svg+xml", include_bytes!("favicon.svg"), false),
    (
        "console.css",
        "text/css; charset=utf-8",
        include_bytes!("console.css"),
        false,
    ),
    (
        "console.js",
        "text/javascript; charset=utf-8",
        include_bytes!("console.js"),
        false,
    ),
    (
        "htmx-2.0.11.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/htmx-2.0.11.min.js"),
        true,
    ),
    (
        "htmx-ext-sse-2.2.4.min.js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/htmx-ext-sse-2.2.4.min.js"),
        true,
    ),
];

/// `GET /assets/{file}`.
pub async fn serve(Path(file): Path<String>) -> Response {
    match FILES.iter().find(|(name, ..)| *name == file) {
        Some((_, content_type, body, immutable)) => {
            let cache = if *immutable {
                "public, max-age=31536000, immutable"
            } else {
                "no-cache"
            };
            (
                [(header::CONTENT_TYPE, *content_type), (header::CACHE_CONTROL, cache)],
                *body,
            )
                .into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_the_pages_name_is_served() {
        for path in [CSS, JS, HTMX, HTMX_SSE, ICON] {
            let name = path.strip_prefix("/assets/").unwrap();
            assert!(FILES.iter().any(|(n, ..)| *n == name), "{path}");
        }
    }
}
