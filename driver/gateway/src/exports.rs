//! The gateway's volumes as NBD exports: each volume is an export named by its id.
//!
//! The export list is the engine's open volumes at the time of asking, so an attached volume
//! is served at once and a detached one disappears; sessions already open on a detached
//! volume get `ESHUTDOWN`.

use std::sync::Arc;

use async_trait::async_trait;
use blockgate_engine::{Engine, EngineError, Volume, error_chain};
use blockgate_nbd::{BlockDevice, ExportInfo, Exports, IoError};
use bytes::Bytes;

/// Largest request accepted, and the largest block the export advertises.
pub const MAX_REQUEST: u32 = 32 << 20;

#[derive(Debug)]
pub struct VolumeExports {
    engine: Arc<Engine>,
}

impl VolumeExports {
    pub fn new(engine: Arc<Engine>) -> VolumeExports {
        VolumeExports { engine }
    }
}

fn info(volume: &Volume) -> ExportInfo {
    ExportInfo {
        name: volume.id.clone(),
        description: format!("blockgate {} volume {}", volume.mode, volume.id),
        size: volume.size(),
        read_only: false,
        min_block: 512,
        preferred_block: volume.block_size,
        max_block: MAX_REQUEST,
        can_flush: true,
        can_fua: true,
        can_trim: true,
        can_write_zeroes: true,
        // Writes are ordered through one log and a flush syncs every connection's writes.
        can_multi_conn: true,
    }
}

#[async_trait]
impl Exports for VolumeExports {
    async fn list(&self) -> Vec<ExportInfo> {
        self.engine.volumes().iter().map(|v| info(v)).collect()
    }

    async fn open(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        let volumes = self.engine.volumes();
        let volume = if name.is_empty() && volumes.len() == 1 {
            volumes.into_iter().next()
        } else {
            self.engine.volume(name).ok()
        }?;
        Some(Arc::new(VolumeDevice { volume }))
    }
}

/// What an export of `volume` advertises (its transmission flags go to the kernel).
pub fn device_info(volume: &Volume) -> ExportInfo {
    info(volume)
}

/// A volume as a block device, for sessions that skip the handshake (the kernel's sockets).
pub fn device(volume: Arc<Volume>) -> Arc<dyn BlockDevice> {
    Arc::new(VolumeDevice { volume })
}

/// One volume behind an NBD session.
#[derive(Debug)]
struct VolumeDevice {
    volume: Arc<Volume>,
}

/// What kind of request failed: a fenced volume answers writes and reads differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RequestKind {
    Read,
    /// Write, flush, trim, write-zeroes.
    Modify,
}

/// Maps engine errors onto the errors NBD can express; the full cause is logged here since
/// the client sees only an errno.
///
/// A fenced volume (attached to a newer writer elsewhere) refuses every request. Writes,
/// flushes and trims get `EPERM`: this gateway is no longer permitted to change the volume,
/// which is permanent and says so, where `EIO` would invite a retry that can never succeed.
/// Reads get `EIO`: `EPERM` on a read means nothing to clients (a kernel or qemu reports it as
/// a read-only device, not as "this copy is stale"), and the data this gateway holds may be
/// older than the volume's, so it must not be served.
fn to_nbd(volume: &str, request: RequestKind, error: EngineError) -> IoError {
    tracing::warn!(volume, error = %error, cause = %error_chain(&error), "nbd request failed");
    match error {
        EngineError::OutOfRange { .. } | EngineError::InvalidArgument(_) => {
            IoError::Invalid(error.to_string())
        }
        EngineError::LogDiskFull { .. } => IoError::NoSpace(error.to_string()),
        EngineError::Closed { .. } => IoError::ShuttingDown,
        EngineError::Fenced { .. } if request == RequestKind::Modify => {
            IoError::ReadOnly(error.to_string())
        }
        other => IoError::Io(format!("{other}: {}", error_chain(&other))),
    }
}

#[async_trait]
impl BlockDevice for VolumeDevice {
    fn info(&self) -> ExportInfo {
        info(&self.volume)
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, IoError> {
        self.volume
            .read(offset, length)
            .await
            .map_err(|e| to_nbd(&self.volume.id, RequestKind::Read, e))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.volume
            .write(offset, &data, fua)
            .await
            .map_err(|e| to_nbd(&self.volume.id, RequestKind::Modify, e))
    }

    async fn flush(&self) -> Result<(), IoError> {
        self.volume
            .flush()
            .await
            .map_err(|e| to_nbd(&self.volume.id, RequestKind::Modify, e))
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), IoError> {
        self.volume
            .write_zeroes(offset, length, fua)
            .await
            .map_err(|e| to_nbd(&self.volume.id, RequestKind::Modify, e))
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        _no_hole: bool,
    ) -> Result<(), IoError> {
        // Zeroes are recorded as zero extents either way; nothing is "allocated" to keep.
        self.volume
            .write_zeroes(offset, length, fua)
            .await
            .map_err(|e| to_nbd(&self.volume.id, RequestKind::Modify, e))
    }
}
