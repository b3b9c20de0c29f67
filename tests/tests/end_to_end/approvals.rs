//! Approval gates end to end: doctrine decides per task whether approval is needed
//! and at which class; pending tasks wait until an admin or owner decides with a
//! single-use approval token bound to that task and payload; decisions are stored,
//! listed and published; deadlines expire. Real servers; time-dependent paths are
//! driven with a controlled clock (`sweep(now)`, `decide(…, now)`).

use chrono::{Duration as Span, Utc};
use futures::StreamExt;
use serde_json::json;
use std::time::{Duration, Instant};
use tanjiren_approval::DecisionKind;
use tanjiren_shared::approvals::{
    ApprovalDecidedEvent, ApprovalDecision, ApprovalRequestedEvent, ApprovalToken, DecideTaskReply, DecideTaskRequest,
    DoctrineDryRunReply, DoctrineDryRunRequest, DoctrineView, GetDoctrineRequest, ListApprovalsReply,
    ListApprovalsRequest, MintApprovalTokenReply, MintApprovalTokenRequest, PendingApprovalsReply,
    PendingApprovalsRequest, PublishDoctrineReply, PublishDoctrineRequest,
};
use tanjiren_shared::codec::Encoding;
use tanjiren_shared::doctrine::ApprovalClass;
use tanjiren_shared::ids::TaskId;
use tanjiren_shared::model::{ApprovalStatus, Mode, Role, TaskSpec, TaskStatus};
use tanjiren_shared::protocol::{CreateTaskReply, TaskView};
use tanjiren_shared::{ErrorCode, WireError};
use tanjiren_tests::{Running, Service, TestEnv, command};

const WAIT: Duration = Duration::from_secs(20);

/// The doctrine most tests use: production targets need an owner's or admin's yes
/// (with a reason), package installs a lighter one.
fn prod_doctrine() -> serde_json::Value {
    json!({"description": "nothing writes to production without a yes", "rules": [
        {"name": "prod", "class": "production_mutation", "match": {"labels": {"env": "production"}}},
        {"name": "installs", "class": "sensitive_write", "match": {"text": "\\binstall\\b"}}
    ]})
}

async fn start(env: &TestEnv) -> Vec<Running> {
    vec![env.start(Service::Ingest).await, env.start(Service::Approval).await]
}

async fn publish(env: &TestEnv, token: &str, doctrine: serde_json::Value) -> Result<PublishDoctrineReply, WireError> {
    env.call(
        &env.conns.subjects.doctrine_publish(),
        token,
        &PublishDoctrineRequest { doctrine },
    )
    .await
}

/// Creates a task with `token` and waits until doctrine has been evaluated for it.
async fn create_as(env: &TestEnv, token: &str, spec: &TaskSpec) -> TaskView {
    let reply: CreateTaskReply = env
        .call(&env.conns.subjects.tasks_create(), token, spec)
        .await
        .expect("task created");
    wait_evaluated(env, reply.task_id).await
}

