//! Layered configuration: built-in defaults, then an optional TOML file
//! (`TANJIREN_CONFIG` or `--config`), then `TANJIREN_<FIELD>` environment
//! variables. Every knob is a field of [`Config`]; its env var is its name in
//! upper case (`lease_ttl_ms` → `TANJIREN_LEASE_TTL_MS`). Secrets are never printed.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// Every setting of every service. Defaults target one machine on localhost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// Postgres URL.
    pub database_url: String,
    /// Redis URL.
    pub redis_url: String,
    /// Prefix of every NATS subject and JetStream stream (`{prefix}.v1.…`).
    pub subject_prefix: String,
    /// Prefix of every Redis key (`{prefix}:lease:{step}`).
    pub redis_key_prefix: String,
    /// Address of the `/healthz`, `/readyz` and `/metrics` endpoint; empty disables it.
    pub http_addr: String,
    /// `human` or `json`.
    pub log_format: String,
    /// A tracing filter, e.g. `info` or `tanjiren=debug,info`.
    pub log_level: String,
    /// Postgres connections of a service process's hot pool (the statements on every
    /// task's path); its default pool (reads, sweeps, migrations) gets half as many, at least 2.
    pub db_max_connections: u32,
    /// Most requests one service folds into one database transaction.
    pub batch_max: usize,
    /// A batch also closes once its requests' payloads reach this many bytes (a log
    /// flood makes bounded transactions and bounded memory per batch).
    pub batch_max_bytes: usize,
    /// Requests one service processes concurrently (batches in flight × batch size bounds memory).
    pub max_in_flight: usize,
    /// Messages one NATS subscription buffers before the client drops the
    /// slowest consumer's messages (async-nats' subscription capacity).
    pub nats_subscription_capacity: usize,
    /// Lease time-to-live.
    pub lease_ttl_ms: u64,
    /// How often workers renew their leases; must be ≤ lease_ttl_ms / 3.
    pub heartbeat_interval_ms: u64,
    /// How often the reconciler sweeps for stale leases.
    pub reconcile_interval_ms: u64,
    /// Claims younger than this are never treated as stale.
    pub claim_grace_ms: u64,
    /// Execution timeout of a step when the task sets none.
    pub default_timeout_secs: u64,
    /// A queued step not claimed within this long fails with `queue_timeout` (when the task sets none).
    pub queue_timeout_secs: u64,
    /// A queued step not claimed within this long is dispatched again.
    pub redispatch_after_ms: u64,
    /// How often the scheduler looks for work (re-dispatch, timeouts).
    pub scheduler_interval_ms: u64,
    /// How often the approval service looks for planned tasks whose event was missed
    /// and fails pending tasks past their approval deadline.
    pub approval_sweep_interval_ms: u64,
    /// How long a minted approval token stays valid (never past the task's approval deadline).
    pub approval_token_ttl_secs: u64,
    /// A task waiting for approval longer than this fails with `approval_expired`.
    pub approval_deadline_secs: u64,
    /// Largest command, prompt or question list accepted, in bytes.
    pub max_command_bytes: usize,
    /// Most bytes of output stored per step; beyond it one marker line is stored and the rest dropped.
    pub log_cap_bytes: u64,
    /// Largest artifact accepted (title + body + url), in bytes.
    pub max_artifact_bytes: usize,
    /// How often ingest looks for ended tasks that still lack their outcome summary.
    pub summary_sweep_interval_ms: u64,
    /// How often a worker refreshes a running step's output preview (with its log batches).
    pub progress_interval_ms: u64,
    /// Attempts (including the first) of a task whose own retry policy sets none:
    /// the organisation default. 1 (the default) never retries automatically:
    /// retries are opt-in, by the task's `retry_policy`, its schedule's template, or
    /// raising this knob.
    pub default_max_attempts: u32,
    /// A schedule whose consecutive ticks may come closer than this is refused.
    pub min_schedule_interval_secs: u64,
    /// Bearer token for the CLI and the worker; when empty it is read from `token_file`.
    pub token: String,
    /// File holding the token; empty means `$XDG_CONFIG_HOME/tanjiren/token` (or `~/.config/tanjiren/token`).
    pub token_file: String,
    /// Worker: the workstation name to register; defaults to the host name.
    pub workstation_name: String,
    /// Worker: the file holding this workstation's credential (mode 0600), written
    /// at enrolment and read on every start; empty means
    /// `<worker_state_dir>/credentials/<workstation>`.
    pub worker_credential_file: String,
    /// Worker: steps run at the same time.
    pub worker_concurrency: usize,
    /// Worker: the shell commands run under (`$shell -c "$command"`).
    pub worker_shell: String,
    /// Worker: the AI agent adapter it runs `prompt` and `investigate` steps with,
    /// advertised at registration: empty (none), `openai` or `command`.
    pub worker_agent: String,
    /// Worker: the agent's model, advertised with the adapter; empty when unknown.
    /// The `openai` adapter asks for this model (it is required there).
    pub worker_agent_model: String,
    /// Worker, `command` adapter: the CLI agent's command line, run like a command
    /// step (`$worker_shell -c`, same containment, timeout and cancellation). The
    /// prompt is on its standard input and in `$TANJIREN_PROMPT` (when under 100 KiB),
    /// e.g. `claude -p "$TANJIREN_PROMPT"` or `ollama run llama3.2`.
    pub worker_agent_command: String,
    /// Worker, `command` adapter: a JSON Pointer (`/result`) picking the response
    /// from the agent's JSON-lines output (the last line with a string there); empty
    /// means the whole standard output is the response.
    pub worker_agent_response_pointer: String,
    /// Worker, `openai` adapter: the API's base URL, up to `/v1` (the adapter posts
    /// to `{base}/chat/completions`). Ollama serves `http://127.0.0.1:11434/v1`.
    pub worker_agent_base_url: String,
    /// Worker, `openai` adapter: the API key (sent as a bearer token, never logged,
    /// never sent to Tanjiren's services); empty reads `worker_agent_api_key_file`,
    /// and with neither none is sent (local servers need none).
    pub worker_agent_api_key: String,
    /// Worker, `openai` adapter: a file holding the API key.
    pub worker_agent_api_key_file: String,
    /// Worker, `openai` adapter: the longest one HTTP request may take, in
    /// milliseconds (each request is bounded by the step's timeout as well).
    pub worker_agent_request_timeout_ms: u64,
    /// Worker, `openai` adapter: `max_tokens` of each request; 0 leaves it to the server.
    pub worker_agent_max_tokens: u64,
    /// Worker, `openai` adapter: `temperature` of each request (0–2); empty leaves it
    /// to the server. A config file may give it as a number (`0.2`) or a string.
    #[serde(deserialize_with = "number_or_string")]
    pub worker_agent_temperature: String,
    /// Worker: how many times one agent request is retried after a retryable failure
    /// (HTTP 429 or 5xx, a connection error), with exponential backoff from 500 ms,
    /// or as long as `Retry-After` says (at most 60 s), within the step's timeout.
    pub worker_agent_max_retries: u64,
    /// Worker, `openai` adapter: the read-only commands the model may call through its
    /// `run_command` tool, as patterns separated by `;` or new lines (none by default,
    /// and then no tool is offered). A pattern is words like a command line; `*`
    /// matches within one word (not across `/`), and a last word `...` allows any
    /// further words: `df -h`, `uptime`, `cat /var/log/*.log`, `journalctl -u * ...`.
    pub worker_agent_tools: String,
    /// Worker: time between SIGTERM and SIGKILL when stopping a step.
    pub kill_grace_ms: u64,
    /// Gateway: the address its HTTP server (MCP at `/mcp`, the HTTP API at `/v1`)
    /// listens on; empty disables it in `tanjiren up`.
    pub gateway_addr: String,
    /// Gateway: its address as clients reach it (`https://tanjiren.example.com`),
    /// named in the protected-resource metadata and `WWW-Authenticate`; empty
    /// means `http://` plus the request's `Host`.
    pub gateway_public_url: String,
    /// Gateway: the `Host` values it answers (DNS-rebinding protection), comma-separated
    /// host names or `host:port`; `*` allows any (behind a proxy that checks it).
    pub gateway_allowed_hosts: String,
    /// Gateway: the browser origins allowed to call it (`https://console.example.com`,
    /// `http://localhost:*`), comma-separated; a request with any other `Origin` is
    /// refused with 403. Requests without `Origin` (CLI and server clients) pass.
    pub gateway_allowed_origins: String,
    /// Gateway: origins sent CORS headers for the HTTP API, comma-separated; empty
    /// (the default) sends none, so browsers on other origins cannot read replies.
    pub gateway_cors_origins: String,
    /// Gateway: how long one call to a service may take before the client gets
    /// `unavailable`, in milliseconds.
    pub gateway_request_timeout_ms: u64,
    /// Gateway: the most event streams and MCP subscriptions one token may hold
    /// open at once; one more is refused with `too_many` (HTTP 429).
    pub gateway_max_streams_per_token: u64,
    /// Gateway: the secret that encrypts and signs the console's session cookies
    /// (any string of 32 or more characters; every replica behind one address
    /// needs the same). Empty (the default): a random one per process, so
    /// console sessions end when the gateway restarts.
    pub gateway_console_secret: String,
    /// Worker: the program serving the hidden `step-guard` subcommand, which stops a
    /// step's processes when the worker dies: `auto` (the `tanjiren` binary itself),
    /// `off`, or a path.
    pub step_guard: String,
    /// Worker: where each step gets its own cgroup v2: `auto` (below the worker's own
    /// cgroup, when the unified hierarchy is mounted and writable), `off`, or a
    /// cgroup v2 directory.
    pub step_cgroup: String,
    /// Worker: directory of the records of running steps; empty means
    /// `/var/lib/tanjiren` for root, else `$XDG_STATE_HOME/tanjiren` (or `~/.local/state/tanjiren`).
    pub worker_state_dir: String,
    /// Worker: a log batch is sent when it reaches this many lines…
    pub log_batch_max_lines: usize,
    /// …or this many bytes…
    pub log_batch_max_bytes: usize,
    /// …or this long after its first line.
    pub log_flush_ms: u64,
}

