//! The AI agent a workstation runs `prompt` and `investigate` steps with (issue 11):
//! which adapter its worker has and, when known, the model, as the worker
//! advertises them at registration (operators see it, doctrine matches on it, and a
//! task that needs an agent is refused at creation for a workstation without one);
//! what a step reports about its agent's answer ([`AgentReport`]); and the pure
//! rules of an investigation's conversation: how each question is put to the agent
//! with the earlier answers as context, and how the closing summary is asked for.

use crate::error::WireError;
use crate::model::{UnknownVariant, text_enum, unknown_variant};
use serde::{Deserialize, Serialize};

/// How the worker talks to its agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[derive(strum::Display, strum::EnumString, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case", parse_err_ty = UnknownVariant, parse_err_fn = unknown_variant::<Self>)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum AgentAdapter {
    /// An OpenAI-compatible Chat Completions server over HTTP (hosted, Ollama, vLLM, …).
    Openai,
    /// A CLI agent run as a process (`claude -p`, `codex exec`, …).
    Command,
}

text_enum!(AgentAdapter);

/// Longest model name accepted, in bytes.
pub const MAX_MODEL_BYTES: usize = 200;

/// A model name as an agent reported it, made safe to store and print: control
/// characters dropped, cut to [`MAX_MODEL_BYTES`] on a character boundary (the rule
/// [`AgentInfo::validate`] enforces on what workers advertise).
pub fn clean_model(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len().min(MAX_MODEL_BYTES));
    for c in raw.chars().filter(|c| !c.is_control()) {
        if out.len() + c.len_utf8() > MAX_MODEL_BYTES {
            break;
        }
        out.push(c);
    }
    out
}

/// What a workstation advertises about its agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentInfo {
    pub adapter: AgentAdapter,
    /// The model, when the adapter names one (`llama3.1:8b`, `gpt-4.1-mini`, …).
    #[serde(default)]
    pub model: Option<String>,
}

impl AgentInfo {
    /// Checks the model name: at most [`MAX_MODEL_BYTES`], no control characters.
    ///
    /// # Errors
    /// `invalid_request` naming `field`.
    pub fn validate(&self, field: &str) -> Result<(), WireError> {
        if let Some(m) = &self.model {
            if m.len() > MAX_MODEL_BYTES {
                return Err(WireError::invalid(format!(
                    "{field}.model: at most {MAX_MODEL_BYTES} bytes"
                )));
            }
            if m.chars().any(char::is_control) {
                return Err(WireError::invalid(format!(
                    "{field}.model: control characters are not allowed"
                )));
            }
        }
        Ok(())
    }
}

/// Longest response kept from an agent, in bytes (the artifact and the result carry at
/// most this much; the step's log has the whole stream, within the log cap). Below
/// NATS's 1 MiB payload limit with room for the rest of a result.
pub const MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Appended to a response cut at [`MAX_RESPONSE_BYTES`].
pub const RESPONSE_CUT_MARK: &str = "\n[… response cut at 256 KiB; the step's log has more]";

/// Tokens an agent reports having used for a step (summed over every request of it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenUsage {
    /// Prompt tokens (`prompt_tokens` in OpenAI's `usage`).
    pub input_tokens: u64,
    /// Generated tokens (`completion_tokens`).
    pub output_tokens: u64,
}

impl TokenUsage {
    /// Adds another request's usage.
    pub fn add(&mut self, other: TokenUsage) {
        self.input_tokens = self.input_tokens.saturating_add(other.input_tokens);
        self.output_tokens = self.output_tokens.saturating_add(other.output_tokens);
    }
}

/// What a `prompt` or `investigate` step's agent produced, carried in its result.
///
/// For `prompt`, `response` is the agent's answer and becomes the task's `response`
/// artifact for this workstation; for `investigate`, it is the closing summary of this
/// run's answers and becomes a `summary` artifact of the investigation (the answers
/// themselves were stored one by one as `evidence` while the step ran). Empty when the
/// step ended before the agent answered.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AgentReport {
    /// At most [`MAX_RESPONSE_BYTES`] (cut with [`RESPONSE_CUT_MARK`]).
    #[serde(default)]
    pub response: String,
    /// The model that answered, as the agent names it (may differ from the one asked for).
    #[serde(default)]
    pub model: Option<String>,
    /// When the agent reports it.
    #[serde(default)]
    pub usage: Option<TokenUsage>,
}

