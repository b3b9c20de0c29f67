//! Pure rules for stored output: what a line's *signature* is (so ten thousand
//! repeats of one line with different timestamps or ids fold into one row), how
//! a line is made safe to store (cut at 64 KiB, NUL replaced, marked), the
//! per-step cap's marker line, and the rendering of a task's outcome summary.
//! No IO here; ingest does the storing.

use crate::model::StepStatus;
use crate::protocol::LogStream;
use regex::{Captures, Regex};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::sync::LazyLock;

/// Longest line stored, in bytes of UTF-8 (the worker cuts there too).
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Appended to a line cut at [`MAX_LINE_BYTES`] (the worker's marker, reused server-side).
pub const TRUNCATED_MARK: &str = " [line truncated]";
/// Appended to a line whose bytes were not valid UTF-8 (replaced by U+FFFD).
pub const INVALID_UTF8_MARK: &str = " [invalid utf-8 replaced]";
/// Only this much of a line's start is normalised into its signature.
pub const SIGNATURE_INPUT_BYTES: usize = 4 * 1024;
/// The stored (displayed) signature text is kept to this many characters.
pub const SIGNATURE_DISPLAY_CHARS: usize = 512;

/// The line stored once, in place of everything beyond the per-step cap.
pub fn cap_marker(cap_bytes: u64) -> String {
    format!("[tanjiren] output truncated: this step reached its log cap of {cap_bytes} bytes; later lines were dropped")
}

static VOLATILE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"(?P<uuid>\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b)",
        r"|(?P<ts>\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2})?(?:[.,]\d+)?(?:Z|[+-]\d{2}:?\d{2})?)?",
        r"|\b\d{2}:\d{2}:\d{2}(?:[.,]\d+)?\b)",
        r"|(?P<hex>\b0[xX][0-9a-fA-F]+\b|\b[0-9a-fA-F]{8,}\b)",
        r"|(?P<num>\d+(?:\.\d+)?)",
    ))
    .expect("signature regex compiles")
});

/// The normalised form of a line: the volatile parts replaced by placeholders.
///
/// In this order: UUIDs → `<uuid>`; dates and date-times (`2026-11-26`,
/// `2026-11-26T08:13:14.057Z`, `2026-11-26 08:13:14,5+01:00`) and clock times
/// (`08:13:14`) → `<ts>`; `0x…` and runs of 8+ hex digits containing a digit →
/// `<hex>`; any other run of digits (with an optional decimal part) → `<n>`.
/// Only the first [`SIGNATURE_INPUT_BYTES`] of the line are considered.
pub fn normalise(text: &str) -> String {
    let text = cut_at_boundary(text, SIGNATURE_INPUT_BYTES);
    VOLATILE
        .replace_all(text, |c: &Captures| {
            if c.name("uuid").is_some() {
                "<uuid>".to_string()
            } else if c.name("ts").is_some() {
                "<ts>".to_string()
            } else if let Some(h) = c.name("hex") {
                let h = h.as_str();
                // A word like `deadbeef` or `accepted` is not an id: only runs with a digit are.
                if h.starts_with("0x") || h.starts_with("0X") || h.bytes().any(|b| b.is_ascii_digit()) {
                    "<hex>".to_string()
                } else {
                    h.to_string()
                }
            } else {
                "<n>".to_string()
            }
        })
        .into_owned()
}

/// A line's signature: its stream and its normalised text (`stderr:error at <hex>`),
/// with a 64-bit hash of it (the first 8 bytes of SHA-256) used as the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub hash: i64,
    /// The normalised text, kept to [`SIGNATURE_DISPLAY_CHARS`].
    pub text: String,
}

