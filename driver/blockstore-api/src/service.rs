//! The block-storage API: volumes, attachments and snapshots over the bucket.
//!
//! State lives in the bucket alone (descriptors, checkpoints, manifests, attachment
//! records), so any instance over the same bucket sees the same volumes. Changes are
//! serialised by one lock per instance: run one instance per bucket (the operator's leader)
//! until attachment records use a compare-and-swap the object stores here do not offer.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockgate_blockstore::documents::{
    self, AttachmentRecord, DetachmentRecord, Mode, ReaderRecord, SnapshotManifest, Source,
    VolumeDescriptor,
};
use blockgate_blockstore::keys;
use blockgate_engine::EngineError;
use blockgate_engine::catalog::{Catalog, CatalogSource};
use blockgate_objstore::ObjectStoreError;
use blockgate_proto::blockstore::v1 as pb;
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::gateways::{GatewaySnapshot, Gateways};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The largest volume the API creates: 64 TiB.
pub const MAX_VOLUME_SIZE: u64 = 64 << 40;
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;
/// How long creating a clone of an attached volume waits for its snapshot to upload.
const CLONE_SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A snapshot cut on a gateway and not yet known to be in the bucket.
#[derive(Debug, Clone)]
struct Pending {
    volume: String,
    node: String,
    size: u64,
    parent: Option<String>,
    created_unix: u64,
}

/// Shared by the BlockStore and BlockData services.
#[derive(Debug)]
pub struct State {
    pub(crate) catalog: Catalog,
    pub(crate) gateways: Arc<dyn Gateways>,
    /// Serialises changes to volumes, attachments and snapshots.
    pub(crate) changes: tokio::sync::Mutex<()>,
    pending: Mutex<HashMap<String, Pending>>,
}