async fn wait_evaluated(env: &TestEnv, task: TaskId) -> TaskView {
    let start = Instant::now();
    loop {
        let t = env.get(task).await.unwrap();
        if t.approval_status != ApprovalStatus::Unevaluated {
            return t;
        }
        assert!(start.elapsed() < WAIT, "task {task} never evaluated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn mint(env: &TestEnv, token: &str, task: TaskId) -> Result<MintApprovalTokenReply, WireError> {
    env.call(
        &env.conns.subjects.approvals_mint(),
        token,
        &MintApprovalTokenRequest { task_id: task },
    )
    .await
}

async fn decide(
    env: &TestEnv,
    kind: DecisionKind,
    token: &str,
    task: TaskId,
    approval_token: Option<&ApprovalToken>,
    reason: Option<&str>,
) -> Result<DecideTaskReply, WireError> {
    let subject = match kind {
        DecisionKind::Approve => env.conns.subjects.tasks_approve(),
        DecisionKind::Reject => env.conns.subjects.tasks_reject(),
    };
    let req = DecideTaskRequest {
        task_id: task,
        approval_token: approval_token.cloned(),
        reason: reason.map(str::to_string),
    };
    env.call(&subject, token, &req).await
}

/// Mints with `approver` and approves with the same token in one go (as the CLI does).
async fn approve(
    env: &TestEnv,
    approver: &str,
    task: TaskId,
    reason: Option<&str>,
) -> Result<DecideTaskReply, WireError> {
    let minted = mint(env, approver, task).await?;
    decide(
        env,
        DecisionKind::Approve,
        approver,
        task,
        Some(&minted.approval_token),
        reason,
    )
    .await
}

fn code<T: std::fmt::Debug>(r: Result<T, WireError>) -> ErrorCode {
    r.expect_err("expected an error").code
}

fn prompt(text: &str, targets: &[&str]) -> TaskSpec {
    let mut spec = command("unused", targets);
    spec.intent = text.to_string();
    spec.mode = Mode::Prompt { prompt: text.into() };
    spec
}

fn class_of(t: &TaskView) -> (ApprovalClass, Vec<String>) {
    let s = t.approval.as_ref().expect("snapshot stored");
    (
        s.verdict.approval_class,
        s.verdict.matched_rules.iter().map(|r| r.name.clone()).collect(),
    )
}

async fn token_consumed(env: &TestEnv, token_id: uuid::Uuid) -> bool {
    sqlx::query_scalar("SELECT consumed_at IS NOT NULL FROM approval_tokens WHERE id = $1")
        .bind(token_id)
        .fetch_one(&env.conns.db)
        .await
        .unwrap()
}

/// Each rule kind on real tasks, and the dry run agreeing with what tasks get.
#[tokio::test]
async fn each_rule_kind_decides_the_class() {
    let env = TestEnv::new().await;
    let services = start(&env).await;
    env.workstation_with_labels("web-prod", &[("env", "production")]).await;
    env.workstation_with_labels("web-stage", &[("env", "staging")]).await;
    env.give_agent("web-stage", "command", None).await;
    env.workstation("db-01").await;
    let v = publish(
        &env,
        &env.owner_token,
        json!({"rules": [
            {"name": "prompts", "class": "sensitive_write", "match": {"modes": ["prompt"]}},
            {"name": "database-box", "class": "production_mutation", "match": {"workstations": ["db-01"]}},
            {"name": "prod-label", "class": "production_mutation", "match": {"labels": {"env": "production"}}},
            {"name": "drops", "class": "production_mutation", "match": {"text": "(?i)drop\\s+table"}},
            {"name": "deploys", "class": "sensitive_write", "match": {"intent": "^deploy\\b"}}
        ]}),
    )
    .await
    .unwrap();
    assert_eq!((v.version, v.rules), (1, 5));

    let mut deploy = command("make release", &["web-stage"]);
    deploy.intent = "deploy the site".into();
    let cases: Vec<(TaskSpec, ApprovalClass, Vec<&str>)> = vec![
        (command("ls", &["web-stage"]), ApprovalClass::None, vec![]),
        (
            prompt("summarise the logs", &["web-stage"]),
            ApprovalClass::SensitiveWrite,
            vec!["prompts"],
        ),
        (
            command("uptime", &["db-01"]),
            ApprovalClass::ProductionMutation,
            vec!["database-box"],
        ),
        (
            command("uptime", &["web-stage", "web-prod"]),
            ApprovalClass::ProductionMutation,
            vec!["prod-label"],
        ),
        (
            command("psql -c 'DROP TABLE t'", &["web-stage"]),
            ApprovalClass::ProductionMutation,
            vec!["drops"],
        ),
        (deploy, ApprovalClass::SensitiveWrite, vec!["deploys"]),
    ];
    for (spec, class, rules) in cases {
        let dry: DoctrineDryRunReply = env
            .call(
                &env.conns.subjects.doctrine_dry_run(),
                &env.member_token,
                &DoctrineDryRunRequest {
                    task: spec.clone(),
                    doctrine: None,
                },
            )
            .await
            .unwrap();
        assert_eq!(dry.doctrine_version, Some(1));
        assert_eq!(dry.verdict.approval_class, class, "dry run of {spec:?}");
        let t = create_as(&env, &env.member_token, &spec).await;
        let snapshot = t.approval.clone().unwrap();
        assert_eq!(snapshot.doctrine_version, Some(1));
        assert_eq!(
            class_of(&t),
            (class, rules.iter().map(|r| r.to_string()).collect()),
            "{spec:?}"
        );
        if class == ApprovalClass::None {
            // No approval needed: queued at once with its step, as before doctrine existed.
            assert_eq!(
                (t.approval_status, snapshot.deadline),
                (ApprovalStatus::NotRequired, None)
            );
            let t = env.get(t.task_id).await.unwrap();
            assert_eq!(t.status, TaskStatus::Queued);
            assert_eq!(t.steps.len(), 1);
        } else {
            assert_eq!(
                (t.status, t.approval_status),
                (TaskStatus::Planned, ApprovalStatus::Pending)
            );
            assert!(t.steps.is_empty());
            assert!(snapshot.deadline.unwrap() > Utc::now() + Span::hours(23));
        }
    }
    // A dry run of an unpublished candidate does not change what is in force.
    let dry: DoctrineDryRunReply = env
        .call(
            &env.conns.subjects.doctrine_dry_run(),
            &env.member_token,
            &DoctrineDryRunRequest {
                task: command("ls", &["web-stage"]),
                doctrine: Some(json!({"rules": [
                    {"name": "all", "class": "sensitive_write", "match": {"modes": ["command"]}}
                ]})),
            },
        )
        .await
        .unwrap();
    assert_eq!(
        (dry.doctrine_version, dry.verdict.approval_class),
        (None, ApprovalClass::SensitiveWrite)
    );
    let unknown: Result<DoctrineDryRunReply, _> = env
        .call(
            &env.conns.subjects.doctrine_dry_run(),
            &env.member_token,
            &DoctrineDryRunRequest {
                task: command("ls", &["nowhere"]),
                doctrine: None,
            },
        )
        .await;
    assert_eq!(code(unknown), ErrorCode::InvalidRequest);
    env.finish(services).await;
}

#[tokio::test]
async fn the_highest_matching_class_wins_and_every_match_is_kept() {
    let env = TestEnv::new().await;
    let services = start(&env).await;
    env.workstation_with_labels("web-prod", &[("env", "production")]).await;
    publish(&env, &env.owner_token, prod_doctrine()).await.unwrap();
    let t = create_as(&env, &env.member_token, &command("apt install jq", &["web-prod"])).await;
    assert_eq!(
        class_of(&t),
        (
            ApprovalClass::ProductionMutation,
            vec!["prod".into(), "installs".into()]
        )
    );
    env.finish(services).await;
}

/// The gate, the events a notifier and the requester see, and a decision's record.
#[tokio::test]
async fn a_pending_task_is_approved_with_a_token_and_everyone_is_told() {
    let env = TestEnv::new().await;
    let services = start(&env).await;
    env.workstation_with_labels("web-prod", &[("env", "production")]).await;
    publish(&env, &env.owner_token, prod_doctrine()).await.unwrap();
    let mut events = env
        .conns
        .nats
        .subscribe(format!(
            "{}.v1.events.{}.approval.>",
            env.config.subject_prefix, env.org
        ))
        .await
        .unwrap();
    tanjiren_bus::serve::subscriptions_live(&env.conns.nats).await.unwrap();

    let t = create_as(
        &env,
        &env.member_token,
        &command("systemctl restart api", &["web-prod"]),
    )
    .await;
    let requested = events.next().await.unwrap();
    assert_eq!(
        requested.subject.as_str(),
        env.conns.subjects.approval_requested(env.org)
    );
    let requested: ApprovalRequestedEvent = Encoding::MsgPack.decode(&requested.payload).unwrap();
    assert_eq!(requested.task_id, t.task_id);
    assert_eq!(requested.requested_by, "member");
    assert_eq!(
        requested.snapshot.verdict.approval_class,
        ApprovalClass::ProductionMutation
    );
    assert_eq!(requested.snapshot.verdict.matched_rules[0].name, "prod");
    assert_eq!(requested.snapshot.deadline, t.approval.as_ref().unwrap().deadline);

    let pending: PendingApprovalsReply = env
        .call(
            &env.conns.subjects.approvals_pending(),
            &env.member_token,
            &PendingApprovalsRequest::default(),
        )
        .await
        .unwrap();
    assert_eq!(pending.pending.len(), 1);
    assert_eq!(pending.pending[0].task_id, t.task_id);

    let minted = mint(&env, &env.admin_token, t.task_id).await.unwrap();
    assert!(minted.expires_at <= Utc::now() + Span::minutes(15));
    assert!(minted.expires_at > Utc::now() + Span::minutes(14));
    let reply = decide(
        &env,
        DecisionKind::Approve,
        &env.admin_token,
        t.task_id,
        Some(&minted.approval_token),
        Some("change CHG-7"),
    )
    .await
    .unwrap();
    assert_eq!(
        (reply.status, reply.approval_status),
        (TaskStatus::Queued, ApprovalStatus::Approved)
    );
    assert_eq!(reply.approval.decided_by, "admin");
    assert_eq!(reply.approval.decided_by_role, Some(Role::Admin));
    assert_eq!(reply.approval.approval_token_id, Some(minted.token_id));

    let decided = events.next().await.unwrap();
    assert_eq!(decided.subject.as_str(), env.conns.subjects.approval_decided(env.org));
    let token_text = minted.approval_token.expose().as_bytes();
    assert!(!decided.payload.windows(token_text.len()).any(|w| w == token_text));
    let decided: ApprovalDecidedEvent = Encoding::MsgPack.decode(&decided.payload).unwrap();
    assert_eq!(decided.approval.decision, ApprovalDecision::Approved);
    assert_eq!(decided.requested_by, "member");
    assert_eq!(decided.status, TaskStatus::Queued);
    assert_eq!(decided.approval.reason.as_deref(), Some("change CHG-7"));

    // Steps were materialised exactly as for a task that needed no approval.
    let t = env.get(t.task_id).await.unwrap();
    assert_eq!((t.status, t.steps.len()), (TaskStatus::Queued, 1));
    assert!(t.execution_id.is_some());
    assert_eq!(t.approvals.len(), 1);
    assert_eq!(t.approvals[0].decided_by, "admin");
    let listed: ListApprovalsReply = env
        .call(
            &env.conns.subjects.approvals_list(),
            &env.member_token,
            &ListApprovalsRequest::default(),
        )
        .await
        .unwrap();
    assert_eq!(listed.approvals, t.approvals);
    // The token was never stored in clear.
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM approval_tokens WHERE token_hash = $1")
        .bind(minted.approval_token.hash())
        .fetch_one(&env.conns.db)
        .await
        .unwrap();
    assert_eq!(stored, 1);
    env.finish(services).await;
}

#[tokio::test]
async fn a_rejection_fails_the_task_with_the_reason() {
    let env = TestEnv::new().await;
    let services = start(&env).await;
    env.workstation_with_labels("web-prod", &[("env", "production")]).await;
    publish(&env, &env.owner_token, prod_doctrine()).await.unwrap();
    let t = create_as(&env, &env.member_token, &command("rm -rf /srv/cache", &["web-prod"])).await;
    let minted = mint(&env, &env.owner_token, t.task_id).await.unwrap();
    let reply = decide(
        &env,
        DecisionKind::Reject,
        &env.owner_token,
        t.task_id,
        Some(&minted.approval_token),
        Some("not during the sale"),
    )
    .await
    .unwrap();
    assert_eq!(
        (reply.status, reply.approval_status),
        (TaskStatus::Failed, ApprovalStatus::Rejected)
    );
    let t = env.get(t.task_id).await.unwrap();
    assert_eq!(t.failure_reason.as_deref(), Some("rejected"));
    assert!(t.finished_at.is_some() && t.steps.is_empty());
    assert_eq!(t.approvals[0].decision, ApprovalDecision::Rejected);
    assert_eq!(t.approvals[0].reason.as_deref(), Some("not during the sale"));
    assert_eq!(env.executions().await, 0);
    env.finish(services).await;
}

#[tokio::test]
async fn the_snapshot_survives_a_doctrine_change() {
    let env = TestEnv::new().await;
    let services = start(&env).await;
    env.workstation_with_labels("web-prod", &[("env", "production")]).await;
    publish(&env, &env.owner_token, prod_doctrine()).await.unwrap();
    let spec = command("systemctl restart api", &["web-prod"]);
    let old = create_as(&env, &env.member_token, &spec).await;
    assert_eq!(old.approval.as_ref().unwrap().doctrine_version, Some(1));

    let v2 = publish(&env, &env.owner_token, json!({"rules": []})).await.unwrap();
    assert_eq!(v2.version, 2);
    let new = create_as(&env, &env.member_token, &spec).await;
    assert_eq!(new.approval_status, ApprovalStatus::NotRequired);
    assert_eq!(new.approval.as_ref().unwrap().doctrine_version, Some(2));

    // The old task keeps version 1's verdict, and is still approved at its class.
    let again = env.get(old.task_id).await.unwrap();
    assert_eq!(again.approval, old.approval);
    assert_eq!(again.approval_status, ApprovalStatus::Pending);
    let r = approve(&env, &env.admin_token, old.task_id, None).await.unwrap();
    assert_eq!(r.approval.approval_class, ApprovalClass::ProductionMutation);
    // A later sweep does not re-evaluate anything either.
    tanjiren_approval::sweep(&env.conns, Utc::now()).await.unwrap();
    assert_eq!(env.get(old.task_id).await.unwrap().approval, old.approval);
    env.finish(services).await;
}

#[tokio::test]
async fn a_bad_doctrine_is_rejected_whole_and_the_previous_version_stays() {
    let env = TestEnv::new().await;
    let services = start(&env).await;
    env.workstation_with_labels("web-prod", &[("env", "production")]).await;
    publish(&env, &env.owner_token, prod_doctrine()).await.unwrap();
    let bad = json!({"rules": [
        {"name": "fine", "class": "sensitive_write", "match": {"modes": ["command"]}},
        {"name": "broken", "class": "production_mutation", "match": {"text": "(unclosed"}}
    ]});
    let e = publish(&env, &env.owner_token, bad).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InvalidRequest);
    assert!(e.message.contains("rule \"broken\" (rules[1])"), "{e}");
    let e = publish(
        &env,
        &env.admin_token,
        json!({"rules": [{"name": "typo", "class": "sensitive_write", "match": {"lables": {"a": "b"}}}]}),
    )
    .await
    .unwrap_err();
    assert!(e.message.contains("typo") && e.message.contains("lables"), "{e}");
    // Members may read doctrine but not publish it.
    assert_eq!(
        code(publish(&env, &env.member_token, json!({"rules": []})).await),
        ErrorCode::Forbidden
    );

    assert_eq!(env.count("doctrines").await, 1);
    let shown: DoctrineView = env
        .call(
            &env.conns.subjects.doctrine_get(),
            &env.member_token,
            &GetDoctrineRequest::default(),
        )
        .await
        .unwrap();
    assert_eq!((shown.version, shown.in_force), (1, true));
    assert_eq!(shown.doctrine, prod_doctrine());
    assert_eq!(shown.published_by, "owner");
    let t = create_as(&env, &env.member_token, &command("uptime", &["web-prod"])).await;
    assert_eq!(t.approval.unwrap().doctrine_version, Some(1));
    env.finish(services).await;
}

#[tokio::test]
async fn a_member_cannot_approve_but_can_carry_an_approvers_token() {
    let env = TestEnv::new().await;
    let services = start(&env).await;
    env.workstation_with_labels("web-prod", &[("env", "production")]).await;
    publish(&env, &env.owner_token, prod_doctrine()).await.unwrap();
    let t = create_as(&env, &env.owner_token, &command("systemctl restart api", &["web-prod"])).await;
    let agent = &env.member_token;

    assert_eq!(code(mint(&env, agent, t.task_id).await), ErrorCode::Forbidden);
    for kind in [DecisionKind::Approve, DecisionKind::Reject] {
        assert_eq!(
            code(decide(&env, kind, agent, t.task_id, None, None).await),
            ErrorCode::Forbidden
        );
    }
    let forged = ApprovalToken::from_random(rand::random());
    assert_eq!(
        code(decide(&env, DecisionKind::Approve, agent, t.task_id, Some(&forged), None).await),
        ErrorCode::TokenMismatch
    );
    let worker = decide(
        &env,
        DecisionKind::Approve,
        &env.worker_token,
        t.task_id,
        Some(&forged),
        None,
    )
    .await;
    assert_eq!(code(worker), ErrorCode::Forbidden);
    assert_eq!(
        env.get(t.task_id).await.unwrap().approval_status,
        ApprovalStatus::Pending
    );
    assert_eq!(env.count("approvals").await, 0);

    // A human (the admin) mints; the agent presents it. The decision is the admin's.
    let minted = mint(&env, &env.admin_token, t.task_id).await.unwrap();
    let r = decide(
        &env,
        DecisionKind::Approve,
        agent,
        t.task_id,
        Some(&minted.approval_token),
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, TaskStatus::Queued);
    assert_eq!(r.approval.decided_by, "admin");
    assert_eq!(r.approval.decided_by_role, Some(Role::Admin));
    assert_eq!(r.approval.presented_by.as_deref(), Some("member"));
    let member = env.principal(agent).await;
    assert_eq!(r.approval.presented_by_token_id, Some(member.token_id));
    env.finish(services).await;
}

#[tokio::test]
async fn the_requester_cannot_approve_their_own_production_mutation() {
    let env = TestEnv::new().await;
    let services = start(&env).await;
    env.workstation_with_labels("web-prod", &[("env", "production")]).await;
    env.workstation("build-01").await;
    publish(&env, &env.owner_token, prod_doctrine()).await.unwrap();
    // The owner creates it: the owner's own token cannot approve it.
    let t = create_as(&env, &env.owner_token, &command("systemctl restart api", &["web-prod"])).await;
    let minted = mint(&env, &env.owner_token, t.task_id).await.unwrap();
    let e = decide(
        &env,
        DecisionKind::Approve,
        &env.owner_token,
        t.task_id,
        Some(&minted.approval_token),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden, "{e}");
    // Carried by someone else, the decision is still the creator's: refused too.
    let carried = decide(
        &env,
        DecisionKind::Approve,
        &env.member_token,
        t.task_id,
        Some(&minted.approval_token),
        None,
    )
    .await;
    assert_eq!(code(carried), ErrorCode::Forbidden);
    assert!(!token_consumed(&env, minted.token_id).await);
    assert_eq!(
        env.get(t.task_id).await.unwrap().approval_status,
        ApprovalStatus::Pending
    );
    assert_eq!(env.count("approvals").await, 0);
    // Another approver may; identities are compared by token id, not by name.
    let same_name_other_admin = env.token(Role::Admin, "owner").await;
    let r = approve(&env, &same_name_other_admin, t.task_id, None).await.unwrap();
    assert_eq!(r.status, TaskStatus::Queued);

    // The creator may approve their own lower-class task, and reject their own production one.
    let low = create_as(&env, &env.owner_token, &command("apt install jq", &["build-01"])).await;
    assert_eq!(class_of(&low).0, ApprovalClass::SensitiveWrite);
    approve(&env, &env.owner_token, low.task_id, None).await.unwrap();
    let own = create_as(&env, &env.owner_token, &command("reboot", &["web-prod"])).await;
    let minted = mint(&env, &env.owner_token, own.task_id).await.unwrap();
    let r = decide(
        &env,
        DecisionKind::Reject,
        &env.owner_token,
        own.task_id,
        Some(&minted.approval_token),
        None,
    )
    .await
    .unwrap();
    assert_eq!(r.status, TaskStatus::Failed);
    env.finish(services).await;
}

#[tokio::test]
async fn a_reason_required_by_doctrine_is_enforced() {
    let env = TestEnv::new().await;
    let services = start(&env).await;
    env.workstation_with_labels("web-prod", &[("env", "production")]).await;
    publish(
        &env,
        &env.owner_token,
        json!({"rules": [{"name": "prod", "class": "production_mutation", "require_reason": true,
                          "match": {"labels": {"env": "production"}}}]}),
    )
    .await
    .unwrap();
    let t = create_as(&env, &env.member_token, &command("reboot", &["web-prod"])).await;
    assert!(t.approval.as_ref().unwrap().verdict.reason_required);
    let minted = mint(&env, &env.admin_token, t.task_id).await.unwrap();
    for reason in [None, Some("   ")] {
        let e = decide(
            &env,
            DecisionKind::Approve,
            &env.admin_token,
            t.task_id,
            Some(&minted.approval_token),
            reason,
        )
        .await
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidRequest);
        assert!(e.message.contains("reason") && e.message.contains("prod"), "{e}");
    }
    assert!(!token_consumed(&env, minted.token_id).await);
    let r = decide(
        &env,
        DecisionKind::Approve,
        &env.admin_token,
        t.task_id,
        Some(&minted.approval_token),
        Some("kernel patch"),
    )
    .await
    .unwrap();
    assert_eq!(r.approval.reason.as_deref(), Some("kernel patch"));
    env.finish(services).await;
}

