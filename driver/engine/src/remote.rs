//! The bucket side of a volume: its extent map as the bucket holds it, rebuilt from the
//! newest checkpoint and the segments after it, and the reads of segment data.
//!
//! Recovery follows one rule: the valid history of a volume is its newest checkpoint (the
//! highest writer epoch, then the highest sequence number) and the segments *of that epoch*
//! that follow it without a gap. A fenced writer's later segments carry an older epoch and are
//! ignored; a segment after a gap was never part of a state anyone saw.

use std::collections::HashSet;
use std::sync::Arc;

use blockgate_blockstore::checkpoint::{self, Checkpoint};
use blockgate_blockstore::documents::SnapshotManifest;
use blockgate_blockstore::keys::{self, Name, SegmentRef};
use blockgate_blockstore::segment::{self, Run, RunKind, RunLocation, SegmentHeader};
use blockgate_objstore::{ObjectStore, ObjectStoreError};
use bytes::Bytes;

use crate::cache::{CHUNK_SIZE, ChunkCache, Fetch, wait_fetch};
use crate::error::EngineError;
use crate::extent_map::ExtentMap;

/// A volume's map as the bucket holds it.
#[derive(Debug, Clone)]
pub struct RemoteState {
    pub map: ExtentMap<RunLocation>,
    /// Segment table: `RunLocation::segment` indexes it.
    pub segments: Vec<SegmentRef>,
    pub segment_keys: Vec<Arc<str>>,
    pub size: u64,
    /// The newest checkpoint in the bucket.
    pub checkpoint: Name,
    /// Segments applied after `checkpoint`, in order.
    pub since_checkpoint: Vec<Name>,
    /// The newest applied segment (or the checkpoint when none follows it).
    pub applied: Name,
}

impl RemoteState {
    pub fn empty(name: Name, size: u64) -> RemoteState {
        RemoteState {
            map: ExtentMap::new(),
            segments: Vec::new(),
            segment_keys: Vec::new(),
            size,
            checkpoint: name,
            since_checkpoint: Vec::new(),
            applied: name,
        }
    }

    pub fn from_checkpoint(checkpoint: Checkpoint) -> RemoteState {
        let mut state = RemoteState::empty(checkpoint.name, checkpoint.volume_size);
        state.segment_keys = checkpoint
            .segments
            .iter()
            .map(|s| Arc::from(s.key()))
            .collect();
        state.segments = checkpoint.segments;
        for (offset, length, location) in checkpoint.extents {
            state.map.insert(offset, length, location);
        }
        state
    }

    fn add_segment(&mut self, segment: SegmentRef) -> u32 {
        self.segment_keys.push(Arc::from(segment.key()));
        self.segments.push(segment);
        u32::try_from(self.segments.len() - 1).unwrap_or(u32::MAX)
    }

    /// Applies a segment's runs on top of the map.
    pub fn apply(&mut self, segment: SegmentRef, volume_size: u64, runs: &[Run]) {
        let name = segment.name;
        let index = self.add_segment(segment);
        for run in runs {
            match run.kind {
                RunKind::Data => self.map.insert(
                    run.volume_offset,
                    run.length,
                    RunLocation {
                        segment: index,
                        run_offset: run.object_offset,
                        run_length: run.length,
                        skip: 0,
                    },
                ),
                RunKind::Zero => self.map.remove(run.volume_offset, run.length),
            }
        }
        self.size = self.size.max(volume_size);
        self.since_checkpoint.push(name);
        self.applied = name;
    }

    /// Encodes the map as a checkpoint named `name`, with only the segments it references.
    pub fn encode_checkpoint(&self, name: Name) -> Bytes {
        let mut remap = vec![u32::MAX; self.segments.len()];
        let mut table = Vec::new();
        let mut extents = Vec::with_capacity(self.map.len());
        for (offset, length, location) in self.map.iter() {
            let slot = &mut remap[location.segment as usize];
            if *slot == u32::MAX {
                *slot = u32::try_from(table.len()).unwrap_or(u32::MAX);
                table.push(self.segments[location.segment as usize].clone());
            }
            extents.push((
                offset,
                length,
                RunLocation {
                    segment: *slot,
                    ..*location
                },
            ));
        }
        checkpoint::encode(
            name,
            self.size,
            &table,
            extents.iter().map(|(o, l, loc)| (*o, *l, loc)),
        )
    }

    /// Records that checkpoint `name` is in the bucket.
    pub fn checkpoint_written(&mut self, name: Name) {
        if name > self.checkpoint {
            self.checkpoint = name;
            self.since_checkpoint
                .retain(|segment| segment.seq > name.seq);
        }
    }

    /// The segments the map references.
    pub fn referenced(&self) -> HashSet<SegmentRef> {
        let mut used = vec![false; self.segments.len()];
        for (_, _, location) in self.map.iter() {
            used[location.segment as usize] = true;
        }
        used.iter()
            .zip(&self.segments)
            .filter(|(used, _)| **used)
            .map(|(_, segment)| segment.clone())
            .collect()
    }
}

