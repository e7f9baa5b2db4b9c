//! One open volume: its write log, its two maps and the tasks that upload and hydrate it.
//!
//! Reads resolve through two maps. The *overlay* holds what is still only in the write log
//! (always the newest bytes); the *remote* map is the volume as the bucket holds it. Under
//! the overlay, a `stored` volume reads its full local copy wherever that copy is hydrated,
//! and a `cached` volume reads the bucket through its chunk cache.
//!
//! Every mutation of the overlay, the log position and the local copy happens under one
//! lock, in log order, so the order of the maps is the order replay will see.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use blockgate_blockstore::documents::{self, Mode, NameDoc, SnapshotManifest};
use blockgate_blockstore::keys::{self, Name, SegmentRef};
use blockgate_blockstore::segment::{self, Run, RunLocation, SegmentBuilder};
use blockgate_objstore::{ObjectStore, ObjectStoreError};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::cache::ChunkCache;
use crate::config::EngineConfig;
use crate::error::{EngineError, error_chain};
use crate::extent_map::{Advance, ExtentMap};
use crate::limiter::UploadLimiter;
use crate::log::{self, HEADER_LEN, LogFile, RecordKind};
use crate::remote::{self, RemoteState};
use crate::unix_now;

/// Records with at least this much data are written as header and data, without a copy.
const LARGE_RECORD: usize = 64 * 1024;

/// Read-ahead fetches in pieces of this size, this many at once.
const PREFETCH_PIECE: u64 = 8 << 20;
const PREFETCH_CONCURRENCY: usize = 8;
/// Sealed log files made into segments (and fence-checked) while every PUT slot is busy, so
/// that a slot never waits for a build. Each holds a segment in memory.
const SEGMENTS_BUILT_AHEAD: usize = 2;

/// Where the newest bytes of a range in the write log are.
#[derive(Debug, Clone)]
enum LogLocation {
    Data { file: Arc<LogFile>, position: u64 },
    Zero { file_seq: u64 },
}

impl LogLocation {
    fn file_seq(&self) -> u64 {
        match self {
            LogLocation::Data { file, .. } => file.seq,
            LogLocation::Zero { file_seq } => *file_seq,
        }
    }
}

impl Advance for LogLocation {
    fn advance(&self, by: u64) -> Self {
        match self {
            LogLocation::Data { file, position } => LogLocation::Data {
                file: file.clone(),
                position: position + by,
            },
            zero @ LogLocation::Zero { .. } => zero.clone(),
        }
    }
}

/// A log file waiting for upload.
#[derive(Debug)]
struct Sealed {
    file: Arc<LogFile>,
    length: u64,
    volume_size: u64,
    /// When no more writes could go into the file (for a replayed file: when the volume
    /// opened). A fence check that started later answers for its upload.
    sealed_at: Instant,
}

/// A snapshot cut but not yet in the bucket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PendingSnapshot {
    pub id: String,
    /// The last segment the snapshot includes.
    pub point_seq: u64,
    pub size: u64,
    pub parent: Option<String>,
    pub internal: bool,
    pub created_unix: u64,
}

/// What the gateway keeps about a volume on local disk, besides its log and copy.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LocalState {
    pub epoch: u64,
    pub hydrated: bool,
    #[serde(default)]
    pub pending_snapshots: Vec<PendingSnapshot>,
    #[serde(default)]
    pub last_snapshot: Option<String>,
}

#[derive(Debug)]
struct State {
    size: u64,
    epoch: u64,
    overlay: ExtentMap<LogLocation>,
    remote: RemoteState,
    current: Arc<LogFile>,
    current_length: u64,
    current_since: Option<Instant>,
    sealed: VecDeque<Sealed>,
    /// Every log file not yet deleted.
    files: BTreeMap<u64, Arc<LogFile>>,
    log_bytes: u64,
    next_record_seq: u64,
    pending_snapshots: Vec<PendingSnapshot>,
    last_snapshot: Option<String>,
    /// Ranges of the local copy that hold the volume's bytes (`stored` mode; `None` once the
    /// whole copy is hydrated).
    hydrated: Option<ExtentMap<()>>,
    last_upload_error: Option<String>,
    /// Why uploads stopped until a restart (a sealed log file that cannot be made into a
    /// segment). Unlike `last_upload_error` it is not cleared by later successful uploads:
    /// with segments built ahead, the uploads before the bad file still finish after it.
    uploads_stopped: Option<String>,
    checkpoint_uploading: bool,
    /// Snapshots whose manifest is being written.
    manifests_in_flight: std::collections::HashSet<String>,
}

/// Counters exported as metrics.
#[derive(Debug, Default)]
pub struct VolumeCounters {
    pub reads: AtomicU64,
    pub read_bytes: AtomicU64,
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub log_full_waits: AtomicU64,
    pub segments_uploaded: AtomicU64,
    pub bytes_uploaded: AtomicU64,
    pub upload_errors: AtomicU64,
    pub read_errors: AtomicU64,
}

/// A point-in-time view of a volume for listings and metrics.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeStatus {
    pub id: String,
    pub mode: Mode,
    pub size: u64,
    pub epoch: u64,
    pub log_bytes: u64,
    pub log_capacity: u64,
    pub upload_backlog_segments: usize,
    pub uploaded_seq: u64,
    pub map_extents: usize,
    pub overlay_extents: usize,
    pub hydrated: bool,
    pub pending_snapshots: Vec<String>,
    pub last_upload_error: Option<String>,
    /// A newer writer epoch is in the bucket: this gateway uploads nothing more and refuses
    /// every request to the volume.
    pub fenced: bool,
    pub cache_hits: u64,
    pub cache_misses: u64,
    pub cache_used_bytes: u64,
    pub cache_capacity_bytes: u64,
}

/// What a read is assembled from.
enum Source {
    Log(Arc<LogFile>, u64),
    Local(u64),
    Remote(Arc<str>, RunLocation),
}