#[tokio::test]
async fn a_rule_can_require_that_an_owner_approves() {
    let env = TestEnv::new().await;
    let services = start(&env).await;
    env.workstation_with_labels("db-prod", &[("env", "production")]).await;
    publish(
        &env,
        &env.owner_token,
        json!({"rules": [{"name": "prod-owner", "class": "production_mutation", "require_owner": true,
                          "match": {"labels": {"env": "production"}}}]}),
    )
    .await
    .unwrap();
    // An admin's yes is refused and changes nothing…
    let t = create_as(&env, &env.member_token, &command("drop table sessions", &["db-prod"])).await;
    let rules = &t.approval.as_ref().unwrap().verdict.matched_rules;
    assert!(
        rules.iter().any(|r| r.name == "prod-owner" && r.require_owner),
        "{rules:?}"
    );
    let minted = mint(&env, &env.admin_token, t.task_id).await.unwrap();
    let e = decide(
        &env,
        DecisionKind::Approve,
        &env.admin_token,
        t.task_id,
        Some(&minted.approval_token),
        None,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code, ErrorCode::Forbidden);
    assert!(e.message.contains("owner") && e.message.contains("prod-owner"), "{e}");
    assert!(!token_consumed(&env, minted.token_id).await);
    assert_eq!(env.get(t.task_id).await.unwrap().status, TaskStatus::Planned);
    // …an owner's is what queues the task.
    let r = approve(&env, &env.owner_token, t.task_id, None).await.unwrap();
    assert_eq!(r.status, TaskStatus::Queued);
    // An admin may still say no to such a task.
    let t2 = create_as(&env, &env.member_token, &command("drop table users", &["db-prod"])).await;
    let minted = mint(&env, &env.admin_token, t2.task_id).await.unwrap();
    let r = decide(
        &env,
        DecisionKind::Reject,
        &env.admin_token,
        t2.task_id,
        Some(&minted.approval_token),
        Some("not today"),
    )
    .await
    .unwrap();
    assert_eq!(r.status, TaskStatus::Failed);
    env.finish(services).await;
}

