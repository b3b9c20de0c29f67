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
