//! Helpers shared by the engine's integration tests: a small engine configuration, waits on a
//! condition with a deadline (never a sleep as synchronisation), and deterministic data.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]
// Helpers are not #[test] functions, so clippy's allow-unwrap-in-tests does not reach them; a
// panic is how they report a failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockgate_blockstore::documents::Mode;
use blockgate_engine::{Engine, EngineConfig, Volume, VolumeSource, VolumeSpec};
use blockgate_objstore::ObjectStore;

pub const BLOCK: u64 = 4096;

/// How long any wait in these tests may take before it counts as a failure. Generous: the
/// conditions normally hold within milliseconds, and a loaded CI machine must not flake.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A small engine: segments of 64 KiB, sealed after 50 ms, quick retries, no GC grace.
pub fn config() -> EngineConfig {
    EngineConfig {
        segment_target: 64 * 1024,
        log_capacity: 64 << 20,
        cache_capacity: 4 << 20,
        upload_concurrency: 2,
        seal_interval: Duration::from_millis(50),
        checkpoint_every: 3,
        readahead: 256 * 1024,
        max_retry_delay: Duration::from_millis(50),
        gc_grace: Duration::ZERO,
        block_size: 4096,
        attach_only: false,
    }
}

pub async fn open(dir: &Path, store: &Arc<dyn ObjectStore>, config: EngineConfig) -> Arc<Engine> {
    Engine::open(dir, store.clone(), config).await.unwrap()
}

pub fn spec(id: &str, size: u64, mode: Mode, source: VolumeSource) -> VolumeSpec {
    VolumeSpec {
        id: id.to_string(),
        size,
        mode,
        source,
    }
}

pub async fn create(engine: &Engine, id: &str, size: u64, mode: Mode) -> Arc<Volume> {
    engine
        .create_volume(spec(id, size, mode, VolumeSource::Empty))
        .await
        .unwrap()
}

/// Polls `condition` until it holds; panics with `what` when `DEADLINE` passes first.
pub async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until every write of `volume` is in the bucket and no snapshot of it is pending.
pub async fn wait_uploaded(volume: &Volume) {
    volume.seal_now().unwrap();
    wait_until(&format!("volume {} is drained", volume.id), || {
        volume.is_drained()
            && volume
                .status()
                .is_ok_and(|status| status.pending_snapshots.is_empty())
    })
    .await;
}

/// Waits until every volume of `engine` is uploaded.
pub async fn wait_all_uploaded(engine: &Engine) {
    for volume in engine.volumes() {
        wait_uploaded(&volume).await;
    }
}

/// Reads the whole volume.
pub async fn read_all(volume: &Arc<Volume>) -> Vec<u8> {
    let size = volume.size();
    let mut out = Vec::with_capacity(usize::try_from(size).unwrap());
    let mut at = 0;
    while at < size {
        let take = (size - at).min(256 * 1024);
        out.extend_from_slice(&volume.read(at, u32::try_from(take).unwrap()).await.unwrap());
        at += take;
    }
    out
}

/// Deterministic bytes that differ from position to position and from seed to seed, so a
/// shifted or mixed-up read never matches by accident.
pub fn pattern(seed: u64, length: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state.to_le_bytes()[0]
        })
        .collect()
}

/// Asserts two volume images are equal, naming the first differing byte rather than dumping
/// megabytes.
#[track_caller]
pub fn assert_same(got: &[u8], expected: &[u8], what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: length differs");
    if let Some(at) = got.iter().zip(expected).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at} (block {}): got {:#04x}, expected {:#04x}",
            at as u64 / BLOCK,
            got[at],
            expected[at]
        );
    }
}
