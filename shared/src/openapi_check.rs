//! The OpenAPI 3.1 schemas of the wire types (feature `openapi`, `utoipa::ToSchema`)
//! checked against what serde actually does: (a) a document with every request,
//! reply and event type as a component has no dangling `$ref`; (b) realistic
//! values serialised with serde_json validate against their type's schema (draft
//! 2020-12, formats checked), JSON that serde refuses is refused by the schema
//! too, and the defaults the schemas announce are the ones serde applies.

use crate::agents::{AgentAdapter, AgentInfo, AgentReport, TokenUsage};
use crate::approvals::*;
use crate::artifacts::*;
use crate::codec::Reply;
use crate::doctrine::*;
use crate::error::*;
use crate::ids::*;
use crate::investigations::*;
use crate::model::*;
use crate::protocol::*;
use crate::schedules::*;
use crate::scopes::Scope;
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::sync::LazyLock;
use utoipa::{OpenApi, ToSchema};
use uuid::Uuid;

#[derive(OpenApi)]
#[openapi(components(schemas(
    CreateTaskRequest,
    CreateTaskReply,
    GetTaskRequest,
    TaskView,
    StepView,
    CancelTaskRequest,
    CancelTaskReply,
    ListTasksRequest,
    ListTasksReply,
    TaskLogsRequest,
    TaskLogsReply,
    ArtifactView,
    AddArtifactRequest,
    AddArtifactReply,
    ListArtifactsRequest,
    ListArtifactsReply,
    GetArtifactRequest,
    MintApprovalTokenRequest,
    MintApprovalTokenReply,
    DecideTaskRequest,
    DecideTaskReply,
    ApprovalRecord,
    PendingApprovalsRequest,
    PendingApprovalsReply,
    ListApprovalsRequest,
    ListApprovalsReply,
    GetDoctrineRequest,
    DoctrineView,
    DoctrineDocument,
    PublishDoctrineRequest,
    PublishDoctrineReply,
    DoctrineDryRunRequest,
    DoctrineDryRunReply,
    CreateScheduleRequest,
    ScheduleView,
    ScheduleRef,
    GetScheduleRequest,
    ScheduleDetail,
    ListSchedulesRequest,
    ListSchedulesReply,
    DeleteScheduleReply,
    RetryTaskRequest,
    RetryTaskReply,
    CreateInvestigationRequest,
    GetInvestigationRequest,
    CloseInvestigationRequest,
    ListInvestigationsRequest,
    ListInvestigationsReply,
    InvestigationView,
    WireError,
    Principal,
    SubmitOutcome,
    RegisterWorkstationRequest,
    RegisterWorkstationReply,
    Assignment,
    ClaimRequest,
    ClaimGranted,
    HeartbeatRequest,
    HeartbeatReply,
    ReleaseRequest,
    ReleaseReply,
    LogBatch,
    LogBatchReply,
    WorkerArtifactRequest,
    ProgressReport,
    ProgressReply,
    ControlMessage,
    TaskEventMessage,
    LiveLogBatch,
    ApprovalRequestedEvent,
    ApprovalDecidedEvent,
    Reply<CreateTaskReply>,
)))]
struct WireApi;

/// Every type with a schema: the roots above and all they reference.
const ALL_SCHEMAS: &[&str] = &[
    "AddArtifactReply",
    "AddArtifactRequest",
    "AgentAdapter",
    "AgentInfo",
    "AgentReport",
    "ApprovalClass",
    "ApprovalDecidedEvent",
    "ApprovalDecision",
    "ApprovalRecord",
    "ApprovalRequestedEvent",
    "ApprovalSnapshot",
    "ApprovalStatus",
    "ApprovalToken",
    "ArtifactContent",
    "ArtifactKind",
    "ArtifactView",
    "Assignment",
    "CancelTaskReply",
    "CancelTaskRequest",
    "ClaimGranted",
    "ClaimRequest",
    "CloseInvestigationRequest",
    "ControlMessage",
    "CreateInvestigationRequest",
    "CreateScheduleRequest",
    "CreateTaskReply",
    "DecideTaskReply",
    "DecideTaskRequest",
    "DeleteScheduleReply",
    "DoctrineDocument",
    "DoctrineDryRunReply",
    "DoctrineDryRunRequest",
    "DoctrineView",
    "ErrorCode",
    "ErrorDetails",
    "ExecutionId",
    "FailureReason",
    "GetArtifactRequest",
    "GetDoctrineRequest",
    "GetInvestigationRequest",
    "GetScheduleRequest",
    "GetTaskRequest",
    "HeartbeatReply",
    "HeartbeatRequest",
    "HeldLease",
    "InvestigationStatus",
    "InvestigationView",
    "LeaseRenewal",
    "ListApprovalsReply",
    "ListApprovalsRequest",
    "ListArtifactsReply",
    "ListArtifactsRequest",
    "ListInvestigationsReply",
    "ListInvestigationsRequest",
    "ListSchedulesReply",
    "ListSchedulesRequest",
    "ListTasksReply",
    "ListTasksRequest",
    "LiveLogBatch",
    "LogBatch",
    "LogBatchReply",
    "LogLine",
    "LogSignatureView",
    "LogStream",
    "LogView",
    "MatchedRule",
    "MintApprovalTokenReply",
    "MintApprovalTokenRequest",
    "Mode",
    "OrgId",
    "OverlapPolicy",
    "PendingApproval",
    "PendingApprovalsReply",
    "PendingApprovalsRequest",
    "Principal",
    "ProgressReply",
    "ProgressReport",
    "PublishDoctrineReply",
    "PublishDoctrineRequest",
    "RegisterWorkstationReply",
    "RegisterWorkstationRequest",
    "ReleaseReply",
    "ReleaseRequest",
    "Reply_CreateTaskReply",
    "RetryPolicy",
    "RetryTaskReply",
    "RetryTaskRequest",
    "Role",
    "RuleConditions",
    "RuleSpec",
    "ScheduleDetail",
    "ScheduleId",
    "ScheduleRef",
    "ScheduleTick",
    "ScheduleView",
    "Scope",
    "StepId",
    "StepLogLine",
    "StepResult",
    "StepStatus",
    "StepView",
    "SubmitOutcome",
    "TaskEventMessage",
    "TaskId",
    "TaskLogsReply",
    "TaskLogsRequest",
    "TaskSpec",
    "TaskStatus",
    "TaskSummary",
    "TaskTemplate",
    "TaskView",
    "TickCounts",
    "TickOutcome",
    "TokenUsage",
    "Verdict",
    "WireError",
    "WorkerArtifactRequest",
    "WorkstationId",
];