#[derive(Debug)]
pub struct Volume {
    pub id: String,
    id_arc: Arc<str>,
    pub mode: Mode,
    pub block_size: u32,
    /// The writer epoch this volume writes with; fixed for the life of the `Volume` (a new
    /// epoch reopens it).
    epoch: u64,
    /// The newer epoch seen in the bucket, once this writer is fenced. Set once, never
    /// cleared: a fenced writer can never write again.
    fenced_by: OnceLock<u64>,
    /// A detach is waiting for the log to drain: new writes wait until it ends (and then
    /// fail with `Closed`, or proceed if the detach gave up).
    detaching: AtomicBool,
    store: Arc<dyn ObjectStore>,
    config: Arc<EngineConfig>,
    /// The gateway's upload bandwidth limit, shared by its volumes.
    limiter: Arc<UploadLimiter>,
    dir: PathBuf,
    log_dir: PathBuf,
    state: Mutex<State>,
    sync_lock: tokio::sync::Mutex<()>,
    synced: AtomicU64,
    pub(crate) space_freed: Notify,
    work: Notify,
    pub(crate) snapshot_ready: Notify,
    cache: Option<ChunkCache>,
    local_copy: Option<File>,
    /// The frontier of sequential reading, and how far read-ahead has fetched beyond it.
    last_read_end: AtomicU64,
    prefetched_until: AtomicU64,
    /// Read-ahead fetches in flight, for all streams of the volume.
    prefetch_slots: tokio::sync::Semaphore,
    /// PUTs of segments in flight, at most `upload_concurrency`.
    put_slots: tokio::sync::Semaphore,
    /// When the last fence check that found no newer writer started (segment uploads share
    /// checks; each is a listing, and one per segment doubled the uploader's requests).
    last_fence_check: tokio::sync::Mutex<Option<Instant>>,
    closed: AtomicBool,
    pub counters: VolumeCounters,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

pub(crate) struct OpenParams {
    pub id: String,
    pub mode: Mode,
    pub block_size: u32,
    pub dir: PathBuf,
    pub remote: RemoteState,
    pub local: LocalState,
    pub store: Arc<dyn ObjectStore>,
    pub config: Arc<EngineConfig>,
    pub limiter: Arc<UploadLimiter>,
}

impl Volume {
    /// Opens a volume whose bucket state is `remote`: replays its write log, then starts the
    /// uploader (and the hydrator of a `stored` volume whose copy is incomplete).
    pub(crate) fn open(params: OpenParams) -> Result<Arc<Volume>, EngineError> {
        let OpenParams {
            id,
            mode,
            block_size,
            dir,
            remote,
            local,
            store,
            config,
            limiter,
        } = params;
        let log_dir = dir.join("log");
        std::fs::create_dir_all(&log_dir).map_err(|e| EngineError::local(&log_dir, e))?;
        let cache = match mode {
            Mode::Cached => {
                let path = dir.join("cache");
                Some(
                    ChunkCache::create(&path, config.cache_capacity)
                        .map_err(|e| EngineError::local(path, e))?,
                )
            }
            Mode::Stored => None,
        };
        let local_copy = match mode {
            Mode::Stored => {
                let path = dir.join("data");
                let file = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(|e| EngineError::local(&path, e))?;
                Some(file)
            }
            Mode::Cached => None,
        };
        let mut hydrated = match (mode, local.hydrated) {
            (Mode::Stored, false) => {
                // Everything the bucket does not map is a hole, and holes are hydrated.
                let mut hydrated = ExtentMap::new();
                hydrated.insert(0, u64::MAX / 2, ());
                for (offset, length, _) in remote.map.iter() {
                    hydrated.remove(offset, length);
                }
                Some(hydrated)
            }
            _ => None,
        };

        // Replay the write log on top of the bucket state.
        let mut overlay = ExtentMap::new();
        let mut size = remote.size;
        let mut files = BTreeMap::new();
        let mut sealed = VecDeque::new();
        let mut log_bytes = 0u64;
        let mut next_record_seq = 0u64;
        let mut expected: Option<u64> = None;
        let mut current: Option<(Arc<LogFile>, u64)> = None;
        let mut broken = false;
        let on_disk = log::list_files(&log_dir).map_err(|e| EngineError::local(&log_dir, e))?;
        for (seq, path) in on_disk {
            if seq <= remote.applied.seq || broken {
                // Uploaded before the last stop, or after a torn record: never applied.
                std::fs::remove_file(&path).map_err(|e| EngineError::local(&path, e))?;
                continue;
            }
            let file = Arc::new(
                LogFile::open(path.clone(), seq).map_err(|e| EngineError::local(&path, e))?,
            );
            let bytes = file.read_all().map_err(|e| EngineError::local(&path, e))?;
            let (records, end) = log::parse_records(&bytes, expected);
            let file_size = bytes.len() as u64;
            drop(bytes);
            for record in &records {
                match record.kind {
                    RecordKind::Write => {
                        overlay.insert(
                            record.offset,
                            u64::from(record.length),
                            LogLocation::Data {
                                file: file.clone(),
                                position: record.data_position,
                            },
                        );
                        if let Some(copy) = &local_copy {
                            let mut data = vec![0u8; record.length as usize];
                            file.read_at(&mut data, record.data_position)
                                .and_then(|()| copy.write_all_at(&data, record.offset))
                                .map_err(|e| EngineError::local(dir.join("data"), e))?;
                            // The copy now holds these bytes: the hydrator must not
                            // overwrite them with the older bytes of the bucket.
                            if let Some(hydrated) = &mut hydrated {
                                hydrated.insert(record.offset, u64::from(record.length), ());
                            }
                        }
                    }
                    RecordKind::Zero => {
                        overlay.insert(
                            record.offset,
                            u64::from(record.length),
                            LogLocation::Zero { file_seq: seq },
                        );
                        if let Some(copy) = &local_copy {
                            punch_hole(copy, record.offset, u64::from(record.length))
                                .map_err(|e| EngineError::local(dir.join("data"), e))?;
                            if let Some(hydrated) = &mut hydrated {
                                hydrated.insert(record.offset, u64::from(record.length), ());
                            }
                        }
                    }
                    RecordKind::Resize => size = size.max(record.offset),
                }
                next_record_seq = record.seq + 1;
            }
            if let Some(last) = records.last() {
                expected = Some(last.seq + 1);
            }
            if end < file_size {
                // A torn or unused tail. Cut it so no stale bytes can ever follow a new record.
                let torn = bytes_after_end_are_data(&file, end, file_size);
                if torn {
                    tracing::warn!(volume = %id, file = %path.display(), valid = end, "dropped torn write-log tail");
                    broken = true;
                }
                file.truncate(end, end.max(config.segment_target + (1 << 20)))
                    .map_err(|e| EngineError::local(&path, e))?;
            }
            if let Some((previous, length)) = current.take() {
                if length > 0 {
                    sealed.push_back(Sealed {
                        file: previous,
                        length,
                        volume_size: size,
                        sealed_at: Instant::now(),
                    });
                } else {
                    let path = previous.path.clone();
                    files.remove(&previous.seq);
                    drop(previous);
                    std::fs::remove_file(&path).map_err(|e| EngineError::local(&path, e))?;
                }
            }
            log_bytes += end;
            files.insert(seq, file.clone());
            current = Some((file, end));
        }
        let (current, current_length) = match current {
            Some(current) => current,
            None => {
                let seq = remote.applied.seq + 1;
                let file = LogFile::create(&log_dir, seq, config.segment_target + (1 << 20))
                    .map_err(|e| EngineError::log_io(&id, log_dir.clone(), e))?;
                let file = Arc::new(file);
                files.insert(seq, file.clone());
                (file, 0)
            }
        };
        if let Some(copy) = &local_copy {
            let length = copy
                .metadata()
                .map_err(|e| EngineError::local(dir.join("data"), e))?
                .len();
            if length < size {
                copy.set_len(size)
                    .map_err(|e| EngineError::local(dir.join("data"), e))?;
            }
        }
        let current_since = (current_length > 0).then(Instant::now);
        let volume = Arc::new(Volume {
            id_arc: Arc::from(id.as_str()),
            id,
            mode,
            block_size,
            epoch: local.epoch,
            fenced_by: OnceLock::new(),
            detaching: AtomicBool::new(false),
            store,
            dir,
            log_dir,
            state: Mutex::new(State {
                size,
                epoch: local.epoch,
                overlay,
                remote,
                current,
                current_length,
                current_since,
                sealed,
                files,
                log_bytes,
                next_record_seq,
                pending_snapshots: local.pending_snapshots,
                last_snapshot: local.last_snapshot,
                hydrated,
                last_upload_error: None,
                uploads_stopped: None,
                checkpoint_uploading: false,
                manifests_in_flight: std::collections::HashSet::new(),
            }),
            sync_lock: tokio::sync::Mutex::new(()),
            // Everything replayed is synced below, before the volume is handed out.
            synced: AtomicU64::new(next_record_seq),
            space_freed: Notify::new(),
            work: Notify::new(),
            snapshot_ready: Notify::new(),
            cache,
            local_copy,
            last_read_end: AtomicU64::new(u64::MAX),
            prefetched_until: AtomicU64::new(0),
            prefetch_slots: tokio::sync::Semaphore::new(PREFETCH_CONCURRENCY),
            put_slots: tokio::sync::Semaphore::new(config.upload_concurrency.max(1)),
            last_fence_check: tokio::sync::Mutex::new(None),
            closed: AtomicBool::new(false),
            counters: VolumeCounters::default(),
            tasks: Mutex::new(Vec::new()),
            config,
            limiter,
        });
        // Replayed data is already durable on local disk, but sync once so that a flush
        // after restart has nothing older to cover.
        volume.sync_all_files()?;
        volume.complete_applied_snapshots();
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(volume.clone().run_uploader()));
        if volume
            .lock()
            .map(|st| st.hydrated.is_some())
            .unwrap_or(false)
        {
            tasks.push(tokio::spawn(volume.clone().run_hydrator()));
        }
        if let Ok(mut slot) = volume.tasks.lock() {
            *slot = tasks;
        }
        Ok(volume)
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, EngineError> {
        self.state.lock().map_err(|_| EngineError::Closed {
            volume: self.id.clone(),
        })
    }

