//! The bucket-level catalog of volumes and snapshots, for a process that holds no write log
//! (the block-storage API).
//!
//! Everything here works on the bucket alone: creating a volume's first objects, reading a
//! volume's or a snapshot's map, cutting a snapshot of a volume no gateway holds, deleting,
//! and reading and writing snapshot blocks. It must never change a volume a gateway holds:
//! the caller (the block-storage API) knows the attachments and asks the holding gateway
//! instead. No key is overwritten, with one documented exception: the blocks of an import
//! that has not completed (see [`Catalog::put_import_block`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use blockgate_blockstore::documents::{
    self, Mode, NameDoc, SnapshotManifest, Source, Tombstone, VolumeDescriptor,
};
use blockgate_blockstore::keys::{self, Name, SegmentRef};
use blockgate_blockstore::segment::{RunLocation, SegmentBuilder};
use blockgate_objstore::{ObjectStore, ObjectStoreError};

use crate::error::EngineError;
use crate::remote::{self, RemoteState};
use crate::unix_now;

/// What a volume created through the catalog starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogSource {
    Empty,
    Snapshot(String),
    /// A clone of `volume` through its (internal) snapshot `snapshot`, already cut.
    Clone {
        volume: String,
        snapshot: String,
    },
}

/// A snapshot's map: which byte ranges hold data and where that data is.
#[derive(Debug, Clone)]
pub struct SnapshotMap {
    state: RemoteState,
}

/// A byte range of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

impl SnapshotMap {
    pub fn size(&self) -> u64 {
        self.state.size
    }

    /// The written extents, in order.
    pub fn extents(&self) -> Vec<Extent> {
        self.state
            .map
            .iter()
            .map(|(offset, length, _)| Extent { offset, length })
            .collect()
    }

    /// Where the byte at the start of a piece lives, comparable across maps: the segment,
    /// and the position in its run that the piece's first byte has.
    fn identity(&self, location: &RunLocation) -> (&SegmentRef, u64, u64) {
        (
            &self.state.segments[location.segment as usize],
            location.run_offset,
            location.skip,
        )
    }

    /// The extents whose data differs between `self` and `older`: written (or trimmed) in
    /// one and not the other, or written again. Bytes that are the same bytes of the same
    /// segment in both are unchanged, so the diff costs the two maps' sizes, not the
    /// volume's.
    pub fn changed_since(&self, older: &SnapshotMap) -> Vec<Extent> {
        let end = self.size().max(older.size());
        let ours = self.state.map.pieces(0, end);
        let theirs = older.state.map.pieces(0, end);
        let mut changed: Vec<Extent> = Vec::new();
        let (mut i, mut j) = (0, 0);
        let mut at = 0u64;
        while i < ours.len() && j < theirs.len() {
            let (a, b) = (&ours[i], &theirs[j]);
            let a_end = a.offset + a.length;
            let b_end = b.offset + b.length;
            let until = a_end.min(b_end);
            let same = match (&a.value, &b.value) {
                (None, None) => true,
                (Some(x), Some(y)) => {
                    let x = x.advance(at - a.offset);
                    let y = y.advance(at - b.offset);
                    self.identity(&x) == older.identity(&y)
                }
                _ => false,
            };
            if !same {
                match changed.last_mut() {
                    Some(last) if last.offset + last.length == at => last.length += until - at,
                    _ => changed.push(Extent {
                        offset: at,
                        length: until - at,
                    }),
                }
            }
            at = until;
            if a_end == until {
                i += 1;
            }
            if b_end == until {
                j += 1;
            }
        }
        changed
    }
}

/// The catalog over one bucket.
#[derive(Debug, Clone)]
pub struct Catalog {
    store: Arc<dyn ObjectStore>,
    block_size: u32,
}

