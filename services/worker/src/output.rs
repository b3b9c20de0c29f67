//! What happens to a step's output between the pipe and the wire, as pure code:
//! splitting raw bytes into bounded lines, made storable (invalid UTF-8 and NUL
//! become U+FFFD: output is never a reason for a step to fail), keeping the last
//! few KiB of each stream as a tail, and deciding when a batch of lines is due
//! to be sent.
//! Nothing here does IO or reads a clock; callers pass the time in, so every
//! rule is unit-tested.

use chrono::{DateTime, Utc};
use std::time::Duration;
use tanjiren_shared::protocol::{LogLine, LogStream};
use tokio::time::Instant;

/// Longest line kept; the rest of a longer line is dropped up to its newline.
pub const MAX_LINE_BYTES: usize = 64 * 1024;
/// Appended to a line that was cut at [`MAX_LINE_BYTES`].
pub const TRUNCATED_MARK: &str = " [line truncated]";
/// How much of the end of each stream is kept for the progress report.
pub const TAIL_BYTES: usize = 4 * 1024;

/// Turns a byte stream into lines: split on `\n`, a trailing `\r` stripped,
/// invalid UTF-8 replaced, and no line longer than the limit held in memory.
#[derive(Debug)]
pub struct LineSplitter {
    max_line: usize,
    partial: Vec<u8>,
    /// True after a line was cut: its remaining bytes are dropped until the next newline.
    discarding: bool,
}

impl LineSplitter {
    pub fn new(max_line: usize) -> Self {
        Self {
            max_line: max_line.max(1),
            partial: Vec::new(),
            discarding: false,
        }
    }

    /// Feeds the next chunk; every line it completes is appended to `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<String>) {
        let mut rest = chunk;
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == b'\n') {
                Some(newline) => {
                    self.absorb(&rest[..newline], out);
                    self.end_line(out);
                    rest = &rest[newline + 1..];
                }
                None => {
                    self.absorb(rest, out);
                    break;
                }
            }
        }
    }

    /// The last line when the stream ended without a newline.
    pub fn finish(&mut self) -> Option<String> {
        let was_discarding = std::mem::replace(&mut self.discarding, false);
        if was_discarding || self.partial.is_empty() {
            self.partial.clear();
            return None;
        }
        Some(line_text(&std::mem::take(&mut self.partial)))
    }

    fn absorb(&mut self, part: &[u8], out: &mut Vec<String>) {
        if self.discarding {
            return;
        }
        let room = self.max_line - self.partial.len();
        if part.len() <= room {
            self.partial.extend_from_slice(part);
            return;
        }
        self.partial.extend_from_slice(&part[..room]);
        let kept = std::mem::take(&mut self.partial);
        let cut = utf8_safe_len(&kept);
        out.push(format!(
            "{}{TRUNCATED_MARK}",
            tanjiren_shared::logs::lossy_line(&kept[..cut])
        ));
        self.discarding = true;
    }

    fn end_line(&mut self, out: &mut Vec<String>) {
        if std::mem::replace(&mut self.discarding, false) {
            return;
        }
        out.push(line_text(&std::mem::take(&mut self.partial)));
    }
}

fn line_text(bytes: &[u8]) -> String {
    let bytes = bytes.strip_suffix(b"\r").unwrap_or(bytes);
    // Invalid UTF-8 is kept lossily (U+FFFD) and the line is marked; NUL becomes U+FFFD.
    tanjiren_shared::logs::lossy_line(bytes)
}

/// The length of `bytes` without a multi-byte UTF-8 sequence that was cut off at the end.
fn utf8_safe_len(bytes: &[u8]) -> usize {
    let len = bytes.len();
    for back in 1..=len.min(3) {
        let b = bytes[len - back];
        if b & 0xC0 == 0x80 {
            continue; // a continuation byte: look further back for its lead byte
        }
        let needed = match b {
            0xF0.. => 4,
            0xE0.. => 3,
            0xC0.. => 2,
            _ => 1,
        };
        return if needed > back { len - back } else { len };
    }
    len
}

/// The last `cap` bytes of a stream's text (whole lines joined by `\n`), cut at a char boundary.
#[derive(Debug, Clone)]
pub struct Tail {
    cap: usize,
    text: String,
}

impl Tail {
    pub fn new(cap: usize) -> Self {
        Self {
            cap,
            text: String::new(),
        }
    }

    pub fn push_line(&mut self, line: &str) {
        if line.len() >= self.cap {
            // Only the end of a long line can survive; skip copying the rest.
            self.text.clear();
            let mut start = line.len() - self.cap;
            while !line.is_char_boundary(start) {
                start += 1;
            }
            self.text.push_str(&line[start..]);
        } else {
            self.text.push_str(line);
        }
        self.text.push('\n');
        self.trim_front();
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn into_string(self) -> String {
        self.text
    }

    fn trim_front(&mut self) {
        if self.text.len() <= self.cap {
            return;
        }
        let mut cut = self.text.len() - self.cap;
        while !self.text.is_char_boundary(cut) {
            cut += 1;
        }
        self.text.drain(..cut);
    }
}

/// The tails of both streams of one step.
#[derive(Debug, Clone)]
pub struct StreamTails {
    pub stdout: Tail,
    pub stderr: Tail,
}

impl StreamTails {
    pub fn new(cap: usize) -> Self {
        Self {
            stdout: Tail::new(cap),
            stderr: Tail::new(cap),
        }
    }