/// `text` cut to at most [`MAX_RESPONSE_BYTES`] on a character boundary, marked when cut.
pub fn bound_response(mut text: String) -> String {
    if text.len() <= MAX_RESPONSE_BYTES {
        return text;
    }
    let end = crate::logs::cut_at_boundary(&text, MAX_RESPONSE_BYTES - RESPONSE_CUT_MARK.len()).len();
    text.truncate(end);
    text.push_str(RESPONSE_CUT_MARK);
    text
}

/// One turn of a conversation with an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Turn {
    pub role: Role,
    pub content: String,
}

/// Who speaks in a [`Turn`] (the Chat Completions roles).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

/// What every conversation starts with: what Tanjiren asks of the agent.
pub const SYSTEM_PROMPT: &str = "You are the AI agent on a workstation managed by Tanjiren. \
Answer the operator's request about this workstation precisely and concisely.";

/// The conversation of a `prompt` step: the system turn, then the prompt.
pub fn prompt_turns(prompt: &str) -> Vec<Turn> {
    vec![
        Turn {
            role: Role::System,
            content: SYSTEM_PROMPT.into(),
        },
        Turn {
            role: Role::User,
            content: prompt.into(),
        },
    ]
}

/// The conversation that puts question `index` (0-based) of an investigation to the
/// agent: the system turn, then every earlier question with its answer, then this
/// question. `answers` holds the answers to questions `0..index`.
///
/// # Panics
/// If `index` is out of `questions` or `answers` is shorter than `index`.
pub fn question_turns(questions: &[String], answers: &[String], index: usize) -> Vec<Turn> {
    let mut turns = vec![Turn {
        role: Role::System,
        content: format!(
            "{SYSTEM_PROMPT} You are answering the questions of an investigation of this workstation, in order: \
             answer each with the evidence you find; the earlier questions and your answers are given."
        ),
    }];
    push_answered(&mut turns, &questions[..index], &answers[..index]);
    turns.push(Turn {
        role: Role::User,
        content: questions[index].clone(),
    });
    turns
}

/// Each question followed by its answer.
fn push_answered(turns: &mut Vec<Turn>, questions: &[String], answers: &[String]) {
    for (q, a) in questions.iter().zip(answers) {
        turns.push(Turn {
            role: Role::User,
            content: q.clone(),
        });
        turns.push(Turn {
            role: Role::Assistant,
            content: a.clone(),
        });
    }
}

/// The request for an investigation's closing summary: every question and answer of
/// this run, then the ask.
pub fn summary_turns(questions: &[String], answers: &[String]) -> Vec<Turn> {
    let mut turns = question_turns(questions, answers, 0);
    turns.pop();
    push_answered(&mut turns, questions, answers);
    turns.push(Turn {
        role: Role::User,
        content: SUMMARY_REQUEST.into(),
    });
    turns
}

/// The last question of every investigation run: the summary.
pub const SUMMARY_REQUEST: &str = "Summarise the findings of this investigation from the answers above: \
what was found, what it means, and what should be done next.";

/// A conversation as one text, for agents that take a single prompt (CLI agents): each
/// turn under a heading, the last user turn at the end. A `prompt` task's conversation
/// (only [`SYSTEM_PROMPT`] and one user turn) is that turn's text alone, so its prompt
/// reaches a CLI agent exactly as written; every question of an investigation keeps its
/// context, the first one too.
pub fn flatten(turns: &[Turn]) -> String {
    let rest: Vec<&Turn> = turns.iter().filter(|t| t.role != Role::System).collect();
    let plain_system = turns
        .iter()
        .filter(|t| t.role == Role::System)
        .all(|t| t.content == SYSTEM_PROMPT);
    if let ([only], true) = (rest.as_slice(), plain_system) {
        return only.content.clone();
    }
    let mut out = String::new();
    for t in turns {
        let heading = match t.role {
            Role::System => "Context",
            Role::User => "Question",
            Role::Assistant => "Your answer",
        };
        out.push_str(&format!("## {heading}\n\n{}\n\n", t.content.trim_end()));
    }
    out.truncate(out.trim_end().len());
    out
}

/// What a CLI agent printed, read with `worker_agent_response_pointer`: the string at
/// `pointer` in the last standard-output line that is a JSON value with one there
/// (JSON-lines agents such as `claude -p --output-format stream-json` print their
/// answer last), else in the whole output read as one JSON document (agents that
/// print one pretty-printed object). The token usage next to it is taken when the
/// same object has `usage` with `input_tokens`/`output_tokens` (Anthropic's names)
/// or `prompt_tokens`/`completion_tokens` (OpenAI's). `None` when nothing matches.
pub fn extract_response(stdout: &str, pointer: &str) -> Option<(String, Option<TokenUsage>)> {
    let pick = |v: &serde_json::Value| {
        let text = v.pointer(pointer)?.as_str()?.to_string();
        Some((text, v.get("usage").and_then(usage_of)))
    };
    stdout
        .lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
        .find_map(|v| pick(&v))
        .or_else(|| {
            serde_json::from_str::<serde_json::Value>(stdout)
                .ok()
                .and_then(|v| pick(&v))
        })
}

