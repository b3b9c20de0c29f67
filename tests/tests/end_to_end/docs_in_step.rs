//! The documents stay true to the code: every subject the subject builders make is
//! in `docs/protocol.md`, and so is every wire error code. Every configuration knob
//! is in `docs/operations.md` with its environment variable and default. Every
//! metric the code registers is in the metrics table of `docs/operations.md`. The
//! lists are read from the code itself (the builders' source, the error codes'
//! `as_str`, the serialised default `Config`, the metric names in the source), so
//! a new subject, code, knob or metric fails here until it is documented.

use regex::Regex;
use std::path::{Path, PathBuf};
use tanjiren_shared::config::Config;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the repository")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// `{org}`, `{task_id}`, `{status}` … all become `{}`, so the code's and the
/// documents' placeholder names need not match.
fn placeholders_erased(s: &str) -> String {
    Regex::new(r"\{[a-z_]*\}").unwrap().replace_all(s, "{}").into_owned()
}

#[test]
fn every_subject_is_documented_in_the_protocol() {
    let code = read("shared/src/subjects.rs");
    // `self.s("tasks.create")` and `self.s(&format!("dispatch.{org}.{workstation}"))`.
    let built = Regex::new(r#"self\.s\(\s*(?:&format!\(\s*)?"([^"]+)""#).unwrap();
    let subjects: Vec<String> = built
        .captures_iter(&code)
        .map(|c| placeholders_erased(&format!("tanjiren.v1.{}", &c[1])))
        .collect();
    assert!(
        subjects.len() >= 30,
        "found only {} subject builders: {subjects:?}",
        subjects.len()
    );
    let protocol = placeholders_erased(&read("docs/protocol.md"));
    let missing: Vec<&String> = subjects
        .iter()
        .filter(|s| !protocol.contains(&format!("`{s}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "subjects missing from docs/protocol.md: {missing:?}"
    );
}

#[test]
fn every_error_code_is_documented_in_the_protocol() {
    let code = read("shared/src/error.rs");
    let codes: Vec<String> = Regex::new(r#"ErrorCode::\w+ => "([a-z_]+)""#)
        .unwrap()
        .captures_iter(&code)
        .map(|c| c[1].to_string())
        .collect();
    assert!(codes.len() >= 14, "found only {codes:?}");
    let protocol = read("docs/protocol.md");
    let missing: Vec<&String> = codes
        .iter()
        .filter(|c| !protocol.contains(&format!("| `{c}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "error codes without a row in docs/protocol.md §3: {missing:?}"
    );
}

#[test]
fn every_config_knob_is_documented_with_its_variable_and_default() {
    let operations = read("docs/operations.md");
    let serde_json::Value::Object(knobs) = serde_json::to_value(Config::default()).unwrap() else {
        unreachable!("the config is a struct")
    };
    let mut problems = Vec::new();
    for (knob, default) in knobs {
        let var = format!("TANJIREN_{}", knob.to_uppercase());
        let row_start = format!("| `{knob}` | `{var}` |");
        let Some(row) = operations.lines().find(|l| l.starts_with(&row_start)) else {
            problems.push(format!("{knob}: no row starting `{row_start}`"));
            continue;
        };
        let default_cell = row[row_start.len()..].split('|').next().unwrap_or_default();
        let expected = match &default {
            serde_json::Value::String(s) if s.is_empty() => continue,
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if !default_cell.contains(&expected) {
            problems.push(format!(
                "{knob}: default `{expected}`, documented as `{}`",
                default_cell.trim()
            ));
        }
    }
    assert!(problems.is_empty(), "docs/operations.md is out of step: {problems:#?}");
}

#[test]
fn every_metric_is_documented_in_the_metrics_table() {
    let operations = read("docs/operations.md");
    // Every metric is registered up front in one registry (`tanjiren_ops::metrics`).
    let metrics = tanjiren_ops::Metrics::new().names();
    assert!(metrics.len() >= 10, "found only {metrics:?}");
    let missing: Vec<&String> = metrics
        .iter()
        .filter(|m| !operations.contains(&format!("| `{m}` |")))
        .collect();
    assert!(
        missing.is_empty(),
        "metrics missing from the table in docs/operations.md: {missing:?}"
    );
}