/// `unknown knob `x``, with the nearest known knob when one is close (edit distance
/// at most a third of the name).
fn unknown_knob<'a>(unknown: &str, known: impl Iterator<Item = &'a str>) -> String {
    let nearest = known
        .map(|k| (strsim::levenshtein(unknown, k), k))
        .min()
        .filter(|(d, _)| *d <= unknown.len().max(3) / 3);
    match nearest {
        Some((_, k)) => format!("unknown knob `{unknown}`; did you mean `{k}`? (docs/operations.md lists them all)"),
        None => format!("unknown knob `{unknown}` (docs/operations.md lists them all)"),
    }
}

/// A knob kept as text that a config file may also write as a number (`0.2`).
fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Number(f64),
    }
    Ok(match Raw::deserialize(d)? {
        Raw::Text(t) => t,
        Raw::Number(n) => n.to_string(),
    })
}

impl Default for Config {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            database_url: "postgres://postgres@127.0.0.1:5432/tanjiren".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            subject_prefix: "tanjiren".into(),
            redis_key_prefix: "tanjiren".into(),
            http_addr: "127.0.0.1:9464".into(),
            log_format: "human".into(),
            log_level: "info".into(),
            db_max_connections: 8,
            batch_max: 256,
            batch_max_bytes: 4 * 1024 * 1024,
            max_in_flight: 1024,
            nats_subscription_capacity: 65_536,
            lease_ttl_ms: 90_000,
            heartbeat_interval_ms: 30_000,
            reconcile_interval_ms: 30_000,
            claim_grace_ms: 10_000,
            default_timeout_secs: 3600,
            queue_timeout_secs: 3600,
            redispatch_after_ms: 10_000,
            scheduler_interval_ms: 1_000,
            approval_sweep_interval_ms: 5_000,
            approval_token_ttl_secs: 15 * 60,
            approval_deadline_secs: 24 * 3600,
            max_command_bytes: 64 * 1024,
            log_cap_bytes: 10 * 1024 * 1024,
            max_artifact_bytes: 256 * 1024,
            summary_sweep_interval_ms: 30_000,
            progress_interval_ms: 2_000,
            default_max_attempts: 1,
            min_schedule_interval_secs: 60,
            token: String::new(),
            token_file: String::new(),
            workstation_name: String::new(),
            worker_credential_file: String::new(),
            worker_concurrency: 4,
            worker_shell: "/bin/sh".into(),
            worker_agent: String::new(),
            worker_agent_model: String::new(),
            worker_agent_command: String::new(),
            worker_agent_response_pointer: String::new(),
            worker_agent_base_url: "https://api.openai.com/v1".into(),
            worker_agent_api_key: String::new(),
            worker_agent_api_key_file: String::new(),
            worker_agent_request_timeout_ms: 300_000,
            worker_agent_max_tokens: 0,
            worker_agent_temperature: String::new(),
            worker_agent_max_retries: 3,
            worker_agent_tools: String::new(),
            kill_grace_ms: 10_000,
            gateway_addr: "127.0.0.1:8420".into(),
            gateway_public_url: String::new(),
            gateway_allowed_hosts: "localhost,127.0.0.1,::1".into(),
            gateway_allowed_origins: "http://localhost:*,http://127.0.0.1:*".into(),
            gateway_cors_origins: String::new(),
            gateway_request_timeout_ms: 10_000,
            gateway_max_streams_per_token: 16,
            gateway_console_secret: String::new(),
            step_guard: "auto".into(),
            step_cgroup: "auto".into(),
            worker_state_dir: String::new(),
            log_batch_max_lines: 500,
            log_batch_max_bytes: 256 * 1024,
            log_flush_ms: 100,
        }
    }
}

