//! The read cache of `cached` volumes: byte ranges of segment objects, kept in one local
//! file of fixed-size chunks with CLOCK eviction.
//!
//! Objects are immutable, so a cached chunk never goes stale; it can only be evicted. The
//! cache stores object bytes as fetched (frames with their checksums), so every read through
//! it is verified again, and local corruption is caught like remote corruption.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

pub const CHUNK_SIZE: u64 = 256 * 1024;

/// A chunk of a segment object: its key and its index (offset / `CHUNK_SIZE`).
type ChunkId = (Arc<str>, u64);

#[derive(Debug)]
struct Slot {
    key: Option<(Arc<str>, u64)>,
    valid: u64,
    referenced: bool,
    /// Bumped whenever the slot is given to another chunk or dropped, so a reader that
    /// copied bytes out without the lock can tell they still belonged to its chunk.
    generation: u64,
    /// Being written by an insert: not handed to another.
    busy: bool,
}

#[derive(Debug, Default)]
struct Index {
    by_chunk: HashMap<(Arc<str>, u64), usize>,
    slots: Vec<Slot>,
    hand: usize,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct CacheStats {
    pub hits: u64,
    pub misses: u64,
    pub evictions: u64,
    pub used_bytes: u64,
    pub capacity_bytes: u64,
}

#[derive(Debug)]
pub struct ChunkCache {
    file: File,
    capacity_slots: usize,
    index: Mutex<Index>,
    stats: Mutex<CacheStats>,
    /// Chunks being fetched, each with a receiver that wakes when that fetch ends: a reader
    /// that misses a chunk being fetched waits for it instead of sending its own request.
    in_flight: Mutex<HashMap<ChunkId, watch::Receiver<()>>>,
}

/// What a reader that missed should do about a chunk.
pub enum Fetch<'a> {
    /// Fetch chunks `[start, end)` (bytes, chunk-aligned) and insert them; the claim ends,
    /// waking the readers waiting for them, when it is dropped.
    Claimed(FetchClaim<'a>),
    /// Another fetch is bringing the chunk: wait with [`wait_fetch`], then look again.
    Wait(watch::Receiver<()>),
}

/// Chunks claimed for one fetch.
pub struct FetchClaim<'a> {
    cache: &'a ChunkCache,
    key: Arc<str>,
    first: u64,
    end: u64,
    _done: watch::Sender<()>,
}

impl FetchClaim<'_> {
    /// The claimed object bytes, chunk-aligned.
    pub fn range(&self) -> std::ops::Range<u64> {
        self.first * CHUNK_SIZE..self.end * CHUNK_SIZE
    }
}

impl Drop for FetchClaim<'_> {
    fn drop(&mut self) {
        if let Ok(mut in_flight) = self.cache.in_flight.lock() {
            for chunk in self.first..self.end {
                in_flight.remove(&(self.key.clone(), chunk));
            }
        }
        // Dropping the sender (after this) wakes every waiter.
    }
}

/// Waits until the fetch behind `receiver` has ended (successfully or not).
pub async fn wait_fetch(mut receiver: watch::Receiver<()>) {
    // The sender never sends: it is dropped when the fetch ends, which ends this wait.
    while receiver.changed().await.is_ok() {}
}