static DOCUMENT: LazyLock<Value> =
    LazyLock::new(|| serde_json::to_value(WireApi::openapi()).expect("the document serialises"));

/// Every `$ref` in `value`, at any depth.
fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[test]
fn every_ref_resolves_to_a_component() {
    assert_eq!(DOCUMENT["openapi"], "3.1.0");
    let schemas = DOCUMENT["components"]["schemas"].as_object().unwrap();
    let names: BTreeSet<&str> = schemas.keys().map(String::as_str).collect();
    assert_eq!(names, ALL_SCHEMAS.iter().copied().collect::<BTreeSet<_>>());
    let mut found = Vec::new();
    refs(&DOCUMENT, &mut found);
    assert!(found.len() > 150, "only {} refs", found.len());
    for r in found {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("{r}: not a component ref"));
        assert!(names.contains(name), "{r} does not resolve");
    }
}

#[test]
fn ids_tokens_and_bounds_are_spelt_out() {
    let s = &DOCUMENT["components"]["schemas"];
    for id in [
        "TaskId",
        "OrgId",
        "StepId",
        "ExecutionId",
        "WorkstationId",
        "ScheduleId",
    ] {
        assert_eq!(
            (&s[id]["type"], &s[id]["format"]),
            (&json!("string"), &json!("uuid")),
            "{id}"
        );
        assert!(s[id]["description"].is_string(), "{id} keeps its doc comment");
    }
    assert_eq!(s["ApprovalToken"]["type"], "string");
    let worker_id = &s["ClaimRequest"]["properties"]["worker_id"];
    assert_eq!(worker_id["maxLength"], crate::model::MAX_WORKER_ID_BYTES);
    assert_eq!(
        s["HeartbeatRequest"]["properties"]["leases"]["maxItems"],
        crate::protocol::MAX_HEARTBEAT_LEASES
    );
    assert_eq!(s["Scope"]["enum"], json!(["mcp:read", "mcp:operate"]));
    assert_eq!(s["RuleSpec"]["additionalProperties"], false);
    assert!(s["RuleSpec"]["properties"]["match"].is_object());
}

/// A validator for component `name`: the components inlined under `$defs`.
fn validator(name: &str) -> jsonschema::Validator {
    let defs = serde_json::to_string(&DOCUMENT["components"]["schemas"])
        .expect("components serialise")
        .replace("\"#/components/schemas/", "\"#/$defs/");
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": serde_json::from_str::<Value>(&defs).expect("rewritten components parse"),
        "$ref": format!("#/$defs/{name}"),
    });
    jsonschema::draft202012::options()
        .should_validate_formats(true)
        .build(&schema)
        .unwrap_or_else(|e| panic!("{name}: the schema does not compile: {e}"))
}

fn errors(validator: &jsonschema::Validator, json: &Value) -> Vec<String> {
    validator
        .iter_errors(json)
        .map(|e| format!("{} at `{}`", e, e.instance_path()))
        .collect()
}

/// The component name of `T` (a generic's name carries its argument: `Reply_CreateTaskReply`).
fn component<T: ToSchema>() -> String {
    let name = T::name().into_owned();
    match std::any::type_name::<T>().split_once('<') {
        Some((_, arg)) => {
            let arg = arg.trim_end_matches('>');
            format!("{name}_{}", arg.rsplit("::").next().unwrap_or(arg))
        }
        None => name,
    }
}

/// Each value, as serde_json writes it, validates against `T`'s schema.
fn conforms<T: Serialize + ToSchema>(values: &[T]) {
    let name = component::<T>();
    let v = validator(&name);
    for value in values {
        let json = serde_json::to_value(value).expect("a wire value serialises");
        let errors = errors(&v, &json);
        assert!(
            errors.is_empty(),
            "{name} does not match its schema: {errors:#?}\n{json:#}"
        );
    }
}

/// `json` is accepted by serde exactly when it is accepted by `T`'s schema.
fn agree<T: DeserializeOwned + ToSchema>(json: Value, accepted: bool) {
    let name = component::<T>();
    let by_serde = serde_json::from_value::<T>(json.clone())
        .map(|_| ())
        .map_err(|e| e.to_string());
    let by_schema = errors(&validator(&name), &json);
    let shown = crate::logs::shorten(&json.to_string(), 400);
    assert_eq!(
        by_serde.is_ok(),
        accepted,
        "{name}: serde says {by_serde:?} for {shown}"
    );
    assert_eq!(
        by_schema.is_empty(),
        accepted,
        "{name}: the schema says {by_schema:#?} for {shown}"
    );
}

/// The defaults `T`'s schema announces are the values serde fills in for `minimal`.
fn defaults_agree<T: Serialize + DeserializeOwned + ToSchema>(minimal: Value) -> usize {
    let decoded = serde_json::from_value::<T>(minimal).expect("the minimal value decodes");
    let filled = serde_json::to_value(decoded).expect("a wire value serialises");
    let props = DOCUMENT["components"]["schemas"][T::name().as_ref()]["properties"]
        .as_object()
        .expect("an object schema with properties");
    let mut checked = 0;
    for (field, schema) in props {
        if let Some(default) = schema.get("default") {
            assert_eq!(&filled[field], default, "{}.{field}", T::name());
            checked += 1;
        }
    }
    checked
}

fn at(minutes: i64) -> DateTime<Utc> {
    "2026-11-26T08:00:00Z"
        .parse::<DateTime<Utc>>()
        .expect("an RFC 3339 instant")
        + Duration::minutes(minutes)
}

fn modes() -> Vec<Mode> {
    vec![
        Mode::Command {
            command: "df -h /var".into(),
        },
        Mode::Prompt {
            prompt: "Why is the disk full?".into(),
        },
        Mode::Investigate {
            questions: vec!["What fills /var?".into(), "Since when?".into()],
        },
    ]
}

