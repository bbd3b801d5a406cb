//! `--export-file`: flow events as JSON lines, for log shippers (Fluent Bit,
//! Vector). When the file reaches `max_bytes` it is renamed to `PATH.1`
//! (older ones shift to `.2`, ...) and a new one starts; at most
//! `max_backups` old files are kept. Lines are whole: a reader never sees
//! half an event at a rotation.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::flow::FlowEvent;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("could not open export file {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not write export file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not rotate export file {path}: {source}")]
    Rotate {
        path: PathBuf,
        source: std::io::Error,
    },
}

pub struct ExportFile {
    path: PathBuf,
    out: BufWriter<File>,
    size: u64,
    max_bytes: u64,
    max_backups: u32,
    line: Vec<u8>,
}

impl ExportFile {
    pub fn open(path: &Path, max_bytes: u64, max_backups: u32) -> Result<Self, ExportError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| ExportError::Open {
                path: path.into(),
                source,
            })?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| ExportError::Open {
                path: path.into(),
                source,
            })?;
        let size = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(64 * 1024, file),
            size,
            max_bytes: max_bytes.max(1),
            max_backups,
            line: Vec::with_capacity(1024),
        })
    }

    pub fn write(&mut self, flow: &FlowEvent) -> Result<(), ExportError> {
        self.line.clear();
        serde_json::to_writer(&mut self.line, flow).expect("a FlowEvent always serialises");
        self.line.push(b'\n');
        if self.size > 0 && self.size + self.line.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.out
            .write_all(&self.line)
            .map_err(|source| ExportError::Write {
                path: self.path.clone(),
                source,
            })?;
        self.size += self.line.len() as u64;
        Ok(())
    }

    /// Pushes buffered lines to the file (called when the pipeline is idle).
    pub fn flush(&mut self) -> Result<(), ExportError> {
        self.out.flush().map_err(|source| ExportError::Write {
            path: self.path.clone(),
            source,
        })
    }

    fn backup(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> Result<(), ExportError> {
        self.flush()?;
        let err = |source| ExportError::Rotate {
            path: self.path.clone(),
            source,
        };
        if self.max_backups == 0 {
            std::fs::remove_file(&self.path).map_err(err)?;
        } else {
            let _ = std::fs::remove_file(self.backup(self.max_backups));
            for n in (1..self.max_backups).rev() {
                let from = self.backup(n);
                if from.exists() {
                    std::fs::rename(&from, self.backup(n + 1)).map_err(err)?;
                }
            }
            std::fs::rename(&self.path, self.backup(1)).map_err(err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|source| ExportError::Open {
                path: self.path.clone(),
                source,
            })?;
        self.out = BufWriter::with_capacity(64 * 1024, file);
        self.size = 0;
        Ok(())
    }
}

/// As a pipeline sink: a failed write is logged (once per hundred) and
/// counted; the other sinks go on.
pub struct ExportFileSink {
    pub file: ExportFile,
    pub errors: u64,
}

impl ExportFileSink {
    fn failed(&mut self, e: ExportError) {
        if self.errors % 100 == 0 {
            tracing::error!(error = %e, failures = self.errors + 1, "export file write failed; other sinks still get every flow");
        }
        self.errors += 1;
    }
}

impl super::Sink for ExportFileSink {
    fn on_flow(&mut self, flow: &std::sync::Arc<FlowEvent>) {
        if let Err(e) = self.file.write(flow) {
            self.failed(e);
        }
    }

    fn flush(&mut self) {
        if let Err(e) = self.file.flush() {
            self.failed(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::Clock;
    use crate::capture::record::{KernelEvent, tests::sample};

    fn flow() -> FlowEvent {
        FlowEvent::from_kernel(
            &KernelEvent::from_record(&sample()).unwrap(),
            "n1",
            &Clock::now(),
        )
    }

    #[test]
    fn rotates_by_size_keeps_whole_lines_and_bounded_backups() {
        let dir = std::env::temp_dir().join(format!("fa-export-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("flows.jsonl");
        let line_len = serde_json::to_vec(&flow()).unwrap().len() as u64 + 1;
        // Room for 3 lines per file, 2 backups.
        let mut ex = ExportFile::open(&path, line_len * 3, 2).unwrap();
        for _ in 0..10 {
            ex.write(&flow()).unwrap();
        }
        ex.flush().unwrap();
        let count = |p: &Path| {
            let text = std::fs::read_to_string(p).unwrap();
            for l in text.lines() {
                serde_json::from_str::<FlowEvent>(l).expect("every line is a whole event");
            }
            text.lines().count()
        };
        // 10 lines: files of 3,3,3,1; the oldest file of 3 was dropped.
        assert_eq!(count(&path), 1);
        assert_eq!(count(&dir.join("flows.jsonl.1")), 3);
        assert_eq!(count(&dir.join("flows.jsonl.2")), 3);
        assert!(!dir.join("flows.jsonl.3").exists());
        // Reopening appends to the current file.
        drop(ex);
        let mut ex = ExportFile::open(&path, line_len * 3, 2).unwrap();
        ex.write(&flow()).unwrap();
        ex.flush().unwrap();
        assert_eq!(count(&path), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unwritable_path_is_a_clear_error() {
        let err = ExportFile::open(Path::new("/proc/flowaudit/flows.jsonl"), 1 << 20, 1)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("/proc/flowaudit/flows.jsonl"),
            "{err}"
        );
    }
}