    pub fn push(&mut self, stream: LogStream, line: &str) {
        match stream {
            LogStream::Stdout => self.stdout.push_line(line),
            LogStream::Stderr => self.stderr.push_line(line),
        }
    }
}

/// When a batch of log lines is sent: at `max_lines` lines, at `max_bytes` bytes
/// of text, or `flush_after` after its first line, whichever comes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    pub max_lines: usize,
    pub max_bytes: usize,
    pub flush_after: Duration,
}

/// Numbers lines (from 1, across both streams, in arrival order) and groups them into batches.
#[derive(Debug)]
pub struct Batcher {
    limits: BatchLimits,
    lines: Vec<LogLine>,
    bytes: usize,
    next_seq: i64,
    first_at: Option<Instant>,
}

impl Batcher {
    pub fn new(limits: BatchLimits) -> Self {
        let limits = BatchLimits {
            max_lines: limits.max_lines.max(1),
            max_bytes: limits.max_bytes.max(1),
            ..limits
        };
        Self {
            limits,
            lines: Vec::new(),
            bytes: 0,
            next_seq: 1,
            first_at: None,
        }
    }

    /// Adds a line read at `at` (wall clock, for the record) and `now` (monotonic, for the
    /// flush timer); returns the batch if this line filled it.
    pub fn push(&mut self, stream: LogStream, text: String, at: DateTime<Utc>, now: Instant) -> Option<Vec<LogLine>> {
        self.first_at.get_or_insert(now);
        self.bytes += text.len();
        self.lines.push(LogLine {
            seq: self.next_seq,
            stream,
            text,
            at,
        });
        self.next_seq += 1;
        let full = self.lines.len() >= self.limits.max_lines || self.bytes >= self.limits.max_bytes;
        if full { self.take() } else { None }
    }

    /// When the pending batch must be sent even if it is not full.
    pub fn flush_due(&self) -> Option<Instant> {
        self.first_at.map(|t| t + self.limits.flush_after)
    }