impl State {
    pub fn new(catalog: Catalog, gateways: Arc<dyn Gateways>) -> Arc<State> {
        Arc::new(State {
            catalog,
            gateways,
            changes: tokio::sync::Mutex::new(()),
            pending: Mutex::new(HashMap::new()),
        })
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, HashMap<String, Pending>> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn check_id(what: &str, id: &str) -> Result<(), ApiError> {
        if id.is_empty() {
            return Err(ApiError::InvalidArgument(format!("{what} is required")));
        }
        keys::validate_id(id)
            .map_err(|reason| ApiError::InvalidArgument(format!("{what}: {reason}")))
    }

    /// The attachment records of a volume: the current writer, the newest epoch any record
    /// names, and the readers.
    async fn attachments(&self, volume: &str) -> Result<Attachments, ApiError> {
        let store = self.catalog.store();
        let mut records: BTreeMap<u64, Option<AttachmentRecord>> = BTreeMap::new();
        let mut ended = std::collections::HashSet::new();
        for object in blockgate_objstore::list_all(&**store, &keys::attachments_prefix(volume))
            .await
            .map_err(|e| ApiError::store("list attachments", e))?
        {
            match keys::attachment_of_key(&object.key) {
                Some((epoch, true)) => {
                    ended.insert(epoch);
                }
                Some((epoch, false)) => {
                    records.insert(epoch, None);
                }
                None => {}
            }
        }
        let newest_epoch = records.keys().next_back().copied().unwrap_or(0);
        let mut writer = None;
        if let Some((&epoch, _)) = records.iter().next_back()
            && !ended.contains(&epoch)
        {
            let key = keys::attachment_key(volume, epoch);
            let bytes = store
                .get(&key)
                .await
                .map_err(|e| ApiError::store("read attachment", e))?;
            let record: AttachmentRecord = documents::decode(&key, &bytes)
                .map_err(|source| EngineError::Corrupt { key, source })?;
            writer = Some(record);
        }
        let mut readers = Vec::new();
        for object in blockgate_objstore::list_all(&**store, &keys::readers_prefix(volume))
            .await
            .map_err(|e| ApiError::store("list readers", e))?
        {
            let bytes = match store.get(&object.key).await {
                Ok(bytes) => bytes,
                Err(ObjectStoreError::NotFound { .. }) => continue,
                Err(e) => return Err(ApiError::store("read reader", e)),
            };
            let record: ReaderRecord =
                documents::decode(&object.key, &bytes).map_err(|source| EngineError::Corrupt {
                    key: object.key.clone(),
                    source,
                })?;
            readers.push(record);
        }
        Ok(Attachments {
            writer,
            newest_epoch,
            readers,
        })
    }

    /// A writer epoch newer than anything the volume has seen.
    async fn next_epoch(&self, volume: &str, attachments: &Attachments) -> Result<u64, ApiError> {
        let checkpoints = self.catalog.newest_epoch(volume).await?;
        Ok(checkpoints.max(attachments.newest_epoch) + 1)
    }

    async fn put_document<T: serde::Serialize>(
        &self,
        key: &str,
        document: &T,
        operation: &'static str,
    ) -> Result<(), ApiError> {
        self.catalog
            .store()
            .put(key, documents::encode(document))
            .await
            .map_err(|e| ApiError::store(operation, e))
    }

    async fn end_writer(&self, record: &AttachmentRecord, fenced: bool) -> Result<(), ApiError> {
        let marker = DetachmentRecord {
            format: documents::FORMAT,
            detached_unix: unix_now(),
            fenced,
        };
        self.put_document(
            &keys::detachment_key(&record.volume, record.epoch),
            &marker,
            "write detachment record",
        )
        .await
    }

    async fn volume_message(&self, descriptor: &VolumeDescriptor) -> Result<pb::Volume, ApiError> {
        let map = self.catalog.volume_state(descriptor).await?;
        let attachments = self.attachments(&descriptor.id).await?;
        Ok(volume_message(
            descriptor,
            map.size(),
            attachments.writer.as_ref(),
        ))
    }

    fn pending_message(&self, id: &str) -> Option<pb::Snapshot> {
        self.pending().get(id).map(|p| pb::Snapshot {
            id: id.to_string(),
            volume_id: p.volume.clone(),
            size_bytes: p.size,
            ready_to_use: false,
            parent_id: p.parent.clone().unwrap_or_default(),
            created_unix: p.created_unix,
        })
    }

    /// The snapshot as the bucket or its gateway knows it; a pending one is asked about and
    /// forgotten once its manifest is in the bucket.
    pub(crate) async fn snapshot(&self, id: &str) -> Result<pb::Snapshot, ApiError> {
        match self.catalog.manifest(id).await {
            Ok(manifest) => {
                self.pending().remove(id);
                return Ok(snapshot_message(&manifest));
            }
            Err(EngineError::SnapshotNotFound { .. }) => {}
            Err(error) => return Err(error.into()),
        }
        let Some(pending) = self.pending().get(id).cloned() else {
            return Err(ApiError::NotFound(format!("snapshot {id} does not exist")));
        };
        if let Ok(Some(found)) = self.gateways.get_snapshot(&pending.node, id).await
            && found.ready
        {
            // Ready on the gateway means the manifest is written.
            if let Ok(manifest) = self.catalog.manifest(id).await {
                self.pending().remove(id);
                return Ok(snapshot_message(&manifest));
            }
        }
        self.pending_message(id)
            .ok_or_else(|| ApiError::NotFound(format!("snapshot {id} does not exist")))
    }

    /// Cuts a snapshot: through the gateway that holds the volume, or from the bucket when
    /// no gateway does.
    async fn cut_snapshot(
        &self,
        volume: &str,
        id: &str,
        internal: bool,
    ) -> Result<pb::Snapshot, ApiError> {
        match self.catalog.manifest(id).await {
            Ok(existing) if existing.volume == volume => {
                return Ok(snapshot_message(&existing));
            }
            Ok(existing) => {
                return Err(ApiError::AlreadyExists(format!(
                    "snapshot {id} already exists, of volume {}",
                    existing.volume
                )));
            }
            Err(EngineError::SnapshotNotFound { .. }) => {}
            Err(error) => return Err(error.into()),
        }
        if let Some(pending) = self.pending().get(id) {
            if pending.volume == volume {
                return self
                    .pending_message(id)
                    .ok_or_else(|| ApiError::NotFound(format!("snapshot {id} vanished")));
            }
            return Err(ApiError::AlreadyExists(format!(
                "snapshot {id} already exists, of volume {}",
                pending.volume
            )));
        }
        self.catalog.live_descriptor(volume).await?;
        let attachments = self.attachments(volume).await?;
        match attachments.writer {
            None => {
                let manifest = self.catalog.snapshot_detached(volume, id, internal).await?;
                Ok(snapshot_message(&manifest))
            }
            Some(writer) => {
                let cut = self
                    .gateways
                    .create_snapshot(&writer.node, volume, id)
                    .await?;
                if cut.ready {
                    let manifest = self.catalog.manifest(id).await?;
                    return Ok(snapshot_message(&manifest));
                }
                self.pending().insert(
                    id.to_string(),
                    Pending {
                        volume: volume.to_string(),
                        node: writer.node.clone(),
                        size: cut.size,
                        parent: cut.parent.clone(),
                        created_unix: cut.created_unix,
                    },
                );
                Ok(gateway_snapshot_message(&cut))
            }
        }
    }
}

#[derive(Debug)]
struct Attachments {
    writer: Option<AttachmentRecord>,
    newest_epoch: u64,
    readers: Vec<ReaderRecord>,
}

fn mode_message(mode: Mode) -> pb::VolumeMode {
    match mode {
        Mode::Cached => pb::VolumeMode::Cached,
        Mode::Stored => pb::VolumeMode::Stored,
    }
}

fn attachment_message(record: &AttachmentRecord) -> pb::Attachment {
    pb::Attachment {
        volume_id: record.volume.clone(),
        node_id: record.node.clone(),
        epoch: record.epoch,
        attached_unix: record.attached_unix,
        readonly: false,
    }
}

fn reader_message(record: &ReaderRecord) -> pb::Attachment {
    pb::Attachment {
        volume_id: record.volume.clone(),
        node_id: record.node.clone(),
        epoch: 0,
        attached_unix: record.attached_unix,
        readonly: true,
    }
}

fn volume_message(
    descriptor: &VolumeDescriptor,
    size: u64,
    writer: Option<&AttachmentRecord>,
) -> pb::Volume {
    let source = descriptor.source.as_ref().map(|source| pb::VolumeSource {
        kind: Some(match source {
            Source::Snapshot { snapshot } => pb::volume_source::Kind::SnapshotId(snapshot.clone()),
            Source::Volume { volume, .. } => pb::volume_source::Kind::VolumeId(volume.clone()),
        }),
    });
    pb::Volume {
        id: descriptor.id.clone(),
        size_bytes: size.max(descriptor.size),
        block_size: descriptor.block_size,
        mode: mode_message(descriptor.mode) as i32,
        compression: pb::Compression::None as i32,
        encrypted: false,
        source,
        created_unix: descriptor.created_unix,
        attachment: writer.map(attachment_message),
    }
}

pub(crate) fn snapshot_message(manifest: &SnapshotManifest) -> pb::Snapshot {
    pb::Snapshot {
        id: manifest.id.clone(),
        volume_id: manifest.volume.clone(),
        size_bytes: manifest.size,
        ready_to_use: true,
        parent_id: manifest.parent.clone().unwrap_or_default(),
        created_unix: manifest.created_unix,
    }
}

fn gateway_snapshot_message(snapshot: &GatewaySnapshot) -> pb::Snapshot {
    pb::Snapshot {
        id: snapshot.id.clone(),
        volume_id: snapshot.volume.clone(),
        size_bytes: snapshot.size,
        ready_to_use: snapshot.ready,
        parent_id: snapshot.parent.clone().unwrap_or_default(),
        created_unix: snapshot.created_unix,
    }
}

pub(crate) fn page_size(requested: u32) -> usize {
    match usize::try_from(requested).unwrap_or(MAX_PAGE) {
        0 => DEFAULT_PAGE,
        n => n.min(MAX_PAGE),
    }
}

/// A page token is the id the next page starts after.
fn page_token(token: &str) -> Result<Option<&str>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    keys::validate_id(token)
        .map_err(|_| ApiError::InvalidArgument(format!("page token {token:?} is not valid")))?;
    Ok(Some(token))
}

