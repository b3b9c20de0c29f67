//! The gateway: Tanjiren for AI agents over MCP (Streamable HTTP at `/mcp`, and
//! stdio through `tanjiren mcp`) and for everyone else over HTTP. It is stateless
//! and holds no credential: every request's own bearer token is checked
//! ([`auth`]) and forwarded over NATS to the services ([`upstream`]), which decide
//! roles, scopes and organisations exactly as for any other client. Run any
//! number of replicas behind a load balancer.

pub mod api;
pub mod auth;
pub mod console;
pub mod events;
pub mod guard;
pub mod mcp;
pub mod problem;
pub mod schema;
pub mod sessions;
pub mod streams;
pub mod upstream;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{Next, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use std::net::SocketAddr;
use std::time::Duration;
use tanjiren_bus::{Shutdown, StartupError};
use tanjiren_shared::config::Config;
use tanjiren_shared::error::ErrorCode;
use tanjiren_shared::scopes::Needs;

pub use auth::Authenticator;
pub use upstream::{Caller, Upstream};

/// Largest MCP message the gateway reads, in bytes.
pub const MAX_MCP_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// A running gateway.
#[derive(Debug)]
pub struct Gateway {
    /// Where it listens (the port is the real one when the config asked for 0).
    pub addr: SocketAddr,
    /// Its address for people: `gateway_public_url`, else `http://` and `addr`
    /// (loopback when it listens on every interface).
    pub url: String,
    pub handle: tokio::task::JoinHandle<()>,
    /// The console's one-time sign-in links (`tanjiren up` issues one).
    pub links: console::SignInLinks,
}

impl Gateway {
    /// A one-time link that signs a browser into the console with `token`
    /// (good once, for 15 minutes).
    pub fn sign_in_link(&self, token: &str) -> String {
        format!("{}/sign-in/{}", self.url, self.links.issue(token))
    }
}

/// The services as the gateway calls them.
pub fn upstream(config: &Config, nats: async_nats::Client) -> Upstream {
    Upstream {
        nats,
        subjects: config.subjects(),
        timeout: Duration::from_millis(config.gateway_request_timeout_ms),
        streams: streams::StreamSlots::new(config.gateway_max_streams_per_token),
        stop: Default::default(),
    }
}

/// Starts the gateway on `config.gateway_addr` (None when it is empty); it serves
/// until `shutdown`.
///
/// # Errors
/// [`StartupError::Gateway`] when the address cannot be bound or a gateway knob is malformed.
pub async fn start(
    config: &Config,
    nats: async_nats::Client,
    shutdown: Shutdown,
) -> Result<Option<Gateway>, StartupError> {
    if config.gateway_addr.is_empty() {
        return Ok(None);
    }
    let http_error = |reason: String| StartupError::Gateway {
        addr: config.gateway_addr.clone(),
        reason,
    };
    let links = console::SignInLinks::default();
    let app = app(config, nats, shutdown.clone(), links.clone()).map_err(http_error)?;
    let listener = tokio::net::TcpListener::bind(&config.gateway_addr)
        .await
        .map_err(|e| http_error(e.to_string()))?;
    let addr = listener.local_addr().map_err(|e| http_error(e.to_string()))?;
    let handle = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "the gateway stopped");
        }
    });
    let url = if config.gateway_public_url.is_empty() {
        let mut shown = addr;
        if shown.ip().is_unspecified() {
            shown.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        format!("http://{shown}")
    } else {
        config.gateway_public_url.trim_end_matches('/').to_string()
    };
    Ok(Some(Gateway {
        addr,
        url,
        handle,
        links,
    }))
}

