//! Doctrine: an organisation's versioned rule set that decides, for each task,
//! whether a human must approve it and at which class (DESIGN §4).
//!
//! This module parses and validates a doctrine document — every error names the
//! rule at fault — and evaluates a task against it: every rule whose conditions
//! all hold matches, and the highest class among the matches wins. It is pure: it
//! never reads or stores anything. The approval service stores the versions,
//! snapshots each task's verdict and acts on it.
//!
//! The document (JSON; `docs/protocol.md` §"Doctrine" is the reference):
//!
//! ```json
//! {"description": "prod needs an owner", "rules": [
//!   {"name": "prod-writes", "class": "production_mutation", "require_reason": true, "require_owner": true,
//!    "match": {"labels": {"env": "production"}, "modes": ["command", "prompt"]}},
//!   {"name": "package-installs", "class": "sensitive_write",
//!    "match": {"text": "\\b(apt|yum|pip) install\\b"}}
//! ]}
//! ```

use crate::model::{Mode, UnknownVariant, unknown_variant, validate_workstation_name};
use regex::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};

/// Most rules one doctrine may hold.
pub const MAX_RULES: usize = 500;
/// Longest regular expression accepted, in bytes.
pub const MAX_PATTERN_BYTES: usize = 4096;
/// Largest doctrine document, in bytes of its JSON form: `doctrine.get` returns it
/// whole, so it must fit a reply with room to spare.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Most workstation names one rule's `match.workstations` may list.
pub const MAX_RULE_WORKSTATIONS: usize = 1000;
/// Largest compiled regular expression accepted (bounds memory and matching time).
const MAX_COMPILED_REGEX_BYTES: usize = 1 << 20;
/// Label value that matches any value of the key (the label only has to be present).
pub const ANY_LABEL_VALUE: &str = "*";

/// How much human scrutiny a task needs. Ordered: a higher class is stricter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case", parse_err_ty = UnknownVariant, parse_err_fn = unknown_variant::<Self>)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum ApprovalClass {
    /// No approval needed: the task is queued at once.
    None,
    SensitiveWrite,
    ProductionMutation,
}

crate::model::text_enum!(ApprovalClass);

impl ApprovalClass {
    /// Whether a task of this class waits for a decision.
    pub fn requires_approval(&self) -> bool {
        *self != ApprovalClass::None
    }
}

/// A doctrine document as written and stored.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DoctrineDocument {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub rules: Vec<RuleSpec>,
}

/// One rule as written: when every condition of `match` holds, the task needs `class`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RuleSpec {
    /// Unique in the doctrine; 1–100 of `A-Z a-z 0-9 . _ -`. Shown to approvers.
    pub name: String,
    /// `sensitive_write` or `production_mutation`.
    pub class: ApprovalClass,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// A decision on a task this rule matched must give a reason.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_reason: bool,
    /// Only an owner may approve a task this rule matched (an admin may still reject).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub require_owner: bool,
    #[serde(rename = "match")]
    pub conditions: RuleConditions,
}

/// The conditions of a rule; at least one is required and all must hold.
/// `workstations` and `labels` are about targets: one target must satisfy both.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RuleConditions {
    /// The task's mode is one of these (`command`, `prompt`, `investigate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modes: Option<Vec<String>>,
    /// A target workstation has one of these names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workstations: Option<Vec<String>>,
    /// A target workstation carries every one of these labels (`"*"`: any value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// A regular expression found in the command, the prompt, or any question.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// A regular expression found in the intent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intent: Option<String>,
    /// A target workstation's AI agent uses one of these adapters (`openai`,
    /// `command`), as its worker advertises.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agents: Option<Vec<String>>,
    /// A regular expression found in the model a target workstation's agent
    /// advertises (a workstation advertising no model never matches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
}

/// A doctrine that cannot be published, and where the fault is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{location}: {message}")]
pub struct DoctrineError {
    /// `rule "prod-writes" (rules[2])`, `rules[4]` for a rule without a usable name, or `doctrine`.
    pub location: String,
    pub message: String,
}