/// The block-storage API's `BlockStore` service.
#[derive(Debug, Clone)]
pub struct BlockStoreService {
    state: Arc<State>,
}

impl BlockStoreService {
    pub fn new(state: Arc<State>) -> BlockStoreService {
        BlockStoreService { state }
    }

    async fn create_volume(
        &self,
        request: pb::CreateVolumeRequest,
    ) -> Result<pb::Volume, ApiError> {
        State::check_id("volume name", &request.name)?;
        let mode = match pb::VolumeMode::try_from(request.mode) {
            Ok(pb::VolumeMode::Unspecified | pb::VolumeMode::Cached) => Mode::Cached,
            Ok(pb::VolumeMode::Stored) => Mode::Stored,
            Err(_) => {
                return Err(ApiError::InvalidArgument(format!(
                    "unknown volume mode {}",
                    request.mode
                )));
            }
        };
        match pb::Compression::try_from(request.compression) {
            Ok(pb::Compression::Unspecified | pb::Compression::None) => {}
            Ok(other) => {
                return Err(ApiError::Unimplemented(format!(
                    "compression {} is not implemented yet: create the volume without compression",
                    other.as_str_name()
                )));
            }
            Err(_) => {
                return Err(ApiError::InvalidArgument(format!(
                    "unknown compression {}",
                    request.compression
                )));
            }
        }
        if request.encrypted {
            return Err(ApiError::Unimplemented(
                "encryption is not implemented yet: create the volume unencrypted".to_string(),
            ));
        }
        if request.size_bytes > MAX_VOLUME_SIZE {
            return Err(ApiError::OutOfRange(format!(
                "size {} is above the largest volume, {MAX_VOLUME_SIZE} bytes",
                request.size_bytes
            )));
        }
        let block = u64::from(self.state.catalog.block_size());
        if !request.size_bytes.is_multiple_of(block) {
            return Err(ApiError::InvalidArgument(format!(
                "size {} is not a multiple of the block size {block}",
                request.size_bytes
            )));
        }
        let _changes = self.state.changes.lock().await;
        let source = match request.source.and_then(|s| s.kind) {
            None => {
                if request.size_bytes == 0 {
                    return Err(ApiError::InvalidArgument(
                        "size_bytes is required for a volume without a source".to_string(),
                    ));
                }
                CatalogSource::Empty
            }
            Some(pb::volume_source::Kind::SnapshotId(snapshot)) => {
                State::check_id("source snapshot id", &snapshot)?;
                CatalogSource::Snapshot(snapshot)
            }
            Some(pb::volume_source::Kind::VolumeId(volume)) => {
                State::check_id("source volume id", &volume)?;
                if let Some(existing) = self.state.catalog.descriptor(&request.name).await? {
                    // Idempotency first: the clone exists, do not snapshot the source again.
                    let snapshot = match existing.source {
                        Some(Source::Volume { snapshot, .. }) => snapshot,
                        _ => String::new(),
                    };
                    CatalogSource::Clone { volume, snapshot }
                } else {
                    let snapshot = format!("clone-{}", request.name);
                    State::check_id("clone snapshot id", &snapshot)?;
                    let cut = self.state.cut_snapshot(&volume, &snapshot, true).await?;
                    if !cut.ready_to_use {
                        let attachments = self.state.attachments(&volume).await?;
                        let node = attachments.writer.map(|w| w.node).unwrap_or_default();
                        self.state
                            .gateways
                            .wait_snapshot(&node, &snapshot, CLONE_SNAPSHOT_TIMEOUT)
                            .await?;
                        self.state.pending().remove(&snapshot);
                    }
                    CatalogSource::Clone { volume, snapshot }
                }
            }
        };
        let descriptor = self
            .state
            .catalog
            .create_volume(&request.name, request.size_bytes, mode, source)
            .await
            .map_err(|error| match error {
                EngineError::VolumeExists { id } => ApiError::AlreadyExists(format!(
                    "volume {id} already exists with other parameters (size, mode or source), or was deleted while its snapshots still use its data"
                )),
                other => other.into(),
            })?;
        self.state.volume_message(&descriptor).await
    }