#[tokio::test]
async fn token_reuse_expiry_and_mismatch_fail_with_their_codes_and_change_nothing() {
    let env = TestEnv::new().await;
    let services = start(&env).await;
    env.workstation_with_labels("web-prod", &[("env", "production")]).await;
    publish(&env, &env.owner_token, prod_doctrine()).await.unwrap();
    let spec = |c: &str| command(c, &["web-prod"]);
    let a = create_as(&env, &env.member_token, &spec("restart a")).await;
    let b = create_as(&env, &env.member_token, &spec("restart b")).await;
    let c = create_as(&env, &env.member_token, &spec("restart c")).await;
    let admin = env.principal(&env.admin_token).await;

    // Reuse: the second use fails, whatever it asks for.
    let ta = mint(&env, &env.admin_token, a.task_id).await.unwrap();
    decide(
        &env,
        DecisionKind::Approve,
        &env.admin_token,
        a.task_id,
        Some(&ta.approval_token),
        None,
    )
    .await
    .unwrap();
    for kind in [DecisionKind::Approve, DecisionKind::Reject] {
        let again = decide(&env, kind, &env.admin_token, a.task_id, Some(&ta.approval_token), None).await;
        assert_eq!(code(again), ErrorCode::TokenUsed);
    }
    assert_eq!(env.count("approvals").await, 1);
    assert_eq!(env.executions().await, 1);

    // Expiry: presented 16 minutes after minting (controlled clock).
    let tb = mint(&env, &env.admin_token, b.task_id).await.unwrap();
    let late = tanjiren_approval::decide(
        &env.conns,
        DecisionKind::Approve,
        vec![(
            admin.clone(),
            DecideTaskRequest {
                task_id: b.task_id,
                approval_token: Some(tb.approval_token.clone()),
                reason: None,
            },
        )],
        Utc::now() + Span::minutes(16),
    )
    .await;
    assert_eq!(late[0].as_ref().unwrap_err().code, ErrorCode::TokenExpired);
    assert!(!token_consumed(&env, tb.token_id).await);
    assert_eq!(
        env.get(b.task_id).await.unwrap().approval_status,
        ApprovalStatus::Pending
    );

    // Mismatch: b's token presented for c.
    let wrong = decide(
        &env,
        DecisionKind::Approve,
        &env.admin_token,
        c.task_id,
        Some(&tb.approval_token),
        None,
    )
    .await;
    assert_eq!(code(wrong), ErrorCode::TokenMismatch);
    // Mismatch: a payload that no longer matches. The database refuses the change…
    let tc = mint(&env, &env.admin_token, c.task_id).await.unwrap();
    let refused =
        sqlx::query("UPDATE tasks SET payload = '{\"mode\":\"command\",\"command\":\"rm -rf /\"}' WHERE id = $1")
            .bind(c.task_id.as_uuid())
            .execute(&env.conns.db)
            .await;
    assert!(refused.is_err(), "the payload of a planned task must not change");
    // …and if it were forced past the database, the token would not approve it.
    let mut conn = env.conns.db.acquire().await.unwrap();
    sqlx::query("SET session_replication_role = replica")
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("UPDATE tasks SET payload = '{\"mode\":\"command\",\"command\":\"rm -rf /\"}' WHERE id = $1")
        .bind(c.task_id.as_uuid())
        .execute(&mut *conn)
        .await
        .unwrap();
    sqlx::query("SET session_replication_role = origin")
        .execute(&mut *conn)
        .await
        .unwrap();
    drop(conn);
    let tampered = decide(
        &env,
        DecisionKind::Approve,
        &env.admin_token,
        c.task_id,
        Some(&tc.approval_token),
        None,
    )
    .await;
    assert_eq!(code(tampered), ErrorCode::TokenMismatch);

    // Nothing changed: b and c still wait, their tokens unused, no new decision, no new steps.
    for t in [b.task_id, c.task_id] {
        let t = env.get(t).await.unwrap();
        assert_eq!(
            (t.status, t.approval_status),
            (TaskStatus::Planned, ApprovalStatus::Pending)
        );
        assert!(t.steps.is_empty() && t.approvals.is_empty());
    }
    assert!(!token_consumed(&env, tb.token_id).await && !token_consumed(&env, tc.token_id).await);
    assert_eq!(env.count("approvals").await, 1);
    assert_eq!(env.executions().await, 1);
    // b's token still works in time.
    decide(
        &env,
        DecisionKind::Approve,
        &env.admin_token,
        b.task_id,
        Some(&tb.approval_token),
        None,
    )
    .await
    .unwrap();
    env.finish(services).await;
}