fn spec(mode: Mode, full: bool) -> TaskSpec {
    TaskSpec {
        intent: "check disk pressure".into(),
        mode,
        targets: vec!["build-01".into(), WorkstationId::new().to_string()],
        timeout_secs: full.then_some(600),
        queue_timeout_secs: full.then_some(3600),
        retry_policy: full.then(|| RetryPolicy {
            non_retryable_exit_codes: vec![2, 64],
            ..RetryPolicy::default()
        }),
        investigation_id: full.then(Uuid::now_v7),
        idempotency_key: full.then(|| "ci-run-4711".into()),
        retry_of_task_id: full.then(TaskId::new),
    }
}

fn verdict() -> Verdict {
    Verdict {
        approval_class: ApprovalClass::ProductionMutation,
        matched_rules: vec![
            MatchedRule {
                name: "prod-writes".into(),
                class: ApprovalClass::ProductionMutation,
                require_reason: true,
                require_owner: true,
            },
            MatchedRule {
                name: "installs".into(),
                class: ApprovalClass::SensitiveWrite,
                require_reason: false,
                require_owner: false,
            },
        ],
        reason_required: true,
    }
}

fn snapshot(full: bool) -> ApprovalSnapshot {
    let mode = Mode::Command {
        command: "systemctl restart api".into(),
    };
    ApprovalSnapshot {
        doctrine_version: full.then_some(3),
        verdict: if full { verdict() } else { Verdict::no_doctrine() },
        payload_digest: payload_digest("restart", &mode, &[WorkstationId::new()]),
        requested_at: full.then(|| at(0)),
        deadline: full.then(|| at(60)),
    }
}

fn record(decision: ApprovalDecision, full: bool) -> ApprovalRecord {
    ApprovalRecord {
        approval_id: Uuid::now_v7(),
        task_id: TaskId::new(),
        decision,
        approval_class: ApprovalClass::SensitiveWrite,
        decided_by: if full { "alice".into() } else { "system".into() },
        decided_by_token_id: full.then(Uuid::now_v7),
        decided_by_role: full.then_some(Role::Owner),
        presented_by: full.then(|| "mcp-agent".into()),
        presented_by_token_id: full.then(Uuid::now_v7),
        approval_token_id: full.then(Uuid::now_v7),
        reason: full.then(|| "change window CHG-42".into()),
        decided_at: at(5),
    }
}

fn summary(status: TaskStatus, full: bool) -> TaskSummary {
    TaskSummary {
        task_id: TaskId::new(),
        intent: "check disk pressure".into(),
        mode: "command".into(),
        status,
        approval_status: ApprovalStatus::NotRequired,
        targets: vec![WorkstationId::new()],
        attempt: 2,
        created_at: at(0),
        finished_at: full.then(|| at(3)),
        retry_of_task_id: full.then(TaskId::new),
        failure_reason: full.then(|| FailureReason::NonZeroExit.as_str().into()),
        schedule_id: full.then(ScheduleId::new),
    }
}

fn step(status: StepStatus, full: bool) -> StepView {
    StepView {
        step_id: StepId::new(),
        workstation_id: WorkstationId::new(),
        workstation_name: full.then(|| "build-01".into()),
        status,
        lease_generation: 3,
        lease_owner: full.then(|| "build-01-7f3a9c1e".into()),
        lease_expires_at: full.then(|| at(2)),
        exit_code: full.then_some(-1),
        failure_reason: full.then(|| "timeout".into()),
        started_at: full.then(|| at(1)),
        finished_at: full.then(|| at(2)),
        duration_ms: full.then_some(61_500),
        last_heartbeat_at: full.then(|| at(1)),
        lease_expires_in_ms: full.then_some(-250),
        last_heartbeat_age_ms: full.then_some(4_000),
        cancel_requested_at: full.then(|| at(2)),
        stop_confirmed_at: full.then(|| at(2)),
        stdout_tail: if full { "93% /var\n".into() } else { String::new() },
        stderr_tail: String::new(),
        log_bytes: if full { 4096 } else { 0 },
        log_truncated: full,
        message: full.then(|| "exited with code 3".into()),
        agent_model: full.then(|| "gpt-4.1-mini".into()),
        usage: full.then_some(TokenUsage {
            input_tokens: 1200,
            output_tokens: 345,
        }),
    }
}

fn artifact(kind: ArtifactKind, full: bool) -> ArtifactView {
    ArtifactView {
        artifact_id: Uuid::now_v7(),
        kind,
        task_id: full.then(TaskId::new),
        root_task_id: full.then(TaskId::new),
        investigation_id: full.then(Uuid::now_v7),
        step_id: full.then(StepId::new),
        workstation: full.then(|| "build-01".into()),
        question_index: full.then_some(1),
        question: full.then(|| "Since when?".into()),
        title: "Disk usage".into(),
        body: "/var/log is 40 GiB".into(),
        url: (kind == ArtifactKind::Link).then(|| "https://wiki.example.com/runbooks/disk".into()),
        created_by: "ci".into(),
        created_at: at(4),
    }
}

fn task_view(mode: Mode, status: TaskStatus, full: bool) -> TaskView {
    TaskView {
        task_id: TaskId::new(),
        org_id: OrgId::new(),
        intent: "check disk pressure".into(),
        mode,
        status,
        approval_status: if full {
            ApprovalStatus::Approved
        } else {
            ApprovalStatus::Unevaluated
        },
        targets: vec![WorkstationId::new(), WorkstationId::new()],
        timeout_secs: 600,
        failure_reason: full.then(|| FailureReason::LeaseExpired.as_str().into()),
        investigation_id: full.then(Uuid::now_v7),
        idempotency_key: full.then(|| "ci-run-4711".into()),
        retry_of_task_id: full.then(TaskId::new),
        root_task_id: TaskId::new(),
        attempt: 1,
        created_by: "ci".into(),
        created_at: at(0),
        queued_at: full.then(|| at(1)),
        started_at: full.then(|| at(1)),
        finished_at: full.then(|| at(3)),
        execution_id: full.then(ExecutionId::new),
        queue_timeout_secs: 3600,
        cancel_reason: full.then(|| "superseded".into()),
        cancelled_by: full.then(|| "alice".into()),
        stop_confirmed: full.then_some(true),
        approval: full.then(|| snapshot(true)),
        approvals: if full {
            vec![record(ApprovalDecision::Approved, true)]
        } else {
            vec![]
        },
        schedule_id: full.then(ScheduleId::new),
        retry_at: full.then(|| at(10)),
        attempts: if full {
            vec![summary(TaskStatus::Failed, true), summary(status, false)]
        } else {
            vec![]
        },
        steps: if full {
            vec![step(StepStatus::Failed, true), step(StepStatus::Queued, false)]
        } else {
            vec![]
        },
        artifacts: if full {
            vec![
                artifact(ArtifactKind::Summary, true),
                artifact(ArtifactKind::Link, false),
            ]
        } else {
            vec![]
        },
        next_steps_after: full.then(StepId::new),
        attempts_truncated: full,
        artifacts_truncated: full,
    }
}