fn corrupt(key: &str, source: blockgate_blockstore::DecodeError) -> EngineError {
    EngineError::Corrupt {
        key: key.to_string(),
        source,
    }
}

pub async fn load_checkpoint(
    store: &dyn ObjectStore,
    volume: &str,
    name: Name,
) -> Result<Checkpoint, EngineError> {
    let key = keys::checkpoint_key(volume, name);
    let bytes = store
        .get(&key)
        .await
        .map_err(|e| EngineError::store("read checkpoint", e))?;
    checkpoint::decode(&bytes).map_err(|e| corrupt(&key, e))
}

/// Reads and verifies a segment's header and index.
pub async fn read_segment_index(
    store: &dyn ObjectStore,
    key: &str,
) -> Result<(SegmentHeader, Vec<Run>), EngineError> {
    let head = store
        .get_range(key, 0..segment::HEADER_LEN as u64)
        .await
        .map_err(|e| EngineError::store("read segment header", e))?;
    let header = segment::decode_header(&head).map_err(|e| corrupt(key, e))?;
    let whole = store
        .get_range(key, 0..header.index_end())
        .await
        .map_err(|e| EngineError::store("read segment index", e))?;
    let runs = segment::decode_index(&header, &whole).map_err(|e| corrupt(key, e))?;
    Ok((header, runs))
}

/// The names under a prefix of segment or checkpoint keys, in order.
pub async fn list_names(store: &dyn ObjectStore, prefix: &str) -> Result<Vec<Name>, EngineError> {
    let listed = blockgate_objstore::list_all(store, prefix)
        .await
        .map_err(|e| EngineError::store("list", e))?;
    Ok(listed
        .iter()
        .filter_map(|object| keys::name_of_key(&object.key))
        .collect())
}

/// The newest checkpoint of a volume, if it has one.
pub async fn latest_checkpoint(
    store: &dyn ObjectStore,
    volume: &str,
) -> Result<Option<Name>, EngineError> {
    Ok(list_names(store, &keys::checkpoints_prefix(volume))
        .await?
        .into_iter()
        .max())
}

/// The first checkpoint of a writer epoch newer than `epoch`, if the bucket holds one: the
/// volume was then attached to (taken over by) a newer writer, and a writer of `epoch` is
/// fenced. One LIST request, starting after the last name epoch `epoch` can have, so its cost
/// does not grow with the volume's history. Errors are the store's, never "fenced": the
/// caller retries them.
pub async fn newer_checkpoint(
    store: &dyn ObjectStore,
    volume: &str,
    epoch: u64,
) -> Result<Option<Name>, ObjectStoreError> {
    let prefix = keys::checkpoints_prefix(volume);
    // Names are `{epoch:010}-{seq:016}`: every name of `epoch` sorts before
    // `{epoch:010}-\u{7f}`, every name of a later epoch after it.
    let after = format!("{prefix}{epoch:010}-\u{7f}");
    let page = store.list(&prefix, Some(after)).await?;
    Ok(page
        .keys
        .iter()
        .filter_map(|object| keys::name_of_key(&object.key))
        .find(|name| name.epoch > epoch))
}

/// Rebuilds a volume's bucket-side state: the newest checkpoint and the segments of its
/// epoch that follow it without a gap.
pub async fn recover(
    store: &dyn ObjectStore,
    volume: &str,
    size_floor: u64,
) -> Result<RemoteState, EngineError> {
    let mut state = match latest_checkpoint(store, volume).await? {
        Some(name) => RemoteState::from_checkpoint(load_checkpoint(store, volume, name).await?),
        None => RemoteState::empty(Name { epoch: 0, seq: 0 }, size_floor),
    };
    state.size = state.size.max(size_floor);
    let epoch = state.checkpoint.epoch;
    let volume_id: Arc<str> = Arc::from(volume);
    for name in list_names(store, &keys::segments_epoch_prefix(volume, epoch)).await? {
        if name.seq <= state.applied.seq {
            continue;
        }
        if name.seq != state.applied.seq + 1 {
            tracing::warn!(volume, segment = %name, after = %state.applied, "segment after a gap ignored");
            break;
        }
        let segment = SegmentRef {
            volume: volume_id.clone(),
            name,
        };
        let (header, runs) = read_segment_index(store, &segment.key()).await?;
        state.apply(segment, header.volume_size, &runs);
    }
    Ok(state)
}

/// The map of a snapshot: its checkpoint with its segments applied.
pub async fn snapshot_state(
    store: &dyn ObjectStore,
    manifest: &SnapshotManifest,
) -> Result<RemoteState, EngineError> {
    let checkpoint = load_checkpoint(store, &manifest.volume, manifest.checkpoint.0).await?;
    let mut state = RemoteState::from_checkpoint(checkpoint);
    let volume: Arc<str> = Arc::from(manifest.volume.as_str());
    for name in &manifest.segments {
        let segment = SegmentRef {
            volume: volume.clone(),
            name: name.0,
        };
        let (header, runs) = read_segment_index(store, &segment.key()).await?;
        state.apply(segment, header.volume_size, &runs);
    }
    state.size = manifest.size;
    Ok(state)
}