/// Owner and admin each mint a token and approve at the same moment, through two
/// approval replicas: exactly one transition.
#[tokio::test]
async fn two_approvers_at_once_make_exactly_one_transition() {
    let env = TestEnv::new().await;
    let mut services = start(&env).await;
    services.push(env.start(Service::Approval).await);
    env.workstation_with_labels("web-prod", &[("env", "production")]).await;
    publish(&env, &env.owner_token, prod_doctrine()).await.unwrap();
    for round in 0..5 {
        let t = create_as(
            &env,
            &env.member_token,
            &command(&format!("restart {round}"), &["web-prod"]),
        )
        .await;
        let t1 = mint(&env, &env.owner_token, t.task_id).await.unwrap();
        let t2 = mint(&env, &env.admin_token, t.task_id).await.unwrap();
        let (r1, r2) = tokio::join!(
            decide(
                &env,
                DecisionKind::Approve,
                &env.owner_token,
                t.task_id,
                Some(&t1.approval_token),
                None
            ),
            decide(
                &env,
                DecisionKind::Approve,
                &env.admin_token,
                t.task_id,
                Some(&t2.approval_token),
                None
            ),
        );
        let (won, lost): (Vec<_>, Vec<_>) = [r1, r2].into_iter().partition(|r| r.is_ok());
        assert_eq!(won.len(), 1, "round {round}: {lost:?}");
        assert_eq!(lost[0].as_ref().unwrap_err().code, ErrorCode::Conflict);
        let t = env.get(t.task_id).await.unwrap();
        assert_eq!((t.status, t.steps.len(), t.approvals.len()), (TaskStatus::Queued, 1, 1));
    }
    // The same race inside one batch (one transaction): the first request wins.
    let t = create_as(&env, &env.member_token, &command("restart batch", &["web-prod"])).await;
    let (owner, admin) = (
        env.principal(&env.owner_token).await,
        env.principal(&env.admin_token).await,
    );
    let t1 = mint(&env, &env.owner_token, t.task_id).await.unwrap();
    let t2 = mint(&env, &env.admin_token, t.task_id).await.unwrap();
    let req = |token: &MintApprovalTokenReply| DecideTaskRequest {
        task_id: t.task_id,
        approval_token: Some(token.approval_token.clone()),
        reason: None,
    };
    let results = tanjiren_approval::decide(
        &env.conns,
        DecisionKind::Approve,
        vec![(owner, req(&t1)), (admin, req(&t2))],
        Utc::now(),
    )
    .await;
    assert_eq!(results[0].as_ref().unwrap().approval.decided_by, "owner");
    assert_eq!(results[1].as_ref().unwrap_err().code, ErrorCode::Conflict);

    assert_eq!(env.executions().await, 6);
    assert_eq!(env.count("approvals").await, 6);
    let consumed: i64 = sqlx::query_scalar("SELECT count(*) FROM approval_tokens WHERE consumed_at IS NOT NULL")
        .fetch_one(&env.conns.db)
        .await
        .unwrap();
    assert_eq!(consumed, 6, "the losers' tokens are not consumed");
    env.finish(services).await;
}

