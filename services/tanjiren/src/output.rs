//! What the CLI prints. Every line for standard output goes through [`outln!`],
//! which treats a closed standard output — the reader went away, as in
//! `tanjiren task list | head -1` — as "stop" ([`StdoutClosed`], which `main`
//! turns into a quiet exit 0) instead of the panic `println!` gives. Messages for
//! standard error go through [`errln!`], which drops them if nobody reads them.
//! Lists are printed by [`table`]: columns aligned by display width, whatever
//! their contents.

use comfy_table::{ContentArrangement, Table};
use std::fmt;
use std::io::Write;

/// Standard output was closed by its reader: nothing more can be shown, and
/// nothing went wrong. The CLI stops and exits 0 without a message.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed")]
pub struct StdoutClosed;

/// Writes one line to standard output; a closed output is [`StdoutClosed`].
pub fn line(args: fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        Err(e) => Err(anyhow::Error::new(e).context("writing to standard output")),
    }
}

/// Writes one line to standard error, dropping it if standard error is closed.
pub fn err_line(args: fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_fmt(args).and_then(|()| err.write_all(b"\n"));
}

/// Whether `e` (or an error it wraps) is [`StdoutClosed`].
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

/// `println!` that returns `anyhow::Result<()>` instead of panicking on a closed
/// standard output: use as `outln!("…", …)?`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}

/// `eprintln!` that never panics: a message nobody can read is dropped.
macro_rules! errln {
    ($($arg:tt)*) => {
        $crate::output::err_line(format_args!($($arg)*))
    };
}

/// The lines of a borderless table: a header row, then one row per entry, each
/// column as wide as its widest cell (display width, so `…` and CJK text line
/// up), two spaces between columns, no trailing spaces. A cell may hold several
/// lines. No entries: no lines.
pub fn table_lines(header: &[&str], rows: Vec<Vec<String>>) -> Vec<String> {
    if rows.is_empty() {
        return Vec::new();
    }
    let mut t = Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for row in rows {
        t.add_row(row);
    }
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((if i == 0 { 0 } else { 1 }, 1));
    }
    t.lines().map(|l| l.trim_end().to_string()).collect()
}

/// Prints [`table_lines`] to standard output; for an empty list, nothing there (a
/// script counting lines sees none) and `none found` on standard error (for a person).
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> anyhow::Result<()> {
    if rows.is_empty() {
        errln!("none found");
    }
    for l in table_lines(header, rows) {
        outln!("{l}")?;
    }
    Ok(())
}

/// `s` on one line (newlines become spaces), cut to `max` characters with `…`.
pub fn one_line(s: &str, max: usize) -> String {
    let s = s.replace(['\n', '\r'], " ");
    if s.chars().count() > max {
        format!("{}…", s.chars().take(max).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Display columns at which each line's `needle` starts.
    fn columns_of(lines: &[String], needle: char) -> Vec<usize> {
        lines
            .iter()
            .map(|l| {
                let byte = l.find(needle).unwrap();
                unicode_width::UnicodeWidthStr::width(&l[..byte])
            })
            .collect()
    }

    #[test]
    fn columns_line_up_whatever_the_cell_widths() {
        let rows = vec![
            vec!["a".to_string(), "executing".into(), "|x".into()],
            vec!["bbbb".to_string(), "failed".into(), "|y".into()],
            vec!["c".to_string(), "完了した…".into(), "|z".into()],
        ];
        let lines = table_lines(&["ID", "STATUS", "|INTENT"], rows);
        assert_eq!(lines.len(), 4, "{lines:#?}");
        let at = columns_of(&lines, '|');
        assert!(at.iter().all(|c| *c == at[0]), "{lines:#?}");
        assert!(lines[0].starts_with("ID "), "{lines:#?}");
        assert!(lines.iter().all(|l| !l.ends_with(' ')), "{lines:#?}");
        assert!(table_lines(&["ID"], Vec::new()).is_empty());
    }

    #[test]
    fn multi_line_cells_keep_the_columns() {
        let rows = vec![
            vec!["1".to_string(), "one\n|two".into()],
            vec!["22".to_string(), "|three".into()],
        ];
        let lines = table_lines(&["N", "WHAT"], rows);
        let with_bar: Vec<String> = lines.iter().filter(|l| l.contains('|')).cloned().collect();
        assert_eq!(with_bar.len(), 2, "{lines:#?}");
        let at = columns_of(&with_bar, '|');
        assert_eq!(at[0], at[1], "{lines:#?}");
    }

    #[test]
    fn one_line_cuts_by_characters() {
        assert_eq!(one_line("a\nb", 10), "a b");
        assert_eq!(one_line("ééééé", 3), "ééé…");
    }
}