    async fn expand_volume(
        &self,
        request: pb::ExpandVolumeRequest,
    ) -> Result<pb::Volume, ApiError> {
        State::check_id("volume id", &request.id)?;
        let block = u64::from(self.state.catalog.block_size());
        if request.size_bytes == 0 || !request.size_bytes.is_multiple_of(block) {
            return Err(ApiError::InvalidArgument(format!(
                "size {} must be a positive multiple of the block size {block}",
                request.size_bytes
            )));
        }
        if request.size_bytes > MAX_VOLUME_SIZE {
            return Err(ApiError::OutOfRange(format!(
                "size {} is above the largest volume, {MAX_VOLUME_SIZE} bytes",
                request.size_bytes
            )));
        }
        let _changes = self.state.changes.lock().await;
        let descriptor = self.state.catalog.live_descriptor(&request.id).await?;
        let current = self.state.catalog.volume_state(&descriptor).await?.size();
        if request.size_bytes < current {
            return Err(ApiError::OutOfRange(format!(
                "volume {} is {current} bytes; volumes cannot shrink",
                request.id
            )));
        }
        let attachments = self.state.attachments(&request.id).await?;
        let mut message = volume_message(&descriptor, current, attachments.writer.as_ref());
        if request.size_bytes == current {
            return Ok(message);
        }
        match &attachments.writer {
            Some(writer) => {
                self.state
                    .gateways
                    .expand_volume(&writer.node, &request.id, request.size_bytes)
                    .await?;
            }
            None => {
                let epoch = self.state.next_epoch(&request.id, &attachments).await?;
                self.state
                    .catalog
                    .expand_detached(&request.id, request.size_bytes, epoch)
                    .await?;
            }
        }
        message.size_bytes = request.size_bytes;
        Ok(message)
    }