fn template(mode: Mode) -> TaskTemplate {
    TaskTemplate {
        intent: "nightly backup".into(),
        mode,
        targets: vec!["db-01".into()],
        timeout_secs: Some(3600),
        queue_timeout_secs: None,
        retry_policy: Some(RetryPolicy::default()),
        investigation_id: None,
    }
}

fn schedule(mode: Mode, full: bool) -> ScheduleView {
    ScheduleView {
        schedule_id: ScheduleId::new(),
        org_id: OrgId::new(),
        name: "nightly-backup".into(),
        cron: "30 2 * * *".into(),
        cron_normalized: "0 30 2 * * *".into(),
        timezone: "Europe/Berlin".into(),
        template: template(mode),
        enabled: full,
        overlap: if full {
            OverlapPolicy::Allow
        } else {
            OverlapPolicy::Skip
        },
        catch_up_ticks: 1,
        next_run_at: full.then(|| at(1440)),
        last_tick_at: full.then(|| at(0)),
        last_task_id: full.then(TaskId::new),
        created_by: "alice".into(),
        created_at: at(-10_000),
        updated_at: at(-5),
    }
}

fn doctrine_document() -> DoctrineDocument {
    DoctrineDocument {
        description: Some("prod needs an owner".into()),
        rules: vec![
            RuleSpec {
                name: "prod-writes".into(),
                class: ApprovalClass::ProductionMutation,
                description: Some("anything that writes to production".into()),
                require_reason: true,
                require_owner: true,
                conditions: RuleConditions {
                    modes: Some(vec!["command".into(), "prompt".into()]),
                    workstations: Some(vec!["db-01".into()]),
                    labels: Some([("env".to_string(), "production".to_string())].into()),
                    text: Some(r"\b(apt|yum|pip) install\b".into()),
                    intent: Some("^deploy".into()),
                    agents: Some(vec!["openai".into()]),
                    model: Some("^gpt-".into()),
                },
            },
            RuleSpec {
                name: "installs".into(),
                class: ApprovalClass::SensitiveWrite,
                description: None,
                require_reason: false,
                require_owner: false,
                conditions: RuleConditions {
                    text: Some("install".into()),
                    ..RuleConditions::default()
                },
            },
        ],
    }
}

#[test]
fn task_replies_and_requests_match_their_schemas() {
    let statuses = TaskStatus::ALL;
    conforms(
        &modes()
            .into_iter()
            .flat_map(|m| [spec(m.clone(), true), spec(m, false)])
            .collect::<Vec<CreateTaskRequest>>(),
    );
    conforms(&[
        CreateTaskReply {
            task_id: TaskId::new(),
            org_id: OrgId::new(),
            status: TaskStatus::Planned,
            approval_status: ApprovalStatus::Pending,
            created: true,
            investigation_id: Some(Uuid::now_v7()),
        },
        CreateTaskReply {
            task_id: TaskId::new(),
            org_id: OrgId::new(),
            status: TaskStatus::Queued,
            approval_status: ApprovalStatus::NotRequired,
            created: false,
            investigation_id: None,
        },
    ]);
    let mut views = Vec::new();
    for (i, mode) in modes().into_iter().enumerate() {
        views.push(task_view(mode.clone(), statuses[i % statuses.len()], true));
        views.push(task_view(mode, statuses[(i + 3) % statuses.len()], false));
    }
    conforms(&views);
    conforms(
        &StepStatus::ALL
            .iter()
            .flat_map(|s| [step(*s, true), step(*s, false)])
            .collect::<Vec<_>>(),
    );
    conforms(&[
        GetTaskRequest::new(TaskId::new()),
        GetTaskRequest {
            task_id: TaskId::new(),
            steps_after: Some(StepId::new()),
        },
    ]);
    conforms(&[
        ListTasksRequest::default(),
        ListTasksRequest {
            status: Some(TaskStatus::Failed),
            mode: Some("investigate".into()),
            approval_status: Some(ApprovalStatus::Pending),
            lease_owner: Some("build-01-3f2a".into()),
            workstation: Some("build-01".into()),
            before: Some(TaskId::new()),
            root_task_id: Some(TaskId::new()),
            schedule_id: Some(ScheduleId::new()),
            investigation_id: Some(Uuid::now_v7()),
            text: Some("disk".into()),
            created_after: Some(at(-60)),
            created_before: Some(at(0)),
            limit: Some(50),
        },
    ]);
    conforms(&[
        ListTasksReply {
            tasks: statuses.iter().map(|s| summary(*s, true)).collect(),
            next_before: Some(TaskId::new()),
        },
        ListTasksReply {
            tasks: vec![summary(TaskStatus::Planned, false)],
            next_before: None,
        },
    ]);
    conforms(&[CancelTaskRequest {
        task_id: TaskId::new(),
        reason: Some("superseded".into()),
    }]);
    conforms(&[CancelTaskReply {
        task_id: TaskId::new(),
        status: TaskStatus::Cancelled,
        steps_signalled: 2,
        steps_cancelled: 1,
    }]);
    conforms(&[RetryTaskRequest { task_id: TaskId::new() }]);
    conforms(&[RetryTaskReply {
        task_id: TaskId::new(),
        retry_of_task_id: TaskId::new(),
        root_task_id: TaskId::new(),
        attempt: 2,
        status: TaskStatus::Planned,
        approval_status: ApprovalStatus::Unevaluated,
        created: true,
    }]);
    let created = CreateTaskReply {
        task_id: TaskId::new(),
        org_id: OrgId::new(),
        status: TaskStatus::Queued,
        approval_status: ApprovalStatus::NotRequired,
        created: true,
        investigation_id: None,
    };
    conforms(&[
        Reply::Ok(created),
        Reply::Error(WireError::conflict("taken").with_details(ErrorDetails {
            task_id: Some(TaskId::new()),
        })),
    ]);
}