#[tokio::test]
async fn approve_and_reject_racing_one_wins_and_the_other_gets_a_conflict() {
    let env = TestEnv::new().await;
    let mut services = start(&env).await;
    services.push(env.start(Service::Approval).await);
    env.workstation_with_labels("web-prod", &[("env", "production")]).await;
    publish(&env, &env.owner_token, prod_doctrine()).await.unwrap();
    for round in 0..5 {
        let t = create_as(
            &env,
            &env.member_token,
            &command(&format!("restart {round}"), &["web-prod"]),
        )
        .await;
        let yes = mint(&env, &env.owner_token, t.task_id).await.unwrap();
        let no = mint(&env, &env.admin_token, t.task_id).await.unwrap();
        let (approved, rejected) = tokio::join!(
            decide(
                &env,
                DecisionKind::Approve,
                &env.owner_token,
                t.task_id,
                Some(&yes.approval_token),
                None
            ),
            decide(
                &env,
                DecisionKind::Reject,
                &env.admin_token,
                t.task_id,
                Some(&no.approval_token),
                Some("no")
            ),
        );
        let t = env.get(t.task_id).await.unwrap();
        match (approved, rejected) {
            (Ok(_), Err(e)) => {
                assert_eq!(e.code, ErrorCode::Conflict);
                assert_eq!((t.status, t.steps.len()), (TaskStatus::Queued, 1));
            }
            (Err(e), Ok(_)) => {
                assert_eq!(e.code, ErrorCode::Conflict);
                assert_eq!(
                    (t.status, t.failure_reason.as_deref()),
                    (TaskStatus::Failed, Some("rejected"))
                );
                assert!(t.steps.is_empty());
            }
            other => panic!("round {round}: exactly one must win: {other:?}"),
        }
        assert_eq!(t.approvals.len(), 1);
    }
    env.finish(services).await;
}

