//! DNS-rebinding and cross-origin protection for every gateway route: the `Host`
//! must be one the gateway answers to (`gateway_allowed_hosts`), and a browser's
//! `Origin`, when present, one of `gateway_allowed_origins`; otherwise 403 before
//! anything else runs. Requests without `Origin` (CLIs, servers, MCP clients that
//! are not browsers) pass the origin check.

use crate::problem::Problem;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use tanjiren_shared::error::ErrorCode;

/// The allow-lists, parsed once.
#[derive(Clone, Debug, Default)]
pub struct Guard {
    hosts: Arc<Vec<String>>,
    any_host: bool,
    origins: Arc<Vec<OriginRule>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct OriginRule {
    scheme: String,
    host: String,
    /// `None`: any port (`:*`).
    port: Option<u16>,
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" { 443 } else { 80 }
}

/// `scheme://host[:port]` (host lower-cased, IPv6 in brackets), the port defaulted.
fn split_origin(origin: &str) -> Option<(String, String, Option<String>)> {
    let (scheme, rest) = origin.split_once("://")?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return None;
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        (format!("[{h}]"), after.strip_prefix(':').map(str::to_string))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.to_string())),
            None => (rest.to_string(), None),
        }
    };
    Some((scheme.to_ascii_lowercase(), host.to_ascii_lowercase(), port))
}

impl Guard {
    /// From the comma-separated knobs.
    ///
    /// # Errors
    /// An entry of `origins` that is not `scheme://host[:port|:*]`.
    pub fn new(hosts: &str, origins: &str) -> Result<Self, String> {
        let list = |s: &str| -> Vec<String> {
            s.split(',')
                .map(|x| x.trim().to_ascii_lowercase())
                .filter(|x| !x.is_empty())
                .collect()
        };
        let hosts = list(hosts);
        let mut rules = Vec::new();
        for o in list(origins) {
            let (scheme, host, port) = split_origin(&o).ok_or_else(|| {
                format!("gateway_allowed_origins: `{o}` is not scheme://host[:port], e.g. http://localhost:*")
            })?;
            let port = match port.as_deref() {
                Some("*") => None,
                Some(p) => Some(
                    p.parse::<u16>()
                        .map_err(|_| format!("gateway_allowed_origins: bad port in `{o}`"))?,
                ),
                None => Some(default_port(&scheme)),
            };
            rules.push(OriginRule { scheme, host, port });
        }
        Ok(Self {
            any_host: hosts.iter().any(|h| h == "*"),
            hosts: Arc::new(hosts),
            origins: Arc::new(rules),
        })
    }

    /// Whether the gateway answers requests for this `Host` header value.
    pub fn host_allowed(&self, host: &str) -> bool {
        if self.any_host {
            return true;
        }
        let host = host.trim().to_ascii_lowercase();
        // An authority only: a host name or address and an optional numeric port.
        let (name, port) = match host.strip_prefix('[') {
            Some(v6) => match v6.split_once(']') {
                Some((h, rest)) if rest.is_empty() || rest.starts_with(':') => {
                    (h.to_string(), rest.strip_prefix(':').map(str::to_string))
                }
                _ => return false,
            },
            None => match host.split_once(':') {
                Some((h, p)) => (h.to_string(), Some(p.to_string())),
                None => (host.clone(), None),
            },
        };
        let valid_name = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
        let valid_port = port.as_deref().is_none_or(|p| p.parse::<u16>().is_ok());
        if !(valid_name && valid_port) {
            return false;
        }
        self.hosts.iter().any(|h| *h == host || *h == name)
    }

    /// Whether a browser page of this origin may call the gateway.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        let Some((scheme, host, port)) = split_origin(origin) else {
            return false;
        };
        let port = match port {
            Some(p) => match p.parse::<u16>() {
                Ok(p) => p,
                Err(_) => return false,
            },
            None => default_port(&scheme),
        };
        self.origins
            .iter()
            .any(|r| r.scheme == scheme && r.host == host && r.port.is_none_or(|p| p == port))
    }

    /// The rmcp transport's own lists (it checks them again).
    pub fn rmcp_hosts(&self) -> Vec<String> {
        self.hosts.iter().filter(|h| *h != "*").cloned().collect()
    }
}

/// Whether `origin` names the same host and port as the request's (allowed) `Host`:
/// a page served by this gateway calling it back.
pub fn same_origin(origin: &str, host: &str) -> bool {
    let Some((scheme, o_host, o_port)) = split_origin(origin) else {
        return false;
    };
    let o_port = o_port.unwrap_or_else(|| default_port(&scheme).to_string());
    let host = host.trim().to_ascii_lowercase();
    let (h_host, h_port) = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((h, rest)) => (format!("[{h}]"), rest.strip_prefix(':').map(str::to_string)),
            None => return false,
        },
        None => match host.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p.to_string())),
            None => (host.clone(), None),
        },
    };
    let h_port = h_port.unwrap_or_else(|| default_port(&scheme).to_string());
    o_host == h_host && o_port == h_port
}

/// Middleware: refuses a foreign `Host` or `Origin` with 403.
pub async fn check(State(guard): State<Guard>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or_default();
    if !guard.host_allowed(host) {
        return Problem::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("host `{host}` is not one this gateway answers to (gateway_allowed_hosts)"),
        )
        .into_response();
    }
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        // A page the gateway served itself (the console) calls back to its own origin.
        if !(guard.origin_allowed(origin) || same_origin(origin, host)) {
            return Problem::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                format!("origin `{origin}` is not allowed (gateway_allowed_origins)"),
            )
            .into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_match_by_name_or_authority() {
        let g = Guard::new("localhost,127.0.0.1,::1,tanjiren.example.com:8443", "").unwrap();
        for ok in [
            "localhost",
            "localhost:8420",
            "127.0.0.1:1",
            "[::1]:8420",
            "tanjiren.example.com:8443",
        ] {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8420",
            "tanjiren.example.com",
            "localhost.evil.example",
        ] {
            assert!(!g.host_allowed(bad), "{bad}");
        }
        assert!(Guard::new("*", "").unwrap().host_allowed("anything"));
    }

    #[test]
    fn origins_match_scheme_host_and_port() {
        let g = Guard::new("", "http://localhost:*, https://console.example.com").unwrap();
        assert!(g.origin_allowed("http://localhost:3000"));
        assert!(g.origin_allowed("http://localhost"));
        assert!(g.origin_allowed("https://console.example.com"));
        assert!(g.origin_allowed("https://console.example.com:443"));
        for bad in [
            "https://localhost:3000",
            "http://console.example.com",
            "https://console.example.com:8443",
            "https://evil.example",
            "null",
            "http://localhost.evil.example",
        ] {
            assert!(!g.origin_allowed(bad), "{bad}");
        }
        assert!(Guard::new("", "localhost").is_err());
    }

    #[test]
    fn a_page_of_the_gateway_itself_is_same_origin() {
        assert!(same_origin("https://tanjiren.example.com", "tanjiren.example.com"));
        assert!(same_origin(
            "http://tanjiren.example.com:8420",
            "Tanjiren.example.com:8420"
        ));
        assert!(same_origin("http://[::1]:8420", "[::1]:8420"));
        for (origin, host) in [
            ("https://evil.example", "tanjiren.example.com"),
            ("http://tanjiren.example.com:8421", "tanjiren.example.com:8420"),
            ("https://tanjiren.example.com", "tanjiren.example.com:8443"),
            ("null", "tanjiren.example.com"),
        ] {
            assert!(!same_origin(origin, host), "{origin} {host}");
        }
    }
}
