//! Where flow events leave the agent. Every sink gets each flow once, in
//! order, from the pipeline's single judge-and-fan-out task; a sink must not
//! block it (a slow consumer buffers or drops on its own side, and counts).

pub mod file;

use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use crate::flow::FlowEvent;
use crate::state::AgentState;

/// `flowaudit agent` flags of the export side.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Write flow events to this file as JSON lines, rotated by size.
    #[arg(long, env = "FLOWAUDIT_EXPORT_FILE", value_name = "PATH")]
    pub export_file: Option<PathBuf>,
    /// Rotate the export file when it reaches this many MiB.
    #[arg(
        long,
        env = "FLOWAUDIT_EXPORT_FILE_MAX_SIZE_MB",
        default_value_t = 64,
        value_name = "MIB"
    )]
    pub export_file_max_size_mb: u64,
    /// How many rotated export files to keep (PATH.1 ... PATH.N).
    #[arg(
        long,
        env = "FLOWAUDIT_EXPORT_FILE_MAX_BACKUPS",
        default_value_t = 5,
        value_name = "N"
    )]
    pub export_file_max_backups: u32,
}

/// Opens every configured sink (and starts the servers that feed from them).
pub async fn start(
    args: &ExportArgs,
    _state: &Arc<AgentState>,
) -> anyhow::Result<Vec<Box<dyn Sink>>> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(path) = &args.export_file {
        let file = file::ExportFile::open(
            path,
            args.export_file_max_size_mb.saturating_mul(1024 * 1024),
            args.export_file_max_backups,
        )?;
        sinks.push(Box::new(file::ExportFileSink { file, errors: 0 }));
    }
    Ok(sinks)
}

pub trait Sink: Send {
    fn on_flow(&mut self, flow: &Arc<FlowEvent>);
    /// Called when the pipeline has drained its queue: push buffered output.
    fn flush(&mut self) {}
}