#[test]
fn log_replies_match_their_schemas() {
    let line = |seq, stream| LogLine {
        seq,
        stream,
        text: "error: disk full at 2026-11-26T08:00:00Z".into(),
        at: at(1),
    };
    conforms(&[
        TaskLogsRequest {
            task_id: TaskId::new(),
            step_id: None,
            after_seq: None,
            after_step_id: None,
            limit: None,
            view: LogView::Raw,
        },
        TaskLogsRequest {
            task_id: TaskId::new(),
            step_id: Some(StepId::new()),
            after_seq: Some(120),
            after_step_id: Some(StepId::new()),
            limit: Some(500),
            view: LogView::Dedup,
        },
    ]);
    conforms(&[
        TaskLogsReply {
            lines: vec![
                StepLogLine {
                    step_id: StepId::new(),
                    line: line(1, LogStream::Stdout),
                },
                StepLogLine {
                    step_id: StepId::new(),
                    line: line(2, LogStream::Stderr),
                },
            ],
            signatures: vec![],
            next_after_step_id: Some(StepId::new()),
            next_after_seq: Some(2),
        },
        TaskLogsReply {
            lines: vec![],
            signatures: vec![LogSignatureView {
                step_id: StepId::new(),
                stream: LogStream::Stderr,
                signature: "error: disk full at <ts>".into(),
                exemplar: "error: disk full at 2026-11-26T08:00:00Z".into(),
                count: 42,
                first_seq: 1,
                last_seq: 99,
                first_at: at(1),
                last_at: at(2),
            }],
            next_after_step_id: None,
            next_after_seq: None,
        },
    ]);
    conforms(&[LiveLogBatch {
        task_id: TaskId::new(),
        step_id: StepId::new(),
        lines: vec![line(7, LogStream::Stdout)],
    }]);
    conforms(&[LogBatch {
        step_id: StepId::new(),
        lease_generation: 4,
        worker_id: "build-01-7f3a9c1e".into(),
        lines: vec![line(1, LogStream::Stdout), line(2, LogStream::Stderr)],
    }]);
    conforms(&[LogBatchReply {
        stored: 2,
        truncated: true,
    }]);
}

#[test]
fn artifact_types_match_their_schemas() {
    let kinds = [
        ArtifactKind::Note,
        ArtifactKind::Link,
        ArtifactKind::Evidence,
        ArtifactKind::Summary,
        ArtifactKind::Response,
    ];
    conforms(
        &kinds
            .iter()
            .flat_map(|k| [artifact(*k, true), artifact(*k, false)])
            .collect::<Vec<_>>(),
    );
    conforms(&[
        AddArtifactRequest {
            kind: ArtifactKind::Link,
            task_id: Some(TaskId::new()),
            investigation_id: None,
            content: ArtifactContent {
                title: "runbook".into(),
                body: String::new(),
                url: Some("https://wiki.example.com/disk".into()),
            },
        },
        AddArtifactRequest {
            kind: ArtifactKind::Note,
            task_id: None,
            investigation_id: Some(Uuid::now_v7()),
            content: ArtifactContent::default(),
        },
    ]);
    conforms(&[WorkerArtifactRequest {
        step_id: StepId::new(),
        lease_generation: 2,
        worker_id: "build-01-7f3a9c1e".into(),
        kind: ArtifactKind::Evidence,
        question_index: Some(0),
        content: ArtifactContent {
            title: "What fills /var?".into(),
            body: "journald".into(),
            url: None,
        },
    }]);
    conforms(&[AddArtifactReply {
        artifact_id: Uuid::now_v7(),
    }]);
    conforms(&[
        ListArtifactsRequest::default(),
        ListArtifactsRequest {
            task_id: Some(TaskId::new()),
            investigation_id: None,
            kind: Some(ArtifactKind::Evidence),
            after: Some(Uuid::now_v7()),
            limit: Some(10),
        },
    ]);
    conforms(&[ListArtifactsReply {
        artifacts: vec![artifact(ArtifactKind::Note, true)],
        next_after: Some(Uuid::now_v7()),
    }]);
    conforms(&[GetArtifactRequest {
        artifact_id: Uuid::now_v7(),
    }]);
}