/// The gateway's routes; `links` are the console's one-time sign-in links.
///
/// # Errors
/// A malformed `gateway_allowed_origins` entry.
pub fn app(
    config: &Config,
    nats: async_nats::Client,
    shutdown: Shutdown,
    links: console::SignInLinks,
) -> Result<Router, String> {
    let mut upstream = upstream(config, nats);
    upstream.stop = shutdown.clone();
    // An origin given CORS is an origin allowed to call.
    let origins = format!("{},{}", config.gateway_allowed_origins, config.gateway_cors_origins);
    let guard = guard::Guard::new(&config.gateway_allowed_hosts, &origins)?;
    let auth = Authenticator::new(upstream.clone(), &config.gateway_public_url);

    let mut mcp_config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(true)
        .with_allowed_hosts(guard.rmcp_hosts());
    mcp_config.cancellation_token = shutdown.child_token();
    // Host and Origin are checked by the guard in front (with `*` and port
    // wildcards); rmcp's own host list repeats the named hosts.
    if config.gateway_allowed_hosts.split(',').any(|h| h.trim() == "*") {
        mcp_config = mcp_config.disable_allowed_hosts();
    }
    // One handler per session (and per stateless request): a session's
    // subscriptions are its own.
    let (mcp_upstream, mcp_stop) = (upstream.clone(), shutdown.clone());
    let mcp_service: StreamableHttpService<mcp::TanjirenMcp, LocalSessionManager> = StreamableHttpService::new(
        move || {
            Ok(mcp::TanjirenMcp::new(
                mcp_upstream.clone(),
                mcp::Identity::PerRequest,
                mcp_stop.clone(),
            ))
        },
        Default::default(),
        mcp_config,
    );

    let mcp_routes = Router::new()
        .nest_service("/mcp", mcp_service)
        .layer(from_fn_with_state(auth.clone(), operate_scope))
        .layer(from_fn_with_state(sessions::SessionOwners::default(), sessions::bind))
        .layer(from_fn_with_state(auth.clone(), auth::require_bearer));

    let api_routes = api::router(upstream.clone())
        .layer(from_fn_with_state(auth.clone(), auth::require_bearer))
        .layer(axum::middleware::from_fn(problem::everywhere));
    let openapi = std::sync::Arc::new(api::openapi::document());

    let metadata_auth = auth.clone();
    let api_metadata_auth = auth.clone();
    let open = Router::new()
        .route(
            auth::MCP_METADATA_PATH,
            get(move |headers: HeaderMap| async move {
                axum::Json(auth::resource_metadata(&format!(
                    "{}/mcp",
                    metadata_auth.base_url(&headers)
                )))
            }),
        )
        .route(
            auth::API_METADATA_PATH,
            get(move |headers: HeaderMap| async move {
                axum::Json(auth::resource_metadata(&api_metadata_auth.base_url(&headers)))
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/", get(console::tasks::home))
        .route(
            "/v1/openapi.json",
            get(move || {
                let doc = openapi.clone();
                async move { axum::Json(doc.as_ref().clone()) }
            }),
        );

    let console = console::Console {
        up: upstream.clone(),
        auth: auth.clone(),
        key: console::key_from_secret(&config.gateway_console_secret),
        links,
        secure: config.gateway_public_url.starts_with("https://"),
    };

    let mut app = Router::new()
        .merge(open)
        .merge(console::router(console))
        .merge(mcp_routes)
        .merge(api_routes)
        .fallback(|headers: HeaderMap| async move {
            if console::wants_html(&headers) {
                return console::view::refusal(
                    StatusCode::NOT_FOUND,
                    "There is no such page: the console starts at /tasks.",
                );
            }
            problem::Problem::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "no such route: the console is at /tasks, MCP at /mcp, the HTTP API under /v1 (/v1/openapi.json)",
            )
            .into_response()
        })
        .layer(from_fn_with_state(guard, guard::check));
    if let Some(cors) = cors(&config.gateway_cors_origins)? {
        app = app.layer(cors);
    }
    Ok(app)
}

/// CORS for the listed origins (none: no CORS headers, so browsers on other
/// origins cannot read replies).
fn cors(origins: &str) -> Result<Option<tower_http::cors::CorsLayer>, String> {
    let list: Vec<HeaderValue> = origins
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|o| HeaderValue::from_str(o).map_err(|_| format!("gateway_cors_origins: `{o}` is not a valid origin")))
        .collect::<Result<_, _>>()?;
    if list.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        tower_http::cors::CorsLayer::new()
            .allow_origin(list)
            .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                "last-event-id".parse().expect("a header name"),
            ])
            .max_age(Duration::from_secs(600)),
    ))
}

/// Middleware on `/mcp`: a `tools/call` of a tool that changes something, by a
/// token whose scopes do not reach `mcp:operate`, is answered 403 with an
/// `insufficient_scope` challenge (MCP authorization, step-up), before rmcp runs it.
async fn operate_scope(State(auth): State<Authenticator>, req: Request, next: Next) -> Response {
    if req.method() != Method::POST {
        return next.run(req).await;
    }
    let Some(caller) = req.extensions().get::<Caller>().cloned() else {
        return next.run(req).await;
    };
    if Needs::Operate.granted_by(&caller.principal.scopes) {
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = match axum::body::to_bytes(body, MAX_MCP_MESSAGE_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return problem::Problem::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::TooLarge,
                format!("an MCP message is at most {MAX_MCP_MESSAGE_BYTES} bytes"),
            )
            .into_response();
        }
    };
    if let Some(tool) = operate_tool_called(&bytes) {
        let metadata = format!("{}{}", auth.base_url(&parts.headers), auth::MCP_METADATA_PATH);
        let description = format!("{tool} needs the scope mcp:operate");
        return auth::refuse(
            problem::Problem::new(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                format!("insufficient_scope: {tool} needs the scope `mcp:operate`"),
            ),
            &auth::challenge(&metadata, "mcp:operate", Some(("insufficient_scope", &description))),
        );
    }
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// The operate tool a JSON-RPC message (or batch) calls, if any.
fn operate_tool_called(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let messages = match value {
        serde_json::Value::Array(a) => a,
        v => vec![v],
    };
    messages.iter().find_map(|m| {
        if m.get("method")?.as_str()? != "tools/call" {
            return None;
        }
        let name = m.get("params")?.get("name")?.as_str()?;
        let tool = mcp::tools::find(name)?;
        (tool.needs == Needs::Operate).then(|| name.to_string())
    })
}
