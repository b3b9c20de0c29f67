//! The crate graph the design promises (docs/design.md §1): services never depend
//! on each other, the worker links no database, Redis or HTTP server code, and
//! only the store and the lease service talk to Postgres or Redis directly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `cargo tree` of one package's normal (non-dev, non-build) dependencies: crate names.
fn tree(package: &str) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO"))
        .current_dir(repo())
        .args([
            "tree",
            "--offline",
            "-p",
            package,
            "-e",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Each workspace member's direct normal dependencies on other `tanjiren-*` crates.
fn internal_edges() -> BTreeMap<String, BTreeSet<String>> {
    let out = Command::new(env!("CARGO"))
        .current_dir(repo())
        .args(["metadata", "--offline", "--no-deps", "--format-version", "1"])
        .output()
        .expect("cargo metadata runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let deps = p["dependencies"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|d| d["kind"].is_null())
                .filter_map(|d| d["name"].as_str())
                .filter(|n| n.starts_with("tanjiren-"))
                .map(str::to_string)
                .collect();
            (p["name"].as_str().unwrap().to_string(), deps)
        })
        .collect()
}

#[test]
fn the_worker_links_no_database_redis_or_http_server() {
    let deps = tree("tanjiren-worker");
    assert!(deps.contains("async-nats"), "{deps:?}");
    for banned in [
        "sqlx",
        "sqlx-core",
        "redis",
        "axum",
        "tanjiren-store",
        "tanjiren-ingest",
    ] {
        assert!(!deps.contains(banned), "tanjiren-worker depends on {banned}");
    }
}

#[test]
fn services_depend_on_the_shared_crates_never_on_each_other() {
    let edges = internal_edges();
    let services = [
        "tanjiren-ingest",
        "tanjiren-approval",
        "tanjiren-lease",
        "tanjiren-scheduler",
    ];
    for s in services {
        let deps = &edges[s];
        for other in services {
            assert!(!deps.contains(other), "{s} depends on {other}");
        }
        assert!(deps.contains("tanjiren-store"), "{s}: {deps:?}");
    }
    assert_eq!(
        edges["tanjiren-worker"],
        BTreeSet::from(["tanjiren-shared".to_string(), "tanjiren-bus".to_string()])
    );
    assert!(!edges["tanjiren-bus"].contains("tanjiren-store"));
    let shared = tree("tanjiren-shared");
    for io in ["async-nats", "sqlx", "redis", "tokio", "tracing-subscriber"] {
        assert!(!shared.contains(io), "the pure domain links {io}");
    }
}

/// Every `.rs` file under `dir`, recursively.
fn rust_files(dir: &std::path::Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `SET` list of every `UPDATE tasks` / `UPDATE steps` in `text` that assigns `status`.
fn status_writes(text: &str) -> Vec<String> {
    let update =
        regex::Regex::new(r"(?is)UPDATE\s+(?:tasks|steps)\b.*?\bSET\b(.*?)(?:\bFROM\b|\bWHERE\b|\bRETURNING\b|;|$)")
            .unwrap();
    let assigns = regex::Regex::new(r"(?i)(?:^|[\s,])status\s*=").unwrap();
    update
        .captures_iter(text)
        .filter(|c| assigns.is_match(&c[1]))
        .map(|c| c[0].chars().take(120).collect())
        .collect()
}

/// DESIGN §2: no SQL outside the store's lifecycle interpreter sets a task's or a
/// step's status; services bind its fragments and tables instead. (Inserting a
/// row in its initial state is not a change.)
#[test]
fn only_the_lifecycle_interpreter_writes_a_status() {
    let mut files = Vec::new();
    rust_files(&repo().join("services"), &mut files);
    let interpreter = repo().join("services/store/src/lifecycle");
    let mut offenders = Vec::new();
    for f in &files {
        if f.starts_with(&interpreter) || f == &repo().join("services/store/src/lifecycle.rs") {
            continue;
        }
        for w in status_writes(&std::fs::read_to_string(f).unwrap()) {
            offenders.push(format!("{}: {w}", f.display()));
        }
    }
    assert!(files.len() > 50, "found {} files", files.len());
    assert!(
        offenders.is_empty(),
        "status written outside the interpreter:\n{}",
        offenders.join("\n")
    );
    // The check can fail: the statements the claim and the cancel used before the interpreter.
    assert_eq!(
        status_writes("UPDATE tasks t SET status = 'executing', started_at = now() WHERE t.id IN (SELECT 1)").len(),
        1
    );
    assert_eq!(
        status_writes("UPDATE steps SET cancel_requested_at = now(), status = $2 WHERE task_id = ANY($1)").len(),
        1
    );
    assert!(status_writes("UPDATE steps SET dispatched_at = $3 WHERE status = 'queued'").is_empty());
    assert!(status_writes("UPDATE tasks SET approval_status = $2 WHERE id = $1").is_empty());
}