    async fn delete_volume(&self, request: pb::DeleteVolumeRequest) -> Result<(), ApiError> {
        State::check_id("volume id", &request.id)?;
        let _changes = self.state.changes.lock().await;
        self.state.catalog.live_descriptor(&request.id).await?;
        let attachments = self.state.attachments(&request.id).await?;
        let attached: Vec<String> = attachments
            .writer
            .iter()
            .map(|w| w.node.clone())
            .chain(attachments.readers.iter().map(|r| r.node.clone()))
            .collect();
        if !attached.is_empty() && !request.force {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {} is attached to node(s) {}; detach it first",
                request.id,
                attached.join(", ")
            )));
        }
        if let Some(writer) = &attachments.writer {
            self.state.end_writer(writer, true).await?;
        }
        for reader in &attachments.readers {
            self.state
                .catalog
                .store()
                .delete(&keys::reader_key(&request.id, &reader.node))
                .await
                .map_err(|e| ApiError::store("delete reader record", e))?;
        }
        self.state.catalog.delete_volume(&request.id).await?;
        Ok(())
    }

    async fn attach_volume(
        &self,
        request: pb::AttachVolumeRequest,
    ) -> Result<pb::Attachment, ApiError> {
        State::check_id("volume id", &request.volume_id)?;
        State::check_id("node id", &request.node_id)?;
        let volume = &request.volume_id;
        let node = &request.node_id;
        let _changes = self.state.changes.lock().await;
        self.state.catalog.live_descriptor(volume).await?;
        let attachments = self.state.attachments(volume).await?;
        if request.readonly {
            if let Some(writer) = &attachments.writer {
                return Err(ApiError::FailedPrecondition(format!(
                    "volume {volume} is attached read-write to node {}; a read-only attachment needs it detached",
                    writer.node
                )));
            }
            if let Some(reader) = attachments.readers.iter().find(|r| &r.node == node) {
                return Ok(reader_message(reader));
            }
            let record = ReaderRecord {
                format: documents::FORMAT,
                volume: volume.clone(),
                node: node.clone(),
                attached_unix: unix_now(),
            };
            self.state
                .put_document(
                    &keys::reader_key(volume, node),
                    &record,
                    "write reader record",
                )
                .await?;
            tracing::info!(volume = %volume, node = %node, "attached read-only");
            return Ok(reader_message(&record));
        }
        if let Some(reader) = attachments.readers.first() {
            return Err(ApiError::FailedPrecondition(format!(
                "volume {volume} is attached read-only to node {}; a writer needs every reader detached",
                reader.node
            )));
        }
        if let Some(writer) = &attachments.writer {
            if &writer.node == node {
                return Ok(attachment_message(writer));
            }
            if !request.force {
                return Err(ApiError::FailedPrecondition(format!(
                    "volume {volume} is attached to node {} (epoch {}); detach it there first, or force a takeover if that node is gone",
                    writer.node, writer.epoch
                )));
            }
            self.state.end_writer(writer, true).await?;
            tracing::warn!(volume = %volume, from = %writer.node, to = %node, epoch = writer.epoch, "writer fenced by a forced attach");
        }
        let epoch = self.state.next_epoch(volume, &attachments).await?;
        let record = AttachmentRecord {
            format: documents::FORMAT,
            volume: volume.clone(),
            node: node.clone(),
            epoch,
            attached_unix: unix_now(),
        };
        self.state
            .put_document(
                &keys::attachment_key(volume, epoch),
                &record,
                "write attachment record",
            )
            .await?;
        tracing::info!(volume = %volume, node = %node, epoch, "attached");
        Ok(attachment_message(&record))
    }

    async fn detach_volume(&self, request: pb::DetachVolumeRequest) -> Result<(), ApiError> {
        State::check_id("volume id", &request.volume_id)?;
        State::check_id("node id", &request.node_id)?;
        let volume = &request.volume_id;
        let node = &request.node_id;
        let _changes = self.state.changes.lock().await;
        if self.state.catalog.descriptor(volume).await?.is_none() {
            return Ok(());
        }
        let attachments = self.state.attachments(volume).await?;
        if attachments.readers.iter().any(|r| &r.node == node) {
            self.state
                .catalog
                .store()
                .delete(&keys::reader_key(volume, node))
                .await
                .map_err(|e| ApiError::store("delete reader record", e))?;
        }
        if let Some(writer) = attachments.writer.filter(|w| &w.node == node) {
            // What the gateway still holds must reach the bucket before anyone else may
            // attach: ask it to upload and close the volume when we can reach it.
            if self.state.gateways.knows(node) {
                self.state.gateways.detach_volume(node, volume).await?;
            }
            self.state.end_writer(&writer, false).await?;
            tracing::info!(volume = %volume, node = %node, epoch = writer.epoch, "detached");
        }
        Ok(())
    }

    async fn list_attachments(
        &self,
        request: pb::ListAttachmentsRequest,
    ) -> Result<pb::ListAttachmentsResponse, ApiError> {
        let limit = page_size(request.page_size);
        let mut after = page_token(&request.page_token)?.map(str::to_string);
        let mut attachments = Vec::new();
        loop {
            let (volumes, next) = self
                .state
                .catalog
                .list_volumes(after.as_deref(), limit)
                .await?;
            for descriptor in &volumes {
                let found = self.state.attachments(&descriptor.id).await?;
                let writer = found.writer.iter().map(attachment_message);
                let readers = found.readers.iter().map(reader_message);
                attachments.extend(
                    writer
                        .chain(readers)
                        .filter(|a| request.node_id.is_empty() || a.node_id == request.node_id),
                );
            }
            after = next;
            // A page holds the attachments of up to `limit` volumes.
            if after.is_none() || !volumes.is_empty() {
                break;
            }
        }
        Ok(pb::ListAttachmentsResponse {
            attachments,
            next_page_token: after.unwrap_or_default(),
        })
    }
}

