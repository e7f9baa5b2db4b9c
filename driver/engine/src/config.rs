//! Engine settings.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// A log file is sealed into a segment once it holds this many bytes.
    pub segment_target: u64,
    /// Write-log bytes a volume may hold before new writes wait for uploads.
    pub log_capacity: u64,
    /// Local read cache of each `cached` volume.
    pub cache_capacity: u64,
    /// Segments uploaded at once per volume.
    pub upload_concurrency: usize,
    /// A log file holding data this long is sealed even if not full, so the bucket is never
    /// far behind.
    pub seal_interval: Duration,
    /// A checkpoint is written after this many segments.
    pub checkpoint_every: u64,
    /// Bytes fetched ahead of a sequential reader of a `cached` volume.
    pub readahead: u64,
    /// Longest wait between retries of a failed upload.
    pub max_retry_delay: Duration,
    /// A segment must be unreferenced for this long before garbage collection deletes it,
    /// so a read that resolved it just before still finds it.
    pub gc_grace: Duration,
    /// Block size advertised for new volumes.
    pub block_size: u32,
    /// Managed mode: [`Engine::open`](crate::Engine::open) opens only the volumes that have
    /// local state here (attached before a restart) and never takes a volume over by itself;
    /// volumes come and go through [`Engine::attach_volume`](crate::Engine::attach_volume) and
    /// [`Engine::detach_volume`](crate::Engine::detach_volume), with the writer epoch the
    /// control plane hands out. Off (standalone): every volume in the bucket is opened, and one
    /// without local state is taken over with the next epoch.
    pub attach_only: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            segment_target: 8 << 20,
            log_capacity: 1 << 30,
            cache_capacity: 1 << 30,
            upload_concurrency: 4,
            seal_interval: Duration::from_secs(2),
            checkpoint_every: 64,
            readahead: 32 << 20,
            max_retry_delay: Duration::from_secs(10),
            gc_grace: Duration::from_secs(60),
            block_size: 4096,
            attach_only: false,
        }
    }
}