/// A configuration that could not be loaded; the message names the file, variable or field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    File { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Defaults → the file's text (if any) → environment variables `TANJIREN_<KNOB>`
    /// as `env` returns them. Reading the file and the process environment is
    /// `tanjiren_bus::config::load`'s job; this is the pure layering.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file or variable that does not parse, or the rule broken.
    pub fn layered(
        file_text: Option<&str>,
        file_path: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut value = serde_json::to_value(Config::default()).expect("config serialises");
        let path = || {
            file_path
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "<inline>".into())
        };
        if let Some(text) = file_text {
            // A misspelt knob is named with the nearest real one (serde would list all 60).
            if let Ok(table) = toml::from_str::<toml::Table>(text) {
                let Value::Object(known) = &value else {
                    unreachable!("config is a struct")
                };
                if let Some(unknown) = table.keys().find(|k| !known.contains_key(k.as_str())) {
                    return Err(ConfigError::File {
                        path: path(),
                        message: unknown_knob(unknown, known.keys().map(String::as_str)),
                    });
                }
            }
            let from_file: Config = toml::from_str(text).map_err(|e| ConfigError::File {
                path: path(),
                message: e.to_string(),
            })?;
            value = serde_json::to_value(from_file).expect("config serialises");
        }
        let Value::Object(map) = &mut value else {
            unreachable!("config is a struct")
        };
        for (key, slot) in map.iter_mut() {
            let var = format!("TANJIREN_{}", key.to_uppercase());
            let Some(raw) = env(&var) else { continue };
            *slot = match slot {
                Value::String(_) => Value::String(raw),
                Value::Number(_) => raw
                    .trim()
                    .parse::<u64>()
                    .map(Value::from)
                    .map_err(|_| ConfigError::Env {
                        var: var.clone(),
                        message: format!("`{raw}` is not a non-negative integer"),
                    })?,
                Value::Bool(_) => raw
                    .trim()
                    .parse::<bool>()
                    .map(Value::Bool)
                    .map_err(|_| ConfigError::Env {
                        var: var.clone(),
                        message: format!("`{raw}` is not true or false"),
                    })?,
                other => unreachable!("config field {key} has unsupported type {other:?}"),
            };
        }
        let config: Config = serde_json::from_value(value).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.check()?;
        Ok(config)
    }

    /// Cross-field rules.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.heartbeat_interval_ms == 0 || self.heartbeat_interval_ms * 3 > self.lease_ttl_ms {
            return Err(ConfigError::Invalid(format!(
                "heartbeat_interval_ms ({}) must be between 1 and lease_ttl_ms / 3 ({})",
                self.heartbeat_interval_ms,
                self.lease_ttl_ms / 3
            )));
        }
        if !matches!(self.log_format.as_str(), "human" | "json") {
            return Err(ConfigError::Invalid(format!(
                "log_format must be `human` or `json`, not `{}`",
                self.log_format
            )));
        }
        if self.subject_prefix.is_empty()
            || !self
                .subject_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return Err(ConfigError::Invalid(
                "subject_prefix must be letters, digits, '_', '-' or '.'".into(),
            ));
        }
        if self.gateway_request_timeout_ms == 0 {
            return Err(ConfigError::Invalid("gateway_request_timeout_ms must be ≥ 1".into()));
        }
        let secret = self.gateway_console_secret.chars().count();
        if secret > 0 && secret < 32 {
            return Err(ConfigError::Invalid(
                "gateway_console_secret must be empty or at least 32 characters".into(),
            ));
        }
        let url = &self.gateway_public_url;
        if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
            return Err(ConfigError::Invalid(format!(
                "gateway_public_url must start with http:// or https://, not `{}`",
                self.gateway_public_url
            )));
        }
        if self.approval_token_ttl_secs == 0 || self.approval_deadline_secs == 0 {
            return Err(ConfigError::Invalid(
                "approval_token_ttl_secs and approval_deadline_secs must be ≥ 1".into(),
            ));
        }
        if self.default_max_attempts == 0 || self.default_max_attempts > 100 {
            return Err(ConfigError::Invalid(
                "default_max_attempts must be between 1 and 100".into(),
            ));
        }
        for (knob, value) in [("step_guard", &self.step_guard), ("step_cgroup", &self.step_cgroup)] {
            let v = value.trim();
            if !(v == "auto" || v == "off" || v.starts_with('/')) {
                return Err(ConfigError::Invalid(format!(
                    "{knob} must be `auto`, `off` or an absolute path, not `{value}`"
                )));
            }
        }
        self.worker_agent_info()?;
        if self.batch_max == 0
            || self.batch_max_bytes == 0
            || self.max_in_flight == 0
            || self.worker_concurrency == 0
            || self.nats_subscription_capacity == 0
        {
            return Err(ConfigError::Invalid(
                "batch_max, batch_max_bytes, max_in_flight, worker_concurrency and nats_subscription_capacity must be ≥ 1"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The agent the worker advertises (`worker_agent`, `worker_agent_model`); `None`
    /// when `worker_agent` is empty.
    ///
    /// # Errors
    /// `worker_agent` names no adapter, or the model is too long or not printable.
    pub fn worker_agent_info(&self) -> Result<Option<crate::agents::AgentInfo>, ConfigError> {
        // The adapter's own knobs are checked even without an adapter: a mistake in
        // them shows at once, not when an agent is turned on.
        self.worker_agent_temperature()?;
        let pointer = self.worker_agent_response_pointer.trim();
        if !(pointer.is_empty() || pointer.starts_with('/')) {
            return Err(ConfigError::Invalid(format!(
                "worker_agent_response_pointer must be empty or a JSON Pointer starting with `/`, not `{pointer}`"
            )));
        }
        crate::agents::ToolAllowList::parse(&self.worker_agent_tools)
            .map_err(|e| ConfigError::Invalid(format!("worker_agent_tools: {e}")))?;
        let adapter = self.worker_agent.trim();
        if adapter.is_empty() {
            return Ok(None);
        }
        let adapter = adapter.parse::<crate::agents::AgentAdapter>().map_err(|_| {
            ConfigError::Invalid(format!(
                "worker_agent must be empty, `openai` or `command`, not `{}`",
                self.worker_agent
            ))
        })?;
        let model = self.worker_agent_model.trim();
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        match adapter {
            crate::agents::AgentAdapter::Command if self.worker_agent_command.trim().is_empty() => {
                return invalid(
                    "worker_agent `command` needs worker_agent_command, the CLI agent's command line".into(),
                );
            }
            crate::agents::AgentAdapter::Openai if model.is_empty() => {
                return invalid("worker_agent `openai` needs worker_agent_model, the model to ask for".into());
            }
            crate::agents::AgentAdapter::Openai
                if !(self.worker_agent_base_url.starts_with("http://")
                    || self.worker_agent_base_url.starts_with("https://")) =>
            {
                return invalid(format!(
                    "worker_agent_base_url must be an http or https URL, not `{}`",
                    self.worker_agent_base_url
                ));
            }
            _ => {}
        }
        let info = crate::agents::AgentInfo {
            adapter,
            model: (!model.is_empty()).then(|| model.to_string()),
        };
        info.validate("worker_agent_model")
            .map_err(|e| ConfigError::Invalid(e.message))?;
        Ok(Some(info))
    }

    /// `worker_agent_temperature` as a number; `None` when empty.
    ///
    /// # Errors
    /// Not a number between 0 and 2.
    pub fn worker_agent_temperature(&self) -> Result<Option<f64>, ConfigError> {
        let raw = self.worker_agent_temperature.trim();
        if raw.is_empty() {
            return Ok(None);
        }
        match raw.parse::<f64>() {
            Ok(t) if (0.0..=2.0).contains(&t) => Ok(Some(t)),
            _ => Err(ConfigError::Invalid(format!(
                "worker_agent_temperature must be empty or a number from 0 to 2, not `{raw}`"
            ))),
        }
    }

    /// The retry policy of a task that sets none (the organisation default).
    pub fn default_retry_policy(&self) -> crate::model::RetryPolicy {
        crate::model::RetryPolicy {
            max_attempts: self.default_max_attempts,
            ..crate::model::RetryPolicy::default()
        }
    }

    /// The subject builder for this configuration.
    pub fn subjects(&self) -> crate::subjects::Subjects {
        crate::subjects::Subjects::new(&self.subject_prefix)
    }

    /// Where the token lives when not given directly: `token_file`, else
    /// `tanjiren/token` under `config_home` (`$XDG_CONFIG_HOME` or `~/.config`).
    pub fn token_path(&self, config_home: &std::path::Path) -> std::path::PathBuf {
        if !self.token_file.is_empty() {
            return self.token_file.clone().into();
        }
        config_home.join("tanjiren").join("token")
    }

    /// A URL with any password replaced by `***`, for logs and error messages.
    pub fn redact_url(raw: &str) -> String {
        match url::Url::parse(raw) {
            Ok(mut parsed) if parsed.password().is_some() => {
                // Fails only for URLs that cannot have credentials, and those have none.
                let _ = parsed.set_password(Some("***"));
                parsed.to_string()
            }
            Ok(_) => raw.to_string(),
            // Not a URL we can read: show no part of it that could hold a secret.
            Err(_) if raw.contains('@') => "<a URL that does not parse>".to_string(),
            Err(_) => raw.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| m.get(k).cloned()
    }

    #[test]
    fn defaults_file_then_env() {
        let c = Config::layered(None, None, env(&[])).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.lease_ttl_ms, 90_000);

        let file = "lease_ttl_ms = 9000\nheartbeat_interval_ms = 3000\nsubject_prefix = \"file\"\n";
        let c = Config::layered(Some(file), None, env(&[])).unwrap();
        assert_eq!((c.lease_ttl_ms, c.subject_prefix.as_str()), (9000, "file"));

        let c = Config::layered(
            Some(file),
            None,
            env(&[("TANJIREN_SUBJECT_PREFIX", "env"), ("TANJIREN_LEASE_TTL_MS", "12000")]),
        )
        .unwrap();
        assert_eq!(
            (c.lease_ttl_ms, c.subject_prefix.as_str(), c.heartbeat_interval_ms),
            (12000, "env", 3000)
        );
    }

    #[test]
    fn bad_values_name_their_source() {
        let e = Config::layered(None, None, env(&[("TANJIREN_LEASE_TTL_MS", "soon")])).unwrap_err();
        assert!(e.to_string().contains("TANJIREN_LEASE_TTL_MS"), "{e}");
        let e = Config::layered(Some("no_such_knob = 1"), None, env(&[])).unwrap_err();
        assert!(e.to_string().contains("no_such_knob"), "{e}");
        let e = Config::layered(None, None, env(&[("TANJIREN_HEARTBEAT_INTERVAL_MS", "60000")])).unwrap_err();
        assert!(e.to_string().contains("heartbeat_interval_ms"), "{e}");
    }

    #[test]
    fn containment_knobs_take_auto_off_or_an_absolute_path() {
        let c = Config::layered(None, None, env(&[])).unwrap();
        assert_eq!((c.step_guard.as_str(), c.step_cgroup.as_str()), ("auto", "auto"));
        let c = Config::layered(
            None,
            None,
            env(&[
                ("TANJIREN_STEP_GUARD", "/usr/bin/tanjiren"),
                ("TANJIREN_STEP_CGROUP", "off"),
                ("TANJIREN_WORKER_STATE_DIR", "/srv/tanjiren"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (
                c.step_guard.as_str(),
                c.step_cgroup.as_str(),
                c.worker_state_dir.as_str()
            ),
            ("/usr/bin/tanjiren", "off", "/srv/tanjiren")
        );
        let e = Config::layered(None, None, env(&[("TANJIREN_STEP_GUARD", "tanjiren")])).unwrap_err();
        assert!(e.to_string().contains("step_guard"), "{e}");
        let e = Config::layered(None, None, env(&[("TANJIREN_STEP_CGROUP", "yes")])).unwrap_err();
        assert!(e.to_string().contains("step_cgroup"), "{e}");
    }

    #[test]
    fn a_misspelt_knob_is_named_with_the_nearest_one() {
        let e = Config::layered(Some("worker_agent_modle = \"x\""), None, env(&[])).unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown knob `worker_agent_modle`; did you mean `worker_agent_model`?"),
            "{e}"
        );
        let e = Config::layered(Some("flux_capacitor = 1"), None, env(&[])).unwrap_err();
        assert!(e.to_string().contains("unknown knob `flux_capacitor` (docs"), "{e}");
    }

    #[test]
    fn the_temperature_is_a_number_in_a_file_or_text_anywhere() {
        let c = Config::layered(Some("worker_agent_temperature = 0.2"), None, env(&[])).unwrap();
        assert_eq!(c.worker_agent_temperature().unwrap(), Some(0.2));
        let c = Config::layered(Some("worker_agent_temperature = \"1\""), None, env(&[])).unwrap();
        assert_eq!(c.worker_agent_temperature().unwrap(), Some(1.0));
        let c = Config::layered(None, None, env(&[("TANJIREN_WORKER_AGENT_TEMPERATURE", "0.7")])).unwrap();
        assert_eq!(c.worker_agent_temperature().unwrap(), Some(0.7));
        let e = Config::layered(Some("worker_agent_temperature = 5"), None, env(&[])).unwrap_err();
        assert!(e.to_string().contains("worker_agent_temperature"), "{e}");
        assert_eq!(Config::default().worker_agent_temperature().unwrap(), None);
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            Config::redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(Config::redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(Config::redact_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(Config::redact_url("redis://:p%40ss@h:6379/0"), "redis://:***@h:6379/0");
        assert_eq!(Config::redact_url("nats://user:pa:ss@h:4222"), "nats://user:***@h:4222");
    }
}