#[tokio::test]
async fn another_organisation_can_do_nothing() {
    let env = TestEnv::new().await;
    let services = start(&env).await;
    env.workstation_with_labels("web-prod", &[("env", "production")]).await;
    publish(&env, &env.owner_token, prod_doctrine()).await.unwrap();
    let t = create_as(&env, &env.member_token, &command("reboot", &["web-prod"])).await;
    let ours = mint(&env, &env.admin_token, t.task_id).await.unwrap();
    let (other_org, stranger) = env.other_org().await;

    // Their owner cannot see, mint for, approve or reject our task, even holding our token.
    assert_eq!(code(mint(&env, &stranger, t.task_id).await), ErrorCode::NotFound);
    for kind in [DecisionKind::Approve, DecisionKind::Reject] {
        let r = decide(&env, kind, &stranger, t.task_id, Some(&ours.approval_token), Some("x")).await;
        assert_eq!(code(r), ErrorCode::NotFound);
    }
    let pending: PendingApprovalsReply = env
        .call(
            &env.conns.subjects.approvals_pending(),
            &stranger,
            &PendingApprovalsRequest::default(),
        )
        .await
        .unwrap();
    assert!(pending.pending.is_empty());
    let listed: ListApprovalsReply = env
        .call(
            &env.conns.subjects.approvals_list(),
            &stranger,
            &ListApprovalsRequest::default(),
        )
        .await
        .unwrap();
    assert!(listed.approvals.is_empty());
    let doctrine: Result<DoctrineView, _> = env
        .call(
            &env.conns.subjects.doctrine_get(),
            &stranger,
            &GetDoctrineRequest::default(),
        )
        .await;
    assert_eq!(code(doctrine), ErrorCode::NotFound);

    // A token minted in their organisation (for their own task) is useless on ours.
    let their_ws = uuid::Uuid::now_v7();
    sqlx::query(
        "INSERT INTO workstations (id, org_id, name, labels) VALUES ($1, $2, 'theirs', '{\"env\":\"production\"}')",
    )
    .bind(their_ws)
    .bind(other_org.as_uuid())
    .execute(&env.conns.db)
    .await
    .unwrap();
    publish(&env, &stranger, prod_doctrine()).await.unwrap();
    let theirs_reply: CreateTaskReply = env
        .call(
            &env.conns.subjects.tasks_create(),
            &stranger,
            &command("reboot", &["theirs"]),
        )
        .await
        .unwrap();
    let their_pending = wait_evaluated_as(&env, &stranger, theirs_reply.task_id).await;
    assert_eq!(their_pending, ApprovalStatus::Pending);
    let theirs = mint(&env, &stranger, theirs_reply.task_id).await.unwrap();
    for presenter in [&env.member_token, &env.admin_token] {
        let r = decide(
            &env,
            DecisionKind::Approve,
            presenter,
            t.task_id,
            Some(&theirs.approval_token),
            None,
        )
        .await;
        assert_eq!(code(r), ErrorCode::TokenMismatch);
    }

    // Nothing changed on our side; our own token still works.
    assert_eq!(
        env.get(t.task_id).await.unwrap().approval_status,
        ApprovalStatus::Pending
    );
    assert!(!token_consumed(&env, theirs.token_id).await && !token_consumed(&env, ours.token_id).await);
    decide(
        &env,
        DecisionKind::Approve,
        &env.member_token,
        t.task_id,
        Some(&ours.approval_token),
        None,
    )
    .await
    .unwrap();
    env.finish(services).await;
}