#[test]
fn approval_and_doctrine_types_match_their_schemas() {
    let token = ApprovalToken::from_random([0xab; 32]);
    conforms(&[MintApprovalTokenRequest { task_id: TaskId::new() }]);
    conforms(&[MintApprovalTokenReply {
        approval_token: token.clone(),
        token_id: Uuid::now_v7(),
        task_id: TaskId::new(),
        approval_class: ApprovalClass::ProductionMutation,
        payload_digest: snapshot(true).payload_digest,
        expires_at: at(15),
    }]);
    conforms(&[
        DecideTaskRequest {
            task_id: TaskId::new(),
            approval_token: Some(token),
            reason: Some("change window CHG-42".into()),
        },
        DecideTaskRequest {
            task_id: TaskId::new(),
            approval_token: None,
            reason: None,
        },
    ]);
    conforms(&[
        DecideTaskReply {
            task_id: TaskId::new(),
            status: TaskStatus::Queued,
            approval_status: ApprovalStatus::Approved,
            approval: record(ApprovalDecision::Approved, true),
        },
        DecideTaskReply {
            task_id: TaskId::new(),
            status: TaskStatus::Failed,
            approval_status: ApprovalStatus::Rejected,
            approval: record(ApprovalDecision::Rejected, false),
        },
    ]);
    conforms(
        &ApprovalDecision::ALL
            .iter()
            .flat_map(|d| [record(*d, true), record(*d, false)])
            .collect::<Vec<_>>(),
    );
    conforms(&[PendingApprovalsRequest { limit: Some(20) }]);
    conforms(&[PendingApprovalsReply {
        pending: modes()
            .into_iter()
            .map(|mode| PendingApproval {
                task_id: TaskId::new(),
                intent: "restart".into(),
                mode,
                targets: vec![WorkstationId::new()],
                requested_by: "ci".into(),
                snapshot: snapshot(true),
            })
            .collect(),
        truncated: true,
    }]);
    conforms(&[
        ListApprovalsRequest::default(),
        ListApprovalsRequest {
            task_id: Some(TaskId::new()),
            decision: Some(ApprovalDecision::Expired),
            before: Some(Uuid::now_v7()),
            limit: Some(5),
        },
    ]);
    conforms(&[ListApprovalsReply {
        approvals: vec![record(ApprovalDecision::Expired, false)],
        next_before: Some(Uuid::now_v7()),
    }]);
    let document = doctrine_document();
    conforms(&[document.clone(), DoctrineDocument::default()]);
    let value = serde_json::to_value(&document).unwrap();
    conforms(&[GetDoctrineRequest { version: Some(2) }, GetDoctrineRequest::default()]);
    conforms(&[DoctrineView {
        version: 2,
        doctrine: value.clone(),
        published_by: "alice".into(),
        published_at: at(-100),
        in_force: true,
    }]);
    conforms(&[PublishDoctrineRequest {
        doctrine: value.clone(),
    }]);
    conforms(&[PublishDoctrineReply { version: 3, rules: 2 }]);
    conforms(&[
        DoctrineDryRunRequest {
            task: spec(modes().remove(0), true),
            doctrine: Some(value),
        },
        DoctrineDryRunRequest {
            task: spec(modes().remove(2), false),
            doctrine: None,
        },
    ]);
    conforms(&[
        DoctrineDryRunReply {
            doctrine_version: Some(2),
            verdict: verdict(),
        },
        DoctrineDryRunReply {
            doctrine_version: None,
            verdict: Verdict::no_doctrine(),
        },
    ]);
    conforms(&[ApprovalRequestedEvent {
        task_id: TaskId::new(),
        org_id: OrgId::new(),
        intent: "restart".into(),
        mode: "command".into(),
        targets: vec![WorkstationId::new()],
        requested_by: "ci".into(),
        requested_by_token_id: Some(Uuid::now_v7()),
        snapshot: snapshot(true),
    }]);
    conforms(&[ApprovalDecidedEvent {
        org_id: OrgId::new(),
        status: TaskStatus::Failed,
        requested_by: "ci".into(),
        requested_by_token_id: None,
        approval: record(ApprovalDecision::Expired, false),
    }]);
}

#[test]
fn schedule_and_investigation_types_match_their_schemas() {
    conforms(&[CreateScheduleRequest {
        name: "nightly-backup".into(),
        cron: "30 2 * * *".into(),
        timezone: "Europe/Berlin".into(),
        template: template(modes().remove(0)),
        enabled: false,
        overlap: OverlapPolicy::Allow,
        catch_up_ticks: 3,
    }]);
    let views: Vec<ScheduleView> = modes()
        .into_iter()
        .flat_map(|m| [schedule(m.clone(), true), schedule(m, false)])
        .collect();
    conforms(&views);
    conforms(&[ScheduleDetail {
        schedule: views[0].clone(),
        next_runs: vec![at(1440), at(2880)],
        ticks: TickOutcome::ALL
            .iter()
            .map(|o| ScheduleTick {
                tick_at: at(0),
                outcome: *o,
                task_id: (*o == TickOutcome::Fired).then(TaskId::new),
                reason: (*o != TickOutcome::Fired).then(|| "previous task still live".into()),
                recorded_at: at(0),
            })
            .collect(),
        tick_counts: TickCounts {
            fired: 10,
            skipped_overlap: 2,
            missed: 1,
            failed: 0,
        },
        next_ticks_before: Some(at(-1440)),
    }]);
    conforms(&[ScheduleRef {
        schedule: "nightly-backup".into(),
    }]);
    conforms(&[GetScheduleRequest {
        schedule: ScheduleId::new().to_string(),
        next_runs: Some(5),
        ticks_limit: Some(20),
        ticks_before: Some(at(0)),
    }]);
    conforms(&[
        ListSchedulesRequest::default(),
        ListSchedulesRequest {
            enabled: Some(true),
            before: Some(ScheduleId::new()),
            limit: Some(50),
        },
    ]);
    conforms(&[ListSchedulesReply {
        schedules: views,
        next_before: Some(ScheduleId::new()),
    }]);
    conforms(&[DeleteScheduleReply {
        schedule_id: ScheduleId::new(),
        deleted: true,
    }]);

    let investigation = |status, full: bool| InvestigationView {
        investigation_id: Uuid::now_v7(),
        title: "Disk pressure on build hosts".into(),
        status,
        opened_by: "alice".into(),
        opened_at: at(0),
        opened_by_task_id: full.then(TaskId::new),
        closed_by: full.then(|| "bob".into()),
        closed_at: full.then(|| at(100)),
        close_reason: full.then(|| "found: journald".into()),
        task_count: 3,
        artifact_count: 7,
        tasks: if full {
            vec![summary(TaskStatus::Completed, true)]
        } else {
            vec![]
        },
    };
    conforms(&[
        investigation(InvestigationStatus::Closed, true),
        investigation(InvestigationStatus::Open, false),
    ]);
    conforms(&[ListInvestigationsReply {
        investigations: vec![investigation(InvestigationStatus::Open, true)],
        next_before: Some(Uuid::now_v7()),
    }]);
    conforms(&[
        ListInvestigationsRequest::default(),
        ListInvestigationsRequest {
            status: Some(InvestigationStatus::Open),
            before: Some(Uuid::now_v7()),
            limit: Some(10),
        },
    ]);
    conforms(&[CreateInvestigationRequest {
        title: "Disk pressure".into(),
    }]);
    conforms(&[GetInvestigationRequest {
        investigation_id: Uuid::now_v7(),
    }]);
    conforms(&[CloseInvestigationRequest {
        investigation_id: Uuid::now_v7(),
        reason: Some("found it".into()),
    }]);
}