impl ChunkCache {
    /// Opens (emptying) the cache file at `path` holding up to `capacity` bytes.
    pub fn create(path: &Path, capacity: u64) -> std::io::Result<ChunkCache> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let capacity_slots = usize::try_from(capacity / CHUNK_SIZE)
            .unwrap_or(usize::MAX)
            .max(1);
        Ok(ChunkCache {
            file,
            capacity_slots,
            index: Mutex::new(Index::default()),
            in_flight: Mutex::new(HashMap::new()),
            stats: Mutex::new(CacheStats {
                capacity_bytes: capacity_slots as u64 * CHUNK_SIZE,
                ..CacheStats::default()
            }),
        })
    }

    pub fn stats(&self) -> CacheStats {
        self.stats.lock().map(|s| *s).unwrap_or_default()
    }

    fn count(&self, update: impl FnOnce(&mut CacheStats)) {
        if let Ok(mut stats) = self.stats.lock() {
            update(&mut stats);
        }
    }

    /// Copies object bytes `[start, start + out.len())` of `key` into `out` if every chunk
    /// they touch is cached with enough valid bytes.
    pub fn read(&self, key: &Arc<str>, start: u64, out: &mut [u8]) -> bool {
        let end = start + out.len() as u64;
        let mut plan = Vec::new();
        {
            let Ok(mut index) = self.index.lock() else {
                return false;
            };
            let mut at = start;
            while at < end {
                let chunk = at / CHUNK_SIZE;
                let chunk_start = chunk * CHUNK_SIZE;
                let take_end = end.min(chunk_start + CHUNK_SIZE);
                let Some(&slot) = index.by_chunk.get(&(key.clone(), chunk)) else {
                    drop(index);
                    self.count(|s| s.misses += 1);
                    return false;
                };
                if chunk_start + index.slots[slot].valid < take_end {
                    drop(index);
                    self.count(|s| s.misses += 1);
                    return false;
                }
                index.slots[slot].referenced = true;
                let generation = index.slots[slot].generation;
                plan.push((
                    slot,
                    generation,
                    at - chunk_start,
                    at - start,
                    take_end - at,
                ));
                at = take_end;
            }
        }
        for &(slot, _, within, out_at, length) in &plan {
            let out_at = usize::try_from(out_at).unwrap_or(0);
            let length = usize::try_from(length).unwrap_or(0);
            let position = slot as u64 * CHUNK_SIZE + within;
            if self
                .file
                .read_exact_at(&mut out[out_at..out_at + length], position)
                .is_err()
            {
                return false;
            }
        }
        // A slot evicted and refilled while we read holds another chunk's bytes, which may
        // even pass the frame checksum: count it a miss.
        let Ok(index) = self.index.lock() else {
            return false;
        };
        if plan
            .iter()
            .any(|&(slot, generation, ..)| index.slots[slot].generation != generation)
        {
            drop(index);
            self.count(|s| s.misses += 1);
            return false;
        }
        drop(index);
        self.count(|s| s.hits += 1);
        true
    }

    /// Claims chunks `first..` (at most up to `end`, exclusive) of `key` for a fetch: from
    /// `first`, every chunk neither cached in full nor being fetched already. When `first`
    /// itself is being fetched, says to wait for that fetch instead.
    pub fn claim(&self, key: &Arc<str>, first: u64, end: u64) -> Fetch<'_> {
        let Ok(mut in_flight) = self.in_flight.lock() else {
            // A poisoned registry: fetch without coordination.
            let (done, _) = watch::channel(());
            return Fetch::Claimed(FetchClaim {
                cache: self,
                key: key.clone(),
                first,
                end: first + 1,
                _done: done,
            });
        };
        if let Some(waiting) = in_flight.get(&(key.clone(), first)) {
            return Fetch::Wait(waiting.clone());
        }
        let (done, receiver) = watch::channel(());
        in_flight.insert((key.clone(), first), receiver.clone());
        let mut claimed_end = first + 1;
        while claimed_end < end
            && !in_flight.contains_key(&(key.clone(), claimed_end))
            && !self.holds_whole_chunk(key, claimed_end)
        {
            in_flight.insert((key.clone(), claimed_end), receiver.clone());
            claimed_end += 1;
        }
        Fetch::Claimed(FetchClaim {
            cache: self,
            key: key.clone(),
            first,
            end: claimed_end,
            _done: done,
        })
    }

    /// Tells whether chunk `chunk` of `key` is cached with all its bytes.
    pub fn holds_whole_chunk(&self, key: &Arc<str>, chunk: u64) -> bool {
        self.index.lock().is_ok_and(|index| {
            index
                .by_chunk
                .get(&(key.clone(), chunk))
                .is_some_and(|&slot| index.slots[slot].valid == CHUNK_SIZE)
        })
    }

    /// Stores fetched object bytes starting at a chunk boundary `start`.
    pub fn insert(&self, key: &Arc<str>, start: u64, bytes: &[u8]) {
        debug_assert_eq!(start % CHUNK_SIZE, 0);
        for (n, piece) in bytes
            .chunks(usize::try_from(CHUNK_SIZE).unwrap_or(usize::MAX))
            .enumerate()
        {
            let chunk = start / CHUNK_SIZE + n as u64;
            let slot = {
                let Ok(mut index) = self.index.lock() else {
                    return;
                };
                let existing = index.by_chunk.get(&(key.clone(), chunk)).copied();
                let slot = match existing {
                    Some(slot) if index.slots[slot].valid >= piece.len() as u64 => continue,
                    Some(slot) if index.slots[slot].busy => continue,
                    Some(slot) => slot,
                    None => match self.take_slot(&mut index) {
                        Some(slot) => slot,
                        // Every slot is being written by someone: skip caching this piece.
                        None => continue,
                    },
                };
                // Unindexed and busy while being written, so no reader sees half a chunk and
                // no other insert writes the same slot.
                index.by_chunk.remove(&(key.clone(), chunk));
                let entry = &mut index.slots[slot];
                entry.key = None;
                entry.valid = 0;
                entry.busy = true;
                entry.generation += 1;
                slot
            };
            let written = self
                .file
                .write_all_at(piece, slot as u64 * CHUNK_SIZE)
                .is_ok();
            if let Ok(mut index) = self.index.lock() {
                let entry = &mut index.slots[slot];
                entry.busy = false;
                if written {
                    entry.key = Some((key.clone(), chunk));
                    entry.valid = piece.len() as u64;
                    entry.referenced = false;
                    index.by_chunk.insert((key.clone(), chunk), slot);
                }
            }
        }
        let used = self
            .index
            .lock()
            .map(|i| i.by_chunk.len() as u64 * CHUNK_SIZE)
            .unwrap_or(0);
        self.count(|s| s.used_bytes = used);
    }

    /// Drops the chunks of `[start, end)` of `key` (after they failed verification).
    pub fn invalidate(&self, key: &Arc<str>, start: u64, end: u64) {
        if let Ok(mut index) = self.index.lock() {
            for chunk in start / CHUNK_SIZE..end.div_ceil(CHUNK_SIZE) {
                if let Some(slot) = index.by_chunk.remove(&(key.clone(), chunk)) {
                    let entry = &mut index.slots[slot];
                    entry.key = None;
                    entry.valid = 0;
                    entry.generation += 1;
                }
            }
        }
    }

    /// A free slot, or the next one the CLOCK hand evicts; `None` when every slot is busy.
    fn take_slot(&self, index: &mut Index) -> Option<usize> {
        if index.slots.len() < self.capacity_slots {
            index.slots.push(Slot {
                key: None,
                valid: 0,
                referenced: false,
                generation: 0,
                busy: false,
            });
            return Some(index.slots.len() - 1);
        }
        // Two passes: the first may only clear reference bits.
        for _ in 0..2 * index.slots.len() {
            let hand = index.hand;
            index.hand = (hand + 1) % index.slots.len();
            let slot = &mut index.slots[hand];
            if slot.busy {
                continue;
            }
            if slot.referenced {
                slot.referenced = false;
                continue;
            }
            if let Some(old) = slot.key.take() {
                slot.generation += 1;
                index.by_chunk.remove(&old);
                self.count(|s| s.evictions += 1);
            }
            return Some(hand);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_misses_and_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ChunkCache::create(&dir.path().join("c"), 2 * CHUNK_SIZE).unwrap();
        let key: Arc<str> = Arc::from("k");
        let chunk = usize::try_from(CHUNK_SIZE).unwrap();
        let data: Vec<u8> = (0..chunk * 2 + 10)
            .map(|i| u8::try_from(i % 253).unwrap())
            .collect();
        let mut out = vec![0u8; 100];
        assert!(!cache.read(&key, 5, &mut out));
        cache.insert(&key, 0, &data[..2 * chunk]);
        assert!(cache.read(&key, CHUNK_SIZE - 50, &mut out));
        assert_eq!(out, &data[chunk - 50..chunk + 50]);
        // A third chunk evicts one of the first two.
        cache.insert(&key, 2 * CHUNK_SIZE, &data[2 * chunk..]);
        assert_eq!(cache.stats().evictions, 1);
        let mut tail = vec![0u8; 10];
        assert!(cache.read(&key, 2 * CHUNK_SIZE, &mut tail));
        // Past the valid bytes of a partial chunk is a miss.
        let mut past = vec![0u8; 20];
        assert!(!cache.read(&key, 2 * CHUNK_SIZE, &mut past));
        cache.invalidate(&key, 2 * CHUNK_SIZE, 2 * CHUNK_SIZE + 1);
        assert!(!cache.read(&key, 2 * CHUNK_SIZE, &mut tail));
    }
}
