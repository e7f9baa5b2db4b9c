//! The engine's errors, named for what failed.

use std::path::PathBuf;

use blockgate_blockstore::DecodeError;
use blockgate_objstore::ObjectStoreError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("volume {id} not found")]
    VolumeNotFound { id: String },
    #[error("volume {id} already exists with different parameters")]
    VolumeExists { id: String },
    #[error("snapshot {id} not found")]
    SnapshotNotFound { id: String },
    #[error("snapshot {id} already exists for volume {volume}")]
    SnapshotExists { id: String, volume: String },
    #[error("snapshot {snapshot} is the source of volume {volume}; delete the volume first")]
    SnapshotInUse { snapshot: String, volume: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("request {offset}+{length} is beyond the end of volume {volume} ({size} bytes)")]
    OutOfRange {
        volume: String,
        offset: u64,
        length: u64,
        size: u64,
    },
    #[error("volume {volume} cannot shrink from {size} to {requested} bytes")]
    Shrink {
        volume: String,
        size: u64,
        requested: u64,
    },
    #[error("volume {volume} was taken over by writer epoch {current} (this gateway holds {ours})")]
    Fenced {
        volume: String,
        ours: u64,
        current: u64,
    },
    /// A detach gave up waiting for the write log to reach the bucket; the volume stays open
    /// and attached, and nothing is dropped.
    #[error(
        "volume {volume} still holds {log_bytes} bytes not in the bucket after {waited_seconds} s; it stays attached{}",
        last_upload_error.as_ref().map(|e| format!(" (last upload error: {e})")).unwrap_or_default()
    )]
    DrainTimeout {
        volume: String,
        log_bytes: u64,
        waited_seconds: u64,
        last_upload_error: Option<String>,
    },
    #[error("volume {volume} is closed")]
    Closed { volume: String },
    #[error("write log of volume {volume} is on a full disk")]
    LogDiskFull {
        volume: String,
        #[source]
        source: std::io::Error,
    },
    #[error("write log i/o failed at {path}")]
    LogIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("local state i/o failed at {path}")]
    LocalIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("object store {operation} failed")]
    Store {
        operation: &'static str,
        #[source]
        source: ObjectStoreError,
    },
    #[error("object {key} is corrupt")]
    Corrupt {
        key: String,
        #[source]
        source: DecodeError,
    },
    #[error("data directory {path} is in use by another gateway")]
    DirectoryLocked { path: PathBuf },
}

impl EngineError {
    pub(crate) fn log_io(volume: &str, path: PathBuf, source: std::io::Error) -> EngineError {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            EngineError::LogDiskFull {
                volume: volume.to_string(),
                source,
            }
        } else {
            EngineError::LogIo { path, source }
        }
    }

    pub(crate) fn local(path: impl Into<PathBuf>, source: std::io::Error) -> EngineError {
        EngineError::LocalIo {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn store(operation: &'static str, source: ObjectStoreError) -> EngineError {
        EngineError::Store { operation, source }
    }
}

/// The causes of an error, outermost first, joined by `: ` (the store's and the SDK's useful
/// details are in the causes; logs and clients need them).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = error.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.join(": ")
}

/// An error and its causes, outermost first, joined by `: ` (what a person reading a log line
/// or a gRPC status needs; [`error_chain`] gives the causes alone).
pub fn describe(error: &dyn std::error::Error) -> String {
    let causes = error_chain(error);
    if causes.is_empty() {
        error.to_string()
    } else {
        format!("{error}: {causes}")
    }
}