    /// Takes whatever is pending (None when empty).
    pub fn take(&mut self) -> Option<Vec<LogLine>> {
        self.first_at = None;
        self.bytes = 0;
        if self.lines.is_empty() {
            None
        } else {
            Some(std::mem::take(&mut self.lines))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_all(max: usize, chunks: &[&[u8]]) -> Vec<String> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        out.extend(s.finish());
        out
    }

    #[test]
    fn splits_on_newlines_across_chunks_and_strips_carriage_returns() {
        let lines = split_all(100, &[b"one\r\ntw", b"o\n\nthr", b"ee"]);
        assert_eq!(lines, ["one", "two", "", "three"]);
        assert_eq!(split_all(100, &[b"a\n"]), ["a"]);
        assert!(split_all(100, &[]).is_empty());
    }

    #[test]
    fn long_lines_are_cut_and_the_rest_dropped_up_to_the_newline() {
        let long = [b'x'; 25];
        let lines = split_all(10, &[&long[..12], &long[12..], b"\nnext\n"]);
        assert_eq!(
            lines,
            [format!("{}{TRUNCATED_MARK}", "x".repeat(10)), "next".to_string()]
        );
        // Exactly at the limit is not truncated.
        assert_eq!(split_all(10, &[b"0123456789\n"]), ["0123456789"]);
        // A cut line with no newline before the end is reported once, not twice.
        let lines = split_all(4, &[b"abcdefgh"]);
        assert_eq!(lines, [format!("abcd{TRUNCATED_MARK}")]);
    }

    #[test]
    fn long_lines_are_cut_at_a_char_boundary() {
        // "ééé" is 6 bytes; a limit of 5 would split the third é.
        let lines = split_all(5, &["ééé\n".as_bytes()]);
        assert_eq!(lines, [format!("éé{TRUNCATED_MARK}")]);
        // A 4-byte char cut after 2 of its bytes.
        let lines = split_all(3, &["a😀\n".as_bytes()]);
        assert_eq!(lines, [format!("a{TRUNCATED_MARK}")]);
    }

    #[test]
    fn the_default_limit_is_64_kib() {
        let mut data = vec![b'y'; MAX_LINE_BYTES + 1000];
        data.extend_from_slice(b"\nok\n");
        let lines = split_all(MAX_LINE_BYTES, &[&data]);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].len(), MAX_LINE_BYTES + TRUNCATED_MARK.len());
        assert_eq!(lines[1], "ok");
    }

    #[test]
    fn invalid_utf8_is_replaced() {
        let lines = split_all(100, &[b"ok \xff\xfe end\n"]);
        assert_eq!(
            lines,
            [format!(
                "ok \u{FFFD}\u{FFFD} end{}",
                tanjiren_shared::logs::INVALID_UTF8_MARK
            )]
        );
    }

    #[test]
    fn nul_and_binary_output_become_storable_text() {
        let lines = split_all(100, &[b"a\0b\n\0\xff\n"]);
        assert_eq!(
            lines,
            [
                "a\u{FFFD}b".to_string(),
                format!("\u{FFFD}\u{FFFD}{}", tanjiren_shared::logs::INVALID_UTF8_MARK)
            ]
        );
        // Random bytes, cut lines included: nothing with a NUL reaches the wire or the tails.
        let noise: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        assert!(noise.contains(&0));
        let lines = split_all(1000, &[&noise]);
        assert!(!lines.is_empty());
        let mut tails = StreamTails::new(TAIL_BYTES);
        for l in &lines {
            assert!(!l.contains('\0'));
            tails.push(LogStream::Stdout, l);
        }
        assert!(!tails.stdout.as_str().contains('\0'));
    }

    #[test]
    fn tail_keeps_the_last_bytes_at_a_char_boundary() {
        let mut t = Tail::new(8);
        t.push_line("hello");
        assert_eq!(t.as_str(), "hello\n");
        t.push_line("wörld");
        // "hello\nwörld\n" is 13 bytes: only the last 8 are kept.
        assert!(t.as_str().len() <= 8);
        assert!(t.as_str().ends_with("wörld\n"));
        let mut t = Tail::new(5);
        t.push_line("ab€€"); // 8 bytes + newline: keep ≤5 bytes, starting at a char boundary
        assert_eq!(t.as_str(), "€\n");
        let mut t = Tail::new(TAIL_BYTES);
        for i in 0..10_000 {
            t.push_line(&format!("line {i} ✓"));
        }
        assert!(t.as_str().len() <= TAIL_BYTES);
        assert!(t.as_str().ends_with("line 9999 ✓\n"));
        let long = "é".repeat(TAIL_BYTES);
        t.push_line(&long);
        assert!(t.as_str().len() <= TAIL_BYTES && t.as_str().ends_with("é\n"));
    }

    fn limits(max_lines: usize, max_bytes: usize, flush_ms: u64) -> BatchLimits {
        BatchLimits {
            max_lines,
            max_bytes,
            flush_after: Duration::from_millis(flush_ms),
        }
    }

    #[test]
    fn batch_flushes_at_max_lines_with_sequence_across_streams() {
        let now = Instant::now();
        let mut b = Batcher::new(limits(3, 1 << 20, 100));
        assert!(b.push(LogStream::Stdout, "a".into(), Utc::now(), now).is_none());
        assert!(b.push(LogStream::Stderr, "b".into(), Utc::now(), now).is_none());
        let batch = b
            .push(LogStream::Stdout, "c".into(), Utc::now(), now)
            .expect("full at 3 lines");
        let seqs: Vec<_> = batch.iter().map(|l| (l.seq, l.stream)).collect();
        assert_eq!(
            seqs,
            [(1, LogStream::Stdout), (2, LogStream::Stderr), (3, LogStream::Stdout)]
        );
        assert!(b.flush_due().is_none());
        assert!(b.push(LogStream::Stdout, "d".into(), Utc::now(), now).is_none());
        assert_eq!(b.take().unwrap()[0].seq, 4);
        assert!(b.take().is_none());
    }

    #[test]
    fn batch_flushes_at_max_bytes() {
        let now = Instant::now();
        let mut b = Batcher::new(limits(100, 10, 100));
        assert!(b.push(LogStream::Stdout, "12345".into(), Utc::now(), now).is_none());
        let batch = b
            .push(LogStream::Stdout, "67890".into(), Utc::now(), now)
            .expect("full at 10 bytes");
        assert_eq!(batch.len(), 2);
        // A single line larger than the limit goes out on its own.
        assert_eq!(
            b.push(LogStream::Stdout, "x".repeat(50), Utc::now(), now)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn batch_is_due_a_flush_interval_after_its_first_line() {
        let t0 = Instant::now();
        let mut b = Batcher::new(limits(100, 1 << 20, 100));
        assert!(b.flush_due().is_none());
        b.push(LogStream::Stdout, "a".into(), Utc::now(), t0);
        b.push(
            LogStream::Stdout,
            "b".into(),
            Utc::now(),
            t0 + Duration::from_millis(60),
        );
        assert_eq!(b.flush_due(), Some(t0 + Duration::from_millis(100)));
        assert_eq!(b.take().unwrap().len(), 2);
        let t1 = t0 + Duration::from_millis(500);
        b.push(LogStream::Stdout, "c".into(), Utc::now(), t1);
        assert_eq!(b.flush_due(), Some(t1 + Duration::from_millis(100)));
    }
}