impl DoctrineError {
    fn doctrine(message: impl Into<String>) -> Self {
        Self {
            location: "doctrine".into(),
            message: message.into(),
        }
    }
}

impl From<DoctrineError> for crate::WireError {
    fn from(e: DoctrineError) -> Self {
        crate::WireError::invalid(format!("doctrine rejected, nothing was published: {e}"))
    }
}

/// What doctrine needs to know about one target workstation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TargetFacts {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The AI agent the workstation advertises, if any.
    pub agent: Option<crate::agents::AgentInfo>,
}

/// What doctrine needs to know about a task.
#[derive(Clone, Copy, Debug)]
pub struct TaskFacts<'a> {
    pub intent: &'a str,
    pub mode: &'a Mode,
    pub targets: &'a [TargetFacts],
}

/// A rule that matched a task, as kept in the task's snapshot and shown to approvers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MatchedRule {
    pub name: String,
    pub class: ApprovalClass,
    #[serde(default)]
    pub require_reason: bool,
    #[serde(default)]
    pub require_owner: bool,
}

/// Doctrine's verdict on one task: the highest matching class and every rule that matched.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Verdict {
    pub approval_class: ApprovalClass,
    #[serde(default)]
    pub matched_rules: Vec<MatchedRule>,
    /// Some matched rule requires a decision to give a reason.
    #[serde(default)]
    pub reason_required: bool,
}

impl Verdict {
    /// The verdict when the organisation has no doctrine: nothing needs approval.
    pub fn no_doctrine() -> Self {
        Self {
            approval_class: ApprovalClass::None,
            matched_rules: Vec::new(),
            reason_required: false,
        }
    }
}

/// A validated doctrine, ready to evaluate tasks (regular expressions compiled once).
#[derive(Clone, Debug)]
pub struct Doctrine {
    rules: Vec<Rule>,
}

#[derive(Clone, Debug)]
struct Rule {
    name: String,
    class: ApprovalClass,
    require_reason: bool,
    require_owner: bool,
    modes: Option<Vec<String>>,
    workstations: Option<Vec<String>>,
    labels: Option<BTreeMap<String, String>>,
    text: Option<Regex>,
    intent: Option<Regex>,
    agents: Option<Vec<crate::agents::AgentAdapter>>,
    model: Option<Regex>,
}

impl Doctrine {
    /// Parses and validates a document given as JSON (or any self-describing
    /// payload decoded to a JSON value). Rules are read one by one so that every
    /// error, even a misspelt field, names its rule.
    pub fn from_value(value: &serde_json::Value) -> Result<Self, DoctrineError> {
        let serde_json::Value::Object(top) = value else {
            return Err(DoctrineError::doctrine(
                "must be an object with a `rules` list, e.g. {\"rules\": []}",
            ));
        };
        let size = crate::codec::json_size(value);
        if size > MAX_DOCUMENT_BYTES {
            return Err(DoctrineError::doctrine(format!(
                "the document is {size} bytes as JSON, more than the limit of {MAX_DOCUMENT_BYTES}"
            )));
        }
        if let Some(unknown) = top.keys().find(|k| !matches!(k.as_str(), "rules" | "description")) {
            return Err(DoctrineError::doctrine(format!(
                "unknown field `{unknown}`; expected `rules` or `description`"
            )));
        }
        if let Some(d) = top.get("description")
            && !d.is_string()
            && !d.is_null()
        {
            return Err(DoctrineError::doctrine("description: must be a string"));
        }
        let Some(serde_json::Value::Array(raw_rules)) = top.get("rules") else {
            return Err(DoctrineError::doctrine("rules: a list of rules is required"));
        };
        let mut specs = Vec::with_capacity(raw_rules.len());
        for (i, raw) in raw_rules.iter().enumerate() {
            let spec = serde_json::from_value::<RuleSpec>(raw.clone()).map_err(|e| DoctrineError {
                location: raw_location(i, raw),
                message: e.to_string(),
            })?;
            specs.push(spec);
        }
        let description = top.get("description").and_then(|d| d.as_str()).map(str::to_string);
        Self::from_document(&DoctrineDocument {
            description,
            rules: specs,
        })
    }

