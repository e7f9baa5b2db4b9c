//! Read-only attachments: a volume served from its bucket state alone, with no write log and
//! no writer epoch.
//!
//! The block-storage API allows readers (any number of nodes) only while no writer is
//! attached, so the bucket state cannot change under a reader; it is read once at attach.
//! Every read is verified like any other segment read. Writes, trims and write-zeroes are
//! refused with `EPERM`, which is what a kernel read-only device reports. There is no local
//! cache yet: each read is a ranged GET, so readers suit restores and scans better than hot
//! random reads.

use std::sync::Arc;

use async_trait::async_trait;
use blockgate_engine::EngineError;
use blockgate_engine::catalog::{Catalog, SnapshotMap};
use blockgate_nbd::{BlockDevice, ExportInfo, IoError};
use blockgate_objstore::ObjectStore;
use bytes::Bytes;

use crate::exports::MAX_REQUEST;

/// A volume opened for reading only.
#[derive(Debug)]
pub struct ReaderVolume {
    pub id: String,
    pub block_size: u32,
    catalog: Catalog,
    map: SnapshotMap,
}

impl ReaderVolume {
    /// Reads the volume's state from the bucket. The volume must exist and not be deleted.
    pub async fn open(
        store: Arc<dyn ObjectStore>,
        block_size: u32,
        id: &str,
    ) -> Result<Arc<ReaderVolume>, EngineError> {
        let catalog = Catalog::new(store, block_size);
        let descriptor = catalog.live_descriptor(id).await?;
        let map = catalog.volume_state(&descriptor).await?;
        Ok(Arc::new(ReaderVolume {
            id: id.to_string(),
            block_size: descriptor.block_size,
            catalog,
            map,
        }))
    }

    pub fn size(&self) -> u64 {
        self.map.size()
    }

    pub fn info(&self) -> ExportInfo {
        ExportInfo {
            name: self.id.clone(),
            description: format!("blockgate volume {} (read-only)", self.id),
            size: self.size(),
            read_only: true,
            min_block: 512,
            preferred_block: self.block_size,
            max_block: MAX_REQUEST,
            // A flush has nothing to make durable; answering it keeps clients that send one
            // anyway (a read-only mount's journal replay check) happy.
            can_flush: true,
            can_fua: false,
            can_trim: false,
            can_write_zeroes: false,
            can_multi_conn: true,
        }
    }

    pub fn device(self: &Arc<Self>) -> Arc<dyn BlockDevice> {
        Arc::new(ReaderDevice {
            volume: self.clone(),
        })
    }
}

#[derive(Debug)]
struct ReaderDevice {
    volume: Arc<ReaderVolume>,
}

fn refused(volume: &str) -> IoError {
    IoError::ReadOnly(format!("volume {volume} is attached read-only here"))
}

#[async_trait]
impl BlockDevice for ReaderDevice {
    fn info(&self) -> ExportInfo {
        self.volume.info()
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, IoError> {
        let length = usize::try_from(length).map_err(|e| IoError::Invalid(e.to_string()))?;
        match self
            .volume
            .catalog
            .read(&self.volume.map, offset, length)
            .await
        {
            Ok(data) => Ok(Bytes::from(data)),
            Err(error) => {
                let cause = blockgate_engine::error_chain(&error);
                tracing::warn!(volume = %self.volume.id, %error, %cause, "read-only read failed");
                Err(IoError::Io(format!("{error}: {cause}")))
            }
        }
    }

    async fn write(&self, _offset: u64, _data: Bytes, _fua: bool) -> Result<(), IoError> {
        Err(refused(&self.volume.id))
    }

    async fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }

    async fn trim(&self, _offset: u64, _length: u32, _fua: bool) -> Result<(), IoError> {
        Err(refused(&self.volume.id))
    }

    async fn write_zeroes(
        &self,
        _offset: u64,
        _length: u32,
        _fua: bool,
        _no_hole: bool,
    ) -> Result<(), IoError> {
        Err(refused(&self.volume.id))
    }
}