    pub fn size(&self) -> u64 {
        self.lock().map(|st| st.size).unwrap_or(0)
    }

    /// The writer epoch this gateway holds the volume with.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// True once a newer writer epoch was seen in the bucket.
    pub fn is_fenced(&self) -> bool {
        self.fenced_by.get().is_some()
    }

    fn fenced_error(&self, current: u64) -> EngineError {
        EngineError::Fenced {
            volume: self.id.clone(),
            ours: self.epoch,
            current,
        }
    }

    /// Refuses requests to a closed volume, and to a fenced one: another gateway writes the
    /// volume now, so this one's writes would be lost and its reads may be stale.
    fn check_open(&self) -> Result<(), EngineError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(EngineError::Closed {
                volume: self.id.clone(),
            });
        }
        if let Some(current) = self.fenced_by.get() {
            return Err(self.fenced_error(*current));
        }
        Ok(())
    }

    /// Asks the bucket whether a newer writer holds the volume (one LIST); records it when
    /// one does. Store errors are returned for the caller to retry: an unreachable bucket
    /// says nothing about fencing.
    pub(crate) async fn check_fenced(&self) -> Result<bool, ObjectStoreError> {
        if self.is_fenced() {
            return Ok(true);
        }
        match remote::newer_checkpoint(&*self.store, &self.id, self.epoch).await? {
            Some(newer) => {
                self.set_fenced(newer.epoch);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// [`Volume::check_fenced`] for a segment upload: a check that found no newer writer and
    /// started after `not_before` (when the segment was sealed, or when its last attempt
    /// failed) answers for it, and concurrent askers share one listing. A writer taken over
    /// at time T is still refused every segment sealed after T (its check starts after T and
    /// sees the newer epoch), as with a listing per upload; a backlog of segments sealed
    /// before needs one listing instead of one each.
    async fn check_fenced_for_segment(
        &self,
        not_before: Instant,
    ) -> Result<bool, ObjectStoreError> {
        if self.is_fenced() {
            return Ok(true);
        }
        let mut last_clear = self.last_fence_check.lock().await;
        if last_clear.is_some_and(|started| started >= not_before) {
            return Ok(false);
        }
        let started = Instant::now();
        let fenced = self.check_fenced().await?;
        if !fenced {
            *last_clear = Some(started);
        }
        Ok(fenced)
    }

    fn set_fenced(&self, current: u64) {
        if self.fenced_by.set(current).is_ok() {
            let log_bytes = self.lock().map(|st| st.log_bytes).unwrap_or(0);
            tracing::error!(volume = %self.id, epoch = self.epoch, newer_epoch = current, log_bytes, "volume attached to a newer writer: this gateway uploads nothing more and refuses its requests");
        }
        // Writes waiting for log space must wake up and fail rather than wait forever.
        self.space_freed.notify_waiters();
        self.work.notify_one();
    }

    fn check_range(&self, size: u64, offset: u64, length: u64) -> Result<(), EngineError> {
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(EngineError::OutOfRange {
                volume: self.id.clone(),
                offset,
                length,
                size,
            }),
        }
    }

    /// Writes `data` at `offset`. Returns once the write is in the log; with `fua`, once it
    /// is durable.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), EngineError> {
        let length = u32::try_from(data.len()).map_err(|_| {
            EngineError::InvalidArgument(format!("write of {} bytes is too large", data.len()))
        })?;
        self.append(RecordKind::Write, offset, length, data).await?;
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .write_bytes
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Zeroes a range (TRIM and WRITE_ZEROES: both read back as zeros).
    pub async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
    ) -> Result<(), EngineError> {
        self.append(RecordKind::Zero, offset, length, &[]).await?;
        self.counters.trims.fetch_add(1, Ordering::Relaxed);
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    /// Grows the volume to `new_size` bytes.
    pub async fn expand(&self, new_size: u64) -> Result<(), EngineError> {
        let size = self.size();
        if new_size < size {
            return Err(EngineError::Shrink {
                volume: self.id.clone(),
                size,
                requested: new_size,
            });
        }
        if !new_size.is_multiple_of(u64::from(self.block_size)) {
            return Err(EngineError::InvalidArgument(format!(
                "size {new_size} is not a multiple of the block size {}",
                self.block_size
            )));
        }
        if new_size == size {
            return Ok(());
        }
        self.append(RecordKind::Resize, new_size, 0, &[]).await?;
        self.flush().await
    }

    async fn append(
        &self,
        kind: RecordKind,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> Result<(), EngineError> {
        let stored = HEADER_LEN + data.len() as u64;
        loop {
            let notified = self.space_freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let detaching = {
                self.check_open()?;
                let mut st = self.lock()?;
                if kind != RecordKind::Resize {
                    self.check_range(st.size, offset, u64::from(length))?;
                }
                // Checked under the state lock, so a detach that saw the log drained under
                // that lock cannot miss a write that slipped in.
                let detaching = self.detaching.load(Ordering::Acquire);
                if !detaching
                    && (st.log_bytes == 0 || st.log_bytes + stored <= self.config.log_capacity)
                {
                    return self.append_locked(&mut st, kind, offset, length, data);
                }
                // Space only comes back through uploads: hand the uploader what the current
                // file holds now rather than when it fills or ages.
                if let Err(error) = self.seal_locked(&mut st) {
                    tracing::warn!(volume = %self.id, %error, "could not seal the write log file");
                }
                detaching
            };
            if detaching {
                tracing::debug!(volume = %self.id, "volume detaching; write waits");
            } else {
                self.counters.log_full_waits.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(volume = %self.id, "write log full; write waits for uploads");
            }
            notified.await;
        }
    }

    fn append_locked(
        &self,
        st: &mut State,
        kind: RecordKind,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> Result<(), EngineError> {
        let position = st.current_length;
        let written = if data.len() < LARGE_RECORD {
            let record = log::encode_record(kind, offset, length, st.next_record_seq, data);
            st.current.write_at(&record, position)
        } else {
            // Large payloads go straight from the request buffer, not through a copy made
            // while every other request of the volume waits on this lock.
            let header = log::encode_header(kind, offset, length, st.next_record_seq, data);
            st.current
                .write_at(&header, position)
                .and_then(|()| st.current.write_at(data, position + HEADER_LEN))
        };
        written.map_err(|e| EngineError::log_io(&self.id, st.current.path.clone(), e))?;
        let stored = HEADER_LEN + data.len() as u64;
        st.next_record_seq += 1;
        st.current_length += stored;
        st.log_bytes += stored;
        st.current_since.get_or_insert_with(Instant::now);
        let seq = st.current.seq;
        let range = u64::from(length);
        match kind {
            RecordKind::Write => {
                let location = LogLocation::Data {
                    file: st.current.clone(),
                    position: position + HEADER_LEN,
                };
                st.overlay.insert(offset, range, location);
                if let Some(copy) = &self.local_copy {
                    let copied = copy.write_all_at(data, offset);
                    self.note_local_copy(st, offset, range, copied);
                }
            }
            RecordKind::Zero => {
                st.overlay
                    .insert(offset, range, LogLocation::Zero { file_seq: seq });
                if let Some(copy) = &self.local_copy {
                    let punched = punch_hole(copy, offset, range);
                    self.note_local_copy(st, offset, range, punched);
                }
            }
            RecordKind::Resize => {
                if let Some(copy) = &self.local_copy
                    && let Err(error) = copy.set_len(offset)
                {
                    tracing::warn!(volume = %self.id, %error, "could not grow the local copy");
                }
                st.size = st.size.max(offset);
            }
        }
        if st.current_length >= self.config.segment_target
            && let Err(error) = self.seal_locked(st)
        {
            // The current file keeps taking writes; sealing is retried later.
            tracing::warn!(volume = %self.id, %error, "could not seal the write log file");
        }
        Ok(())
    }

    /// The local copy is a cache of the volume in `stored` mode: a range whose local write
    /// failed is marked unhydrated and read from the log or the bucket until the hydrator
    /// refills it (the running one, or the one a restart starts).
    fn note_local_copy(
        &self,
        st: &mut State,
        offset: u64,
        length: u64,
        result: std::io::Result<()>,
    ) {
        match (result, &mut st.hydrated) {
            (Ok(()), Some(hydrated)) => hydrated.insert(offset, length, ()),
            (Ok(()), None) => {}
            (Err(error), hydrated) => {
                tracing::warn!(volume = %self.id, %error, offset, length, "local copy write failed; range will be re-hydrated");
                let map = hydrated.get_or_insert_with(|| {
                    let mut all = ExtentMap::new();
                    all.insert(0, u64::MAX / 2, ());
                    all
                });
                map.remove(offset, length);
                // A restart must not trust the copy's stale bytes there.
                if let Err(error) = self.save_local_state(st) {
                    tracing::warn!(volume = %self.id, %error, "could not save local state");
                }
            }
        }
    }

    /// Closes the current log file and queues it for upload; returns its sequence number.
    fn seal_locked(&self, st: &mut State) -> Result<Option<u64>, EngineError> {
        if st.current_length == 0 {
            return Ok(None);
        }
        let seq = st.current.seq + 1;
        let file = LogFile::create(&self.log_dir, seq, self.config.segment_target + (1 << 20))
            .map_err(|e| EngineError::log_io(&self.id, self.log_dir.clone(), e))?;
        let file = Arc::new(file);
        st.files.insert(seq, file.clone());
        let previous = std::mem::replace(&mut st.current, file);
        let sealed_seq = previous.seq;
        st.sealed.push_back(Sealed {
            file: previous,
            length: st.current_length,
            volume_size: st.size,
            sealed_at: Instant::now(),
        });
        st.current_length = 0;
        st.current_since = None;
        self.work.notify_one();
        Ok(Some(sealed_seq))
    }

    /// Makes every write acknowledged so far durable (group commit: concurrent flushes share
    /// one fdatasync).
    pub async fn flush(&self) -> Result<(), EngineError> {
        if let Some(current) = self.fenced_by.get() {
            return Err(self.fenced_error(*current));
        }
        self.counters.flushes.fetch_add(1, Ordering::Relaxed);
        // Records are numbered in log order, so the next number says how much to cover.
        let target = self.lock()?.next_record_seq;
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let _turn = self.sync_lock.lock().await;
        if self.synced.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let (files, written) = {
            let st = self.lock()?;
            // Every file, clean or not: one the uploader is syncing right now looks clean,
            // and its sync waits for that one to finish.
            let files: Vec<Arc<LogFile>> = st.files.values().cloned().collect();
            (files, st.next_record_seq)
        };
        let volume = self.id.clone();
        tokio::task::spawn_blocking(move || {
            for file in files {
                file.sync()
                    .map_err(|e| EngineError::log_io(&volume, file.path.clone(), e))?;
            }
            Ok::<(), EngineError>(())
        })
        .await
        .map_err(|_| EngineError::Closed {
            volume: self.id.clone(),
        })??;
        self.synced.fetch_max(written, Ordering::AcqRel);
        Ok(())
    }

    fn sync_all_files(&self) -> Result<(), EngineError> {
        let st = self.lock()?;
        for file in st.files.values() {
            file.sync()
                .map_err(|e| EngineError::log_io(&self.id, file.path.clone(), e))?;
        }
        Ok(())
    }

    /// Reads `length` bytes at `offset`.
    pub async fn read(self: &Arc<Self>, offset: u64, length: u32) -> Result<Bytes, EngineError> {
        self.check_open()?;
        let mut out = vec![0u8; length as usize];
        let plan = {
            let st = self.lock()?;
            self.check_range(st.size, offset, u64::from(length))?;
            self.plan_read(&st, offset, u64::from(length))
        };
        // A sequential reader's cache misses fetch whole read-ahead pieces.
        let ahead =
            if self.cache.is_some() && self.note_read_for_readahead(offset, u64::from(length)) {
                PREFETCH_PIECE
            } else {
                0
            };
        let result = self.execute(plan, offset, &mut out, ahead).await;
        if result.is_err() {
            self.counters.read_errors.fetch_add(1, Ordering::Relaxed);
        }
        result?;
        self.counters.reads.fetch_add(1, Ordering::Relaxed);
        self.counters
            .read_bytes
            .fetch_add(u64::from(length), Ordering::Relaxed);
        Ok(Bytes::from(out))
    }

    fn plan_read(&self, st: &State, offset: u64, length: u64) -> Vec<(u64, u64, Source)> {
        let mut plan = Vec::new();
        for piece in st.overlay.pieces(offset, length) {
            match piece.value {
                Some(LogLocation::Data { file, position }) => {
                    plan.push((piece.offset, piece.length, Source::Log(file, position)))
                }
                Some(LogLocation::Zero { .. }) => {}
                None => self.plan_below_log(st, piece.offset, piece.length, &mut plan),
            }
        }
        plan
    }

    fn plan_below_log(
        &self,
        st: &State,
        offset: u64,
        length: u64,
        plan: &mut Vec<(u64, u64, Source)>,
    ) {
        if self.local_copy.is_some() {
            let Some(hydrated) = &st.hydrated else {
                plan.push((offset, length, Source::Local(offset)));
                return;
            };
            for piece in hydrated.pieces(offset, length) {
                match piece.value {
                    Some(()) => {
                        plan.push((piece.offset, piece.length, Source::Local(piece.offset)))
                    }
                    None => self.plan_remote(st, piece.offset, piece.length, plan),
                }
            }
            return;
        }
        self.plan_remote(st, offset, length, plan);
    }

    fn plan_remote(
        &self,
        st: &State,
        offset: u64,
        length: u64,
        plan: &mut Vec<(u64, u64, Source)>,
    ) {
        for piece in st.remote.map.pieces(offset, length) {
            if let Some(location) = piece.value {
                let key = st.remote.segment_keys[location.segment as usize].clone();
                plan.push((piece.offset, piece.length, Source::Remote(key, location)));
            }
        }
    }

    async fn execute(
        &self,
        plan: Vec<(u64, u64, Source)>,
        base: u64,
        out: &mut [u8],
        ahead: u64,
    ) -> Result<(), EngineError> {
        let mut remote_reads = Vec::new();
        let mut rest: &mut [u8] = out;
        let mut rest_offset = base;
        for (offset, length, source) in plan {
            let skip = usize::try_from(offset - rest_offset).unwrap_or(0);
            let taken = std::mem::take(&mut rest);
            let (_, tail) = taken.split_at_mut(skip);
            let (target, tail) = tail.split_at_mut(usize::try_from(length).unwrap_or(0));
            rest = tail;
            rest_offset = offset + length;
            match source {
                Source::Log(file, position) => {
                    file.read_at(target, position)
                        .map_err(|e| EngineError::LogIo {
                            path: file.path.clone(),
                            source: e,
                        })?
                }
                Source::Local(position) => {
                    if let Some(copy) = &self.local_copy {
                        copy.read_exact_at(target, position)
                            .map_err(|e| EngineError::local(self.dir.join("data"), e))?;
                    }
                }
                Source::Remote(key, location) => remote_reads.push(async move {
                    remote::read_run(
                        &*self.store,
                        self.cache.as_ref(),
                        &key,
                        location,
                        target,
                        ahead,
                    )
                    .await
                }),
            }
        }
        if !remote_reads.is_empty() {
            futures::future::try_join_all(remote_reads).await?;
        }
        Ok(())
    }

    /// Tracks the frontier of sequential reading and starts read-ahead from it; tells
    /// whether the read belongs to a sequential stream.
    ///
    /// A reader is sequential when its request starts near the highest end read so far:
    /// several connections that share out one sequential scan (nbdcopy, the kernel with
    /// multi-queue) interleave their requests around a common frontier, so requiring
    /// `offset == previous end` would miss them.
    fn note_read_for_readahead(self: &Arc<Self>, offset: u64, length: u64) -> bool {
        let readahead = self.config.readahead;
        if readahead == 0 {
            return false;
        }
        let end = offset + length;
        let frontier = self.last_read_end.load(Ordering::Relaxed);
        let near = frontier != u64::MAX
            && offset <= frontier.saturating_add(readahead / 2)
            && offset.saturating_add(readahead) >= frontier;
        if !near {
            // A new stream (or random reads): forget what was fetched ahead of the old one.
            self.last_read_end.store(end, Ordering::Relaxed);
            self.prefetched_until.store(end, Ordering::Relaxed);
            return false;
        }
        let frontier = self
            .last_read_end
            .fetch_max(end, Ordering::Relaxed)
            .max(end);
        // Keep between half and all of the read-ahead window fetched beyond the frontier.
        if self.prefetched_until.load(Ordering::Relaxed) >= frontier + readahead / 2 {
            return true;
        }
        let target = frontier + readahead;
        let from = self
            .prefetched_until
            .fetch_max(target, Ordering::Relaxed)
            .max(frontier);
        if from < target {
            self.prefetch(from, target);
        }
        true
    }

    /// Fetches `[from, to)` of the volume into the cache: pieces of up to `PREFETCH_PIECE`
    /// bytes of segment objects, `PREFETCH_CONCURRENCY` at once for the whole volume.
    fn prefetch(self: &Arc<Self>, from: u64, to: u64) {
        let Ok(st) = self.lock() else { return };
        let length = to.min(st.size).saturating_sub(from);
        let mut plan = Vec::new();
        for piece in st.overlay.pieces(from, length) {
            if piece.value.is_none() {
                self.plan_remote(&st, piece.offset, piece.length, &mut plan);
            }
        }
        drop(st);
        for (_, length, source) in plan {
            let Source::Remote(key, location) = source else {
                continue;
            };
            let range = location.object_range(length);
            let mut at = range.start;
            while at < range.end {
                let end = ((at / PREFETCH_PIECE + 1) * PREFETCH_PIECE).min(range.end);
                let volume = self.clone();
                let key = key.clone();
                tokio::spawn(async move {
                    let Ok(_slot) = volume.prefetch_slots.acquire().await else {
                        return;
                    };
                    let Some(cache) = volume.cache.as_ref() else {
                        return;
                    };
                    if volume.closed.load(Ordering::Acquire) {
                        return;
                    }
                    if let Err(error) =
                        remote::prefetch_range(&*volume.store, cache, &key, at..end).await
                    {
                        tracing::debug!(volume = %volume.id, %error, "read-ahead failed");
                    }
                });
                at = end;
            }
        }
    }

    /// Cuts a snapshot now: seals the log so the snapshot is exactly what was written before
    /// this call. The snapshot is ready once its last segment is in the bucket.
    pub(crate) fn cut_snapshot(
        self: &Arc<Self>,
        id: &str,
        internal: bool,
    ) -> Result<PendingSnapshot, EngineError> {
        let pending = {
            let mut st = self.lock()?;
            let point_seq = match self.seal_locked(&mut st)? {
                Some(seq) => seq,
                None => st.current.seq - 1,
            };
            let pending = PendingSnapshot {
                id: id.to_string(),
                point_seq,
                size: st.size,
                parent: if internal {
                    None
                } else {
                    st.last_snapshot.clone()
                },
                internal,
                created_unix: unix_now(),
            };
            st.pending_snapshots.push(pending.clone());
            if !internal {
                st.last_snapshot = Some(id.to_string());
            }
            self.save_local_state(&st)?;
            pending
        };
        self.complete_applied_snapshots();
        Ok(pending)
    }

    pub(crate) fn pending_snapshots(&self) -> Vec<PendingSnapshot> {
        self.lock()
            .map(|st| st.pending_snapshots.clone())
            .unwrap_or_default()
    }

    /// Writes manifests for pending snapshots whose point the bucket has reached.
    fn complete_applied_snapshots(self: &Arc<Self>) {
        let Ok(mut st) = self.lock() else {
            return;
        };
        let applied = st.remote.applied.seq;
        let ready: Vec<PendingSnapshot> = st
            .pending_snapshots
            .iter()
            .filter(|p| p.point_seq <= applied && !st.manifests_in_flight.contains(&p.id))
            .cloned()
            .collect();
        for pending in ready {
            // After a restart the bucket may already hold segments past the point; no
            // checkpoint is written while a snapshot is pending, so the point is the newest
            // checkpoint or one of the segments after it.
            let point = if pending.point_seq == st.remote.checkpoint.seq {
                Some(st.remote.checkpoint)
            } else {
                st.remote
                    .since_checkpoint
                    .iter()
                    .find(|name| name.seq == pending.point_seq)
                    .copied()
            };
            let Some(point) = point else {
                tracing::error!(volume = %self.id, snapshot = %pending.id, point = pending.point_seq, "snapshot point is no longer in the bucket's recent history; snapshot dropped");
                st.pending_snapshots.retain(|p| p.id != pending.id);
                continue;
            };
            let manifest = SnapshotManifest {
                format: documents::FORMAT,
                id: pending.id.clone(),
                volume: self.id.clone(),
                point: NameDoc(point),
                size: pending.size,
                block_size: self.block_size,
                checkpoint: NameDoc(st.remote.checkpoint),
                segments: st
                    .remote
                    .since_checkpoint
                    .iter()
                    .filter(|name| name.seq <= point.seq)
                    .map(|n| NameDoc(*n))
                    .collect(),
                parent: pending.parent.clone(),
                created_unix: pending.created_unix,
                internal: pending.internal,
            };
            // One writer per manifest. Checkpoints wait while the snapshot is pending (see
            // `apply_uploaded`), so the names the manifest lists stay the newest chain.
            st.manifests_in_flight.insert(pending.id.clone());
            let store = self.store.clone();
            let volume_id = self.id.clone();
            let max_delay = self.config.max_retry_delay;
            let volume = Arc::downgrade(self);
            tokio::spawn(async move {
                let key = keys::snapshot_key(&manifest.id);
                // The id may have been cut while the bucket was unreachable, unchecked: a
                // manifest is never overwritten, and one already there must be this one
                // (written before a restart).
                let existing = retry_forever(
                    &volume_id,
                    "snapshot manifest check",
                    max_delay,
                    |e| matches!(e, ObjectStoreError::NotFound { .. }),
                    || store.get(&key),
                )
                .await
                .ok()
                .map(|bytes| documents::decode::<SnapshotManifest>(&key, &bytes));
                match existing {
                    None => {
                        let body = documents::encode(&manifest);
                        let written = retry_forever(
                            &volume_id,
                            "snapshot manifest",
                            max_delay,
                            |_| false,
                            || async {
                                // A fenced writer's snapshot would name a history the volume
                                // no longer follows.
                                let Some(volume) = volume.upgrade() else {
                                    return Ok(false);
                                };
                                if volume.check_fenced().await? {
                                    return Ok(false);
                                }
                                store.put(&key, body.clone()).await.map(|()| true)
                            },
                        )
                        .await;
                        if !matches!(written, Ok(true)) {
                            tracing::error!(volume = %volume_id, snapshot = %manifest.id, "snapshot not written: the volume is held by a newer writer or closed");
                            return;
                        }
                        tracing::info!(volume = %volume_id, snapshot = %manifest.id, point = %manifest.point.0, "snapshot ready");
                    }
                    Some(Ok(found))
                        if found.volume == manifest.volume && found.point == manifest.point =>
                    {
                        tracing::info!(volume = %volume_id, snapshot = %manifest.id, point = %manifest.point.0, "snapshot ready");
                    }
                    Some(_) => {
                        tracing::error!(volume = %volume_id, snapshot = %manifest.id, "another or an unreadable manifest already has this snapshot id; snapshot dropped");
                    }
                }
                if let Some(volume) = volume.upgrade() {
                    if let Ok(mut st) = volume.lock() {
                        st.pending_snapshots.retain(|p| p.id != manifest.id);
                        st.manifests_in_flight.remove(&manifest.id);
                        if let Err(error) = volume.save_local_state(&st) {
                            tracing::warn!(volume = %volume.id, %error, "could not save local state");
                        }
                    }
                    volume.snapshot_ready.notify_waiters();
                }
            });
        }
    }

    fn save_local_state(&self, st: &State) -> Result<(), EngineError> {
        let local = LocalState {
            epoch: st.epoch,
            hydrated: st.hydrated.is_none(),
            pending_snapshots: st.pending_snapshots.clone(),
            last_snapshot: st.last_snapshot.clone(),
        };
        write_local_state(&self.dir, &local)
    }

    /// Uploads sealed log files, `upload_concurrency` at once, and applies them in sequence
    /// order. A finished upload frees its slot at once (the next file starts while an older
    /// one is still on the wire); it is applied when every file before it is.
    async fn run_uploader(self: Arc<Self>) {
        let mut in_flight = FuturesUnordered::new();
        // Sequence numbers dispatched and not yet applied, oldest first, and the uploads
        // among them that finished out of order.
        let mut dispatched: VecDeque<u64> = VecDeque::new();
        let mut finished: BTreeMap<u64, Uploaded> = BTreeMap::new();
        // Set when an upload could not be made (fenced, or a log file unreadable): nothing
        // more is dispatched, the uploads before it are still applied, then the loop ends.
        let mut stop_at: Option<u64> = None;
        let mut ticker =
            tokio::time::interval(self.config.seal_interval.max(Duration::from_millis(10)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            if stop_at.is_none()
                && let Ok(mut st) = self.lock()
            {
                let stale = st
                    .current_since
                    .is_some_and(|t| t.elapsed() >= self.config.seal_interval);
                if stale && let Err(error) = self.seal_locked(&mut st) {
                    tracing::warn!(volume = %self.id, %error, "could not seal the write log file");
                }
                while in_flight.len() < self.config.upload_concurrency + SEGMENTS_BUILT_AHEAD {
                    let Some(sealed) = st.sealed.pop_front() else {
                        break;
                    };
                    let name = Name {
                        epoch: st.epoch,
                        seq: sealed.file.seq,
                    };
                    dispatched.push_back(name.seq);
                    let volume = self.clone();
                    in_flight.push(async move { (name.seq, volume.upload(sealed, name).await) });
                }
            }
            if in_flight.is_empty() {
                if stop_at.is_some() {
                    return;
                }
                tokio::select! {
                    () = self.work.notified() => {}
                    _ = ticker.tick() => {}
                }
                continue;
            }
            tokio::select! {
                done = in_flight.next() => {
                    match done {
                        Some((seq, Some(uploaded))) => {
                            finished.insert(seq, uploaded);
                        }
                        Some((seq, None)) => {
                            if self.is_fenced() {
                                tracing::warn!(volume = %self.id, "uploads stopped: a newer writer holds the volume");
                                return;
                            }
                            if self.closed.load(Ordering::Acquire) {
                                return;
                            }
                            // A log file that could not be made into a segment stays in the
                            // log. Applying the segments after it would leave a gap in the
                            // bucket's sequence (recovery stops at a gap, and the file's
                            // sequence number would later be uploaded twice), so uploads stop
                            // here; the log fills and writes wait, as reported in the status,
                            // until a restart replays the log and retries.
                            if stop_at.is_none_or(|at| seq < at) {
                                tracing::error!(volume = %self.id, "uploads stopped until restart");
                                stop_at = Some(seq);
                            }
                        }
                        None => {}
                    }
                    while let Some(&next) = dispatched.front() {
                        if stop_at.is_some_and(|at| next >= at) {
                            break;
                        }
                        let Some(uploaded) = finished.remove(&next) else {
                            break;
                        };
                        dispatched.pop_front();
                        self.apply_uploaded(uploaded).await;
                    }
                }
                () = self.work.notified() => {}
                _ = ticker.tick() => {}
            }
        }
    }

    /// Builds a segment from a sealed log file and uploads it, retrying until it is in the
    /// bucket (the log keeps the data safe meanwhile). `None` when the volume closed, or
    /// when the log file cannot be read (the uploader then stops).
    async fn upload(self: Arc<Self>, sealed: Sealed, name: Name) -> Option<Uploaded> {
        let file = sealed.file.clone();
        let length = sealed.length;
        let volume_size = sealed.volume_size;
        let volume_id = self.id.clone();
        let started = Instant::now();
        // The segment is built while the bucket is asked whether a newer writer holds the
        // volume: the two are independent, and done one after the other they kept a PUT slot
        // idle for a third of its time.
        let build =
            tokio::task::spawn_blocking(move || build_segment(&file, length, name, volume_size));
        let (built, first_check) =
            tokio::join!(build, self.check_fenced_for_segment(sealed.sealed_at));
        // The build and the fence check together.
        let prepare_time = started.elapsed();
        let (object, runs) = match built {
            Ok(Ok(built)) => built,
            Ok(Err(error)) => {
                tracing::error!(volume = %volume_id, %error, "cannot read sealed write-log file; upload stalled");
                if let Ok(mut st) = self.lock() {
                    st.uploads_stopped = Some(format!("{error}: {}", error_chain(&error)));
                }
                return None;
            }
            Err(_) => return None,
        };
        let key = keys::segment_key(&self.id, name);
        let mut delay = Duration::from_millis(100).min(self.config.max_retry_delay);
        let mut check = Some(first_check);
        let mut not_before = sealed.sealed_at;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            // A fenced writer uploads nothing more: checked before every attempt, so a
            // writer that was fenced during an outage stops as soon as the bucket answers.
            let fenced = match check.take() {
                Some(done) => done,
                None => self.check_fenced_for_segment(not_before).await,
            };
            let attempt = match fenced {
                Ok(true) => return None,
                Ok(false) => {
                    // Only PUTs count against `upload_concurrency`; segments are built (and
                    // checked) ahead, so a slot that frees up starts its next PUT at once.
                    let Ok(_slot) = self.put_slots.acquire().await else {
                        return None;
                    };
                    self.limiter.acquire(object.len() as u64).await;
                    let putting = Instant::now();
                    let put = self.store.put(&key, object.clone()).await;
                    tracing::debug!(volume = %self.id, segment = %name, bytes = object.len(), ?prepare_time, put_time = ?putting.elapsed(), "segment uploaded");
                    put
                }
                Err(error) => Err(error),
            };
            match attempt {
                Ok(()) => break,
                Err(error) => {
                    // The next attempt wants a check made after this failure: a writer fenced
                    // during an outage stops as soon as the bucket answers.
                    not_before = Instant::now();
                    self.counters.upload_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(volume = %self.id, segment = %name, %error, retry_in = ?delay, "segment upload failed");
                    if let Ok(mut st) = self.lock() {
                        st.last_upload_error = Some(format!("{error}: {}", error_chain(&error)));
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.config.max_retry_delay);
                }
            }
        }
        self.counters
            .segments_uploaded
            .fetch_add(1, Ordering::Relaxed);
        self.counters
            .bytes_uploaded
            .fetch_add(object.len() as u64, Ordering::Relaxed);
        Some(Uploaded {
            name,
            runs,
            length,
            volume_size,
            file: sealed.file,
        })
    }

    /// Applies an uploaded segment (in sequence order): the bucket map takes its runs, the
    /// overlay forgets what came from its log file, and the log file is deleted.
    async fn apply_uploaded(self: &Arc<Self>, uploaded: Uploaded) {
        if let Some(copy) = &self.local_copy {
            // The local copy must hold these writes durably before their log goes away.
            if let Ok(copy) = copy.try_clone() {
                let _ = tokio::task::spawn_blocking(move || copy.sync_data()).await;
            }
        }
        let checkpoint = {
            let Ok(mut st) = self.lock() else { return };
            let segment = SegmentRef {
                volume: self.id_arc.clone(),
                name: uploaded.name,
            };
            st.remote
                .apply(segment, uploaded.volume_size, &uploaded.runs);
            let seq = uploaded.name.seq;
            for run in &uploaded.runs {
                for piece in st.overlay.pieces(run.volume_offset, run.length) {
                    if piece.value.as_ref().is_some_and(|v| v.file_seq() == seq) {
                        st.overlay.remove(piece.offset, piece.length);
                    }
                }
            }
            st.files.remove(&seq);
            st.log_bytes = st.log_bytes.saturating_sub(uploaded.length);
            st.last_upload_error = None;
            let due = st.remote.since_checkpoint.len() as u64 >= self.config.checkpoint_every
                && !st.checkpoint_uploading
                && !st.pending_snapshots.iter().any(|p| p.point_seq <= seq);
            if due {
                st.checkpoint_uploading = true;
                Some((
                    st.remote.applied,
                    st.remote.encode_checkpoint(st.remote.applied),
                ))
            } else {
                None
            }
        };
        let path = uploaded.file.path.clone();
        drop(uploaded.file);
        if let Err(error) = std::fs::remove_file(&path) {
            tracing::warn!(volume = %self.id, path = %path.display(), %error, "could not delete uploaded write-log file");
        }
        self.space_freed.notify_waiters();
        self.complete_applied_snapshots();
        if let Some((name, body)) = checkpoint {
            let volume = self.clone();
            tokio::spawn(async move {
                let key = keys::checkpoint_key(&volume.id, name);
                let written = retry_forever(
                    &volume.id,
                    "checkpoint",
                    volume.config.max_retry_delay,
                    |_| false,
                    || async {
                        if volume.check_fenced().await? {
                            return Ok(false);
                        }
                        volume.store.put(&key, body.clone()).await.map(|()| true)
                    },
                )
                .await;
                if let Ok(mut st) = volume.lock() {
                    if matches!(written, Ok(true)) {
                        st.remote.checkpoint_written(name);
                    }
                    st.checkpoint_uploading = false;
                }
            });
        }
    }

    /// Copies the bucket's data into the local copy of a `stored` volume, range by range,
    /// never over bytes written locally meanwhile.
    async fn run_hydrator(self: Arc<Self>) {
        let mut cursor = 0u64;
        let mut delay = Duration::from_millis(100);
        loop {
            if self.closed.load(Ordering::Acquire) {
                return;
            }
            let next = {
                let Ok(mut st) = self.lock() else { return };
                // Wrap around before declaring the copy whole: a range behind the cursor can
                // lose its local bytes again (a failed local write).
                let (found, waiting_for_log) = match find_unhydrated(&st, cursor) {
                    (None, waiting) => {
                        let (found, again) = find_unhydrated(&st, 0);
                        (found, waiting || again)
                    }
                    found => found,
                };
                if found.is_none() && waiting_for_log {
                    // Only ranges whose newest bytes are still in the log are left: they
                    // can be copied once their segment is in the bucket.
                    None
                } else if found.is_none() {
                    st.hydrated = None;
                    if let Err(error) = self.save_local_state(&st) {
                        tracing::warn!(volume = %self.id, %error, "could not save local state");
                    }
                    tracing::info!(volume = %self.id, "local copy hydrated");
                    return;
                } else {
                    found
                }
            };
            let Some((offset, length, key, location)) = next else {
                tokio::time::sleep(self.config.seal_interval.max(Duration::from_millis(100))).await;
                cursor = 0;
                continue;
            };
            let mut data = vec![0u8; usize::try_from(length).unwrap_or(0)];
            if let Err(error) =
                remote::read_run(&*self.store, None, &key, location, &mut data, 0).await
            {
                // Move on: one unreadable range (a corrupt frame, say) must not keep the rest
                // of the copy from hydrating. The wrap-around above retries it later; reads
                // of it go to the bucket meanwhile and report the error themselves.
                tracing::warn!(volume = %self.id, %error, offset, "hydration read failed; will retry");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(self.config.max_retry_delay);
                cursor = offset + length;
                continue;
            }
            delay = Duration::from_millis(100);
            if let (Ok(mut st), Some(copy)) = (self.lock(), &self.local_copy) {
                let Some(hydrated) = &st.hydrated else { return };
                // Copy only what is still missing, still not newer in the log, and still where
                // the bytes were fetched from; anything else is left for a later pass.
                let fetched_from = st.remote.map.pieces(offset, length);
                let unchanged = fetched_from.len() == 1 && fetched_from[0].value == Some(location);
                let holes: Vec<(u64, u64)> = if unchanged {
                    hydrated
                        .pieces(offset, length)
                        .into_iter()
                        .filter(|p| p.value.is_none())
                        .flat_map(|p| st.overlay.pieces(p.offset, p.length))
                        .filter(|p| p.value.is_none())
                        .map(|p| (p.offset, p.length))
                        .collect()
                } else {
                    Vec::new()
                };
                for (hole, hole_length) in holes {
                    let from = usize::try_from(hole - offset).unwrap_or(0);
                    let to = from + usize::try_from(hole_length).unwrap_or(0);
                    let result = copy.write_all_at(&data[from..to], hole);
                    if result.is_ok() {
                        if let Some(hydrated) = &mut st.hydrated {
                            hydrated.insert(hole, hole_length, ());
                        }
                    } else {
                        tracing::warn!(volume = %self.id, offset = hole, "hydration write failed");
                    }
                }
            }
            cursor = offset + length;
        }
    }

    pub fn status(&self) -> Result<VolumeStatus, EngineError> {
        let st = self.lock()?;
        let cache = self.cache.as_ref().map(|c| c.stats()).unwrap_or_default();
        Ok(VolumeStatus {
            id: self.id.clone(),
            mode: self.mode,
            size: st.size,
            epoch: st.epoch,
            log_bytes: st.log_bytes,
            log_capacity: self.config.log_capacity,
            upload_backlog_segments: st.files.len().saturating_sub(1),
            uploaded_seq: st.remote.applied.seq,
            map_extents: st.remote.map.len(),
            overlay_extents: st.overlay.len(),
            hydrated: st.hydrated.is_none(),
            pending_snapshots: st.pending_snapshots.iter().map(|p| p.id.clone()).collect(),
            last_upload_error: st
                .uploads_stopped
                .clone()
                .or_else(|| st.last_upload_error.clone()),
            fenced: self.is_fenced(),
            cache_hits: cache.hits,
            cache_misses: cache.misses,
            cache_used_bytes: cache.used_bytes,
            cache_capacity_bytes: cache.capacity_bytes,
        })
    }

    /// The bucket-side state (for garbage collection).
    pub(crate) fn remote_view(
        &self,
    ) -> Result<(std::collections::HashSet<SegmentRef>, Name), EngineError> {
        let st = self.lock()?;
        Ok((st.remote.referenced(), st.remote.checkpoint))
    }

    /// True when nothing waits in the log: every write is in the bucket.
    /// The snapshot the next one will name as its parent.
    pub(crate) fn last_snapshot(&self) -> Option<String> {
        self.state
            .lock()
            .ok()
            .and_then(|st| st.last_snapshot.clone())
    }

    pub fn is_drained(&self) -> bool {
        self.lock()
            .map(|st| st.log_bytes == 0 && st.sealed.is_empty())
            .unwrap_or(false)
    }

    /// True when the bucket holds everything: no write in the log, no snapshot pending, no
    /// checkpoint or manifest being written. What a detach waits for.
    pub(crate) fn is_settled(&self) -> bool {
        self.lock().is_ok_and(|st| {
            st.log_bytes == 0
                && st.sealed.is_empty()
                && st.pending_snapshots.is_empty()
                && st.manifests_in_flight.is_empty()
                && !st.checkpoint_uploading
        })
    }

    /// While set, new writes wait (a detach is draining the log); cleared, they go on.
    pub(crate) fn set_detaching(&self, detaching: bool) {
        // Under the state lock, so a writer checks the flag either before it is set (and its
        // record is in the log the detach drains) or after (and it waits).
        let _st = self.lock();
        self.detaching.store(detaching, Ordering::Release);
        self.space_freed.notify_waiters();
    }

    /// Seals what the log holds so the uploader sends it now.
    pub fn seal_now(&self) -> Result<(), EngineError> {
        let mut st = self.lock()?;
        self.seal_locked(&mut st).map(|_| ())
    }

    /// Stops the volume's tasks. The write log stays on disk and is replayed on next open.
    pub async fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.space_freed.notify_waiters();
        let tasks = self
            .tasks
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
        let _ = self.sync_all_files();
    }

    pub(crate) fn local_dir(&self) -> &std::path::Path {
        &self.dir
    }
}

struct Uploaded {
    name: Name,
    runs: Vec<Run>,
    length: u64,
    volume_size: u64,
    file: Arc<LogFile>,
}

/// A range to copy into the local copy: offset, length, segment key, and where in it.
type HydrationRange = (u64, u64, Arc<str>, RunLocation);

/// The first range (at most 1 MiB) at or after `cursor` that the bucket map holds, the local
/// copy lacks, and the log does not hold newer; and whether some missing range was passed
/// over because the log holds it.
fn find_unhydrated(st: &State, mut cursor: u64) -> (Option<HydrationRange>, bool) {
    let Some(hydrated) = st.hydrated.as_ref() else {
        return (None, false);
    };
    let mut waiting_for_log = false;
    while let Some((start, length, location)) = st.remote.map.next_from(cursor) {
        for piece in hydrated.pieces(start, length) {
            if piece.value.is_some() {
                continue;
            }
            for part in st.overlay.pieces(piece.offset, piece.length) {
                if part.value.is_some() {
                    waiting_for_log = true;
                    continue;
                }
                let take = part.length.min(1 << 20);
                let location = location.advance(part.offset - start);
                let key = st.remote.segment_keys[location.segment as usize].clone();
                return (Some((part.offset, take, key, location)), waiting_for_log);
            }
        }
        cursor = start + length;
    }
    (None, waiting_for_log)
}

/// Builds a segment from the first `length` bytes of a log file: the net effect of its
/// records, runs sorted by offset.
fn build_segment(
    file: &LogFile,
    length: u64,
    name: Name,
    volume_size: u64,
) -> Result<(Bytes, Vec<Run>), EngineError> {
    file.sync().map_err(|e| EngineError::LogIo {
        path: file.path.clone(),
        source: e,
    })?;
    let bytes = file.read_prefix(length).map_err(|e| EngineError::LogIo {
        path: file.path.clone(),
        source: e,
    })?;
    let valid = &bytes[..];
    let (records, end) = log::parse_records(valid, None);
    if end != length {
        return Err(EngineError::LogIo {
            path: file.path.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("write-log file verifies only to byte {end} of {length}"),
            ),
        });
    }
    #[derive(Clone)]
    enum Bytes_ {
        Data(u64),
        Zero,
    }
    impl Advance for Bytes_ {
        fn advance(&self, by: u64) -> Self {
            match self {
                Bytes_::Data(at) => Bytes_::Data(at + by),
                Bytes_::Zero => Bytes_::Zero,
            }
        }
    }
    let mut net = ExtentMap::new();
    for record in &records {
        match record.kind {
            RecordKind::Write => net.insert(
                record.offset,
                u64::from(record.length),
                Bytes_::Data(record.data_position),
            ),
            RecordKind::Zero => net.insert(record.offset, u64::from(record.length), Bytes_::Zero),
            RecordKind::Resize => {}
        }
    }
    let runs = segment::count_runs(
        net.iter()
            .map(|(offset, length, value)| (offset, length, matches!(value, Bytes_::Data(_)))),
    );
    let data_bytes = net
        .iter()
        .filter(|(_, _, value)| matches!(value, Bytes_::Data(_)))
        .map(|(_, length, _)| length)
        .sum();
    let mut builder = SegmentBuilder::with_capacity(name, volume_size, runs, data_bytes);
    for (offset, extent_length, value) in net.iter() {
        match value {
            Bytes_::Data(at) => {
                let at = usize::try_from(*at).unwrap_or(0);
                let to = at + usize::try_from(extent_length).unwrap_or(0);
                builder.add_data(offset, &valid[at..to]);
            }
            Bytes_::Zero => builder.add_zero(offset, extent_length),
        }
    }
    Ok(builder.finish())
}

/// Tells whether anything but zeros follows `end` (a torn record rather than preallocated
/// space).
fn bytes_after_end_are_data(file: &LogFile, end: u64, size: u64) -> bool {
    let mut buffer = vec![0u8; usize::try_from((size - end).min(64 * 1024)).unwrap_or(0)];
    file.read_at(&mut buffer, end).is_ok() && buffer.iter().any(|b| *b != 0)
}

fn punch_hole(file: &File, offset: u64, length: u64) -> std::io::Result<()> {
    let (Ok(offset), Ok(length)) = (libc::off_t::try_from(offset), libc::off_t::try_from(length))
    else {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    };
    // SAFETY: fallocate on a descriptor we own with integer arguments; punching a hole only
    // deallocates the range.
    let result = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset,
            length,
        )
    };
    if result == 0 {
        return Ok(());
    }
    // Filesystems without hole punching get zeros written.
    let zeros = vec![0u8; usize::try_from(length).unwrap_or(0).min(1 << 20)];
    let mut at = 0i64;
    while at < length {
        let take = (length - at).min(zeros.len() as i64);
        file.write_all_at(
            &zeros[..usize::try_from(take).unwrap_or(0)],
            u64::try_from(offset + at).unwrap_or(0),
        )?;
        at += take;
    }
    Ok(())
}