    /// Validates a typed document.
    pub fn from_document(doc: &DoctrineDocument) -> Result<Self, DoctrineError> {
        if doc.rules.len() > MAX_RULES {
            return Err(DoctrineError::doctrine(format!(
                "rules: {} rules exceed the limit of {MAX_RULES}",
                doc.rules.len()
            )));
        }
        if doc.description.as_ref().is_some_and(|d| d.len() > 4096) {
            return Err(DoctrineError::doctrine("description: longer than 4096 bytes"));
        }
        let mut names = HashSet::with_capacity(doc.rules.len());
        let mut rules = Vec::with_capacity(doc.rules.len());
        for (i, spec) in doc.rules.iter().enumerate() {
            let location = rule_location(i, &spec.name);
            let fail = |message: String| DoctrineError {
                location: location.clone(),
                message,
            };
            validate_rule_name(&spec.name).map_err(&fail)?;
            if !names.insert(spec.name.as_str()) {
                return Err(fail(format!(
                    "name: `{}` is used by an earlier rule; names must be unique",
                    spec.name
                )));
            }
            rules.push(compile_rule(spec).map_err(fail)?);
        }
        Ok(Self { rules })
    }

    pub fn rule_count(&self) -> usize {
        self.rules.len()
    }

    /// Every rule whose conditions all hold matches; the highest class among them wins.
    pub fn evaluate(&self, task: &TaskFacts<'_>) -> Verdict {
        let matched: Vec<MatchedRule> = self
            .rules
            .iter()
            .filter(|r| r.matches(task))
            .map(|r| MatchedRule {
                name: r.name.clone(),
                class: r.class,
                require_reason: r.require_reason,
                require_owner: r.require_owner,
            })
            .collect();
        Verdict {
            approval_class: matched.iter().map(|m| m.class).max().unwrap_or(ApprovalClass::None),
            reason_required: matched.iter().any(|m| m.require_reason),
            matched_rules: matched,
        }
    }
}

impl Rule {
    fn matches(&self, task: &TaskFacts<'_>) -> bool {
        if let Some(modes) = &self.modes
            && !modes.iter().any(|m| m == task.mode.name())
        {
            return false;
        }
        if let Some(re) = &self.intent
            && !re.is_match(task.intent)
        {
            return false;
        }
        if let Some(re) = &self.text {
            let found = match task.mode {
                Mode::Command { command } => re.is_match(command),
                Mode::Prompt { prompt } => re.is_match(prompt),
                Mode::Investigate { questions } => questions.iter().any(|q| re.is_match(q)),
            };
            if !found {
                return false;
            }
        }
        if self.workstations.is_none() && self.labels.is_none() && self.agents.is_none() && self.model.is_none() {
            return true;
        }
        // Target conditions: one target must satisfy all of them.
        task.targets.iter().any(|t| self.target_matches(t))
    }

    fn target_matches(&self, target: &TargetFacts) -> bool {
        if let Some(names) = &self.workstations
            && !names.contains(&target.name)
        {
            return false;
        }
        if let Some(adapters) = &self.agents
            && !target.agent.as_ref().is_some_and(|a| adapters.contains(&a.adapter))
        {
            return false;
        }
        if let Some(re) = &self.model
            && !target
                .agent
                .as_ref()
                .and_then(|a| a.model.as_deref())
                .is_some_and(|m| re.is_match(m))
        {
            return false;
        }
        if let Some(labels) = &self.labels {
            return labels.iter().all(|(k, want)| match target.labels.get(k) {
                Some(have) => want == ANY_LABEL_VALUE || have == want,
                None => false,
            });
        }
        true
    }
}