#[tonic::async_trait]
impl pb::block_store_server::BlockStore for BlockStoreService {
    async fn get_service_info(
        &self,
        _request: Request<pb::GetServiceInfoRequest>,
    ) -> Result<Response<pb::ServiceInfo>, Status> {
        // Answer only when the bucket does: readiness probes rely on it.
        self.state
            .catalog
            .store()
            .list(keys::VOLUMES_PREFIX, None)
            .await
            .map_err(|e| ApiError::store("reach the object store", e))?;
        Ok(Response::new(pb::ServiceInfo {
            version: VERSION.to_string(),
            block_size: crate::block_data::BLOCK_SIZE,
            volume_block_size: self.state.catalog.block_size(),
            max_volume_size: MAX_VOLUME_SIZE,
        }))
    }

    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        Ok(Response::new(
            self.create_volume(request.into_inner()).await?,
        ))
    }

    async fn get_volume(
        &self,
        request: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        let id = request.into_inner().id;
        State::check_id("volume id", &id)?;
        let descriptor = self
            .state
            .catalog
            .live_descriptor(&id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(self.state.volume_message(&descriptor).await?))
    }

    async fn list_volumes(
        &self,
        request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let request = request.into_inner();
        let after = page_token(&request.page_token)?;
        let (descriptors, next) = self
            .state
            .catalog
            .list_volumes(after, page_size(request.page_size))
            .await
            .map_err(ApiError::from)?;
        let mut volumes = Vec::with_capacity(descriptors.len());
        for descriptor in &descriptors {
            volumes.push(self.state.volume_message(descriptor).await?);
        }
        Ok(Response::new(pb::ListVolumesResponse {
            volumes,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn expand_volume(
        &self,
        request: Request<pb::ExpandVolumeRequest>,
    ) -> Result<Response<pb::Volume>, Status> {
        Ok(Response::new(
            self.expand_volume(request.into_inner()).await?,
        ))
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        self.delete_volume(request.into_inner()).await?;
        Ok(Response::new(pb::DeleteVolumeResponse {}))
    }

    async fn attach_volume(
        &self,
        request: Request<pb::AttachVolumeRequest>,
    ) -> Result<Response<pb::Attachment>, Status> {
        Ok(Response::new(
            self.attach_volume(request.into_inner()).await?,
        ))
    }

    async fn detach_volume(
        &self,
        request: Request<pb::DetachVolumeRequest>,
    ) -> Result<Response<pb::DetachVolumeResponse>, Status> {
        self.detach_volume(request.into_inner()).await?;
        Ok(Response::new(pb::DetachVolumeResponse {}))
    }

    async fn list_attachments(
        &self,
        request: Request<pb::ListAttachmentsRequest>,
    ) -> Result<Response<pb::ListAttachmentsResponse>, Status> {
        Ok(Response::new(
            self.list_attachments(request.into_inner()).await?,
        ))
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let request = request.into_inner();
        State::check_id("snapshot name", &request.name)?;
        State::check_id("volume id", &request.volume_id)?;
        let _changes = self.state.changes.lock().await;
        Ok(Response::new(
            self.state
                .cut_snapshot(&request.volume_id, &request.name, false)
                .await?,
        ))
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        let id = request.into_inner().id;
        State::check_id("snapshot id", &id)?;
        Ok(Response::new(self.state.snapshot(&id).await?))
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let request = request.into_inner();
        if !request.volume_id.is_empty() {
            State::check_id("volume id", &request.volume_id)?;
        }
        let volume = (!request.volume_id.is_empty()).then_some(request.volume_id.as_str());
        let after = page_token(&request.page_token)?;
        let (manifests, next) = self
            .state
            .catalog
            .list_snapshots(volume, after, page_size(request.page_size))
            .await
            .map_err(ApiError::from)?;
        let mut snapshots: Vec<pb::Snapshot> = manifests.iter().map(snapshot_message).collect();
        if next.is_none() {
            // Snapshots still uploading on their gateways come last, on the final page.
            let pending: Vec<String> = self
                .state
                .pending()
                .iter()
                .filter(|(_, p)| volume.is_none_or(|v| v == p.volume))
                .map(|(id, _)| id.clone())
                .collect();
            for id in pending {
                if snapshots.iter().any(|s| s.id == id) {
                    continue;
                }
                if let Ok(snapshot) = self.state.snapshot(&id).await {
                    snapshots.push(snapshot);
                }
            }
        }
        Ok(Response::new(pb::ListSnapshotsResponse {
            snapshots,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let id = request.into_inner().id;
        State::check_id("snapshot id", &id)?;
        let _changes = self.state.changes.lock().await;
        let snapshot = self.state.snapshot(&id).await?;
        if !snapshot.ready_to_use {
            return Err(ApiError::FailedPrecondition(format!(
                "snapshot {id} is still uploading; delete it once it is ready"
            ))
            .into());
        }
        self.state
            .catalog
            .delete_snapshot(&id)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::DeleteSnapshotResponse {}))
    }
}