pub(crate) fn write_local_state(
    dir: &std::path::Path,
    local: &LocalState,
) -> Result<(), EngineError> {
    let path = dir.join("state.json");
    let temporary = dir.join("state.json.tmp");
    let body = serde_json::to_vec_pretty(local).unwrap_or_default();
    std::fs::write(&temporary, body)
        .and_then(|()| File::open(&temporary)?.sync_all())
        .and_then(|()| std::fs::rename(&temporary, &path))
        .and_then(|()| log::sync_directory(dir))
        .map_err(|e| EngineError::local(path, e))
}

pub(crate) fn read_local_state(dir: &std::path::Path) -> Result<Option<LocalState>, EngineError> {
    let path = dir.join("state.json");
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            EngineError::local(
                &path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(EngineError::local(path, error)),
    }
}

/// Retries an idempotent bucket request until it succeeds (or fails for good, when
/// `is_final` says so), waiting at most `max_delay` between attempts: the caller holds the
/// data until then.
pub(crate) async fn retry_forever<T, F, Fut>(
    volume: &str,
    what: &str,
    max_delay: Duration,
    is_final: impl Fn(&ObjectStoreError) -> bool,
    mut attempt: F,
) -> Result<T, ObjectStoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ObjectStoreError>>,
{
    let mut delay = Duration::from_millis(100).min(max_delay);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) if is_final(&error) => return Err(error),
            Err(error) => {
                tracing::warn!(volume, what, %error, retry_in = ?delay, "bucket request failed");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(max_delay);
            }
        }
    }
}

/// Bytes of valid records in the write log under volume directory `dir`, counting only the
/// log files `counted` accepts (by sequence number). For reporting; unreadable files count 0.
pub(crate) fn log_bytes_on_disk(dir: &std::path::Path, counted: impl Fn(u64) -> bool) -> u64 {
    let Ok(files) = log::list_files(&dir.join("log")) else {
        return 0;
    };
    files
        .into_iter()
        .filter(|(seq, _)| counted(*seq))
        .filter_map(|(seq, path)| {
            let bytes = LogFile::open(path, seq).ok()?.read_all().ok()?;
            Some(log::parse_records(&bytes, None).1)
        })
        .sum()
}
