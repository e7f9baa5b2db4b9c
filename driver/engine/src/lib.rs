//! The blockgate volume engine.
//!
//! An [`Engine`] owns the volumes of one gateway: their write logs and local state under a
//! data directory, and their data in an object store laid out by `blockgate-blockstore`. It
//! knows nothing of NBD, gRPC or Kubernetes: frontends call [`Volume::read`],
//! [`Volume::write`], [`Volume::flush`] and friends.
//!
//! Invariants kept here (DESIGN.md §9): a write is acknowledged only once it is in the write
//! log, and a flush returns only once the log is durable; objects are immutable and verified
//! on every read; a full log makes writes wait, never fail; the bucket alone can rebuild every
//! volume and snapshot.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use blockgate_blockstore::documents::{
    self, Mode, SnapshotManifest, Source, Tombstone, VolumeDescriptor,
};
use blockgate_blockstore::keys::{self, Name};
use blockgate_objstore::ObjectStore;
use serde::Serialize;

mod cache;
pub mod catalog;
mod config;
mod error;
pub mod extent_map;
mod limiter;
mod log;
mod remote;
mod volume;

pub use config::EngineConfig;
pub use error::{EngineError, describe, error_chain};
pub use limiter::UploadLimiter;
pub use volume::{Volume, VolumeCounters, VolumeStatus};

use catalog::{Catalog, References};
use remote::RemoteState;
use volume::{LocalState, OpenParams};

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a new volume starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeSource {
    Empty,
    Snapshot(String),
    Volume(String),
}

#[derive(Debug, Clone)]
pub struct VolumeSpec {
    pub id: String,
    /// Bytes; 0 takes the source snapshot's size.
    pub size: u64,
    pub mode: Mode,
    pub source: VolumeSource,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub volume: String,
    pub size: u64,
    pub ready: bool,
    pub parent: Option<String>,
    pub created_unix: u64,
    pub internal: bool,
}

impl SnapshotInfo {
    fn from_manifest(manifest: &SnapshotManifest) -> SnapshotInfo {
        SnapshotInfo {
            id: manifest.id.clone(),
            volume: manifest.volume.clone(),
            size: manifest.size,
            ready: true,
            parent: manifest.parent.clone(),
            created_unix: manifest.created_unix,
            internal: manifest.internal,
        }
    }
}

/// What a clean detach leaves behind in `<data>/detached/<id>.json`: the epoch the volume was
/// detached with (everything of it is in the bucket) and the parent of its next snapshot.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Detached {
    epoch: u64,
    #[serde(default)]
    last_snapshot: Option<String>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    pub deleted_segments: u64,
    pub deleted_checkpoints: u64,
    pub waiting_for_grace: u64,
    pub purged_volumes: Vec<String>,
}

#[derive(Debug)]
pub struct Engine {
    store: Arc<dyn ObjectStore>,
    /// The bucket-level reads and deletes shared with the block-storage API.
    catalog: Catalog,
    dir: PathBuf,
    config: Arc<EngineConfig>,
    volumes: Mutex<BTreeMap<String, Arc<Volume>>>,
    /// Serialises volume and snapshot lifecycle changes and garbage collection.
    admin: tokio::sync::Mutex<()>,
    gc_candidates: Mutex<HashMap<String, Instant>>,
    /// The upload bandwidth limit every volume of this gateway shares.
    limiter: Arc<UploadLimiter>,
    _lock: std::fs::File,
}