pub fn signature(stream: LogStream, text: &str) -> Signature {
    let norm = normalise(text);
    let mut h = Sha256::new();
    h.update(stream.as_str().as_bytes());
    h.update(b":");
    h.update(norm.as_bytes());
    let digest = h.finalize();
    let hash = i64::from_be_bytes(digest[..8].try_into().expect("8 bytes"));
    let text = match norm.char_indices().nth(SIGNATURE_DISPLAY_CHARS) {
        Some((i, _)) => norm[..i].to_string(),
        None => norm,
    };
    Signature { hash, text }
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char boundary.
pub fn cut_at_boundary(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `s` whole if it has at most `max` bytes, else cut on a char boundary and ended
/// with `…`, `max` bytes at most in all.
pub fn shorten(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    format!("{}…", cut_at_boundary(s, max.saturating_sub('…'.len_utf8())))
}

/// Makes a line safe to store: NUL (which Postgres text cannot hold) becomes
/// U+FFFD, and a line over [`MAX_LINE_BYTES`] is cut at a char boundary and
/// marked with [`TRUNCATED_MARK`] — the worker does the same, this enforces it.
pub fn sanitise_line(text: &str) -> std::borrow::Cow<'_, str> {
    let needs_nul = text.contains('\0');
    let too_long = text.len() > MAX_LINE_BYTES + TRUNCATED_MARK.len();
    if !needs_nul && !too_long {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = if too_long {
        let mut s = cut_at_boundary(text, MAX_LINE_BYTES).to_string();
        s.push_str(TRUNCATED_MARK);
        s
    } else {
        text.to_string()
    };
    if needs_nul {
        out = out.replace('\0', "\u{FFFD}");
    }
    std::borrow::Cow::Owned(out)
}

/// Decodes raw output bytes lossily: invalid sequences become U+FFFD and the
/// line is marked with [`INVALID_UTF8_MARK`] so a reader knows it was changed;
/// NUL (valid UTF-8, but not storable in Postgres text) becomes U+FFFD as in
/// [`sanitise_line`]. Output is never a reason to refuse anything.
pub fn lossy_line(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => replace_nul(s.to_string()),
        Err(_) => {
            let mut s = replace_nul(String::from_utf8_lossy(bytes).into_owned());
            s.push_str(INVALID_UTF8_MARK);
            s
        }
    }
}

/// `text` with every NUL replaced by U+FFFD (no copy when there is none).
pub fn replace_nul(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

/// One step as the outcome summary shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryStep {
    pub workstation: String,
    pub status: StepStatus,
    pub exit_code: Option<i32>,
    pub duration_ms: Option<i64>,
    pub failure_reason: Option<String>,
    pub log_truncated: bool,
    /// The worker's words on how the step ended, if it gave any.
    pub message: Option<String>,
    /// A `prompt` step's response, or an investigate step's closing summary (its
    /// start: [`SUMMARY_RESPONSE_BYTES`]).
    pub response: Option<String>,
}

/// Of each step's agent response, the bytes an outcome summary quotes.
pub const SUMMARY_RESPONSE_BYTES: usize = 2000;

/// One deduplicated error line: a stderr signature and how often it occurred.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryErrorLine {
    pub workstation: String,
    pub count: i64,
    pub exemplar: String,
}

/// Everything the outcome summary says about a task.
#[derive(Clone, Debug, PartialEq)]
pub struct SummaryInput {
    pub intent: String,
    pub status: crate::model::TaskStatus,
    /// Why the task ended: the failure or cancel reason, or "all steps succeeded".
    pub reason: Option<String>,
    pub attempt: u32,
    pub steps: Vec<SummaryStep>,
    /// Already ordered by count, highest first.
    pub top_errors: Vec<SummaryErrorLine>,
}

/// How many error lines the summary shows at most.
pub const SUMMARY_TOP_ERRORS: usize = 10;
/// An exemplar in the summary is cut to this many bytes.
const SUMMARY_EXEMPLAR_BYTES: usize = 300;

fn duration(ms: Option<i64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 1000 => format!("{ms} ms"),
        Some(ms) => format!("{:.1} s", ms as f64 / 1000.0),
    }
}

