//! Block data of snapshots, as the EBS direct APIs offer it: list a snapshot's written
//! blocks, the blocks changed between two snapshots of one lineage, read a block with its
//! SHA-256, and import a snapshot block by block.
//!
//! Changed blocks are a diff of the two snapshots' maps, never of their data: a block is
//! changed when any of its bytes was written (or trimmed) between the two, so the cost is
//! that of the maps, not of the volume.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockgate_blockstore::documents::{self, ImportRecord, SnapshotManifest};
use blockgate_blockstore::keys;
use blockgate_engine::EngineError;
use blockgate_engine::catalog::Extent;
use blockgate_objstore::ObjectStoreError;
use blockgate_proto::blockstore::v1 as pb;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::error::ApiError;
use crate::service::{State, snapshot_message, unix_now};

/// The block size of the block-data API: 512 KiB, as EBS uses.
pub const BLOCK_SIZE: u32 = 512 * 1024;
const DEFAULT_RESULTS: usize = 10_000;
const DEFAULT_IMPORT_TIMEOUT: u32 = 3600;
const MAX_IMPORT_TIMEOUT: u32 = 86_400;

fn block_size() -> u64 {
    u64::from(BLOCK_SIZE)
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// The blocks an ordered list of extents touches, from `start`, at most `limit`. Returns
/// them and the block to continue at, when there are more.
fn blocks_of(extents: &[Extent], start: u64, limit: usize) -> (Vec<u64>, Option<u64>) {
    let block = block_size();
    let mut blocks: Vec<u64> = Vec::new();
    for extent in extents {
        let first = (extent.offset / block).max(start);
        let last = (extent.offset + extent.length - 1) / block;
        let mut index = first.max(blocks.last().map_or(0, |b| b + 1));
        while index <= last {
            if blocks.len() == limit {
                return (blocks, Some(index));
            }
            blocks.push(index);
            index += 1;
        }
    }
    (blocks, None)
}

/// An import in progress: the digests of the blocks put through this instance. A block put
/// before a restart is read back to get its digest.
#[derive(Debug, Default)]
struct ImportDigests {
    blocks: BTreeMap<u64, [u8; 32]>,
}

/// The block-storage API's `BlockData` service.
#[derive(Debug, Clone)]
pub struct BlockDataService {
    state: Arc<State>,
    imports: Arc<Mutex<HashMap<String, ImportDigests>>>,
}

impl BlockDataService {
    pub fn new(state: Arc<State>) -> BlockDataService {
        BlockDataService {
            state,
            imports: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn imports(&self) -> std::sync::MutexGuard<'_, HashMap<String, ImportDigests>> {
        self.imports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn manifest(&self, what: &str, id: &str) -> Result<SnapshotManifest, ApiError> {
        State::check_id(what, id)?;
        match self.state.catalog.manifest(id).await {
            Ok(manifest) => Ok(manifest),
            Err(EngineError::SnapshotNotFound { .. }) => {
                // Cut on a gateway but not uploaded yet: its blocks are not in the bucket.
                if self.state.snapshot(id).await.is_ok() {
                    return Err(ApiError::FailedPrecondition(format!(
                        "snapshot {id} is not ready yet; its blocks can be read once it is"
                    )));
                }
                Err(ApiError::NotFound(format!("snapshot {id} does not exist")))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The volumes a snapshot's data descends from: its own volume, then the snapshot that
    /// volume was created from, and so on.
    async fn lineage(&self, manifest: &SnapshotManifest) -> Result<Vec<String>, ApiError> {
        let mut volumes = vec![manifest.volume.clone()];
        let mut volume = manifest.volume.clone();
        while volumes.len() < 64 {
            let Some(descriptor) = self.state.catalog.descriptor(&volume).await? else {
                break;
            };
            let Some(source) = descriptor.source else {
                break;
            };
            let parent = match self.state.catalog.manifest(source.snapshot()).await {
                Ok(parent) => parent,
                Err(EngineError::SnapshotNotFound { .. }) => break,
                Err(error) => return Err(error.into()),
            };
            volume = parent.volume;
            volumes.push(volume.clone());
        }
        Ok(volumes)
    }

    async fn list_changed_blocks(
        &self,
        request: pb::ListChangedBlocksRequest,
    ) -> Result<pb::ListChangedBlocksResponse, ApiError> {
        let second = self
            .manifest("second snapshot id", &request.second_snapshot_id)
            .await?;
        let second_map = self.state.catalog.snapshot_map(&second).await?;
        let extents = if request.first_snapshot_id.is_empty() {
            second_map.extents()
        } else {
            let first = self
                .manifest("first snapshot id", &request.first_snapshot_id)
                .await?;
            let (first_lineage, second_lineage) =
                (self.lineage(&first).await?, self.lineage(&second).await?);
            if !second_lineage.contains(&first.volume) && !first_lineage.contains(&second.volume) {
                return Err(ApiError::InvalidArgument(format!(
                    "snapshots {} (volume {}) and {} (volume {}) are not of one lineage",
                    first.id, first.volume, second.id, second.volume
                )));
            }
            let first_map = self.state.catalog.snapshot_map(&first).await?;
            second_map.changed_since(&first_map)
        };
        let size = second_map.size();
        let blocks_in_volume = size.div_ceil(block_size());
        if request.starting_block_index > blocks_in_volume {
            return Err(ApiError::OutOfRange(format!(
                "block {} is beyond the snapshot's {blocks_in_volume} blocks",
                request.starting_block_index
            )));
        }
        let limit = results(request.max_results);
        let (blocks, next) = blocks_of(&extents, request.starting_block_index, limit);
        Ok(pb::ListChangedBlocksResponse {
            changed_blocks: blocks
                .into_iter()
                .map(|block_index| pb::ChangedBlock { block_index })
                .collect(),
            next_block_index: next,
            block_size: BLOCK_SIZE,
            volume_size: size,
        })
    }

    async fn import_record(&self, snapshot: &str) -> Result<Option<ImportRecord>, ApiError> {
        let key = keys::import_key(snapshot);
        match self.state.catalog.store().get(&key).await {
            Ok(bytes) => Ok(Some(
                documents::decode(&key, &bytes)
                    .map_err(|source| EngineError::Corrupt { key, source })?,
            )),
            Err(ObjectStoreError::NotFound { .. }) => Ok(None),
            Err(error) => Err(ApiError::store("read import record", error)),
        }
    }

    async fn live_import(&self, snapshot: &str) -> Result<ImportRecord, ApiError> {
        State::check_id("snapshot id", snapshot)?;
        let Some(record) = self.import_record(snapshot).await? else {
            return Err(ApiError::NotFound(format!(
                "no import of snapshot {snapshot} is in progress"
            )));
        };
        if record.expires_unix <= unix_now() {
            return Err(ApiError::FailedPrecondition(format!(
                "the import of snapshot {snapshot} expired unfinished; start it again"
            )));
        }
        Ok(record)
    }

    async fn start_snapshot(
        &self,
        request: pb::StartSnapshotRequest,
    ) -> Result<pb::StartSnapshotResponse, ApiError> {
        State::check_id("snapshot name", &request.name)?;
        let volume_block = u64::from(self.state.catalog.block_size());
        if request.volume_size == 0 || !request.volume_size.is_multiple_of(volume_block) {
            return Err(ApiError::InvalidArgument(format!(
                "volume_size {} must be a positive multiple of {volume_block}",
                request.volume_size
            )));
        }
        if request.volume_size > crate::service::MAX_VOLUME_SIZE {
            return Err(ApiError::OutOfRange(format!(
                "volume_size {} is above the largest volume",
                request.volume_size
            )));
        }
        let timeout = match request.timeout_seconds {
            0 => DEFAULT_IMPORT_TIMEOUT,
            t if t > MAX_IMPORT_TIMEOUT => {
                return Err(ApiError::InvalidArgument(format!(
                    "timeout_seconds {t} is above {MAX_IMPORT_TIMEOUT}"
                )));
            }
            t => t,
        };
        let parent = (!request.parent_snapshot_id.is_empty()).then_some(request.parent_snapshot_id);
        let _changes = self.state.changes.lock().await;
        if let Some(parent) = &parent {
            let manifest = self.manifest("parent snapshot id", parent).await?;
            if manifest.size > request.volume_size {
                return Err(ApiError::OutOfRange(format!(
                    "volume_size {} is smaller than parent snapshot {parent} ({} bytes)",
                    request.volume_size, manifest.size
                )));
            }
        }
        match self.state.catalog.manifest(&request.name).await {
            Ok(_) => {
                return Err(ApiError::AlreadyExists(format!(
                    "snapshot {} already exists",
                    request.name
                )));
            }
            Err(EngineError::SnapshotNotFound { .. }) => {}
            Err(error) => return Err(error.into()),
        }
        if let Some(existing) = self.import_record(&request.name).await? {
            if existing.volume_size == request.volume_size && existing.parent == parent {
                return Ok(start_response(&existing));
            }
            return Err(ApiError::AlreadyExists(format!(
                "an import of snapshot {} with other parameters is in progress",
                request.name
            )));
        }
        let now = unix_now();
        let record = ImportRecord {
            format: documents::FORMAT,
            snapshot: request.name.clone(),
            volume_size: request.volume_size,
            block_size: BLOCK_SIZE,
            parent,
            started_unix: now,
            expires_unix: now + u64::from(timeout),
        };
        // Blocks left from an earlier import of the same name that expired unswept.
        self.state.catalog.discard_import(&request.name).await?;
        self.state
            .catalog
            .store()
            .put(&keys::import_key(&request.name), documents::encode(&record))
            .await
            .map_err(|e| ApiError::store("write import record", e))?;
        self.imports()
            .insert(request.name.clone(), ImportDigests::default());
        tracing::info!(snapshot = %request.name, size = request.volume_size, "import started");
        Ok(start_response(&record))
    }

    async fn put_snapshot_block(
        &self,
        request: pb::PutSnapshotBlockRequest,
    ) -> Result<pb::PutSnapshotBlockResponse, ApiError> {
        let record = self.live_import(&request.snapshot_id).await?;
        let blocks = record.volume_size.div_ceil(block_size());
        if request.block_index >= blocks {
            return Err(ApiError::OutOfRange(format!(
                "block {} is beyond the volume's {blocks} blocks",
                request.block_index
            )));
        }
        let offset = request.block_index * block_size();
        let expected = (record.volume_size - offset).min(block_size());
        if request.data.len() as u64 != expected {
            return Err(ApiError::InvalidArgument(format!(
                "block {} must be {expected} bytes, not {}",
                request.block_index,
                request.data.len()
            )));
        }
        let digest = sha256(&request.data);
        if !request.checksum.eq_ignore_ascii_case(&hex(&digest)) {
            return Err(ApiError::InvalidArgument(format!(
                "block {}: checksum {:?} does not match the data's SHA-256 {}",
                request.block_index,
                request.checksum,
                hex(&digest)
            )));
        }
        self.state
            .catalog
            .put_import_block(
                &request.snapshot_id,
                record.volume_size,
                offset,
                request.block_index,
                &request.data,
            )
            .await?;
        self.imports()
            .entry(request.snapshot_id.clone())
            .or_default()
            .blocks
            .insert(request.block_index, digest);
        Ok(pb::PutSnapshotBlockResponse {
            checksum: hex(&digest),
        })
    }

    async fn complete_snapshot(
        &self,
        request: pb::CompleteSnapshotRequest,
    ) -> Result<pb::Snapshot, ApiError> {
        State::check_id("snapshot id", &request.snapshot_id)?;
        let _changes = self.state.changes.lock().await;
        if self.import_record(&request.snapshot_id).await?.is_none()
            && let Ok(manifest) = self.state.catalog.manifest(&request.snapshot_id).await
        {
            // Completed already: answer the same.
            return Ok(snapshot_message(&manifest));
        }
        let record = self.live_import(&request.snapshot_id).await?;
        let stored = self
            .state
            .catalog
            .import_blocks(&request.snapshot_id)
            .await?;
        if stored.len() as u64 != request.changed_blocks_count {
            return Err(ApiError::InvalidArgument(format!(
                "changed_blocks_count is {} but the import holds {} blocks",
                request.changed_blocks_count,
                stored.len()
            )));
        }
        let known: BTreeMap<u64, [u8; 32]> = self
            .imports()
            .get(&request.snapshot_id)
            .map(|digests| digests.blocks.clone())
            .unwrap_or_default();
        let mut aggregate = Sha256::new();
        for index in &stored {
            let digest = match known.get(index) {
                Some(digest) => *digest,
                None => sha256(
                    &self
                        .state
                        .catalog
                        .read_import_block(&request.snapshot_id, *index)
                        .await?,
                ),
            };
            aggregate.update(digest);
        }
        let aggregate = hex(&aggregate.finalize());
        if !request.checksum.eq_ignore_ascii_case(&aggregate) {
            return Err(ApiError::InvalidArgument(format!(
                "checksum {:?} does not match the aggregate of the blocks put ({aggregate}): some block is missing or differs",
                request.checksum
            )));
        }
        let manifest = self
            .state
            .catalog
            .complete_import(
                &request.snapshot_id,
                record.volume_size,
                record.parent.as_deref(),
            )
            .await?;
        self.state
            .catalog
            .store()
            .delete(&keys::import_key(&request.snapshot_id))
            .await
            .map_err(|e| ApiError::store("delete import record", e))?;
        self.imports().remove(&request.snapshot_id);
        Ok(snapshot_message(&manifest))
    }

    /// Discards imports that expired unfinished. Returns how many.
    pub async fn sweep_expired_imports(&self) -> Result<usize, ApiError> {
        let now = unix_now();
        let mut swept = 0;
        let objects =
            blockgate_objstore::list_all(&**self.state.catalog.store(), keys::IMPORTS_PREFIX)
                .await
                .map_err(|e| ApiError::store("list imports", e))?;
        for object in objects {
            let Some(snapshot) = keys::import_of_key(&object.key) else {
                continue;
            };
            let _changes = self.state.changes.lock().await;
            let Some(record) = self.import_record(snapshot).await? else {
                continue;
            };
            if record.expires_unix > now {
                continue;
            }
            self.state.catalog.discard_import(snapshot).await?;
            self.state
                .catalog
                .store()
                .delete(&object.key)
                .await
                .map_err(|e| ApiError::store("delete import record", e))?;
            self.imports().remove(snapshot);
            tracing::info!(snapshot, "expired import discarded");
            swept += 1;
        }
        Ok(swept)
    }

    /// Sweeps expired imports every `interval` until the task is dropped.
    pub fn spawn_import_sweeper(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let service = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            loop {
                ticker.tick().await;
                if let Err(error) = service.sweep_expired_imports().await {
                    tracing::warn!(error = %crate::error::describe(&error), "sweeping expired imports failed");
                }
            }
        })
    }
}

fn results(requested: u32) -> usize {
    match usize::try_from(requested).unwrap_or(DEFAULT_RESULTS) {
        0 => DEFAULT_RESULTS,
        n => n.min(DEFAULT_RESULTS),
    }
}

fn start_response(record: &ImportRecord) -> pb::StartSnapshotResponse {
    pb::StartSnapshotResponse {
        snapshot: Some(pb::Snapshot {
            id: record.snapshot.clone(),
            volume_id: keys::import_volume(&record.snapshot),
            size_bytes: record.volume_size,
            ready_to_use: false,
            parent_id: record.parent.clone().unwrap_or_default(),
            created_unix: record.started_unix,
        }),
        block_size: BLOCK_SIZE,
        expires_unix: record.expires_unix,
    }
}

#[tonic::async_trait]
impl pb::block_data_server::BlockData for BlockDataService {
    async fn list_snapshot_blocks(
        &self,
        request: Request<pb::ListSnapshotBlocksRequest>,
    ) -> Result<Response<pb::ListSnapshotBlocksResponse>, Status> {
        let request = request.into_inner();
        let manifest = self.manifest("snapshot id", &request.snapshot_id).await?;
        let map = self
            .state
            .catalog
            .snapshot_map(&manifest)
            .await
            .map_err(ApiError::from)?;
        let blocks_in_volume = map.size().div_ceil(block_size());
        if request.starting_block_index > blocks_in_volume {
            return Err(ApiError::OutOfRange(format!(
                "block {} is beyond the snapshot's {blocks_in_volume} blocks",
                request.starting_block_index
            ))
            .into());
        }
        let (blocks, next) = blocks_of(
            &map.extents(),
            request.starting_block_index,
            results(request.max_results),
        );
        Ok(Response::new(pb::ListSnapshotBlocksResponse {
            blocks: blocks
                .into_iter()
                .map(|block_index| pb::Block { block_index })
                .collect(),
            next_block_index: next,
            block_size: BLOCK_SIZE,
            volume_size: map.size(),
        }))
    }

    async fn list_changed_blocks(
        &self,
        request: Request<pb::ListChangedBlocksRequest>,
    ) -> Result<Response<pb::ListChangedBlocksResponse>, Status> {
        Ok(Response::new(
            self.list_changed_blocks(request.into_inner()).await?,
        ))
    }

    async fn get_snapshot_block(
        &self,
        request: Request<pb::GetSnapshotBlockRequest>,
    ) -> Result<Response<pb::GetSnapshotBlockResponse>, Status> {
        let request = request.into_inner();
        let manifest = self.manifest("snapshot id", &request.snapshot_id).await?;
        let map = self
            .state
            .catalog
            .snapshot_map(&manifest)
            .await
            .map_err(ApiError::from)?;
        let blocks = map.size().div_ceil(block_size());
        if request.block_index >= blocks {
            return Err(ApiError::OutOfRange(format!(
                "block {} is beyond the snapshot's {blocks} blocks",
                request.block_index
            ))
            .into());
        }
        let offset = request.block_index * block_size();
        let length = usize::try_from((map.size() - offset).min(block_size())).unwrap_or(0);
        let data = self
            .state
            .catalog
            .read(&map, offset, length)
            .await
            .map_err(ApiError::from)?;
        let checksum = hex(&sha256(&data));
        Ok(Response::new(pb::GetSnapshotBlockResponse {
            data,
            checksum,
        }))
    }

    async fn start_snapshot(
        &self,
        request: Request<pb::StartSnapshotRequest>,
    ) -> Result<Response<pb::StartSnapshotResponse>, Status> {
        Ok(Response::new(
            self.start_snapshot(request.into_inner()).await?,
        ))
    }

    async fn put_snapshot_block(
        &self,
        request: Request<pb::PutSnapshotBlockRequest>,
    ) -> Result<Response<pb::PutSnapshotBlockResponse>, Status> {
        Ok(Response::new(
            self.put_snapshot_block(request.into_inner()).await?,
        ))
    }

    async fn complete_snapshot(
        &self,
        request: Request<pb::CompleteSnapshotRequest>,
    ) -> Result<Response<pb::Snapshot>, Status> {
        Ok(Response::new(
            self.complete_snapshot(request.into_inner()).await?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = BLOCK_SIZE as u64;

    fn extent(offset: u64, length: u64) -> Extent {
        Extent { offset, length }
    }

    #[test]
    fn extents_become_blocks_once_each() {
        let extents = [
            extent(0, 10),
            extent(100, 10),
            extent(B - 1, 2),
            extent(5 * B, 2 * B),
        ];
        let (blocks, next) = blocks_of(&extents, 0, 100);
        assert_eq!(blocks, vec![0, 1, 5, 6]);
        assert_eq!(next, None);
    }

    #[test]
    fn block_pages_continue_where_they_stopped() {
        let extents = [extent(0, 10 * B)];
        let (first, next) = blocks_of(&extents, 0, 4);
        assert_eq!(first, vec![0, 1, 2, 3]);
        assert_eq!(next, Some(4));
        let (second, next) = blocks_of(&extents, 4, 100);
        assert_eq!(second, vec![4, 5, 6, 7, 8, 9]);
        assert_eq!(next, None);
        let (from_middle, _) = blocks_of(&[extent(0, 3 * B), extent(8 * B, 1)], 2, 10);
        assert_eq!(from_middle, vec![2, 8]);
    }

    #[test]
    fn hex_is_lowercase_sha256() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
