//! The OpenAPI 3.1 document of the HTTP API, generated at start from the route
//! table and the wire types' utoipa schemas (nothing is written by hand): a Query
//! route's request fields become its query (and path) parameters, a Body route's
//! request is its JSON body, the reply is the success response, and every error is
//! `application/problem+json`. Served at `/v1/openapi.json`.

use super::Input;
use super::routes::{ROUTES, Route};
use crate::problem::Problem;
use axum::http::Method;
use utoipa::openapi::path::{HttpMethod, OperationBuilder, ParameterBuilder, ParameterIn, PathItem};
use utoipa::openapi::request_body::RequestBodyBuilder;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{
    ComponentsBuilder, ContentBuilder, InfoBuilder, OpenApi, OpenApiBuilder, PathsBuilder, Ref, RefOr, Required,
    ResponseBuilder, Schema,
};
use utoipa::{PartialSchema, ToSchema};

/// The error responses every route may give, with when.
const ERRORS: &[(&str, &str)] = &[
    (
        "400",
        "The request is malformed or a field is invalid (`malformed_payload`, `invalid_request`).",
    ),
    (
        "401",
        "No token, or an unknown or revoked one (`unauthorized`); see `WWW-Authenticate`.",
    ),
    (
        "403",
        "The token's role or scopes do not allow this (`forbidden`), or a foreign Host or Origin.",
    ),
    ("404", "Not found in the caller's organisation (`not_found`)."),
    (
        "409",
        "Conflicts with the current state, or an approval token that is used, expired or for another task.",
    ),
    ("413", "A field or the body is over its size limit (`too_large`)."),
    (
        "503",
        "A service or its database did not answer in time (`unavailable`); retry.",
    ),
];

fn http_method(m: &Method) -> HttpMethod {
    match *m {
        Method::POST => HttpMethod::Post,
        Method::PUT => HttpMethod::Put,
        Method::DELETE => HttpMethod::Delete,
        _ => HttpMethod::Get,
    }
}

fn component(name: &str) -> RefOr<Schema> {
    RefOr::Ref(Ref::from_schema_name(name))
}

/// The query and path parameters of a Query route: its request's properties.
fn parameters(route: &Route) -> Vec<utoipa::openapi::path::Parameter> {
    let request = (route.request)();
    let path = route.path_params();
    let RefOr::T(Schema::Object(object)) = request.schema else {
        return Vec::new();
    };
    let mut params = Vec::new();
    for name in &path {
        let schema = object.properties.get(*name).cloned();
        params.push(
            ParameterBuilder::new()
                .name(*name)
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .schema(schema)
                .build(),
        );
    }
    if route.input == Input::Query {
        for (name, schema) in &object.properties {
            if path.contains(&name.as_str()) {
                continue;
            }
            let required = if object.required.contains(name) {
                Required::True
            } else {
                Required::False
            };
            let description = match schema {
                RefOr::T(Schema::Object(o)) => o.description.clone(),
                _ => None,
            };
            params.push(
                ParameterBuilder::new()
                    .name(name)
                    .parameter_in(ParameterIn::Query)
                    .required(required)
                    .description(description)
                    .schema(Some(schema.clone()))
                    .build(),
            );
        }
    }
    params
}

/// `op` with every error response: problem+json.
fn with_errors(mut op: OperationBuilder) -> OperationBuilder {
    for (status, when) in ERRORS {
        op = op.response(
            *status,
            ResponseBuilder::new()
                .description(*when)
                .content(
                    crate::problem::PROBLEM_JSON,
                    ContentBuilder::new().schema(Some(component(&Problem::name()))).build(),
                )
                .build(),
        );
    }
    op
}