/// Title of the summary artifact.
pub fn summary_title(input: &SummaryInput) -> String {
    format!("Outcome: {} — {}", input.status, cut_at_boundary(&input.intent, 200))
}

/// Renders the outcome summary as plain text (Markdown-friendly).
pub fn render_summary(input: &SummaryInput) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Task {} (attempt {}).", input.status, input.attempt);
    let reason = match (&input.reason, input.status) {
        (Some(r), _) => r.clone(),
        (None, crate::model::TaskStatus::Completed) => "all steps succeeded".into(),
        (None, _) => "no reason recorded".into(),
    };
    let _ = writeln!(s, "Reason: {reason}");
    let _ = writeln!(s, "\nSteps:");
    if input.steps.is_empty() {
        let _ = writeln!(s, "- none (the task never ran)");
    }
    for st in &input.steps {
        let exit = st.exit_code.map(|c| c.to_string()).unwrap_or_else(|| "-".into());
        let _ = write!(
            s,
            "- {}: {}, exit code {}, duration {}",
            st.workstation,
            st.status,
            exit,
            duration(st.duration_ms)
        );
        if let Some(r) = &st.failure_reason {
            let _ = write!(s, ", reason {r}");
        }
        if st.log_truncated {
            let _ = write!(s, ", output truncated at the log cap");
        }
        if let Some(m) = st
            .message
            .as_deref()
            .filter(|_| st.status != crate::model::StepStatus::Succeeded)
        {
            let _ = write!(s, " ({})", cut_at_boundary(m, SUMMARY_EXEMPLAR_BYTES));
        }
        s.push('\n');
        if let Some(r) = &st.response {
            let quoted = cut_at_boundary(r.trim(), SUMMARY_RESPONSE_BYTES);
            let more = if quoted.len() < r.trim().len() { " […]" } else { "" };
            for line in quoted.lines() {
                let _ = writeln!(s, "  > {line}");
            }
            if !more.is_empty() {
                let _ = writeln!(s, "  >{more}");
            }
        }
    }
    if !input.top_errors.is_empty() {
        let _ = writeln!(s, "\nTop error lines (deduplicated):");
        for e in input.top_errors.iter().take(SUMMARY_TOP_ERRORS) {
            let text = cut_at_boundary(&e.exemplar, SUMMARY_EXEMPLAR_BYTES);
            let _ = writeln!(s, "- {}× [{}] {}", e.count, e.workstation, text);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TaskStatus;

    #[test]
    fn volatile_parts_are_normalised() {
        assert_eq!(
            normalise("2026-11-26T08:13:14.057Z request 01936f2e-8b22-7d4e-a1c3-5b7e9f0a2b3c took 35.2 ms"),
            "<ts> request <uuid> took <n> ms"
        );
        assert_eq!(
            normalise("at 08:13:14 pid 4711 addr 0x7ffd1234"),
            "at <ts> pid <n> addr <hex>"
        );
        assert_eq!(normalise("commit 3f9a2c1d8e7b built"), "commit <hex> built");
        // Words made of hex letters only are words, not ids.
        assert_eq!(normalise("accepted deadbeefcafe"), "accepted deadbeefcafe");
        assert_eq!(normalise("2026-11-26 08:13:14,5+01:00 x"), "<ts> x");
    }

    #[test]
    fn signatures_fold_repeats_and_keep_streams_apart() {
        let a = signature(LogStream::Stderr, "error: retry 1 of 5 at 2026-11-26T08:00:00Z");
        let b = signature(LogStream::Stderr, "error: retry 2 of 5 at 2026-11-26T08:00:01Z");
        let c = signature(LogStream::Stdout, "error: retry 2 of 5 at 2026-11-26T08:00:01Z");
        assert_eq!(a, b);
        assert_ne!(a.hash, c.hash);
        assert_eq!(a.text, "error: retry <n> of <n> at <ts>");
        assert_ne!(
            signature(LogStream::Stdout, "x").hash,
            signature(LogStream::Stdout, "y").hash
        );
    }

    #[test]
    fn long_and_nul_lines_are_made_safe() {
        let long = "é".repeat(MAX_LINE_BYTES); // 2 bytes each
        let s = sanitise_line(&long);
        assert!(s.ends_with(TRUNCATED_MARK));
        assert!(s.len() <= MAX_LINE_BYTES + TRUNCATED_MARK.len());
        assert_eq!(sanitise_line("a\0b"), "a\u{FFFD}b");
        assert!(matches!(sanitise_line("fine"), std::borrow::Cow::Borrowed(_)));
        // A line the worker already cut and marked is left alone.
        let cut = format!("{}{}", "y".repeat(MAX_LINE_BYTES), TRUNCATED_MARK);
        assert_eq!(sanitise_line(&cut), cut.as_str());
    }

    #[test]
    fn invalid_utf8_is_kept_lossily_and_marked() {
        assert_eq!(lossy_line(b"ok"), "ok");
        assert_eq!(lossy_line(b"a\0b"), "a\u{FFFD}b");
        assert_eq!(lossy_line(b"\0\xff"), format!("\u{FFFD}\u{FFFD}{INVALID_UTF8_MARK}"));
        assert_eq!(
            lossy_line(b"bad \xff byte"),
            format!("bad \u{FFFD} byte{INVALID_UTF8_MARK}")
        );
    }

    #[test]
    fn shortened_text_stays_within_its_bytes_on_a_boundary() {
        assert_eq!(shorten("short", 10), "short");
        assert_eq!(shorten("abcdefghij", 6), "abc…");
        let cut = shorten(&"é".repeat(10), 8);
        assert!(cut.len() <= 8 && cut.ends_with('…'), "{cut}");
    }

    #[test]
    fn summary_lists_steps_errors_and_reason() {
        let input = SummaryInput {
            intent: "deploy".into(),
            status: TaskStatus::Failed,
            reason: Some("non_zero_exit".into()),
            attempt: 2,
            steps: vec![
                SummaryStep {
                    workstation: "ws-a".into(),
                    status: StepStatus::Failed,
                    exit_code: Some(3),
                    duration_ms: Some(1500),
                    failure_reason: Some("non_zero_exit".into()),
                    log_truncated: true,
                    message: Some("exited with code 3".into()),
                    response: None,
                },
                SummaryStep {
                    workstation: "ws-b".into(),
                    status: StepStatus::Succeeded,
                    exit_code: Some(0),
                    duration_ms: Some(20),
                    failure_reason: None,
                    log_truncated: false,
                    message: None,
                    response: Some("The disk is 93% full.\nMost of it is /var/log.".into()),
                },
            ],
            top_errors: vec![SummaryErrorLine {
                workstation: "ws-a".into(),
                count: 42,
                exemplar: "error: disk full".into(),
            }],
        };
        let text = render_summary(&input);
        assert!(
            text.starts_with("Task failed (attempt 2).\nReason: non_zero_exit\n"),
            "{text}"
        );
        assert!(text.contains(
            "- ws-a: failed, exit code 3, duration 1.5 s, reason non_zero_exit, output truncated at the log cap \
             (exited with code 3)\n"
        ));
        assert!(text.contains(
            "- ws-b: succeeded, exit code 0, duration 20 ms\n  > The disk is 93% full.\n  > Most of it is /var/log.\n"
        ));
        assert!(text.contains("- 42× [ws-a] error: disk full"));
        assert_eq!(summary_title(&input), "Outcome: failed — deploy");
        let done = SummaryInput {
            status: TaskStatus::Completed,
            reason: None,
            steps: vec![],
            top_errors: vec![],
            ..input
        };
        let text = render_summary(&done);
        assert!(
            text.contains("Reason: all steps succeeded") && text.contains("never ran"),
            "{text}"
        );
    }
}