#[test]
fn errors_principals_workers_and_events_match_their_schemas() {
    let codes = [
        ErrorCode::MalformedPayload,
        ErrorCode::InvalidRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::StaleLease,
        ErrorCode::LeaseHeld,
        ErrorCode::TooLarge,
        ErrorCode::TokenUsed,
        ErrorCode::TokenExpired,
        ErrorCode::TokenMismatch,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];
    let mut wire_errors: Vec<WireError> = codes.iter().map(|c| WireError::new(*c, c.as_str())).collect();
    wire_errors.push(WireError::conflict("taken").with_details(ErrorDetails {
        task_id: Some(TaskId::new()),
    }));
    wire_errors.push(WireError::conflict("taken").with_details(ErrorDetails::default()));
    conforms(&wire_errors);
    conforms(
        &Role::ALL
            .iter()
            .map(|role| Principal {
                org_id: OrgId::new(),
                token_id: Uuid::now_v7(),
                token_name: "ci".into(),
                role: *role,
                workstation_id: (*role == Role::Worker).then(WorkstationId::new),
                scopes: if *role == Role::Member {
                    Scope::ALL.to_vec()
                } else {
                    vec![]
                },
            })
            .collect::<Vec<_>>(),
    );
    conforms(&[
        SubmitOutcome {
            idempotency_key: Some("ci-run-4711".into()),
            task_id: Some(TaskId::new()),
            created: true,
            error: None,
        },
        SubmitOutcome {
            idempotency_key: None,
            task_id: None,
            created: false,
            error: Some(WireError::invalid("targets: at least one workstation is required")),
        },
    ]);
    conforms(&[
        RegisterWorkstationRequest {
            name: "build-01".into(),
            labels: [("env".to_string(), "production".to_string())].into(),
            agent: Some(AgentInfo {
                adapter: AgentAdapter::Openai,
                model: Some("llama3.1:8b".into()),
            }),
        },
        RegisterWorkstationRequest {
            name: "build-02".into(),
            labels: Default::default(),
            agent: Some(AgentInfo {
                adapter: AgentAdapter::Command,
                model: None,
            }),
        },
    ]);
    conforms(&[RegisterWorkstationReply {
        workstation_id: WorkstationId::new(),
        org_id: OrgId::new(),
        credential: Some("tjr_0123".into()),
        credential_id: Some(Uuid::now_v7()),
    }]);
    let assignments: Vec<Assignment> = modes()
        .into_iter()
        .map(|mode| Assignment {
            step_id: StepId::new(),
            task_id: TaskId::new(),
            lease_generation: 0,
            mode,
            timeout_secs: 600,
        })
        .collect();
    conforms(&assignments);
    conforms(&[ClaimRequest {
        step_id: StepId::new(),
        lease_generation: 0,
        worker_id: "build-01-7f3a9c1e".into(),
    }]);
    conforms(&[ClaimGranted {
        step_id: StepId::new(),
        task_id: TaskId::new(),
        lease_generation: 1,
        ttl_ms: 30_000,
        renew_within_ms: 20_000,
        heartbeat_interval_ms: 5_000,
    }]);
    conforms(&[HeartbeatRequest {
        worker_id: "build-01-7f3a9c1e".into(),
        workstation_id: Some(WorkstationId::new()),
        leases: vec![HeldLease {
            step_id: StepId::new(),
            lease_generation: 1,
        }],
        capacity: 4,
    }]);
    conforms(&[HeartbeatReply {
        leases: vec![
            LeaseRenewal {
                step_id: StepId::new(),
                renewed: true,
                renew_within_ms: Some(20_000),
                cancel_requested: true,
                error: None,
            },
            LeaseRenewal {
                step_id: StepId::new(),
                renewed: false,
                renew_within_ms: None,
                cancel_requested: false,
                error: Some(WireError::stale_lease("generation 3 is gone")),
            },
        ],
        offers: assignments,
    }]);
    conforms(&[ReleaseRequest {
        step_id: StepId::new(),
        lease_generation: 1,
        worker_id: "w".into(),
    }]);
    conforms(&[ReleaseReply { lease_generation: 2 }]);
    conforms(&[
        ProgressReport {
            step_id: StepId::new(),
            lease_generation: 1,
            worker_id: "build-01-7f3a9c1e".into(),
            stdout_tail: Some("ok\n".into()),
            stderr_tail: None,
            result: Some(StepResult {
                status: StepStatus::Succeeded,
                exit_code: Some(0),
                failure_reason: None,
                message: Some("exited with code 0".into()),
                processes_left: 0,
                agent: Some(AgentReport {
                    response: "The disk is 93% full.".into(),
                    model: Some("gpt-4.1-mini".into()),
                    usage: Some(TokenUsage {
                        input_tokens: 10,
                        output_tokens: 20,
                    }),
                }),
            }),
        },
        ProgressReport {
            step_id: StepId::new(),
            lease_generation: 1,
            worker_id: "build-01-7f3a9c1e".into(),
            stdout_tail: None,
            stderr_tail: Some("boom\n".into()),
            result: Some(StepResult {
                status: StepStatus::Failed,
                exit_code: None,
                failure_reason: Some(FailureReason::AgentError),
                message: None,
                processes_left: 2,
                agent: Some(AgentReport::default()),
            }),
        },
    ]);
    conforms(&[ProgressReply {
        task_status: TaskStatus::Executing,
        lease_generation: 2,
    }]);
    conforms(&[ControlMessage::Cancel {
        task_id: TaskId::new(),
        step_id: StepId::new(),
    }]);
    conforms(
        &TaskStatus::ALL
            .iter()
            .map(|s| TaskEventMessage {
                task_id: TaskId::new(),
                org_id: OrgId::new(),
                status: *s,
                approval_status: ApprovalStatus::NotRequired,
                failure_reason: s.is_terminal().then(|| "timeout".into()),
                at: at(0),
            })
            .collect::<Vec<_>>(),
    );
}

#[test]
fn a_wrong_value_fails_its_schema() {
    let v = validator("TaskView");
    let good = serde_json::to_value(task_view(modes().remove(1), TaskStatus::Executing, true)).unwrap();
    assert!(errors(&v, &good).is_empty());
    let wrong = [
        ("status", json!("running")),
        ("task_id", json!("not-a-uuid")),
        ("created_at", json!("yesterday")),
        ("attempt", json!(-1)),
        ("steps", json!([{"step_id": StepId::new()}])),
        ("prompt", json!(42)),
        ("mode", json!("dance")),
    ];
    for (field, value) in wrong {
        let mut bad = good.clone();
        bad[field] = value;
        assert!(!v.is_valid(&bad), "TaskView with {field} = {} passed", bad[field]);
        assert!(serde_json::from_value::<TaskView>(bad).is_err(), "serde took {field}");
    }
    let mut missing = good.clone();
    missing.as_object_mut().unwrap().remove("root_task_id");
    assert!(!v.is_valid(&missing));
}