fn compile_rule(spec: &RuleSpec) -> Result<Rule, String> {
    if spec.class == ApprovalClass::None {
        return Err("class: `none` has no effect (a rule can only raise a task's class); \
                    use `sensitive_write` or `production_mutation`"
            .into());
    }
    if spec.description.as_ref().is_some_and(|d| d.len() > 4096) {
        return Err("description: longer than 4096 bytes".into());
    }
    let c = &spec.conditions;
    if c.modes.is_none()
        && c.workstations.is_none()
        && c.labels.is_none()
        && c.text.is_none()
        && c.intent.is_none()
        && c.agents.is_none()
        && c.model.is_none()
    {
        return Err(
            "match: give at least one condition (modes, workstations, labels, text, intent, agents, model); \
                    to match every task use \"modes\": [\"command\", \"prompt\", \"investigate\"]"
                .into(),
        );
    }
    if let Some(modes) = &c.modes {
        if modes.is_empty() {
            return Err("match.modes: must not be empty".into());
        }
        if let Some(bad) = modes
            .iter()
            .find(|m| !matches!(m.as_str(), "command" | "prompt" | "investigate"))
        {
            return Err(format!(
                "match.modes: unknown mode `{bad}`; expected command, prompt or investigate"
            ));
        }
    }
    if let Some(names) = &c.workstations {
        if names.is_empty() {
            return Err("match.workstations: must not be empty".into());
        }
        if names.len() > MAX_RULE_WORKSTATIONS {
            return Err(format!(
                "match.workstations: {} names exceed the limit of {MAX_RULE_WORKSTATIONS}",
                names.len()
            ));
        }
        if let Some(bad) = names.iter().find(|n| validate_workstation_name(n).is_err()) {
            return Err(format!(
                "match.workstations: `{}` is not a valid workstation name",
                crate::error::quote(bad)
            ));
        }
    }
    if let Some(labels) = &c.labels {
        if labels.is_empty() {
            return Err("match.labels: must not be empty".into());
        }
        if labels.keys().any(|k| k.trim().is_empty()) {
            return Err("match.labels: a label key must not be empty".into());
        }
        // A workstation can only carry labels within the registration limits.
        crate::model::validate_labels("match.labels", labels.iter()).map_err(|e| e.message)?;
    }
    let agents = match &c.agents {
        None => None,
        Some(list) if list.is_empty() => return Err("match.agents: must not be empty".into()),
        Some(list) => Some(
            list.iter()
                .map(|a| {
                    a.parse::<crate::agents::AgentAdapter>()
                        .map_err(|_| format!("match.agents: unknown adapter `{a}`; expected openai or command"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
    };
    Ok(Rule {
        agents,
        model: c
            .model
            .as_deref()
            .map(|p| compile_pattern("match.model", p))
            .transpose()?,
        name: spec.name.clone(),
        class: spec.class,
        require_reason: spec.require_reason,
        require_owner: spec.require_owner,
        modes: c.modes.clone(),
        workstations: c.workstations.clone(),
        labels: c.labels.clone(),
        text: c
            .text
            .as_deref()
            .map(|p| compile_pattern("match.text", p))
            .transpose()?,
        intent: c
            .intent
            .as_deref()
            .map(|p| compile_pattern("match.intent", p))
            .transpose()?,
    })
}

fn compile_pattern(field: &str, pattern: &str) -> Result<Regex, String> {
    if pattern.is_empty() {
        return Err(format!("{field}: the pattern must not be empty"));
    }
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(format!(
            "{field}: the pattern is {} bytes, more than {MAX_PATTERN_BYTES}",
            pattern.len()
        ));
    }
    RegexBuilder::new(pattern)
        .size_limit(MAX_COMPILED_REGEX_BYTES)
        .build()
        .map_err(|e| format!("{field}: invalid regular expression: {e}"))
}

fn validate_rule_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err("name: must be 1-100 characters of A-Z, a-z, 0-9, '.', '_' or '-'".into())
    }
}

fn rule_location(index: usize, name: &str) -> String {
    if name.is_empty() || name.len() > 100 {
        format!("rules[{index}]")
    } else {
        format!("rule \"{name}\" (rules[{index}])")
    }
}

fn raw_location(index: usize, raw: &serde_json::Value) -> String {
    match raw.get("name").and_then(|n| n.as_str()) {
        Some(name) => rule_location(index, name),
        None => format!("rules[{index}]"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doctrine(v: serde_json::Value) -> Doctrine {
        Doctrine::from_value(&v).unwrap_or_else(|e| panic!("valid doctrine rejected: {e}"))
    }

    fn target(name: &str, labels: &[(&str, &str)]) -> TargetFacts {
        TargetFacts {
            name: name.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            agent: None,
        }
    }

    fn verdict(d: &Doctrine, intent: &str, mode: Mode, targets: &[TargetFacts]) -> Verdict {
        d.evaluate(&TaskFacts {
            intent,
            mode: &mode,
            targets,
        })
    }

    fn cmd(c: &str) -> Mode {
        Mode::Command { command: c.into() }
    }

    fn names(v: &Verdict) -> Vec<&str> {
        v.matched_rules.iter().map(|m| m.name.as_str()).collect()
    }

    fn error(v: serde_json::Value) -> DoctrineError {
        Doctrine::from_value(&v).expect_err("invalid doctrine accepted")
    }

    #[test]
    fn no_rules_means_no_approval() {
        let d = doctrine(json!({"rules": []}));
        let v = verdict(&d, "x", cmd("rm -rf /"), &[target("a", &[])]);
        assert_eq!(v, Verdict::no_doctrine());
    }

    #[test]
    fn mode_rule() {
        let d = doctrine(json!({"rules": [
            {"name": "prompts", "class": "sensitive_write", "match": {"modes": ["prompt"]}}
        ]}));
        let t = [target("a", &[])];
        assert_eq!(verdict(&d, "x", cmd("ls"), &t).approval_class, ApprovalClass::None);
        let v = verdict(&d, "x", Mode::Prompt { prompt: "hi".into() }, &t);
        assert_eq!(v.approval_class, ApprovalClass::SensitiveWrite);
        assert_eq!(names(&v), ["prompts"]);
    }

    #[test]
    fn workstation_rule_matches_any_target() {
        let d = doctrine(json!({"rules": [
            {"name": "db", "class": "production_mutation", "match": {"workstations": ["db-01", "db-02"]}}
        ]}));
        assert_eq!(
            verdict(&d, "x", cmd("ls"), &[target("web-01", &[])]).approval_class,
            ApprovalClass::None
        );
        let v = verdict(&d, "x", cmd("ls"), &[target("web-01", &[]), target("db-02", &[])]);
        assert_eq!(v.approval_class, ApprovalClass::ProductionMutation);
    }

    #[test]
    fn label_rule_with_exact_and_any_value() {
        let d = doctrine(json!({"rules": [
            {"name": "prod", "class": "production_mutation", "match": {"labels": {"env": "production"}}},
            {"name": "has-gpu", "class": "sensitive_write", "match": {"labels": {"gpu": "*"}}}
        ]}));
        let staging = target("s", &[("env", "staging")]);
        let prod = target("p", &[("env", "production")]);
        let gpu = target("g", &[("gpu", "a100")]);
        assert_eq!(
            verdict(&d, "x", cmd("ls"), std::slice::from_ref(&staging)).approval_class,
            ApprovalClass::None
        );
        assert_eq!(
            verdict(&d, "x", cmd("ls"), &[staging.clone(), prod]).approval_class,
            ApprovalClass::ProductionMutation
        );
        let v = verdict(&d, "x", cmd("ls"), &[staging, gpu]);
        assert_eq!(
            (v.approval_class, names(&v)),
            (ApprovalClass::SensitiveWrite, vec!["has-gpu"])
        );
    }

    #[test]
    fn target_conditions_must_hold_on_the_same_target() {
        let d = doctrine(json!({"rules": [
            {"name": "prod-db", "class": "production_mutation",
             "match": {"workstations": ["db-01"], "labels": {"env": "production"}}}
        ]}));
        // db-01 is staging and the production box is another one: no single target matches both.
        let split = [
            target("db-01", &[("env", "staging")]),
            target("web", &[("env", "production")]),
        ];
        assert_eq!(verdict(&d, "x", cmd("ls"), &split).approval_class, ApprovalClass::None);
        let same = [target("db-01", &[("env", "production"), ("tier", "data")])];
        assert_eq!(
            verdict(&d, "x", cmd("ls"), &same).approval_class,
            ApprovalClass::ProductionMutation
        );
    }

    #[test]
    fn text_rule_searches_command_prompt_and_questions() {
        let d = doctrine(json!({"rules": [
            {"name": "drops", "class": "production_mutation", "match": {"text": "(?i)\\bdrop\\s+table\\b"}}
        ]}));
        let t = [target("a", &[])];
        assert_eq!(
            verdict(&d, "x", cmd("psql -c 'DROP TABLE users'"), &t).approval_class,
            ApprovalClass::ProductionMutation
        );
        assert_eq!(
            verdict(&d, "x", cmd("psql -c 'select 1'"), &t).approval_class,
            ApprovalClass::None
        );
        let p = Mode::Prompt {
            prompt: "please drop table sessions".into(),
        };
        assert_eq!(
            verdict(&d, "x", p, &t).approval_class,
            ApprovalClass::ProductionMutation
        );
        let q = Mode::Investigate {
            questions: vec!["why slow?".into(), "should we drop table logs?".into()],
        };
        assert_eq!(
            verdict(&d, "x", q, &t).approval_class,
            ApprovalClass::ProductionMutation
        );
    }

    #[test]
    fn intent_rule() {
        let d = doctrine(json!({"rules": [
            {"name": "deploys", "class": "sensitive_write", "match": {"intent": "^deploy\\b"}}
        ]}));
        let t = [target("a", &[])];
        assert_eq!(
            verdict(&d, "deploy the site", cmd("make"), &t).approval_class,
            ApprovalClass::SensitiveWrite
        );
        assert_eq!(
            verdict(&d, "redeploy later", cmd("make"), &t).approval_class,
            ApprovalClass::None
        );
    }

    #[test]
    fn all_conditions_of_a_rule_must_hold() {
        let d = doctrine(json!({"rules": [
            {"name": "prod-commands", "class": "production_mutation",
             "match": {"modes": ["command"], "labels": {"env": "production"}, "text": "restart"}}
        ]}));
        let prod = [target("p", &[("env", "production")])];
        assert_eq!(
            verdict(&d, "x", cmd("systemctl restart nginx"), &prod).approval_class,
            ApprovalClass::ProductionMutation
        );
        assert_eq!(
            verdict(&d, "x", cmd("systemctl status nginx"), &prod).approval_class,
            ApprovalClass::None
        );
        let p = Mode::Prompt {
            prompt: "restart it".into(),
        };
        assert_eq!(verdict(&d, "x", p, &prod).approval_class, ApprovalClass::None);
    }

    #[test]
    fn highest_class_wins_and_every_match_is_listed() {
        let d = doctrine(json!({"rules": [
            {"name": "all-commands", "class": "sensitive_write", "match": {"modes": ["command"]}},
            {"name": "prod", "class": "production_mutation", "require_reason": true,
             "match": {"labels": {"env": "production"}}},
            {"name": "installs", "class": "sensitive_write", "match": {"text": "install"}}
        ]}));
        let v = verdict(&d, "x", cmd("apt install jq"), &[target("p", &[("env", "production")])]);
        assert_eq!(v.approval_class, ApprovalClass::ProductionMutation);
        assert_eq!(names(&v), ["all-commands", "prod", "installs"]);
        assert!(v.reason_required);
        // The order of rules does not matter.
        let v = verdict(&d, "x", cmd("apt install jq"), &[target("s", &[("env", "staging")])]);
        assert_eq!(v.approval_class, ApprovalClass::SensitiveWrite);
        assert!(!v.reason_required);
    }

    #[test]
    fn errors_name_the_rule() {
        let e = error(json!({"rules": [
            {"name": "fine", "class": "sensitive_write", "match": {"modes": ["command"]}},
            {"name": "broken", "class": "production_mutation", "match": {"text": "(unclosed"}}
        ]}));
        assert_eq!(e.location, "rule \"broken\" (rules[1])");
        assert!(e.message.starts_with("match.text: invalid regular expression"), "{e}");

        let e = error(json!({"rules": [{"name": "typo", "class": "sensitive_write", "match": {"lables": {}}}]}));
        assert_eq!(e.location, "rule \"typo\" (rules[0])");
        assert!(e.message.contains("lables"), "{e}");

        let e = error(json!({"rules": [{"name": "c", "class": "critical", "match": {"modes": ["command"]}}]}));
        assert!(e.location.contains("\"c\"") && e.message.contains("critical"), "{e}");

        let e = error(json!({"rules": [{"class": "sensitive_write", "match": {"modes": ["command"]}}]}));
        assert_eq!(e.location, "rules[0]");
        assert!(e.message.contains("name"), "{e}");
    }

    #[test]
    fn invalid_rules_are_refused() {
        let rule = |name: &str, class: &str, m: serde_json::Value| json!({"rules": [{"name": name, "class": class, "match": m}]});
        let cases = [
            (rule("x", "none", json!({"modes": ["command"]})), "class: `none`"),
            (rule("x", "sensitive_write", json!({})), "match: give at least one"),
            (
                rule("x", "sensitive_write", json!({"modes": []})),
                "match.modes: must not be empty",
            ),
            (
                rule("x", "sensitive_write", json!({"modes": ["shell"]})),
                "unknown mode `shell`",
            ),
            (rule("x", "sensitive_write", json!({"labels": {}})), "match.labels"),
            (
                rule("x", "sensitive_write", json!({"workstations": ["a b"]})),
                "match.workstations",
            ),
            (rule("x", "sensitive_write", json!({"intent": ""})), "match.intent"),
            (
                rule("bad name", "sensitive_write", json!({"modes": ["command"]})),
                "name:",
            ),
        ];
        for (doc, want) in cases {
            let e = error(doc.clone());
            assert!(e.to_string().contains(want), "{doc}: {e}");
        }
        let dup = json!({"rules": [
            {"name": "a", "class": "sensitive_write", "match": {"modes": ["command"]}},
            {"name": "a", "class": "sensitive_write", "match": {"modes": ["prompt"]}}
        ]});
        let e = error(dup);
        assert_eq!(e.location, "rule \"a\" (rules[1])");
        assert!(e.message.contains("unique"));

        assert_eq!(error(json!([])).location, "doctrine");
        assert!(error(json!({"rule": []})).message.contains("unknown field `rule`"));
        assert!(error(json!({})).message.contains("rules"));
        let huge = "a".repeat(MAX_PATTERN_BYTES + 1);
        assert!(
            error(rule("x", "sensitive_write", json!({"text": huge})))
                .message
                .contains("bytes")
        );
    }

    #[test]
    fn typed_documents_round_trip_through_json() {
        let doc = DoctrineDocument {
            description: Some("prod needs an owner".into()),
            rules: vec![RuleSpec {
                name: "prod".into(),
                class: ApprovalClass::ProductionMutation,
                description: None,
                require_reason: true,
                require_owner: true,
                conditions: RuleConditions {
                    labels: Some([("env".to_string(), "production".to_string())].into()),
                    ..RuleConditions::default()
                },
            }],
        };
        let value = serde_json::to_value(&doc).unwrap();
        assert_eq!(value["rules"][0]["match"]["labels"]["env"], "production");
        assert_eq!(Doctrine::from_value(&value).unwrap().rule_count(), 1);
        assert_eq!(serde_json::from_value::<DoctrineDocument>(value).unwrap(), doc);
    }

    #[test]
    fn the_module_example_is_valid() {
        let example = r#"{"description": "prod needs an owner", "rules": [
          {"name": "prod-writes", "class": "production_mutation", "require_reason": true,
           "match": {"labels": {"env": "production"}, "modes": ["command", "prompt"]}},
          {"name": "package-installs", "class": "sensitive_write",
           "match": {"text": "\\b(apt|yum|pip) install\\b"}}
        ]}"#;
        let d = doctrine(serde_json::from_str(example).unwrap());
        let v = verdict(&d, "x", cmd("pip install requests"), &[target("a", &[])]);
        assert_eq!(names(&v), ["package-installs"]);
    }

    #[test]
    fn classes_order_and_parse() {
        assert!(ApprovalClass::ProductionMutation > ApprovalClass::SensitiveWrite);
        assert!(ApprovalClass::SensitiveWrite > ApprovalClass::None);
        for c in ApprovalClass::ALL {
            assert_eq!(c.as_str().parse::<ApprovalClass>().unwrap(), *c);
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
        assert!("critical".parse::<ApprovalClass>().is_err());
    }

    #[test]
    fn agent_rules_match_the_targets_adapter_and_model() {
        let d = doctrine(serde_json::json!({"rules": [
            {"name": "hosted-prompts", "class": "sensitive_write",
             "match": {"modes": ["prompt", "investigate"], "agents": ["openai"], "model": "^gpt-"}},
            {"name": "cli-agents", "class": "production_mutation", "match": {"agents": ["command"]}}
        ]}));
        let with = |adapter: crate::agents::AgentAdapter, model: Option<&str>| TargetFacts {
            agent: Some(crate::agents::AgentInfo {
                adapter,
                model: model.map(str::to_string),
            }),
            ..target("ws", &[])
        };
        let prompt = || Mode::Prompt { prompt: "hi".into() };
        use crate::agents::AgentAdapter::{Command, Openai};
        let v = verdict(&d, "x", prompt(), &[with(Openai, Some("gpt-4.1-mini"))]);
        assert_eq!(v.approval_class, ApprovalClass::SensitiveWrite);
        let v = verdict(&d, "x", prompt(), &[with(Openai, Some("llama3.2"))]);
        assert_eq!(v.approval_class, ApprovalClass::None, "another model");
        let v = verdict(&d, "x", prompt(), &[with(Openai, None)]);
        assert_eq!(v.approval_class, ApprovalClass::None, "no model advertised");
        let v = verdict(&d, "x", prompt(), &[target("plain", &[]), with(Command, None)]);
        assert_eq!(v.matched_rules.len(), 1);
        assert_eq!(v.matched_rules[0].name, "cli-agents");
        let v = verdict(&d, "x", prompt(), &[target("plain", &[])]);
        assert_eq!(v.approval_class, ApprovalClass::None, "no agent at all");
        let bad = Doctrine::from_value(&serde_json::json!({"rules": [
            {"name": "r", "class": "sensitive_write", "match": {"agents": ["gpt"]}}
        ]}))
        .unwrap_err();
        assert!(bad.message.contains("match.agents"), "{bad}");
        let bad = Doctrine::from_value(&serde_json::json!({"rules": [
            {"name": "r", "class": "sensitive_write", "match": {"model": "("}}
        ]}))
        .unwrap_err();
        assert!(bad.message.contains("match.model"), "{bad}");
    }
}
