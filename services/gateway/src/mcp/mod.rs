//! The MCP server (rmcp): Tanjiren's tools ([`tools`]), the task resource template
//! `tanjiren://tasks/{id}` and the resource `tanjiren://tasks/runtime-overview`,
//! and subscriptions to them, in both revisions rmcp serves: `resources/subscribe`
//! on a session (2025-11-25) and `subscriptions/listen` (2026-07-28). The same
//! handler serves Streamable HTTP (the caller comes from the request, checked by
//! [`crate::auth`]) and stdio (`tanjiren mcp`: one caller for the process).

pub mod tools;

use crate::events;
use crate::upstream::{Caller, Upstream};
use futures::StreamExt;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, Implementation, ListResourceTemplatesResult, ListResourcesResult,
    ListToolsResult, PaginatedRequestParams, ReadResourceRequestParams, ReadResourceResponse, ReadResourceResult,
    Resource, ResourceContents, ResourceTemplate, ResourceUpdatedNotificationParam, ServerCapabilities, ServerConfig,
    SubscribeRequestParams, SubscriptionFilter, UnsubscribeRequestParams,
};
use rmcp::service::{RequestContext, SubscriptionContext};
use rmcp::{ErrorData as McpError, RoleServer, ServerHandler};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tanjiren_shared::WireError;
use tanjiren_shared::error::ErrorCode;
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::protocol::{GetTaskRequest, RuntimeOverview, RuntimeOverviewRequest, TaskView};
use tokio_util::sync::CancellationToken;

/// The runtime overview's URI.
pub const OVERVIEW_URI: &str = "tanjiren://tasks/runtime-overview";
/// The task resource template.
pub const TASK_URI_TEMPLATE: &str = "tanjiren://tasks/{id}";
const TASK_URI_PREFIX: &str = "tanjiren://tasks/";
/// The overview is re-announced at most this often (it changes with every task).
const OVERVIEW_NOTIFY_EVERY: Duration = Duration::from_secs(1);

/// A resource of this server, parsed from its URI.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceRef {
    Overview,
    Task(TaskId),
}

impl ResourceRef {
    /// The resource `uri` names, if it is one of ours.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(TASK_URI_PREFIX)?;
        if rest == "runtime-overview" {
            return Some(ResourceRef::Overview);
        }
        rest.parse::<uuid::Uuid>()
            .ok()
            .map(|u| ResourceRef::Task(TaskId::from(u)))
    }

    fn uri(&self) -> String {
        match self {
            ResourceRef::Overview => OVERVIEW_URI.to_string(),
            ResourceRef::Task(id) => format!("{TASK_URI_PREFIX}{id}"),
        }
    }
}

/// Where the caller of a request comes from.
#[derive(Clone, Debug)]
pub enum Identity {
    /// stdio: the process's token, checked at start.
    Fixed(Caller),
    /// Streamable HTTP: each request's own, put there by [`crate::auth::require_bearer`].
    PerRequest,
}

/// The MCP handler. Over HTTP rmcp makes one per session (or per request).
#[derive(Clone, Debug)]
pub struct TanjirenMcp {
    upstream: Upstream,
    identity: Identity,
    /// Legacy (`resources/subscribe`) subscriptions of this session, by URI.
    subscriptions: Arc<Mutex<HashMap<String, CancellationToken>>>,
    /// Cancelled when the gateway stops: ends every subscription.
    stop: CancellationToken,
}

impl TanjirenMcp {
    pub fn new(upstream: Upstream, identity: Identity, stop: CancellationToken) -> Self {
        Self {
            upstream,
            identity,
            subscriptions: Default::default(),
            stop,
        }
    }

    fn caller(&self, ctx: &RequestContext<RoleServer>) -> Result<Caller, McpError> {
        match &self.identity {
            Identity::Fixed(c) => Ok(c.clone()),
            Identity::PerRequest => ctx
                .extensions
                .get::<http::request::Parts>()
                .and_then(|p| p.extensions.get::<Caller>())
                .cloned()
                .ok_or_else(|| McpError::invalid_request("no authenticated caller", None)),
        }
    }

    /// The resource's current contents, as JSON.
    async fn read(&self, caller: &Caller, resource: ResourceRef) -> Result<serde_json::Value, WireError> {
        let value = match resource {
            ResourceRef::Overview => {
                let o: RuntimeOverview = self
                    .upstream
                    .call(
                        caller,
                        self.upstream.subjects.tasks_overview(),
                        &RuntimeOverviewRequest::default(),
                    )
                    .await?;
                serde_json::to_value(o)
            }
            ResourceRef::Task(id) => {
                let t: TaskView = self
                    .upstream
                    .call(caller, self.upstream.subjects.tasks_get(), &GetTaskRequest::new(id))
                    .await?;
                serde_json::to_value(t)
            }
        };
        value.map_err(|e| WireError::new(ErrorCode::Internal, format!("cannot encode the resource: {e}")))
    }
}