/// A `usage` object in either vendor's names.
pub fn usage_of(usage: &serde_json::Value) -> Option<TokenUsage> {
    let n = |k: &str| usage.get(k).and_then(serde_json::Value::as_u64);
    let input = n("input_tokens").or_else(|| n("prompt_tokens"))?;
    let output = n("output_tokens").or_else(|| n("completion_tokens"))?;
    Some(TokenUsage {
        input_tokens: input,
        output_tokens: output,
    })
}

/// The read-only commands a workstation lets its model call (`worker_agent_tools`):
/// each pattern is a list of words, matched word by word against the call's words.
/// `*` and `?` match within one word and never across `/`; a last pattern word `...`
/// matches any further words. A call is split into words like a POSIX shell would,
/// and is then run without a shell (its words are the program and its arguments), so
/// `;`, `|`, `$(…)` or redirections in a call are plain words, never shell syntax.
#[derive(Clone, Debug, Default)]
pub struct ToolAllowList {
    patterns: Vec<ToolPattern>,
}

#[derive(Clone, Debug)]
struct ToolPattern {
    text: String,
    words: Vec<PatternWord>,
    any_rest: bool,
}

/// One word of a pattern: its glob, and what a wildcard in it may not stand for.
#[derive(Clone, Debug)]
struct PatternWord {
    glob: globset::GlobMatcher,
    /// The word has `*`, `?` or `[`: it matches more than itself.
    wild: bool,
    /// It starts with `-`: it may match an option.
    option: bool,
    /// It names a `.` or `..` path segment itself.
    dot_segments: bool,
}

impl PatternWord {
    /// A wildcard never stands for an option (a word starting with `-`, unless the
    /// pattern word starts with one) nor for a `.` or `..` path segment: `grep * f`
    /// must not admit `grep -r f`, nor `cat /var/log/*` admit `cat /var/log/..`.
    fn admits(&self, word: &str) -> bool {
        if !self.glob.is_match(word) {
            return false;
        }
        if !self.wild {
            return true;
        }
        if word.starts_with('-') && !self.option {
            return false;
        }
        self.dot_segments || !word.split('/').any(|seg| seg == "." || seg == "..")
    }
}

/// Patterns accepted in one allow-list, and words in one pattern.
pub const MAX_TOOL_PATTERNS: usize = 64;