impl Catalog {
    /// `block_size` is the volumes' logical block size: every size is a multiple of it.
    pub fn new(store: Arc<dyn ObjectStore>, block_size: u32) -> Catalog {
        Catalog { store, block_size }
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    pub async fn descriptor(&self, id: &str) -> Result<Option<VolumeDescriptor>, EngineError> {
        let key = keys::descriptor_key(id);
        match self.store.get(&key).await {
            Ok(bytes) => documents::decode(&key, &bytes)
                .map(Some)
                .map_err(|source| EngineError::Corrupt { key, source }),
            Err(ObjectStoreError::NotFound { .. }) => Ok(None),
            Err(error) => Err(EngineError::store("read volume descriptor", error)),
        }
    }

    pub async fn is_tombstoned(&self, id: &str) -> Result<bool, EngineError> {
        match self.store.get(&keys::tombstone_key(id)).await {
            Ok(_) => Ok(true),
            Err(ObjectStoreError::NotFound { .. }) => Ok(false),
            Err(error) => Err(EngineError::store("read volume tombstone", error)),
        }
    }

    /// The descriptor of a volume that exists and was not deleted.
    pub async fn live_descriptor(&self, id: &str) -> Result<VolumeDescriptor, EngineError> {
        match self.descriptor(id).await? {
            Some(descriptor) if !self.is_tombstoned(id).await? => Ok(descriptor),
            _ => Err(EngineError::VolumeNotFound { id: id.to_string() }),
        }
    }

    /// A volume's map and size as the bucket holds them (what a gateway has not uploaded
    /// yet is not here).
    pub async fn volume_state(
        &self,
        descriptor: &VolumeDescriptor,
    ) -> Result<SnapshotMap, EngineError> {
        let state = remote::recover(&*self.store, &descriptor.id, descriptor.size).await?;
        Ok(SnapshotMap { state })
    }

    /// The newest writer epoch in the bucket's checkpoints of a volume (0 when none).
    pub async fn newest_epoch(&self, id: &str) -> Result<u64, EngineError> {
        Ok(remote::latest_checkpoint(&*self.store, id)
            .await?
            .map_or(0, |name| name.epoch))
    }

    /// A page of live volumes in id order, starting after `after`. Returns the page and the
    /// id to continue after, when there may be more. Hidden import volumes are skipped.
    pub async fn list_volumes(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<VolumeDescriptor>, Option<String>), EngineError> {
        let mut found = Vec::new();
        let mut position = after.map(keys::after_volume);
        loop {
            let page = self
                .store
                .list(keys::VOLUMES_PREFIX, position.clone())
                .await
                .map_err(|e| EngineError::store("list volumes", e))?;
            let Some(id) = page
                .keys
                .first()
                .and_then(|object| keys::volume_of_key(&object.key))
            else {
                return Ok((found, None));
            };
            let id = id.to_string();
            position = Some(keys::after_volume(&id));
            if id.starts_with("import.") {
                continue;
            }
            if let Some(descriptor) = self.descriptor(&id).await?
                && !self.is_tombstoned(&id).await?
            {
                found.push(descriptor);
                if found.len() >= limit {
                    return Ok((found, Some(id)));
                }
            }
        }
    }

    /// Writes a new volume's descriptor and first checkpoint (epoch 1). Idempotent: a volume
    /// that exists with the same parameters is returned as it is; with other parameters it
    /// is `VolumeExists`.
    pub async fn create_volume(
        &self,
        id: &str,
        size: u64,
        mode: Mode,
        source: CatalogSource,
    ) -> Result<VolumeDescriptor, EngineError> {
        keys::validate_id(id).map_err(EngineError::InvalidArgument)?;
        if let Some(existing) = self.descriptor(id).await? {
            let same_source = match (&existing.source, &source) {
                (None, CatalogSource::Empty) => true,
                (Some(Source::Snapshot { snapshot }), CatalogSource::Snapshot(wanted)) => {
                    snapshot == wanted
                }
                (Some(Source::Volume { volume, .. }), CatalogSource::Clone { volume: v, .. }) => {
                    volume == v
                }
                _ => false,
            };
            let same = existing.mode == mode
                && same_source
                && (size == 0 || size == existing.size)
                && !self.is_tombstoned(id).await?;
            if same {
                return Ok(existing);
            }
            return Err(EngineError::VolumeExists { id: id.to_string() });
        }
        let (remote, source, size) = match source {
            CatalogSource::Empty => {
                if size == 0 {
                    return Err(EngineError::InvalidArgument(
                        "a new empty volume needs a size".to_string(),
                    ));
                }
                (
                    RemoteState::empty(Name { epoch: 0, seq: 0 }, size),
                    None,
                    size,
                )
            }
            CatalogSource::Snapshot(snapshot) => {
                let manifest = self.manifest(&snapshot).await?;
                let state = remote::snapshot_state(&*self.store, &manifest).await?;
                let size = self.source_size(size, manifest.size, &snapshot)?;
                (state, Some(Source::Snapshot { snapshot }), size)
            }
            CatalogSource::Clone { volume, snapshot } => {
                let manifest = self.manifest(&snapshot).await?;
                let state = remote::snapshot_state(&*self.store, &manifest).await?;
                let size = self.source_size(size, manifest.size, &volume)?;
                (state, Some(Source::Volume { volume, snapshot }), size)
            }
        };
        let (descriptor, _) = self
            .write_new_volume(id, size, mode, source, remote)
            .await?;
        tracing::info!(volume = %id, size, %mode, "volume created in the bucket");
        Ok(descriptor)
    }

    /// Writes a new volume's objects: its descriptor, then its first checkpoint (epoch 1,
    /// sequence 0) holding `remote`'s map (empty, or its source's). Returns the descriptor and
    /// the volume's bucket state as of that checkpoint. Shared by the block-storage API and a
    /// standalone gateway creating a volume.
    pub(crate) async fn write_new_volume(
        &self,
        id: &str,
        size: u64,
        mode: Mode,
        source: Option<Source>,
        remote: RemoteState,
    ) -> Result<(VolumeDescriptor, RemoteState), EngineError> {
        let block = u64::from(self.block_size);
        if !size.is_multiple_of(block) {
            return Err(EngineError::InvalidArgument(format!(
                "size {size} is not a multiple of the block size {block}"
            )));
        }
        let descriptor = VolumeDescriptor {
            format: documents::FORMAT,
            id: id.to_string(),
            size,
            block_size: self.block_size,
            mode,
            created_unix: unix_now(),
            source,
        };
        self.store
            .put(&keys::descriptor_key(id), documents::encode(&descriptor))
            .await
            .map_err(|e| EngineError::store("write volume descriptor", e))?;
        // The volume's own history starts at epoch 1, sequence 0, whatever its source; the
        // first writer to attach it takes it over with a newer epoch.
        let start = Name { epoch: 1, seq: 0 };
        let mut own = RemoteState::empty(start, size);
        own.map = remote.map;
        own.segments = remote.segments;
        own.segment_keys = remote.segment_keys;
        self.store
            .put(
                &keys::checkpoint_key(id, start),
                own.encode_checkpoint(start),
            )
            .await
            .map_err(|e| EngineError::store("write checkpoint", e))?;
        own.checkpoint_written(start);
        Ok((descriptor, own))
    }

    fn source_size(&self, wanted: u64, source: u64, name: &str) -> Result<u64, EngineError> {
        if wanted == 0 {
            return Ok(source);
        }
        if wanted < source {
            return Err(EngineError::Shrink {
                volume: name.to_string(),
                size: source,
                requested: wanted,
            });
        }
        Ok(wanted)
    }

    /// Grows a volume no gateway holds: a checkpoint of its current map with the new size,
    /// in writer epoch `epoch` (newer than any in the bucket; the caller allocates it).
    pub async fn expand_detached(
        &self,
        id: &str,
        size: u64,
        epoch: u64,
    ) -> Result<(), EngineError> {
        let descriptor = self.live_descriptor(id).await?;
        let block = u64::from(self.block_size);
        if !size.is_multiple_of(block) {
            return Err(EngineError::InvalidArgument(format!(
                "size {size} is not a multiple of the block size {block}"
            )));
        }
        let mut state = remote::recover(&*self.store, id, descriptor.size).await?;
        if size < state.size {
            return Err(EngineError::Shrink {
                volume: id.to_string(),
                size: state.size,
                requested: size,
            });
        }
        if size == state.size {
            return Ok(());
        }
        if epoch <= state.checkpoint.epoch {
            return Err(EngineError::Fenced {
                volume: id.to_string(),
                ours: epoch,
                current: state.checkpoint.epoch,
            });
        }
        state.size = size;
        let name = Name {
            epoch,
            seq: state.applied.seq,
        };
        self.store
            .put(
                &keys::checkpoint_key(id, name),
                state.encode_checkpoint(name),
            )
            .await
            .map_err(|e| EngineError::store("write checkpoint", e))?;
        tracing::info!(volume = %id, size, epoch, "detached volume expanded");
        Ok(())
    }

    pub async fn manifest(&self, id: &str) -> Result<SnapshotManifest, EngineError> {
        let key = keys::snapshot_key(id);
        match self.store.get(&key).await {
            Ok(bytes) => documents::decode(&key, &bytes)
                .map_err(|source| EngineError::Corrupt { key, source }),
            Err(ObjectStoreError::NotFound { .. }) => {
                Err(EngineError::SnapshotNotFound { id: id.to_string() })
            }
            Err(error) => Err(EngineError::store("read snapshot manifest", error)),
        }
    }

    /// A page of snapshot manifests in id order, starting after `after`, optionally only of
    /// one volume; internal snapshots (made for clones) are skipped. Returns the page and
    /// the id to continue after, when there may be more.
    pub async fn list_snapshots(
        &self,
        volume: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(Vec<SnapshotManifest>, Option<String>), EngineError> {
        let mut found = Vec::new();
        let mut position = after.map(keys::snapshot_key);
        loop {
            let page = self
                .store
                .list(keys::SNAPSHOTS_PREFIX, position.clone())
                .await
                .map_err(|e| EngineError::store("list snapshots", e))?;
            if page.keys.is_empty() {
                return Ok((found, None));
            }
            for object in &page.keys {
                position = Some(object.key.clone());
                let Some(id) = keys::snapshot_of_key(&object.key) else {
                    continue;
                };
                let manifest = match self.manifest(id).await {
                    Ok(manifest) => manifest,
                    Err(EngineError::SnapshotNotFound { .. }) => continue,
                    Err(error) => return Err(error),
                };
                if manifest.internal || volume.is_some_and(|v| v != manifest.volume) {
                    continue;
                }
                found.push(manifest);
                if found.len() >= limit {
                    return Ok((found, Some(id.to_string())));
                }
            }
            if page.next.is_none() {
                return Ok((found, None));
            }
        }
    }

    /// The newest ready snapshot of a volume, by creation time then point.
    async fn newest_snapshot(&self, volume: &str) -> Result<Option<SnapshotManifest>, EngineError> {
        let mut newest: Option<SnapshotManifest> = None;
        let mut after: Option<String> = None;
        loop {
            let (page, next) = self
                .list_snapshots(Some(volume), after.as_deref(), 1000)
                .await?;
            for manifest in page {
                let later = newest.as_ref().is_none_or(|n| {
                    (manifest.created_unix, manifest.point.0) > (n.created_unix, n.point.0)
                });
                if later {
                    newest = Some(manifest);
                }
            }
            match next {
                Some(next) => after = Some(next),
                None => return Ok(newest),
            }
        }
    }

    /// Snapshots a volume no gateway holds: its bucket state is all of it, so the snapshot is
    /// ready at once. Idempotent by id for the same volume.
    pub async fn snapshot_detached(
        &self,
        volume: &str,
        id: &str,
        internal: bool,
    ) -> Result<SnapshotManifest, EngineError> {
        keys::validate_id(id).map_err(EngineError::InvalidArgument)?;
        match self.manifest(id).await {
            Ok(existing) if existing.volume == volume => return Ok(existing),
            Ok(existing) => {
                return Err(EngineError::SnapshotExists {
                    id: id.to_string(),
                    volume: existing.volume,
                });
            }
            Err(EngineError::SnapshotNotFound { .. }) => {}
            Err(error) => return Err(error),
        }
        let descriptor = self.live_descriptor(volume).await?;
        let state = remote::recover(&*self.store, volume, descriptor.size).await?;
        let parent = if internal {
            None
        } else {
            self.newest_snapshot(volume).await?.map(|m| m.id)
        };
        let manifest = SnapshotManifest {
            format: documents::FORMAT,
            id: id.to_string(),
            volume: volume.to_string(),
            point: NameDoc(state.applied),
            size: state.size,
            block_size: descriptor.block_size,
            checkpoint: NameDoc(state.checkpoint),
            segments: state
                .since_checkpoint
                .iter()
                .copied()
                .map(NameDoc)
                .collect(),
            parent,
            created_unix: unix_now(),
            internal,
        };
        self.store
            .put(&keys::snapshot_key(id), documents::encode(&manifest))
            .await
            .map_err(|e| EngineError::store("write snapshot manifest", e))?;
        tracing::info!(volume, snapshot = %id, point = %state.applied, "snapshot of a detached volume");
        Ok(manifest)
    }

    pub async fn snapshot_map(
        &self,
        manifest: &SnapshotManifest,
    ) -> Result<SnapshotMap, EngineError> {
        Ok(SnapshotMap {
            state: remote::snapshot_state(&*self.store, manifest).await?,
        })
    }

    /// Reads `length` bytes at `offset` of a map, every frame verified; unwritten bytes are
    /// zeroes.
    pub async fn read(
        &self,
        map: &SnapshotMap,
        offset: u64,
        length: usize,
    ) -> Result<Vec<u8>, EngineError> {
        let mut out = vec![0u8; length];
        for piece in map.state.map.pieces(offset, length as u64) {
            let Some(location) = piece.value else {
                continue;
            };
            let start = usize::try_from(piece.offset - offset).unwrap_or(usize::MAX);
            let piece_length = usize::try_from(piece.length).unwrap_or(usize::MAX);
            let key = &map.state.segment_keys[location.segment as usize];
            remote::read_run(
                &*self.store,
                None,
                key,
                location,
                &mut out[start..start + piece_length],
                0,
            )
            .await?;
        }
        Ok(out)
    }

    /// Deletes a snapshot. Refused while a volume reads through it (created from it and not
    /// deleted). The objects it alone kept are freed when its volume is already deleted.
    pub async fn delete_snapshot(&self, id: &str) -> Result<(), EngineError> {
        let manifest = self.manifest(id).await?;
        let mut after: Option<String> = None;
        loop {
            let (page, next) = self.list_volumes(after.as_deref(), 1000).await?;
            for descriptor in page {
                if descriptor
                    .source
                    .as_ref()
                    .is_some_and(|source| source.snapshot() == id)
                {
                    return Err(EngineError::SnapshotInUse {
                        snapshot: id.to_string(),
                        volume: descriptor.id,
                    });
                }
            }
            match next {
                Some(next) => after = Some(next),
                None => break,
            }
        }
        self.store
            .delete(&keys::snapshot_key(id))
            .await
            .map_err(|e| EngineError::store("delete snapshot manifest", e))?;
        tracing::info!(snapshot = %id, "snapshot deleted");
        if self.is_tombstoned(&manifest.volume).await? {
            self.purge_deleted(&manifest.volume).await?;
        }
        Ok(())
    }

    /// Deletes a volume no gateway holds: a tombstone, then every object of it that no
    /// snapshot needs. The caller has ended its attachments.
    pub async fn delete_volume(&self, id: &str) -> Result<(), EngineError> {
        let Some(descriptor) = self.descriptor(id).await? else {
            return Err(EngineError::VolumeNotFound { id: id.to_string() });
        };
        if !self.is_tombstoned(id).await? {
            let tombstone = Tombstone {
                format: documents::FORMAT,
                deleted_unix: unix_now(),
            };
            self.store
                .put(&keys::tombstone_key(id), documents::encode(&tombstone))
                .await
                .map_err(|e| EngineError::store("write volume tombstone", e))?;
            tracing::info!(volume = %id, "volume deleted");
        }
        if let Some(Source::Volume { snapshot, .. }) = descriptor.source
            && self.manifest(&snapshot).await.is_ok_and(|m| m.internal)
        {
            self.store
                .delete(&keys::snapshot_key(&snapshot))
                .await
                .map_err(|e| EngineError::store("delete snapshot manifest", e))?;
        }
        self.purge_deleted(id).await
    }

    /// Segments and checkpoints every snapshot needs, by volume.
    pub(crate) async fn snapshot_references(
        &self,
    ) -> Result<HashMap<String, References>, EngineError> {
        let mut references: HashMap<String, References> = HashMap::new();
        for object in blockgate_objstore::list_all(&*self.store, keys::SNAPSHOTS_PREFIX)
            .await
            .map_err(|e| EngineError::store("list snapshots", e))?
        {
            let Some(id) = keys::snapshot_of_key(&object.key) else {
                continue;
            };
            let manifest = match self.manifest(id).await {
                Ok(manifest) => manifest,
                Err(EngineError::SnapshotNotFound { .. }) => continue,
                Err(error) => return Err(error),
            };
            let checkpoint =
                remote::load_checkpoint(&*self.store, &manifest.volume, manifest.checkpoint.0)
                    .await?;
            let own = references.entry(manifest.volume.clone()).or_default();
            own.checkpoints.insert(manifest.checkpoint.0);
            own.segments.extend(manifest.segments.iter().map(|n| n.0));
            for segment in checkpoint.segments {
                references
                    .entry(segment.volume.to_string())
                    .or_default()
                    .segments
                    .insert(segment.name);
            }
        }
        Ok(references)
    }

    /// Removes a deleted volume's objects that no snapshot needs; its documents go last,
    /// once nothing else is left.
    async fn purge_deleted(&self, id: &str) -> Result<(), EngineError> {
        let references = self.snapshot_references().await?;
        self.purge_deleted_with(id, &references).await.map(|_| ())
    }

    /// [`Catalog::purge_deleted`] with the snapshot references already gathered.
    pub(crate) async fn purge_deleted_with(
        &self,
        id: &str,
        references: &HashMap<String, References>,
    ) -> Result<Purged, EngineError> {
        let empty = References::default();
        let referenced = references.get(id).unwrap_or(&empty);
        let mut purged = Purged::default();
        let mut kept = 0u64;
        for name in remote::list_names(&*self.store, &keys::segments_prefix(id)).await? {
            if referenced.segments.contains(&name) {
                kept += 1;
                continue;
            }
            self.delete(&keys::segment_key(id, name), "delete segment")
                .await?;
            purged.segments += 1;
        }
        for name in remote::list_names(&*self.store, &keys::checkpoints_prefix(id)).await? {
            if referenced.checkpoints.contains(&name) {
                kept += 1;
                continue;
            }
            self.delete(&keys::checkpoint_key(id, name), "delete checkpoint")
                .await?;
            purged.checkpoints += 1;
        }
        if kept == 0 {
            for prefix in [keys::attachments_prefix(id), keys::readers_prefix(id)] {
                for object in blockgate_objstore::list_all(&*self.store, &prefix)
                    .await
                    .map_err(|e| EngineError::store("list attachments", e))?
                {
                    self.delete(&object.key, "delete attachment record").await?;
                }
            }
            for key in [keys::descriptor_key(id), keys::tombstone_key(id)] {
                self.delete(&key, "delete volume documents").await?;
            }
            purged.volume_gone = true;
            tracing::info!(volume = %id, "deleted volume purged");
        }
        Ok(purged)
    }

    async fn delete(&self, key: &str, operation: &'static str) -> Result<(), EngineError> {
        self.store
            .delete(key)
            .await
            .map_err(|e| EngineError::store(operation, e))
    }

    /// Writes one block of an import as its own segment of the import's hidden volume,
    /// named by the block (sequence = block index + 1). Putting a block again replaces it:
    /// the only objects blockgate ever overwrites, allowed because nothing references an
    /// import's segments before it completes.
    pub async fn put_import_block(
        &self,
        snapshot: &str,
        volume_size: u64,
        offset: u64,
        block_index: u64,
        data: &[u8],
    ) -> Result<(), EngineError> {
        let volume = keys::import_volume(snapshot);
        let name = Name {
            epoch: 1,
            seq: block_index + 1,
        };
        let mut builder = SegmentBuilder::new(name, volume_size);
        builder.add_data(offset, data);
        let (body, _) = builder.finish();
        self.store
            .put(&keys::segment_key(&volume, name), body)
            .await
            .map_err(|e| EngineError::store("write import block", e))
    }

    /// The blocks an import holds so far, by index, in order.
    pub async fn import_blocks(&self, snapshot: &str) -> Result<Vec<u64>, EngineError> {
        let volume = keys::import_volume(snapshot);
        Ok(
            remote::list_names(&*self.store, &keys::segments_prefix(&volume))
                .await?
                .into_iter()
                .filter(|name| name.epoch == 1 && name.seq > 0)
                .map(|name| name.seq - 1)
                .collect(),
        )
    }

    /// Reads back one block of an import, verified.
    pub async fn read_import_block(
        &self,
        snapshot: &str,
        block_index: u64,
    ) -> Result<Vec<u8>, EngineError> {
        let volume = keys::import_volume(snapshot);
        let segment = SegmentRef {
            volume: Arc::from(volume.as_str()),
            name: Name {
                epoch: 1,
                seq: block_index + 1,
            },
        };
        let (_, runs) = remote::read_segment_index(&*self.store, &segment.key()).await?;
        let mut state = RemoteState::empty(Name { epoch: 1, seq: 0 }, 0);
        state.apply(segment, 0, &runs);
        let Some(run) = runs.first() else {
            return Ok(Vec::new());
        };
        let map = SnapshotMap { state };
        self.read(
            &map,
            run.volume_offset,
            usize::try_from(run.length).unwrap_or(0),
        )
        .await
    }

    /// Completes an import: the snapshot is `parent`'s map (or nothing) with every imported
    /// block on top. The hidden volume is written with a checkpoint and at once marked
    /// deleted, so its objects live exactly as long as the snapshot.
    pub async fn complete_import(
        &self,
        snapshot: &str,
        volume_size: u64,
        parent: Option<&str>,
    ) -> Result<SnapshotManifest, EngineError> {
        let volume = keys::import_volume(snapshot);
        let mut state = match parent {
            Some(parent) => {
                let manifest = self.manifest(parent).await?;
                remote::snapshot_state(&*self.store, &manifest).await?
            }
            None => RemoteState::empty(Name { epoch: 1, seq: 0 }, volume_size),
        };
        let volume_id: Arc<str> = Arc::from(volume.as_str());
        let mut last = Name { epoch: 1, seq: 0 };
        for name in remote::list_names(&*self.store, &keys::segments_prefix(&volume)).await? {
            let segment = SegmentRef {
                volume: volume_id.clone(),
                name,
            };
            let (header, runs) = remote::read_segment_index(&*self.store, &segment.key()).await?;
            state.apply(segment, header.volume_size, &runs);
            last = last.max(name);
        }
        state.size = volume_size;
        let descriptor = VolumeDescriptor {
            format: documents::FORMAT,
            id: volume.clone(),
            size: volume_size,
            block_size: self.block_size,
            mode: Mode::Cached,
            created_unix: unix_now(),
            source: parent.map(|p| Source::Snapshot {
                snapshot: p.to_string(),
            }),
        };
        self.store
            .put(
                &keys::descriptor_key(&volume),
                documents::encode(&descriptor),
            )
            .await
            .map_err(|e| EngineError::store("write volume descriptor", e))?;
        // One past the last block's segment, so no segment name follows the checkpoint.
        let checkpoint = Name {
            epoch: 1,
            seq: last.seq + 1,
        };
        self.store
            .put(
                &keys::checkpoint_key(&volume, checkpoint),
                state.encode_checkpoint(checkpoint),
            )
            .await
            .map_err(|e| EngineError::store("write checkpoint", e))?;
        let manifest = SnapshotManifest {
            format: documents::FORMAT,
            id: snapshot.to_string(),
            volume: volume.clone(),
            point: NameDoc(checkpoint),
            size: volume_size,
            block_size: self.block_size,
            checkpoint: NameDoc(checkpoint),
            segments: Vec::new(),
            parent: parent.map(str::to_string),
            created_unix: unix_now(),
            internal: false,
        };
        self.store
            .put(&keys::snapshot_key(snapshot), documents::encode(&manifest))
            .await
            .map_err(|e| EngineError::store("write snapshot manifest", e))?;
        let tombstone = Tombstone {
            format: documents::FORMAT,
            deleted_unix: unix_now(),
        };
        self.store
            .put(&keys::tombstone_key(&volume), documents::encode(&tombstone))
            .await
            .map_err(|e| EngineError::store("write volume tombstone", e))?;
        // The block segments are now referenced by the checkpoint's table, and by nothing
        // else: purging keeps exactly them.
        tracing::info!(snapshot, "import completed");
        Ok(manifest)
    }

    /// Deletes every object of an import that did not complete.
    pub async fn discard_import(&self, snapshot: &str) -> Result<(), EngineError> {
        let volume = keys::import_volume(snapshot);
        for object in blockgate_objstore::list_all(&*self.store, &keys::volume_prefix(&volume))
            .await
            .map_err(|e| EngineError::store("list import objects", e))?
        {
            self.delete(&object.key, "delete import object").await?;
        }
        Ok(())
    }
}

/// What the snapshots of one volume need kept.
#[derive(Debug, Default)]
pub(crate) struct References {
    pub(crate) segments: HashSet<Name>,
    pub(crate) checkpoints: HashSet<Name>,
}

/// What purging a deleted volume removed.
#[derive(Debug, Default)]
pub(crate) struct Purged {
    pub(crate) segments: u64,
    pub(crate) checkpoints: u64,
    /// Nothing was left, so the descriptor and tombstone went too.
    pub(crate) volume_gone: bool,
}