/// Notifies through `send` for every event of the caller's organisation that
/// concerns one of `resources`, until `stop`, the gateway's `shutdown`, or a
/// failed send (the client went away).
async fn follow<F, Fut>(
    upstream: &Upstream,
    shutdown: &CancellationToken,
    caller: &Caller,
    resources: Vec<ResourceRef>,
    stop: CancellationToken,
    send: F,
) where
    F: Fn(String) -> Fut,
    Fut: Future<Output = bool>,
{
    let events = match events::watch(&upstream.nats, &upstream.subjects, caller.principal.org_id).await {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch events for a subscription");
            return;
        }
    };
    let tasks: HashSet<TaskId> = resources
        .iter()
        .filter_map(|r| match r {
            ResourceRef::Task(t) => Some(*t),
            ResourceRef::Overview => None,
        })
        .collect();
    let overview = resources.contains(&ResourceRef::Overview);
    let mut last_overview: Option<Instant> = None;
    let mut events = std::pin::pin!(events);
    let revoked = crate::streams::revoked(upstream, caller);
    let mut revoked = std::pin::pin!(revoked);
    loop {
        let task = tokio::select! {
            _ = stop.cancelled() => return,
            _ = shutdown.cancelled() => return,
            _ = &mut revoked => return,
            e = events.next() => match e { Some(t) => t, None => return },
        };
        if tasks.contains(&task) && !send(ResourceRef::Task(task).uri()).await {
            return;
        }
        if overview && last_overview.is_none_or(|t| t.elapsed() >= OVERVIEW_NOTIFY_EVERY) {
            last_overview = Some(Instant::now());
            if !send(OVERVIEW_URI.to_string()).await {
                return;
            }
        }
    }
}

/// A resource read's failure as an MCP error: unknown resources are
/// `resource_not_found` (a task of another organisation is unknown too).
fn resource_error(uri: &str, e: WireError) -> McpError {
    let data = Some(serde_json::json!({ "uri": uri, "code": e.code.as_str() }));
    match e.code {
        ErrorCode::NotFound => McpError::resource_not_found(e.message, data),
        ErrorCode::InvalidRequest | ErrorCode::MalformedPayload => McpError::invalid_params(e.message, data),
        ErrorCode::Forbidden | ErrorCode::Unauthorized => McpError::invalid_request(e.message, data),
        _ => McpError::internal_error(format!("{}: {}", e.code, e.message), data),
    }
}

fn parse_uri(uri: &str) -> Result<ResourceRef, McpError> {
    ResourceRef::parse(uri).ok_or_else(|| {
        McpError::resource_not_found(
            format!("no resource {uri}: Tanjiren serves {OVERVIEW_URI} and {TASK_URI_TEMPLATE}"),
            Some(serde_json::json!({ "uri": uri })),
        )
    })
}