#[test]
fn serde_and_the_schemas_accept_and_refuse_alike() {
    let minimal = json!({"intent": "x", "mode": "command", "command": "ls", "targets": ["a"]});
    agree::<TaskSpec>(minimal.clone(), true);
    agree::<TaskSpec>(
        json!({"intent": "x", "mode": "prompt", "prompt": "hi", "targets": [], "extra": 1}),
        true,
    );
    agree::<TaskSpec>(json!({"intent": "x", "mode": "dance", "targets": ["a"]}), false);
    agree::<TaskSpec>(
        json!({"intent": "x", "mode": "command", "prompt": "ls", "targets": ["a"]}),
        false,
    );
    agree::<TaskSpec>(json!({"intent": "x", "command": "ls", "targets": ["a"]}), false);
    agree::<TaskSpec>(
        json!({"intent": "x", "mode": "investigate", "questions": "why?", "targets": []}),
        false,
    );
    agree::<TaskSpec>(json!({"mode": "command", "command": "ls", "targets": ["a"]}), false);
    let mut with_nulls = minimal.clone();
    for field in ["timeout_secs", "retry_policy", "investigation_id", "retry_of_task_id"] {
        with_nulls[field] = Value::Null;
    }
    agree::<TaskSpec>(with_nulls, true);
    let mut bad_retry = minimal;
    bad_retry["retry_of_task_id"] = json!("task-1");
    agree::<TaskSpec>(bad_retry, false);

    agree::<DoctrineDocument>(json!({"rules": []}), true);
    agree::<DoctrineDocument>(json!({"rules": [], "rule": []}), false);
    let rule = json!({"name": "r", "class": "sensitive_write", "match": {"modes": ["command"]}});
    agree::<DoctrineDocument>(json!({"rules": [rule]}), true);
    agree::<RuleSpec>(
        json!({"name": "r", "class": "sensitive_write", "conditions": {}}),
        false,
    );
    agree::<RuleSpec>(json!({"name": "r", "class": "critical", "match": {}}), false);
    agree::<RuleConditions>(json!({"lables": {}}), false);

    let token = ApprovalToken::from_random([7; 32]);
    let task_id = TaskId::new();
    agree::<DecideTaskRequest>(json!({"task_id": task_id, "approval_token": token.expose()}), true);
    let shouted = format!("  tja_{}\n", token.expose()[4..].to_uppercase());
    agree::<DecideTaskRequest>(json!({"task_id": task_id, "approval_token": shouted}), true);
    agree::<DecideTaskRequest>(json!({"task_id": task_id, "approval_token": "nope"}), false);
    agree::<DecideTaskRequest>(json!({"task_id": task_id, "approval_token": "tjr_0000"}), false);

    let step_id = StepId::new();
    let claim = |worker_id: &str| json!({"step_id": step_id, "lease_generation": 0, "worker_id": worker_id});
    agree::<ClaimRequest>(claim("build-01-7f3a9c1e"), true);
    agree::<ClaimRequest>(claim(&"w".repeat(crate::model::MAX_WORKER_ID_BYTES)), true);
    agree::<ClaimRequest>(claim(&"w".repeat(crate::model::MAX_WORKER_ID_BYTES + 1)), false);
    agree::<ClaimRequest>(claim("a b"), false);
    agree::<ClaimRequest>(claim(""), false);
    agree::<ClaimRequest>(claim("é"), false);
    let lease = json!({"step_id": step_id, "lease_generation": 1});
    let heartbeat = |n: usize| json!({"worker_id": "w", "leases": vec![lease.clone(); n]});
    agree::<HeartbeatRequest>(heartbeat(crate::protocol::MAX_HEARTBEAT_LEASES), true);
    agree::<HeartbeatRequest>(heartbeat(crate::protocol::MAX_HEARTBEAT_LEASES + 1), false);

    agree::<WireError>(json!({"code": "conflict", "message": "taken"}), true);
    agree::<WireError>(json!({"code": "conflict", "message": "taken", "details": null}), true);
    agree::<WireError>(json!({"code": "teapot", "message": "taken"}), false);
    agree::<ControlMessage>(json!({"kind": "cancel", "task_id": task_id, "step_id": step_id}), true);
    agree::<ControlMessage>(json!({"kind": "pause", "task_id": task_id, "step_id": step_id}), false);
    let principal = |scope: &str| json!({"org_id": OrgId::new(), "token_id": Uuid::now_v7(), "token_name": "ci", "role": "member", "scopes": [scope]});
    agree::<Principal>(principal("mcp:operate"), true);
    agree::<Principal>(principal("mcp:write"), false);
    agree::<Principal>(
        json!({"org_id": OrgId::new(), "token_id": Uuid::now_v7(), "token_name": "ci", "role": "root"}),
        false,
    );
    let ok = json!({"task_id": task_id, "org_id": OrgId::new(), "status": "queued", "approval_status": "not_required", "created": true});
    agree::<Reply<CreateTaskReply>>(json!({"ok": ok}), true);
    agree::<Reply<CreateTaskReply>>(json!({"error": {"code": "internal", "message": "x"}}), true);
    agree::<Reply<CreateTaskReply>>(json!({"ok": ok, "error": {"code": "internal", "message": "x"}}), false);
    agree::<Reply<CreateTaskReply>>(json!({}), false);
}

#[test]
fn announced_defaults_are_the_ones_serde_applies() {
    let template = json!({"intent": "back up", "mode": "command", "command": "backup", "targets": ["db-01"]});
    let checked =
        defaults_agree::<CreateScheduleRequest>(json!({"name": "n", "cron": "* * * * *", "template": template}))
            + defaults_agree::<RetryPolicy>(json!({"max_attempts": 3}))
            + defaults_agree::<TaskLogsRequest>(json!({"task_id": TaskId::new()}));
    assert_eq!(checked, 7);
}