impl ToolAllowList {
    /// Parses patterns separated by `;` or new lines (blank ones ignored).
    ///
    /// # Errors
    /// A message naming the pattern that does not parse (unbalanced quotes, a bad
    /// glob, `...` not last), or too many patterns.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut patterns = Vec::new();
        for raw in text.split([';', '\n']).map(str::trim).filter(|p| !p.is_empty()) {
            let words = shlex::split(raw).ok_or_else(|| format!("`{raw}`: unbalanced quotes"))?;
            let any_rest = words.last().is_some_and(|w| w == "...");
            let fixed = &words[..words.len() - usize::from(any_rest)];
            if fixed.is_empty() {
                return Err(format!("`{raw}`: a pattern starts with the program's name"));
            }
            let mut matchers = Vec::with_capacity(fixed.len());
            for w in fixed {
                if w == "..." {
                    return Err(format!("`{raw}`: `...` may only be the last word"));
                }
                let glob = globset::GlobBuilder::new(w)
                    .literal_separator(true)
                    .backslash_escape(true)
                    .build()
                    .map_err(|e| format!("`{raw}`: {e}"))?;
                matchers.push(PatternWord {
                    glob: glob.compile_matcher(),
                    wild: w.contains(['*', '?', '[']),
                    option: w.starts_with('-'),
                    dot_segments: w.split('/').any(|seg| seg == "." || seg == ".."),
                });
            }
            patterns.push(ToolPattern {
                text: raw.to_string(),
                words: matchers,
                any_rest,
            });
        }
        if patterns.len() > MAX_TOOL_PATTERNS {
            return Err(format!("at most {MAX_TOOL_PATTERNS} patterns"));
        }
        Ok(Self { patterns })
    }

    /// True when no command may be called (and so no tool is offered to the model).
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns as configured, for the tool's description.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.patterns.iter().map(|p| p.text.as_str())
    }

    /// The call's words when a pattern allows `command`.
    ///
    /// # Errors
    /// Why it is refused: it does not split into words, or no pattern allows it.
    pub fn check(&self, command: &str) -> Result<Vec<String>, String> {
        if command.chars().any(|c| c.is_control() && c != '\t' && c != ' ') {
            return Err("refused: the command contains a control character (NUL, a new line, …)".into());
        }
        let words = shlex::split(command)
            .filter(|w| !w.is_empty())
            .ok_or_else(|| "refused: the command does not split into words (unbalanced quotes?)".to_string())?;
        let allowed = self.patterns.iter().any(|p| {
            let count_ok = if p.any_rest {
                words.len() >= p.words.len()
            } else {
                words.len() == p.words.len()
            };
            count_ok && p.words.iter().zip(&words).all(|(m, w)| m.admits(w))
        });
        if allowed {
            Ok(words)
        } else {
            Err(format!(
                "refused: `{command}` is not on this workstation's allow-list of read-only commands ({})",
                self.patterns().collect::<Vec<_>>().join("; ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapters_spell_the_same_in_serde_and_text() {
        for a in AgentAdapter::ALL {
            let json = serde_json::to_string(a).unwrap();
            assert_eq!(json, format!("\"{}\"", a.as_str()));
            assert_eq!(a.as_str().parse::<AgentAdapter>().unwrap(), *a);
        }
        assert!("gpt".parse::<AgentAdapter>().is_err());
    }

    #[test]
    fn model_names_are_bounded_and_printable() {
        let ok = AgentInfo {
            adapter: AgentAdapter::Openai,
            model: Some("llama3.1:8b".into()),
        };
        assert!(ok.validate("agent").is_ok());
        let long = AgentInfo {
            model: Some("m".repeat(MAX_MODEL_BYTES + 1)),
            ..ok.clone()
        };
        assert!(long.validate("agent").unwrap_err().message.contains("agent.model"));
        let control = AgentInfo {
            model: Some("a\nb".into()),
            ..ok
        };
        assert!(control.validate("agent").is_err());
    }

    fn qs(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("question {i}?")).collect()
    }

    #[test]
    fn each_question_carries_the_earlier_answers_in_order() {
        let questions = qs(3);
        let answers = vec!["a1".to_string(), "a2".to_string()];
        let turns = question_turns(&questions, &answers, 2);
        let shape: Vec<(Role, &str)> = turns.iter().skip(1).map(|t| (t.role, t.content.as_str())).collect();
        assert_eq!(
            shape,
            [
                (Role::User, "question 1?"),
                (Role::Assistant, "a1"),
                (Role::User, "question 2?"),
                (Role::Assistant, "a2"),
                (Role::User, "question 3?"),
            ]
        );
        assert!(turns[0].content.contains("investigation"));
        let first = question_turns(&questions, &[], 0);
        assert_eq!(first.len(), 2);
        assert_eq!(first[1].content, "question 1?");
    }

    #[test]
    fn the_summary_asks_after_every_answer() {
        let questions = qs(2);
        let answers = vec!["a1".to_string(), "a2".to_string()];
        let turns = summary_turns(&questions, &answers);
        assert_eq!(turns.len(), 6);
        assert_eq!(turns[4].content, "a2");
        assert_eq!(turns[5].content, SUMMARY_REQUEST);
    }

    #[test]
    fn a_single_prompt_flattens_to_itself_and_a_conversation_to_headed_parts() {
        let one = prompt_turns("Review auth.rs");
        assert_eq!(flatten(&one), "Review auth.rs");
        let first_question = flatten(&question_turns(&qs(2), &[], 0));
        assert!(first_question.starts_with("## Context"), "{first_question}");
        assert!(
            first_question.ends_with("## Question\n\nquestion 1?"),
            "{first_question}"
        );
        let many = question_turns(&qs(2), &["a1".to_string()], 1);
        let text = flatten(&many);
        assert!(text.starts_with("## Context"), "{text}");
        assert!(text.ends_with("## Question\n\nquestion 2?"), "{text}");
        let a1 = text.find("a1").unwrap();
        assert!(text.find("question 1?").unwrap() < a1 && a1 < text.find("question 2?").unwrap());
    }

    #[test]
    fn responses_are_cut_on_a_character_boundary_and_marked() {
        assert_eq!(bound_response("short".into()), "short");
        let long = "é".repeat(MAX_RESPONSE_BYTES);
        let cut = bound_response(long);
        assert!(cut.len() <= MAX_RESPONSE_BYTES, "{}", cut.len());
        assert!(cut.ends_with(RESPONSE_CUT_MARK));
    }

    #[test]
    fn usage_adds_up() {
        let mut u = TokenUsage::default();
        u.add(TokenUsage {
            input_tokens: 3,
            output_tokens: 4,
        });
        u.add(TokenUsage {
            input_tokens: 1,
            output_tokens: 1,
        });
        assert_eq!((u.input_tokens, u.output_tokens), (4, 5));
    }

    #[test]
    fn the_allow_list_matches_word_by_word_and_never_across_slashes() {
        let list = ToolAllowList::parse("df -h; uptime\ncat /var/log/*.log; journalctl -u * ...").unwrap();
        assert_eq!(list.check("df -h").unwrap(), ["df", "-h"]);
        assert!(list.check("uptime").is_ok());
        assert!(list.check("cat /var/log/syslog.log").is_ok());
        assert!(list.check("journalctl -u nginx --since today -n 50").is_ok());
        for refused in [
            "df -h; rm -rf /",
            "df -h /",
            "rm -rf /",
            "cat /var/log/../../etc/shadow.log",
            "cat /var/log/a.log /etc/shadow",
            "uptime && reboot",
            "cat '/var/log/x.log",
            "",
        ] {
            let e = list.check(refused).unwrap_err();
            assert!(!e.is_empty(), "{refused}");
        }
        assert!(
            list.check("rm -rf /")
                .unwrap_err()
                .contains("not on this workstation's allow-list")
        );
        // A metacharacter is a plain word: `df -h;` is two words, `df` and `-h;`.
        assert!(list.check("df -h;").is_err());
    }

    #[test]
    fn wildcards_never_stand_for_options_or_dot_segments() {
        let list = ToolAllowList::parse("grep * /srv/logs/*.log; ls /srv/logs/*; sort -n *; cat ../notes.txt").unwrap();
        assert!(list.check("grep error /srv/logs/app.log").is_ok());
        assert!(
            list.check("grep -r /srv/logs/app.log").is_err(),
            "an option through `*`"
        );
        assert!(list.check("ls /srv/logs/..").is_err(), "`..` through `*`");
        assert!(list.check("ls /srv/logs/.").is_err(), "`.` through `*`");
        assert!(
            list.check("ls /srv/logs/.hidden").is_ok(),
            "a dot file is a name, not a segment"
        );
        assert!(
            list.check("sort -n data.txt").is_ok(),
            "an option written in the pattern"
        );
        assert!(list.check("sort -n --output=/etc/passwd").is_err());
        assert!(
            list.check("cat ../notes.txt").is_ok(),
            "a literal `..` in the pattern is the pattern's"
        );
        assert!(
            list.check("ls /srv/logs/a\0b")
                .unwrap_err()
                .contains("control character")
        );
        assert!(list.check("ls /srv/logs/a\nb").is_err());
    }

    #[test]
    fn bad_allow_lists_are_refused_and_empty_offers_nothing() {
        assert!(ToolAllowList::parse("").unwrap().is_empty());
        assert!(ToolAllowList::parse(" ; \n").unwrap().is_empty());
        assert!(ToolAllowList::parse("cat 'x").unwrap_err().contains("quotes"));
        assert!(ToolAllowList::parse("... ls").is_err());
        assert!(ToolAllowList::parse("ls ... -l").unwrap_err().contains("last"));
        assert!(ToolAllowList::parse("ls [").is_err());
    }

    #[test]
    fn responses_are_picked_from_json_lines_or_one_document() {
        let lines = "{\"type\":\"system\"}\nnot json\n{\"type\":\"result\",\"result\":\"all fine\",\"usage\":{\"input_tokens\":12,\"output_tokens\":3}}\n";
        let (text, usage) = extract_response(lines, "/result").unwrap();
        assert_eq!(text, "all fine");
        assert_eq!(
            usage,
            Some(TokenUsage {
                input_tokens: 12,
                output_tokens: 3
            })
        );
        let doc = "{\n  \"response\": \"disk is 40% full\",\n  \"stats\": {}\n}\n";
        assert_eq!(
            extract_response(doc, "/response").unwrap(),
            ("disk is 40% full".into(), None)
        );
        assert_eq!(extract_response("plain text", "/result"), None);
        assert_eq!(extract_response("{\"result\": 3}", "/result"), None);
    }

    #[test]
    fn reported_model_names_are_cleaned_and_bounded() {
        assert_eq!(clean_model("llama3.2"), "llama3.2");
        assert_eq!(clean_model("\u{1b}[2Jgpt\u{1}-4"), "[2Jgpt-4");
        let long = clean_model(&"é".repeat(MAX_MODEL_BYTES));
        assert!(long.len() <= MAX_MODEL_BYTES && long.chars().all(|c| c == 'é'));
    }
}
