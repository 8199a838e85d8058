//! Errors in protocol files, each pointing at a file, line and column, and saying how to fix it.

use std::fmt;
use std::path::PathBuf;

/// One problem in a protocol file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub path: PathBuf,
    /// 1-based line and column of the offending value or table.
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// What would fix it.
    pub help: String,
}

impl Diagnostic {
    /// Places `message` at byte `offset` of `text`.
    pub(super) fn at(
        path: &std::path::Path,
        text: &str,
        offset: usize,
        message: impl Into<String>,
        help: impl Into<String>,
    ) -> Self {
        let (line, column) = line_column(text, offset);
        Self {
            path: path.to_path_buf(),
            line,
            column,
            message: message.into(),
            help: help.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.path.display(),
            self.line,
            self.column,
            self.message
        )?;
        if !self.help.is_empty() {
            write!(f, "\n  fix: {}", self.help)?;
        }
        Ok(())
    }
}

/// Why a protocol could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("cannot read protocol file {}: {source}. Check the path and that the file is readable.", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", render(.0))]
    Invalid(Vec<Diagnostic>),
}

impl ProtocolError {
    /// The individual problems (empty for a read error).
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            ProtocolError::Invalid(d) => d,
            ProtocolError::Read { .. } => &[],
        }
    }
}

fn render(diagnostics: &[Diagnostic]) -> String {
    let mut out = format!(
        "{} problem{} in the protocol:",
        diagnostics.len(),
        if diagnostics.len() == 1 { "" } else { "s" }
    );
    for d in diagnostics {
        out.push_str("\n\n");
        out.push_str(&d.to_string());
    }
    out
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[line_start..].chars().count() + 1)
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

#[cfg(test)]
mod tests {
    use super::line_column;

    #[test]
    fn line_and_column_are_one_based_and_count_characters() {
        let text = "a = 1\nbé = 2\n";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 6), (2, 1));
        assert_eq!(line_column(text, text.find('=').unwrap()), (1, 3));
        let second_eq = text.rfind('=').unwrap();
        assert_eq!(line_column(text, second_eq), (2, 4));
    }
}