async fn wait_evaluated_as(env: &TestEnv, token: &str, task: TaskId) -> ApprovalStatus {
    let start = Instant::now();
    loop {
        let t: TaskView = env
            .call(
                &env.conns.subjects.tasks_get(),
                token,
                &tanjiren_shared::protocol::GetTaskRequest::new(task),
            )
            .await
            .unwrap();
        if t.approval_status != ApprovalStatus::Unevaluated {
            return t.approval_status;
        }
        assert!(start.elapsed() < WAIT, "task {task} never evaluated");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sweep fails a pending task at its deadline (controlled clock), records the
/// expiry as a decision and tells the requester.
#[tokio::test]
async fn a_pending_task_past_its_deadline_fails_with_approval_expired() {
    let env = TestEnv::new().await;
    let services = start(&env).await;
    env.workstation_with_labels("web-prod", &[("env", "production")]).await;
    publish(&env, &env.owner_token, prod_doctrine()).await.unwrap();
    let mut events = env
        .conns
        .nats
        .subscribe(env.conns.subjects.approval_decided(env.org))
        .await
        .unwrap();
    tanjiren_bus::serve::subscriptions_live(&env.conns.nats).await.unwrap();
    let t = create_as(&env, &env.member_token, &command("reboot", &["web-prod"])).await;
    let deadline = t.approval.as_ref().unwrap().deadline.unwrap();

    let early = tanjiren_approval::sweep(&env.conns, deadline - Span::seconds(1))
        .await
        .unwrap();
    assert_eq!(early.expired, 0);
    assert_eq!(
        env.get(t.task_id).await.unwrap().approval_status,
        ApprovalStatus::Pending
    );
    let at = tanjiren_approval::sweep(&env.conns, deadline).await.unwrap();
    assert_eq!(at.expired, 1);

    let t = env.get(t.task_id).await.unwrap();
    assert_eq!(
        (t.status, t.approval_status),
        (TaskStatus::Failed, ApprovalStatus::Expired)
    );
    assert_eq!(t.failure_reason.as_deref(), Some("approval_expired"));
    assert_eq!(t.approvals.len(), 1);
    assert_eq!(
        (t.approvals[0].decision, t.approvals[0].decided_by.as_str()),
        (ApprovalDecision::Expired, "system")
    );
    let e: ApprovalDecidedEvent = Encoding::MsgPack
        .decode(
            &tokio::time::timeout(WAIT, events.next())
                .await
                .unwrap()
                .unwrap()
                .payload,
        )
        .unwrap();
    assert_eq!((e.approval.task_id, e.status), (t.task_id, TaskStatus::Failed));
    assert_eq!(e.requested_by, "member");
    // Nothing more to decide: no token, no decision.
    assert_eq!(code(mint(&env, &env.admin_token, t.task_id).await), ErrorCode::Conflict);
    assert_eq!(
        tanjiren_approval::sweep(&env.conns, deadline + Span::hours(1))
            .await
            .unwrap()
            .expired,
        0
    );
    env.finish(services).await;
}