/// The document.
pub fn document() -> OpenApi {
    let mut components = ComponentsBuilder::new()
        .schema(Problem::name(), Problem::schema())
        .security_scheme(
            "bearer",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("tjr_…")
                    .build(),
            ),
        );
    let mut problem_deps = Vec::new();
    Problem::schemas(&mut problem_deps);
    for (name, schema) in problem_deps {
        components = components.schema(name, schema);
    }
    let mut paths = PathsBuilder::new();
    for route in ROUTES.iter() {
        let request = (route.request)();
        let response = (route.response)();
        for (name, schema) in request.deps.into_iter().chain(response.deps) {
            components = components.schema(name, schema);
        }
        components = components.schema(response.name.clone(), response.schema);
        let mut op = OperationBuilder::new()
            .operation_id(Some(route.operation_id))
            .summary(Some(route.summary))
            .description(Some(format!(
                "Request and reply are those of `{}` in docs/protocol.md (the same operation over NATS).",
                route.subject_name
            )))
            .tag(route.tag)
            .parameters(Some(parameters(route)))
            .response(
                route.status.as_u16().to_string(),
                ResponseBuilder::new()
                    .description("The reply.")
                    .content(
                        "application/json",
                        ContentBuilder::new().schema(Some(component(&response.name))).build(),
                    )
                    .build(),
            );
        if route.input == Input::Body {
            let path = route.path_params();
            let (schema, required) = match request.schema {
                // The path's parameters are not repeated in the body.
                RefOr::T(Schema::Object(mut object)) if !path.is_empty() => {
                    for p in &path {
                        object.properties.remove(*p);
                    }
                    object.required.retain(|r| !path.contains(&r.as_str()));
                    let required = !object.required.is_empty();
                    (RefOr::T(Schema::Object(object)), required)
                }
                schema => {
                    components = components.schema(request.name.clone(), schema);
                    (component(&request.name), true)
                }
            };
            op = op.request_body(Some(
                RequestBodyBuilder::new()
                    .required(Some(if required { Required::True } else { Required::False }))
                    .content("application/json", ContentBuilder::new().schema(Some(schema)).build())
                    .build(),
            ));
        }
        if route.status == axum::http::StatusCode::CREATED {
            op = op.response(
                "200",
                ResponseBuilder::new()
                    .description("Nothing new: the same request (idempotency key, retry) was made before; its result.")
                    .content(
                        "application/json",
                        ContentBuilder::new().schema(Some(component(&response.name))).build(),
                    )
                    .build(),
            );
        }
        op = with_errors(op);
        paths = paths.path(route.path, PathItem::new(http_method(&route.method), op.build()));
    }
    for (path, operation_id, summary, description) in [
        (
            "/v1/tasks/{task_id}/logs/stream",
            "stream_task_logs",
            "Follow a task's output live (server-sent events)",
            "Each event is one line: `event: stdout|stderr`, `id: <step_id>:<seq>,…` (every step's last \
             line so far), `data: {step_id, seq, stream, text, at}`. Stored lines come first, then live ones \
             until the task ends (`event: end`). Resume with `Last-Event-ID`.",
        ),
        (
            "/v1/events",
            "stream_events",
            "The organisation's events (server-sent events)",
            "Every event of the caller's organisation as it happens: `event: task.<status>`, \
             `approval.requested`, `approval.decided`, `submit.outcome`; `data` is the event's JSON; `id` its \
             sequence in the events stream. Resume with `Last-Event-ID` (kept 7 days).",
        ),
    ] {
        let mut op = OperationBuilder::new()
            .operation_id(Some(operation_id))
            .summary(Some(summary))
            .description(Some(description))
            .tag(if path == "/v1/events" { "events" } else { "tasks" })
            .response(
                "200",
                ResponseBuilder::new()
                    .description("A stream of server-sent events.")
                    .content(
                        "text/event-stream",
                        ContentBuilder::new().schema(Some(String::schema())).build(),
                    )
                    .build(),
            );
        if path.contains("{task_id}") {
            op = op.parameter(
                ParameterBuilder::new()
                    .name("task_id")
                    .parameter_in(ParameterIn::Path)
                    .required(Required::True)
                    .schema(Some(tanjiren_shared::ids::TaskId::schema()))
                    .build(),
            );
        }
        op = with_errors(op);
        paths = paths.path(path, PathItem::new(HttpMethod::Get, op.build()));
    }
    OpenApiBuilder::new()
        .info(
            InfoBuilder::new()
                .title("Tanjiren HTTP API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "Every operator subject of Tanjiren over HTTP (docs/http.md). Authenticate with \
                     `Authorization: Bearer <token>`; errors are application/problem+json with the wire error code.",
                ))
                .build(),
        )
        .servers(Some([utoipa::openapi::server::Server::new("/")]))
        .paths(paths.build())
        .components(Some(components.build()))
        .security(Some([SecurityRequirement::new("bearer", Vec::<String>::new())]))
        .build()
}