/// Reads `out.len()` bytes at `location` of segment `key`, through `cache` when given,
/// verifying every frame. A frame that fails verification in the cache is fetched again;
/// one that fails from the store is an error.
///
/// On a cache miss the fetch covers whole cache chunks, up to the next multiple of `ahead`
/// bytes of the object (0: just the chunks the read needs) and never past the run: a
/// sequential reader asks for large pieces, so neighbouring reads find them cached. A chunk
/// another read is already fetching is waited for, not fetched twice.
pub async fn read_run(
    store: &dyn ObjectStore,
    cache: Option<&ChunkCache>,
    key: &Arc<str>,
    location: RunLocation,
    out: &mut [u8],
    ahead: u64,
) -> Result<(), EngineError> {
    let range = location.object_range(out.len() as u64);
    let span = usize::try_from(range.end - range.start).unwrap_or(usize::MAX);
    let Some(cache) = cache else {
        let fetched = get_range(store, key, range.start, range.end).await?;
        return location.decode(&fetched, out).map_err(|e| corrupt(key, e));
    };
    let run_end = location.run_offset + segment::stored_length(location.run_length);
    let wanted_end = match range.start.checked_div(ahead) {
        Some(piece) => range.end.max((piece + 1).saturating_mul(ahead)),
        None => range.end,
    }
    .min(run_end)
    .max(range.end);
    let mut cached = vec![0u8; span];
    // Each round finds the bytes cached, fetches them, or waits for another read's fetch of
    // them and looks again (a few times: that fetch may have failed, or been evicted).
    for _ in 0..4 {
        if cache.read(key, range.start, &mut cached) {
            match location.decode(&cached, out) {
                Ok(()) => return Ok(()),
                Err(error) => {
                    tracing::warn!(%key, %error, "cached segment bytes failed verification; refetching");
                    cache.invalidate(key, range.start, range.end);
                }
            }
        }
        let claim = match cache.claim(
            key,
            range.start / CHUNK_SIZE,
            wanted_end.div_ceil(CHUNK_SIZE),
        ) {
            Fetch::Wait(receiver) => {
                wait_fetch(receiver).await;
                continue;
            }
            Fetch::Claimed(claim) => claim,
        };
        let claimed = claim.range();
        let fetch_end = claimed.end.min(run_end);
        let fetched = get_range(store, key, claimed.start, fetch_end).await?;
        cache.insert(key, claimed.start, &fetched);
        drop(claim);
        let from = usize::try_from(range.start - claimed.start).unwrap_or(0);
        if fetch_end >= range.end {
            return location
                .decode(&fetched[from..from + span], out)
                .map_err(|e| corrupt(key, e));
        }
        // The claim stopped at a chunk cached or being fetched by another read: the rest of
        // this read comes straight from the store.
        let rest = get_range(store, key, fetch_end, range.end).await?;
        let mut joined = Vec::with_capacity(span);
        joined.extend_from_slice(&fetched[from..]);
        joined.extend_from_slice(&rest);
        return location.decode(&joined, out).map_err(|e| corrupt(key, e));
    }
    // Still not in the cache (fetches failing, or a cache smaller than the reads in flight):
    // read around it.
    let fetched = get_range(store, key, range.start, range.end).await?;
    location.decode(&fetched, out).map_err(|e| corrupt(key, e))
}

/// Fetches object bytes `range` of segment `key` into `cache` (read-ahead): chunks already
/// cached or being fetched are skipped; nothing is decoded here, every read verifies what it
/// takes from the cache.
pub async fn prefetch_range(
    store: &dyn ObjectStore,
    cache: &ChunkCache,
    key: &Arc<str>,
    range: std::ops::Range<u64>,
) -> Result<(), EngineError> {
    let mut chunk = range.start / CHUNK_SIZE;
    let end_chunk = range.end.div_ceil(CHUNK_SIZE);
    while chunk < end_chunk {
        if cache.holds_whole_chunk(key, chunk) {
            chunk += 1;
            continue;
        }
        let claim = match cache.claim(key, chunk, end_chunk) {
            Fetch::Wait(_) => {
                chunk += 1;
                continue;
            }
            Fetch::Claimed(claim) => claim,
        };
        let claimed = claim.range();
        chunk = claimed.end / CHUNK_SIZE;
        let fetch_end = claimed.end.min(range.end);
        let fetched = get_range(store, key, claimed.start, fetch_end).await?;
        cache.insert(key, claimed.start, &fetched);
    }
    Ok(())
}

async fn get_range(
    store: &dyn ObjectStore,
    key: &str,
    start: u64,
    end: u64,
) -> Result<Bytes, EngineError> {
    store
        .get_range(key, start..end)
        .await
        .map_err(|error| match error {
            ObjectStoreError::RangeOutOfBounds { .. } => corrupt(
                key,
                blockgate_blockstore::DecodeError::Truncated {
                    needed: end,
                    actual: 0,
                },
            ),
            other => EngineError::store("read segment data", other),
        })
}