impl Engine {
    /// Opens the gateway state in `dir` on `store`: every volume the bucket holds is opened,
    /// its write log replayed; a volume with no local state is taken over from the bucket
    /// with a new writer epoch. A volume this gateway may not write (fenced) or whose bucket
    /// state is corrupt is logged and left closed; the others open as usual.
    ///
    /// With [`EngineConfig::attach_only`], only the volumes with local state here (attached
    /// before a restart) are opened, and nothing is taken over: the control plane attaches
    /// volumes with [`Engine::attach_volume`].
    pub async fn open(
        dir: &Path,
        store: Arc<dyn ObjectStore>,
        config: EngineConfig,
    ) -> Result<Arc<Engine>, EngineError> {
        let volumes_dir = dir.join("volumes");
        std::fs::create_dir_all(&volumes_dir).map_err(|e| EngineError::local(&volumes_dir, e))?;
        let lock_path = dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| EngineError::local(&lock_path, e))?;
        // SAFETY: flock on a descriptor we own; the lock lives as long as the file.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(EngineError::DirectoryLocked {
                path: dir.to_path_buf(),
            });
        }
        let engine = Arc::new(Engine {
            catalog: Catalog::new(store.clone(), config.block_size),
            store,
            dir: dir.to_path_buf(),
            config: Arc::new(config),
            volumes: Mutex::new(BTreeMap::new()),
            admin: tokio::sync::Mutex::new(()),
            gc_candidates: Mutex::new(HashMap::new()),
            limiter: Arc::new(UploadLimiter::default()),
            _lock: lock,
        });
        let ids = if engine.config.attach_only {
            local_volume_ids(&volumes_dir)?
        } else {
            list_volume_ids(&*engine.store).await?
        };
        for id in ids {
            let descriptor = match engine.descriptor(&id).await {
                Ok(Some(descriptor)) => descriptor,
                Ok(None) => {
                    if engine.config.attach_only {
                        // Left alone: it may hold writes nobody else has, and deleting them
                        // is not this gateway's decision to make at start.
                        tracing::warn!(volume = %id, "local state of a volume the bucket does not hold; not opened");
                    }
                    continue;
                }
                Err(error @ EngineError::Corrupt { .. }) => {
                    tracing::error!(volume = %id, %error, "volume not opened");
                    continue;
                }
                Err(error) => return Err(error),
            };
            if engine.is_tombstoned(&id).await? {
                let local = engine.volume_dir(&id);
                if local.exists() {
                    std::fs::remove_dir_all(&local).map_err(|e| EngineError::local(&local, e))?;
                }
                continue;
            }
            if engine.config.attach_only
                && volume::read_local_state(&engine.volume_dir(&id))?.is_none()
            {
                continue;
            }
            match engine.open_volume(&descriptor).await {
                Ok(volume) => {
                    engine.volumes_lock()?.insert(id, volume);
                }
                Err(error @ (EngineError::Fenced { .. } | EngineError::Corrupt { .. })) => {
                    tracing::error!(volume = %id, %error, "volume not opened");
                }
                Err(error) => return Err(error),
            }
        }
        Ok(engine)
    }

    fn volumes_lock(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, BTreeMap<String, Arc<Volume>>>, EngineError> {
        self.volumes
            .lock()
            .map_err(|_| EngineError::InvalidArgument("engine state poisoned".to_string()))
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Limits this gateway's uploads to `bytes_per_second` across all its volumes; 0 lifts
    /// the limit. Writes are still acknowledged from the write log: a limit only makes the
    /// log drain slower (and, once it is full, writes wait).
    pub fn set_upload_limit(&self, bytes_per_second: u64) {
        self.limiter.set_rate(bytes_per_second);
        tracing::info!(bytes_per_second, "upload bandwidth limit set");
    }

    /// The upload bandwidth limit in force (0: none).
    pub fn upload_limit(&self) -> u64 {
        self.limiter.rate()
    }

    fn volume_dir(&self, id: &str) -> PathBuf {
        self.dir.join("volumes").join(id)
    }

    async fn descriptor(&self, id: &str) -> Result<Option<VolumeDescriptor>, EngineError> {
        self.catalog.descriptor(id).await
    }

    async fn is_tombstoned(&self, id: &str) -> Result<bool, EngineError> {
        self.catalog.is_tombstoned(id).await
    }

    /// Opens a volume: with local state, its write log replays on the bucket state; without,
    /// it is taken over from the bucket with the next writer epoch (standalone mode).
    async fn open_volume(&self, descriptor: &VolumeDescriptor) -> Result<Arc<Volume>, EngineError> {
        let id = &descriptor.id;
        let local = volume::read_local_state(&self.volume_dir(id))?;
        let mut remote = remote::recover(&*self.store, id, descriptor.size).await?;
        let local = match local {
            Some(local) => self.resume(id, &mut remote, local).await?,
            None => {
                let epoch = remote.checkpoint.epoch + 1;
                self.take_over(descriptor, &mut remote, epoch, EpochGrant::Derived)
                    .await?
            }
        };
        self.start_volume(descriptor, remote, local)
    }

    /// Checks local state of epoch L against the bucket. A newer epoch in the bucket fences
    /// this gateway. An older one means an attach saved epoch L but stopped before its
    /// checkpoint was written: the checkpoint is written now, so what the log uploads under
    /// L continues a chain recovery follows.
    async fn resume(
        &self,
        id: &str,
        remote: &mut RemoteState,
        local: LocalState,
    ) -> Result<LocalState, EngineError> {
        if remote.checkpoint.epoch > local.epoch {
            return Err(EngineError::Fenced {
                volume: id.to_string(),
                ours: local.epoch,
                current: remote.checkpoint.epoch,
            });
        }
        if remote.checkpoint.epoch < local.epoch {
            let name = Name {
                epoch: local.epoch,
                seq: remote.applied.seq,
            };
            self.put_checkpoint(id, remote, name).await?;
            tracing::info!(volume = %id, epoch = local.epoch, at = %name, "write log continues under a new writer epoch");
        }
        Ok(local)
    }

    /// Takes a volume without local state over from the bucket with writer epoch `epoch`: a
    /// checkpoint in that epoch starts the chain this gateway extends and fences any earlier
    /// writer.
    async fn take_over(
        &self,
        descriptor: &VolumeDescriptor,
        remote: &mut RemoteState,
        epoch: u64,
        grant: EpochGrant,
    ) -> Result<LocalState, EngineError> {
        let id = &descriptor.id;
        let dir = self.volume_dir(id);
        let local = LocalState {
            epoch,
            hydrated: descriptor.mode == Mode::Cached || remote.map.is_empty(),
            pending_snapshots: Vec::new(),
            last_snapshot: None,
        };
        let name = Name {
            epoch,
            seq: remote.applied.seq,
        };
        match grant {
            // Handed to this gateway alone: saved before its checkpoint is written, so if the
            // gateway stops in between, the next open finds local state newer than the bucket
            // and writes the checkpoint then (`resume`) instead of forgetting the epoch.
            EpochGrant::Attached => {
                std::fs::create_dir_all(&dir).map_err(|e| EngineError::local(&dir, e))?;
                volume::write_local_state(&dir, &local)?;
                self.put_checkpoint(id, remote, name).await?;
            }
            // Derived from the bucket, so another gateway may derive the same one: it is
            // claimed in the bucket first, and a gateway that stops before saving it takes
            // the volume over again with a fresh one rather than sharing it.
            EpochGrant::Derived => {
                self.put_checkpoint(id, remote, name).await?;
                std::fs::create_dir_all(&dir).map_err(|e| EngineError::local(&dir, e))?;
                volume::write_local_state(&dir, &local)?;
            }
        }
        tracing::info!(volume = %id, epoch, at = %name, "volume taken over from the bucket");
        Ok(local)
    }

    fn start_volume(
        &self,
        descriptor: &VolumeDescriptor,
        remote: RemoteState,
        local: LocalState,
    ) -> Result<Arc<Volume>, EngineError> {
        Volume::open(OpenParams {
            id: descriptor.id.clone(),
            mode: descriptor.mode,
            block_size: descriptor.block_size,
            dir: self.volume_dir(&descriptor.id),
            remote,
            local,
            store: self.store.clone(),
            config: self.config.clone(),
            limiter: self.limiter.clone(),
        })
    }

    /// Attaches a volume to this gateway as its writer with `epoch`, the writer epoch the
    /// control plane handed out (larger than any epoch the volume had). Idempotent: a volume
    /// already open here with `epoch` is returned as it is.
    ///
    /// - An `epoch` older than the bucket's newest, or than the one the volume is open with
    ///   here, is refused with [`EngineError::Fenced`]: a stale attach must not take a volume
    ///   back from its current writer.
    /// - Without local state, the volume is taken over from the bucket with `epoch`.
    /// - With local state of an older epoch (the volume was attached here before): if the
    ///   bucket moved on since (another writer), the local state is dropped and the volume
    ///   taken over from the bucket; otherwise the write log is kept and continues under
    ///   `epoch`, so no acknowledged write is lost.
    /// - A volume open here with an older epoch is closed first, then handled as above.
    pub async fn attach_volume(&self, id: &str, epoch: u64) -> Result<Arc<Volume>, EngineError> {
        keys::validate_id(id).map_err(EngineError::InvalidArgument)?;
        if epoch == 0 {
            return Err(EngineError::InvalidArgument(
                "writer epochs start at 1".to_string(),
            ));
        }
        let _admin = self.admin.lock().await;
        let not_found = || EngineError::VolumeNotFound { id: id.to_string() };
        let descriptor = self.descriptor(id).await?.ok_or_else(not_found)?;
        if self.is_tombstoned(id).await? {
            return Err(not_found());
        }
        let stale = |current: u64| EngineError::Fenced {
            volume: id.to_string(),
            ours: epoch,
            current,
        };
        let newest = remote::latest_checkpoint(&*self.store, id)
            .await?
            .map_or(0, |name| name.epoch);
        let open = self.volume(id).ok();
        if let Some(open) = &open
            && open.epoch() > epoch
        {
            return Err(stale(open.epoch()));
        }
        if newest > epoch {
            return Err(stale(newest));
        }
        let dir = self.volume_dir(id);
        let detached = self.read_detached(id)?;
        if newest == epoch {
            // The bucket holds this very epoch: only this gateway's own state of it may go
            // on (an attach retried after it stopped halfway, or a volume this gateway
            // detached cleanly and is given back with the same epoch). Anyone else holding
            // it would write the same keys as this gateway.
            let held_here = match &open {
                Some(open) => open.epoch(),
                None => volume::read_local_state(&dir)?
                    .map(|local| local.epoch)
                    .or(detached.as_ref().map(|d| d.epoch))
                    .unwrap_or(0),
            };
            if held_here != epoch {
                tracing::error!(volume = %id, epoch, "attach refused: the bucket already holds this writer epoch and this gateway has no state of it");
                return Err(stale(newest));
            }
        }
        if let Some(open) = open {
            if open.epoch() == epoch {
                return Ok(open);
            }
            // Open with an older epoch: closed first, so its log is replayed below under
            // the new epoch and nothing of it uploads under the old one meanwhile.
            self.volumes_lock()?.remove(id);
            open.close().await;
            tracing::info!(volume = %id, old_epoch = open.epoch(), epoch, "volume reopened with a new writer epoch");
        }
        let local = volume::read_local_state(&dir)?;
        let mut remote = remote::recover(&*self.store, id, descriptor.size).await?;
        let local = match local {
            Some(local) if local.epoch == epoch => self.resume(id, &mut remote, local).await?,
            Some(local) if local.epoch > epoch => return Err(stale(local.epoch)),
            Some(local) if remote.checkpoint.epoch > local.epoch => {
                // Another gateway wrote the volume since this one held it: the bucket is the
                // volume now, and what this log still holds was never part of it.
                let dropped = self.unuploaded_bytes(id, local.epoch, &dir).await;
                tracing::error!(volume = %id, local_epoch = local.epoch, bucket_epoch = remote.checkpoint.epoch, epoch, dropped_bytes = dropped, "local state is older than the bucket's writer; dropping it and its unuploaded writes");
                std::fs::remove_dir_all(&dir).map_err(|e| EngineError::local(&dir, e))?;
                self.take_over(&descriptor, &mut remote, epoch, EpochGrant::Attached)
                    .await?
            }
            Some(local) => {
                // Nobody wrote since: the log continues under the new epoch. Saved first, as
                // in `take_over`.
                let local = LocalState { epoch, ..local };
                volume::write_local_state(&dir, &local)?;
                self.resume(id, &mut remote, local).await?
            }
            None => match detached {
                // Detached cleanly from here with this epoch: everything is in the bucket and
                // the chain of this epoch simply goes on (no new checkpoint, whose name
                // could be one this epoch already wrote).
                Some(detached) if detached.epoch == epoch && remote.checkpoint.epoch == epoch => {
                    let local = LocalState {
                        epoch,
                        hydrated: descriptor.mode == Mode::Cached || remote.map.is_empty(),
                        pending_snapshots: Vec::new(),
                        last_snapshot: detached.last_snapshot,
                    };
                    std::fs::create_dir_all(&dir).map_err(|e| EngineError::local(&dir, e))?;
                    volume::write_local_state(&dir, &local)?;
                    tracing::info!(volume = %id, epoch, "volume attached again with the epoch it was detached with");
                    local
                }
                _ => {
                    self.take_over(&descriptor, &mut remote, epoch, EpochGrant::Attached)
                        .await?
                }
            },
        };
        self.remove_detached(id)?;
        let volume = self.start_volume(&descriptor, remote, local)?;
        self.volumes_lock()?.insert(id.to_string(), volume.clone());
        tracing::info!(volume = %id, epoch, "volume attached");
        Ok(volume)
    }

    /// Write-log bytes of local state at `epoch` that never reached the bucket (for the log
    /// line that says what is dropped; 0 when it cannot be told).
    async fn unuploaded_bytes(&self, id: &str, epoch: u64, dir: &Path) -> u64 {
        let uploaded: HashSet<u64> =
            remote::list_names(&*self.store, &keys::segments_epoch_prefix(id, epoch))
                .await
                .map(|names| names.into_iter().map(|name| name.seq).collect())
                .unwrap_or_default();
        volume::log_bytes_on_disk(dir, |seq| !uploaded.contains(&seq))
    }

    /// Detaches a volume from this gateway: new writes wait, everything in the write log is
    /// uploaded and pending snapshots become ready, then the volume is closed and its local
    /// state removed. Idempotent: a volume not open here is detached already.
    ///
    /// Waits at most `timeout`. If the bucket cannot be reached meanwhile, the detach fails
    /// with the store's error, and when the log is still not drained for another reason with
    /// [`EngineError::DrainTimeout`]; either way the volume stays open and attached, and
    /// nothing is dropped. A fenced volume (a newer writer holds it) is closed at once: its
    /// unuploaded writes can never become part of the volume.
    pub async fn detach_volume(&self, id: &str, timeout: Duration) -> Result<(), EngineError> {
        let Ok(volume) = self.volume(id) else {
            return Ok(());
        };
        let deadline = tokio::time::Instant::now() + timeout;
        volume.set_detaching(true);
        let admin = loop {
            if let Err(error) = self.drain(&volume, deadline, timeout).await {
                volume.set_detaching(false);
                return Err(error);
            }
            // Snapshots are cut under the admin lock: checked again under it, nothing new can
            // be pending when the volume closes.
            let admin = self.admin.lock().await;
            if volume.is_settled() || volume.is_fenced() {
                break admin;
            }
        };
        {
            let mut volumes = self.volumes_lock()?;
            if !volumes
                .get(id)
                .is_some_and(|open| Arc::ptr_eq(open, &volume))
            {
                // Reattached meanwhile (with a newer epoch): that volume is not ours to close.
                return Ok(());
            }
            volumes.remove(id);
        }
        if volume.is_fenced() {
            let dropped = volume.status().map(|s| s.log_bytes).unwrap_or(0);
            tracing::error!(volume = %id, epoch = volume.epoch(), dropped_bytes = dropped, "detaching a fenced volume: its unuploaded writes are dropped");
        }
        let fenced = volume.is_fenced();
        let marker = Detached {
            epoch: volume.epoch(),
            last_snapshot: volume.last_snapshot(),
        };
        volume.close().await;
        let dir = volume.local_dir().to_path_buf();
        drop(volume);
        if !fenced {
            // Remembered so that the same attachment can open it again here (a CSI unstage
            // and stage under one ControllerPublish) without a new epoch.
            self.write_detached(id, &marker)?;
        }
        std::fs::remove_dir_all(&dir).map_err(|e| EngineError::local(&dir, e))?;
        drop(admin);
        tracing::info!(volume = %id, "volume detached");
        Ok(())
    }

    fn detached_path(&self, id: &str) -> PathBuf {
        self.dir.join("detached").join(format!("{id}.json"))
    }

    fn read_detached(&self, id: &str) -> Result<Option<Detached>, EngineError> {
        let path = self.detached_path(id);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(EngineError::local(&path, error)),
        }
    }

    fn write_detached(&self, id: &str, marker: &Detached) -> Result<(), EngineError> {
        let path = self.detached_path(id);
        let body = serde_json::to_vec(marker).unwrap_or_default();
        let temporary = path.with_extension("json.tmp");
        let write = || -> std::io::Result<()> {
            std::fs::create_dir_all(path.parent().unwrap_or(&self.dir))?;
            let mut file = std::fs::File::create(&temporary)?;
            std::io::Write::write_all(&mut file, &body)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)
        };
        write().map_err(|e| EngineError::local(&path, e))
    }

    fn remove_detached(&self, id: &str) -> Result<(), EngineError> {
        let path = self.detached_path(id);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(EngineError::local(&path, error)),
        }
    }

    /// Waits until `volume` has nothing left to upload, or is fenced.
    async fn drain(
        &self,
        volume: &Arc<Volume>,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<(), EngineError> {
        if !volume.is_fenced() {
            volume.flush().await.or_else(|error| match error {
                EngineError::Fenced { .. } => Ok(()),
                other => Err(other),
            })?;
        }
        loop {
            if volume.is_fenced() {
                return Ok(());
            }
            // Seals what arrived since the last pass (writes that were already in the log
            // when the detach began).
            volume.seal_now()?;
            if volume.is_settled() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                break;
            }
            let notified = volume.space_freed.notified();
            // Checkpoints and manifests finish without a notification: look again soon.
            let _ = tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(50)),
                notified,
            )
            .await;
        }
        // Tell an unreachable bucket (the usual reason) from a log that does not drain.
        match volume.check_fenced().await {
            Ok(true) => Ok(()),
            Err(source) => Err(EngineError::store(
                "upload the write log before detach",
                source,
            )),
            Ok(false) => {
                let status = volume.status()?;
                Err(EngineError::DrainTimeout {
                    volume: volume.id.clone(),
                    log_bytes: status.log_bytes,
                    waited_seconds: timeout.as_secs(),
                    last_upload_error: status.last_upload_error,
                })
            }
        }
    }

    async fn put_checkpoint(
        &self,
        id: &str,
        remote: &mut RemoteState,
        name: Name,
    ) -> Result<(), EngineError> {
        let body = remote.encode_checkpoint(name);
        self.store
            .put(&keys::checkpoint_key(id, name), body)
            .await
            .map_err(|e| EngineError::store("write checkpoint", e))?;
        remote.applied = name;
        remote.checkpoint_written(name);
        Ok(())
    }

    pub fn volume(&self, id: &str) -> Result<Arc<Volume>, EngineError> {
        self.volumes_lock()?
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::VolumeNotFound { id: id.to_string() })
    }

    pub fn volumes(&self) -> Vec<Arc<Volume>> {
        self.volumes
            .lock()
            .map(|v| v.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Creates a volume, or returns the existing one when it was created with the same
    /// parameters (creation is idempotent by id).
    pub async fn create_volume(&self, spec: VolumeSpec) -> Result<Arc<Volume>, EngineError> {
        keys::validate_id(&spec.id).map_err(EngineError::InvalidArgument)?;
        let _admin = self.admin.lock().await;
        if let Ok(existing) = self.volume(&spec.id) {
            let descriptor = self.descriptor(&spec.id).await?;
            let same_source = descriptor.as_ref().map(|d| source_spec(d.source.as_ref()))
                == Some(spec.source.clone());
            let same_size =
                spec.size == 0 || descriptor.as_ref().is_some_and(|d| d.size == spec.size);
            if existing.mode == spec.mode && same_source && same_size {
                return Ok(existing);
            }
            return Err(EngineError::VolumeExists { id: spec.id });
        }
        if self.descriptor(&spec.id).await?.is_some() {
            // Deleted, but its objects are still kept for its snapshots.
            return Err(EngineError::VolumeExists { id: spec.id });
        }
        let (remote, source, size) = match &spec.source {
            VolumeSource::Empty => {
                if spec.size == 0 {
                    return Err(EngineError::InvalidArgument(
                        "a new empty volume needs a size".to_string(),
                    ));
                }
                (
                    RemoteState::empty(Name { epoch: 0, seq: 0 }, spec.size),
                    None,
                    spec.size,
                )
            }
            VolumeSource::Snapshot(snapshot) => {
                let manifest = self.manifest(snapshot).await?;
                let remote = remote::snapshot_state(&*self.store, &manifest).await?;
                let size = if spec.size == 0 {
                    manifest.size
                } else {
                    spec.size
                };
                if size < manifest.size {
                    return Err(EngineError::InvalidArgument(format!(
                        "volume size {size} is smaller than snapshot {snapshot} ({} bytes)",
                        manifest.size
                    )));
                }
                (
                    remote,
                    Some(Source::Snapshot {
                        snapshot: snapshot.clone(),
                    }),
                    size,
                )
            }
            VolumeSource::Volume(source_id) => {
                let source_volume = self.volume(source_id)?;
                let snapshot = format!("clone-{}", spec.id);
                keys::validate_id(&snapshot).map_err(EngineError::InvalidArgument)?;
                let cut = source_volume.cut_snapshot(&snapshot, true)?;
                let manifest = self.wait_manifest(&source_volume, &snapshot).await?;
                let remote = remote::snapshot_state(&*self.store, &manifest).await?;
                let size = if spec.size == 0 { cut.size } else { spec.size };
                if size < cut.size {
                    return Err(EngineError::InvalidArgument(format!(
                        "clone size {size} is smaller than volume {source_id} ({} bytes)",
                        cut.size
                    )));
                }
                let source = Source::Volume {
                    volume: source_id.clone(),
                    snapshot,
                };
                (remote, Some(source), size)
            }
        };
        let (_, own) = self
            .catalog
            .write_new_volume(&spec.id, size, spec.mode, source, remote)
            .await?;
        let dir = self.volume_dir(&spec.id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| EngineError::local(&dir, e))?;
        }
        std::fs::create_dir_all(&dir).map_err(|e| EngineError::local(&dir, e))?;
        let local = LocalState {
            epoch: own.checkpoint.epoch,
            hydrated: spec.mode == Mode::Cached || own.map.is_empty(),
            pending_snapshots: Vec::new(),
            last_snapshot: None,
        };
        volume::write_local_state(&dir, &local)?;
        let volume = Volume::open(OpenParams {
            id: spec.id.clone(),
            mode: spec.mode,
            block_size: self.config.block_size,
            dir,
            remote: own,
            local,
            store: self.store.clone(),
            config: self.config.clone(),
            limiter: self.limiter.clone(),
        })?;
        self.volumes_lock()?.insert(spec.id.clone(), volume.clone());
        tracing::info!(volume = %spec.id, size, mode = %spec.mode, source = ?spec.source, "volume created");
        Ok(volume)
    }

    pub async fn expand_volume(&self, id: &str, size: u64) -> Result<(), EngineError> {
        self.volume(id)?.expand(size).await
    }

    /// Deletes a volume: its local state at once; its objects except those its snapshots
    /// still need.
    pub async fn delete_volume(&self, id: &str) -> Result<(), EngineError> {
        let _admin = self.admin.lock().await;
        let volume = self.volume(id)?;
        if !volume.pending_snapshots().is_empty() {
            return Err(EngineError::InvalidArgument(format!(
                "volume {id} has snapshots still uploading; delete it once they are ready"
            )));
        }
        let descriptor = self.descriptor(id).await?;
        self.volumes_lock()?.remove(id);
        volume.close().await;
        let tombstone = Tombstone {
            format: documents::FORMAT,
            deleted_unix: unix_now(),
        };
        self.store
            .put(&keys::tombstone_key(id), documents::encode(&tombstone))
            .await
            .map_err(|e| EngineError::store("write volume tombstone", e))?;
        let dir = volume.local_dir().to_path_buf();
        drop(volume);
        std::fs::remove_dir_all(&dir).map_err(|e| EngineError::local(&dir, e))?;
        tracing::info!(volume = %id, "volume deleted");
        if let Some(Source::Volume { snapshot, .. }) = descriptor.and_then(|d| d.source)
            && self.manifest(&snapshot).await.is_ok_and(|m| m.internal)
        {
            self.store
                .delete(&keys::snapshot_key(&snapshot))
                .await
                .map_err(|e| EngineError::store("delete snapshot manifest", e))?;
        }
        let references = self.snapshot_references().await?;
        let mut report = GcReport::default();
        self.purge_deleted(id, &references, &mut report).await?;
        Ok(())
    }

    async fn manifest(&self, id: &str) -> Result<SnapshotManifest, EngineError> {
        self.catalog.manifest(id).await
    }

    async fn wait_manifest(
        &self,
        volume: &Arc<Volume>,
        id: &str,
    ) -> Result<SnapshotManifest, EngineError> {
        loop {
            let notified = volume.snapshot_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !volume.pending_snapshots().iter().any(|p| p.id == id) {
                return self.manifest(id).await;
            }
            volume.seal_now()?;
            notified.await;
        }
    }

    fn pending_snapshot(&self, id: &str) -> Option<SnapshotInfo> {
        self.volumes().iter().find_map(|volume| {
            volume
                .pending_snapshots()
                .into_iter()
                .find(|p| p.id == id)
                .map(|p| SnapshotInfo {
                    id: p.id,
                    volume: volume.id.clone(),
                    size: p.size,
                    ready: false,
                    parent: p.parent,
                    created_unix: p.created_unix,
                    internal: p.internal,
                })
        })
    }

    /// Cuts a crash-consistent snapshot of a volume and returns at once; it becomes ready
    /// when its data is in the bucket. Idempotent by id for the same volume.
    pub async fn create_snapshot(
        &self,
        volume_id: &str,
        id: &str,
    ) -> Result<SnapshotInfo, EngineError> {
        keys::validate_id(id).map_err(EngineError::InvalidArgument)?;
        let _admin = self.admin.lock().await;
        let volume = self.volume(volume_id)?;
        let existing = match self.pending_snapshot(id) {
            Some(pending) => Some(pending),
            None => match self.manifest(id).await {
                Ok(manifest) => Some(SnapshotInfo::from_manifest(&manifest)),
                Err(EngineError::SnapshotNotFound { .. }) => None,
                // Cutting must not wait for the bucket (DESIGN.md §3). The manifest writer
                // checks the id again before it writes, and never overwrites a manifest.
                Err(EngineError::Store { source, .. }) if source.is_transient() => {
                    tracing::warn!(snapshot = %id, error = %source, "bucket unreachable; cutting the snapshot without checking its id");
                    None
                }
                Err(error) => return Err(error),
            },
        };
        if let Some(existing) = existing {
            if existing.volume == volume_id && !existing.internal {
                return Ok(existing);
            }
            return Err(EngineError::SnapshotExists {
                id: id.to_string(),
                volume: existing.volume,
            });
        }
        let cut = volume.cut_snapshot(id, false)?;
        tracing::info!(volume = %volume_id, snapshot = %id, point = cut.point_seq, "snapshot cut");
        Ok(SnapshotInfo {
            id: id.to_string(),
            volume: volume_id.to_string(),
            size: cut.size,
            ready: false,
            parent: cut.parent,
            created_unix: cut.created_unix,
            internal: false,
        })
    }

    pub async fn snapshot(&self, id: &str) -> Result<SnapshotInfo, EngineError> {
        if let Some(pending) = self.pending_snapshot(id) {
            return Ok(pending);
        }
        Ok(SnapshotInfo::from_manifest(&self.manifest(id).await?))
    }

    /// Waits until a snapshot is ready.
    pub async fn wait_snapshot_ready(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<SnapshotInfo, EngineError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let info = self.snapshot(id).await?;
            if info.ready {
                return Ok(info);
            }
            let volume = self.volume(&info.volume)?;
            let notified = volume.snapshot_ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.pending_snapshot(id).is_none() {
                continue;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.snapshot(id).await;
            }
        }
    }

    /// Every snapshot in the bucket and every one still uploading here, optionally of one
    /// volume.
    pub async fn list_snapshots(
        &self,
        volume: Option<&str>,
    ) -> Result<Vec<SnapshotInfo>, EngineError> {
        let mut found = BTreeMap::new();
        for object in blockgate_objstore::list_all(&*self.store, keys::SNAPSHOTS_PREFIX)
            .await
            .map_err(|e| EngineError::store("list snapshots", e))?
        {
            let Some(id) = keys::snapshot_of_key(&object.key) else {
                continue;
            };
            match self.manifest(id).await {
                Ok(manifest) => {
                    found.insert(id.to_string(), SnapshotInfo::from_manifest(&manifest));
                }
                Err(EngineError::SnapshotNotFound { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        for open in self.volumes() {
            for pending in open.pending_snapshots() {
                if let Some(info) = self.pending_snapshot(&pending.id) {
                    found.insert(pending.id, info);
                }
            }
        }
        Ok(found
            .into_values()
            .filter(|info| volume.is_none_or(|v| v == info.volume))
            .collect())
    }

    /// Deletes a snapshot. Refused while a volume was created from it (the volume still reads
    /// the snapshot's data). The data is freed by garbage collection.
    pub async fn delete_snapshot(&self, id: &str) -> Result<(), EngineError> {
        let _admin = self.admin.lock().await;
        if self.pending_snapshot(id).is_some() {
            return Err(EngineError::InvalidArgument(format!(
                "snapshot {id} is still uploading; delete it once it is ready"
            )));
        }
        self.manifest(id).await?;
        for volume in list_volume_ids(&*self.store).await? {
            let Some(descriptor) = self.descriptor(&volume).await? else {
                continue;
            };
            let sourced = descriptor
                .source
                .as_ref()
                .is_some_and(|s| s.snapshot() == id);
            if sourced && !self.is_tombstoned(&volume).await? {
                return Err(EngineError::SnapshotInUse {
                    snapshot: id.to_string(),
                    volume,
                });
            }
        }
        self.store
            .delete(&keys::snapshot_key(id))
            .await
            .map_err(|e| EngineError::store("delete snapshot manifest", e))?;
        tracing::info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    /// Segments and checkpoints any snapshot needs, by volume.
    async fn snapshot_references(&self) -> Result<HashMap<String, References>, EngineError> {
        self.catalog.snapshot_references().await
    }

    /// Deletes segments and checkpoints that no volume map and no snapshot references.
    /// A segment is deleted only after it stayed unreferenced for the grace period. A volume
    /// another gateway has taken over (a newer epoch in the bucket) is left alone; with a
    /// grace period longer than the time between collections, a takeover is noticed before
    /// anything its new writer may read becomes due.
    pub async fn collect_garbage(&self) -> Result<GcReport, EngineError> {
        let _admin = self.admin.lock().await;
        let references = self.snapshot_references().await?;
        let mut report = GcReport::default();
        let mut seen = HashSet::new();
        for volume in self.volumes() {
            if !volume.pending_snapshots().is_empty() {
                continue;
            }
            let (used, checkpoint) = volume.remote_view()?;
            let empty = References::default();
            let referenced = references.get(&volume.id).unwrap_or(&empty);
            let own_used: HashSet<Name> = used
                .iter()
                .filter(|s| &*s.volume == volume.id.as_str())
                .map(|s| s.name)
                .collect();
            let segments =
                remote::list_names(&*self.store, &keys::segments_prefix(&volume.id)).await?;
            let checkpoints =
                remote::list_names(&*self.store, &keys::checkpoints_prefix(&volume.id)).await?;
            // A newer writer epoch means another gateway took the volume over: this one is
            // fenced, and its map says nothing of what the new writer's map references.
            if segments
                .iter()
                .chain(&checkpoints)
                .any(|name| name.epoch > checkpoint.epoch)
            {
                tracing::warn!(volume = %volume.id, epoch = checkpoint.epoch, "volume taken over by a newer writer; its garbage is not collected here");
                continue;
            }
            let mut candidates = Vec::new();
            for name in segments {
                let recent = name.epoch == checkpoint.epoch && name.seq > checkpoint.seq;
                if !recent && !own_used.contains(&name) && !referenced.segments.contains(&name) {
                    candidates.push((keys::segment_key(&volume.id, name), true));
                }
            }
            for name in checkpoints {
                if name < checkpoint && !referenced.checkpoints.contains(&name) {
                    candidates.push((keys::checkpoint_key(&volume.id, name), false));
                }
            }
            for (key, is_segment) in candidates {
                seen.insert(key.clone());
                let first_seen = {
                    let mut tracked = self.gc_candidates.lock().map_err(|_| {
                        EngineError::InvalidArgument("gc state poisoned".to_string())
                    })?;
                    *tracked.entry(key.clone()).or_insert_with(Instant::now)
                };
                if first_seen.elapsed() < self.config.gc_grace {
                    report.waiting_for_grace += 1;
                    continue;
                }
                self.store
                    .delete(&key)
                    .await
                    .map_err(|e| EngineError::store("delete unreferenced object", e))?;
                if is_segment {
                    report.deleted_segments += 1;
                } else {
                    report.deleted_checkpoints += 1;
                }
            }
        }
        if let Ok(mut tracked) = self.gc_candidates.lock() {
            tracked.retain(|key, _| seen.contains(key));
        }
        let open: HashSet<String> = self.volumes().iter().map(|v| v.id.clone()).collect();
        for id in list_volume_ids(&*self.store).await? {
            if !open.contains(&id) && self.is_tombstoned(&id).await? {
                self.purge_deleted(&id, &references, &mut report).await?;
            }
        }
        tracing::info!(?report, "garbage collection done");
        Ok(report)
    }

    /// Removes a deleted volume's objects that no snapshot needs; the descriptor and the
    /// tombstone go last, once nothing else is left.
    async fn purge_deleted(
        &self,
        id: &str,
        references: &HashMap<String, References>,
        report: &mut GcReport,
    ) -> Result<(), EngineError> {
        let purged = self.catalog.purge_deleted_with(id, references).await?;
        report.deleted_segments += purged.segments;
        report.deleted_checkpoints += purged.checkpoints;
        if purged.volume_gone {
            report.purged_volumes.push(id.to_string());
        }
        Ok(())
    }

    /// Stops every volume's tasks; write logs stay on disk for the next start.
    pub async fn shutdown(&self) {
        for volume in self.volumes() {
            volume.close().await;
        }
    }
}

/// Where a writer epoch came from, which decides how a takeover records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EpochGrant {
    /// Handed out by the control plane to this gateway alone (`attach_volume`).
    Attached,
    /// `newest + 1`, derived from the bucket (standalone mode).
    Derived,
}

fn source_spec(source: Option<&Source>) -> VolumeSource {
    match source {
        None => VolumeSource::Empty,
        Some(Source::Snapshot { snapshot }) => VolumeSource::Snapshot(snapshot.clone()),
        Some(Source::Volume { volume, .. }) => VolumeSource::Volume(volume.clone()),
    }
}

/// The ids of every volume in the bucket, one listing request per volume (each listing
/// starts past the previous volume's keys), so a bucket with many segments is never
/// listed whole.
pub async fn list_volume_ids(store: &dyn ObjectStore) -> Result<Vec<String>, EngineError> {
    let mut ids = Vec::new();
    let mut after = None;
    loop {
        let page = store
            .list(keys::VOLUMES_PREFIX, after)
            .await
            .map_err(|e| EngineError::store("list volumes", e))?;
        let Some(first) = page.keys.first() else {
            break;
        };
        let Some(id) = keys::volume_of_key(&first.key) else {
            break;
        };
        ids.push(id.to_string());
        after = Some(keys::after_volume(id));
    }
    Ok(ids)
}

/// The volumes with a directory under `volumes_dir` (local state of this gateway).
fn local_volume_ids(volumes_dir: &Path) -> Result<Vec<String>, EngineError> {
    let entries = std::fs::read_dir(volumes_dir).map_err(|e| EngineError::local(volumes_dir, e))?;
    let mut ids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| EngineError::local(volumes_dir, e))?;
        if !entry.path().is_dir() {
            continue;
        }
        if let Some(id) = entry.file_name().to_str()
            && keys::validate_id(id).is_ok()
        {
            ids.push(id.to_string());
        }
    }
    ids.sort();
    Ok(ids)
}
