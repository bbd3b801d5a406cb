//! Diagnostics and errors: every problem found while loading policies becomes a
//! [`Diagnostic`] naming file, line and column; loading fails with [`PolicyError`]
//! when any of them is an error.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Warning,
    Error,
}

/// One problem in a policy source, with its position (1-based line and column; 0
/// when the problem concerns the whole file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    pub file: String,
    pub line: usize,
    pub col: usize,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    /// `file:line:col: reason` for errors, `file:line:col: warning: reason` for warnings.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.col)?;
        }
        match self.severity {
            Severity::Error => write!(f, ": {}", self.message),
            Severity::Warning => write!(f, ": warning: {}", self.message),
        }
    }
}

/// Why policies could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy path {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("policy path {0} is neither a file nor a directory")]
    NotFileOrDir(PathBuf),
    #[error("no policy paths given")]
    NoPaths,
    /// The sources parsed but contain errors; every diagnostic (warnings too) is kept
    /// so the caller can log them all.
    #[error("{}", summarize(.0))]
    Invalid(Vec<Diagnostic>),
}

fn summarize(diags: &[Diagnostic]) -> String {
    let errors: Vec<&Diagnostic> = diags
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .collect();
    match errors.as_slice() {
        [] => "invalid policy".into(),
        [one] => one.to_string(),
        [first, rest @ ..] => format!("{first} (and {} more errors)", rest.len()),
    }
}

impl PolicyError {
    /// All diagnostics when the error is [`PolicyError::Invalid`], else none.
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            PolicyError::Invalid(d) => d,
            _ => &[],
        }
    }
}