impl ServerHandler for TanjirenMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .enable_resources_subscribe()
                .build(),
        )
        .with_server_info(Implementation::new("tanjiren", env!("CARGO_PKG_VERSION")))
        .with_instructions(
            "Tanjiren runs tasks on workstations: a shell command, a prompt to the workstation's AI agent, \
             or an investigation's questions. create_task starts one (doctrine may hold it for a person's \
             approval); get_task and the tanjiren://tasks/{id} resource show its state, steps and artifacts; \
             get_task_logs its output. Subscribe to tanjiren://tasks/{id} to hear of each state change.",
        )
    }

    async fn list_tools(
        &self,
        _: Option<PaginatedRequestParams>,
        _: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, McpError> {
        Ok(ListToolsResult::with_all_items(
            tools::TOOLS.iter().map(|t| t.tool()).collect(),
        ))
    }

    fn get_tool(&self, name: &str) -> Option<rmcp::model::Tool> {
        tools::find(name).map(|t| t.tool())
    }

    async fn call_tool(
        &self,
        req: CallToolRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, McpError> {
        let caller = self.caller(&ctx)?;
        let Some(tool) = tools::find(&req.name) else {
            return Err(McpError::invalid_params(
                format!("no tool `{}`", req.name),
                Some(serde_json::json!({ "tool": req.name })),
            ));
        };
        let arguments = req.arguments.unwrap_or_default();
        Ok(tool.call(&self.upstream, &caller, arguments).await.into())
    }

    async fn list_resources(
        &self,
        _: Option<PaginatedRequestParams>,
        _: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, McpError> {
        Ok(ListResourcesResult::with_all_items(vec![
            Resource::new(OVERVIEW_URI, "runtime-overview")
                .with_title("Runtime overview")
                .with_description(
                    "The organisation's execution state: tasks by status and approval status, steps \
                     executing, live leases, queue depth and oldest queued step, stale-lease rejections, \
                     p50/p99 durations of recent tasks, schedules due in the next hour.",
                )
                .with_mime_type("application/json"),
        ]))
    }

    async fn list_resource_templates(
        &self,
        _: Option<PaginatedRequestParams>,
        _: RequestContext<RoleServer>,
    ) -> Result<ListResourceTemplatesResult, McpError> {
        Ok(ListResourceTemplatesResult::with_all_items(vec![
            ResourceTemplate::new(TASK_URI_TEMPLATE, "task")
                .with_title("Task")
                .with_description(
                    "A task's full record with its execution state (as get_task): status, approval, steps \
                     with their leases and output tails, attempts and artifacts. Subscribe to hear of each \
                     state change.",
                )
                .with_mime_type("application/json"),
        ]))
    }

    async fn read_resource(
        &self,
        req: ReadResourceRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResponse, McpError> {
        let caller = self.caller(&ctx)?;
        let resource = parse_uri(&req.uri)?;
        let value = self
            .read(&caller, resource)
            .await
            .map_err(|e| resource_error(&req.uri, e))?;
        let text = serde_json::to_string_pretty(&value).unwrap_or_default();
        Ok(ReadResourceResult::new(vec![
            ResourceContents::text(text, req.uri).with_mime_type("application/json"),
        ])
        .into())
    }

    #[allow(deprecated)]
    async fn subscribe(&self, req: SubscribeRequestParams, ctx: RequestContext<RoleServer>) -> Result<(), McpError> {
        let caller = self.caller(&ctx)?;
        let resource = parse_uri(&req.uri)?;
        // Only what the caller may read: a task of another organisation is not found.
        self.read(&caller, resource)
            .await
            .map_err(|e| resource_error(&req.uri, e))?;
        let slot = self
            .upstream
            .streams
            .acquire(&caller)
            .map_err(|e| McpError::invalid_request(format!("{}: {}", e.code, e.message), None))?;
        let stop = CancellationToken::new();
        if let Some(old) = self
            .subscriptions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(req.uri.clone(), stop.clone())
        {
            old.cancel();
        }
        let (upstream, shutdown, peer) = (self.upstream.clone(), self.stop.clone(), ctx.peer.clone());
        tokio::spawn(async move {
            let _slot = slot;
            follow(&upstream, &shutdown, &caller, vec![resource], stop, |uri| {
                let peer = peer.clone();
                async move {
                    peer.notify_resource_updated(ResourceUpdatedNotificationParam::new(uri))
                        .await
                        .is_ok()
                }
            })
            .await;
        });
        Ok(())
    }

    #[allow(deprecated)]
    async fn unsubscribe(&self, req: UnsubscribeRequestParams, _: RequestContext<RoleServer>) -> Result<(), McpError> {
        if let Some(stop) = self
            .subscriptions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&req.uri)
        {
            stop.cancel();
        }
        Ok(())
    }

    fn accepted_subscription_filter(&self, requested: &SubscriptionFilter) -> Option<SubscriptionFilter> {
        let mut accepted = SubscriptionFilter::new();
        accepted.resource_subscriptions = requested.resource_subscriptions.as_ref().map(|uris| {
            uris.iter()
                .filter(|u| ResourceRef::parse(u).is_some())
                .cloned()
                .collect()
        });
        Some(accepted)
    }

    async fn listen(&self, context: SubscriptionContext) -> Result<(), McpError> {
        let caller = self.caller(context.request_context())?;
        let _slot = self
            .upstream
            .streams
            .acquire(&caller)
            .map_err(|e| McpError::invalid_request(format!("{}: {}", e.code, e.message), None))?;
        let mut resources = Vec::new();
        for uri in context.accepted().resource_subscriptions.iter().flatten() {
            let Some(r) = ResourceRef::parse(uri) else { continue };
            // A task the caller cannot read is never announced (its events are another
            // organisation's), but say so rather than wait in silence.
            self.read(&caller, r).await.map_err(|e| resource_error(uri, e))?;
            resources.push(r);
        }
        let stop = CancellationToken::new();
        let sink = context.sink().clone();
        tokio::select! {
            _ = context.cancelled() => {}
            _ = follow(&self.upstream, &self.stop, &caller, resources, stop.clone(), |uri| {
                let sink = sink.clone();
                async move { sink.notify_resource_updated(uri).await.is_ok() }
            }) => {}
        }
        stop.cancel();
        Ok(())
    }

    async fn on_initialized(&self, _: rmcp::service::NotificationContext<RoleServer>) {}
}

impl Drop for TanjirenMcp {
    fn drop(&mut self) {
        // The last handle of a session ends its subscriptions.
        if Arc::strong_count(&self.subscriptions) == 1 {
            for (_, stop) in self.subscriptions.lock().unwrap_or_else(|e| e.into_inner()).drain() {
                stop.cancel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_uris_parse_and_print_back() {
        let id = TaskId::from(uuid::Uuid::now_v7());
        let uri = format!("tanjiren://tasks/{id}");
        assert_eq!(ResourceRef::parse(&uri), Some(ResourceRef::Task(id)));
        assert_eq!(ResourceRef::Task(id).uri(), uri);
        assert_eq!(ResourceRef::parse(OVERVIEW_URI), Some(ResourceRef::Overview));
        for bad in [
            "tanjiren://tasks/",
            "tanjiren://tasks/nope",
            "tanjiren://other/x",
            "file:///etc/passwd",
        ] {
            assert_eq!(ResourceRef::parse(bad), None, "{bad}");
        }
    }
}
