//! A corrupted object in the bucket is reported as corruption, never served as data, and
//! only the corrupted range is affected.

// Helpers here are not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use blockgate_blockstore::documents::Mode;
use blockgate_blockstore::segment::{self, Run, RunKind};
use blockgate_engine::EngineError;
use blockgate_objstore::{MemoryStore, ObjectStore};

mod common;
use common::{config, create, open, pattern, wait_uploaded};

const SIZE: u64 = 1 << 20;
/// Spans two segment frames (64 KiB each).
const FIRST: (u64, usize) = (0, 100_000);
const SECOND: (u64, usize) = (512 * 1024, 8192);

/// The segment key and run that hold the byte at `offset`.
async fn run_holding(store: &MemoryStore, offset: u64) -> (String, Run) {
    for key in store.keys() {
        if !key.contains("/segments/") {
            continue;
        }
        let object = store.get(&key).await.unwrap();
        let header = segment::decode_header(&object).unwrap();
        let runs = segment::decode_index(&header, &object).unwrap();
        if let Some(run) = runs.into_iter().find(|run| {
            run.kind == RunKind::Data
                && run.volume_offset <= offset
                && offset < run.volume_offset + run.length
        }) {
            return (key, run);
        }
    }
    panic!("no segment holds byte {offset}");
}

async fn corrupted_frame_is_reported_and_other_ranges_read(mode: Mode) {
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let volume = create(&engine, "vol", SIZE, mode).await;
    let first = pattern(1, FIRST.1);
    let second = pattern(2, SECOND.1);
    volume.write(FIRST.0, &first, false).await.unwrap();
    volume.write(SECOND.0, &second, false).await.unwrap();
    wait_uploaded(&volume).await;
    engine.shutdown().await;
    drop(volume);
    drop(engine);

    // Flip a byte inside the first frame of the first write's data.
    let (key, run) = run_holding(&memory, FIRST.0).await;
    let skip = FIRST.0 - run.volume_offset;
    assert!(memory.flip_byte(&key, run.object_offset + skip + 100));

    // A fresh gateway, with a cold cache, restores the volume from the bucket.
    let fresh = tempfile::tempdir().unwrap();
    let engine = open(fresh.path(), &store, config()).await;
    let volume = engine.volume("vol").unwrap();
    for attempt in 0..2 {
        match volume.read(FIRST.0, 4096).await {
            Err(EngineError::Corrupt { key: reported, .. }) => assert_eq!(reported, key),
            other => panic!("read {attempt} of the corrupted frame gave {other:?}"),
        }
    }
    // A read that only touches the corrupted frame's neighbours is fine.
    assert_eq!(
        &volume.read(FIRST.0 + 70_000, 4096).await.unwrap()[..],
        &first[70_000..74_096]
    );
    assert_eq!(
        &volume
            .read(SECOND.0, u32::try_from(SECOND.1).unwrap())
            .await
            .unwrap()[..],
        &second[..]
    );
    assert_eq!(
        &volume.read(SIZE - 4096, 4096).await.unwrap()[..],
        &[0u8; 4096][..]
    );
    // A read spanning good and corrupted bytes fails as a whole: no partial data.
    assert!(matches!(
        volume.read(FIRST.0, 80_000).await,
        Err(EngineError::Corrupt { .. })
    ));
    assert!(volume.counters.read_errors.load(Ordering::Relaxed) >= 3);
    // Overwriting the corrupted range makes it readable again.
    let fixed = pattern(3, 4096);
    volume.write(FIRST.0, &fixed, false).await.unwrap();
    assert_eq!(&volume.read(FIRST.0, 4096).await.unwrap()[..], &fixed[..]);
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_segment_frame_is_an_error_in_a_cached_volume() {
    corrupted_frame_is_reported_and_other_ranges_read(Mode::Cached).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_segment_frame_is_an_error_in_a_stored_volume_being_hydrated() {
    corrupted_frame_is_reported_and_other_ranges_read(Mode::Stored).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_is_not_cached_as_data() {
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let volume = create(&engine, "vol", SIZE, Mode::Cached).await;
    let data = pattern(4, 4096);
    volume.write(0, &data, false).await.unwrap();
    wait_uploaded(&volume).await;
    engine.shutdown().await;
    drop(volume);
    drop(engine);

    let (key, run) = run_holding(&memory, 0).await;
    let fresh = tempfile::tempdir().unwrap();
    let engine = open(fresh.path(), &store, config()).await;
    let volume = engine.volume("vol").unwrap();
    // Corrupt, read (the bad bytes land in the cache), repair the object: the next read
    // refetches and verifies instead of trusting what the cache holds.
    assert!(memory.flip_byte(&key, run.object_offset + 5));
    assert!(matches!(
        volume.read(0, 4096).await,
        Err(EngineError::Corrupt { .. })
    ));
    assert!(memory.flip_byte(&key, run.object_offset + 5));
    assert_eq!(&volume.read(0, 4096).await.unwrap()[..], &data[..]);
    engine.shutdown().await;
}

/// A volume whose bucket state cannot be read (a corrupt segment index, a corrupt
/// descriptor) is not opened, and the error is logged; the gateway's other volumes open and
/// serve as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_volume_does_not_keep_the_others_from_opening() {
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let broken = create(&engine, "broken", SIZE, Mode::Cached).await;
    create(&engine, "bad-descriptor", SIZE, Mode::Cached).await;
    let healthy = create(&engine, "healthy", SIZE, Mode::Stored).await;
    let data = pattern(5, 10_000);
    broken.write(0, &data, false).await.unwrap();
    healthy.write(0, &data, false).await.unwrap();
    wait_uploaded(&broken).await;
    wait_uploaded(&healthy).await;
    engine.shutdown().await;
    drop((broken, healthy, engine));

    // The segment comes after the volume's newest checkpoint, so opening reads its index.
    let segment = memory
        .keys()
        .into_iter()
        .find(|key| key.starts_with("volumes/broken/segments/"))
        .unwrap();
    assert!(memory.flip_byte(&segment, u64::try_from(segment::HEADER_LEN).unwrap() + 3));
    assert!(memory.flip_byte("volumes/bad-descriptor/volume.json", 0));

    // Both the gateway that held the volumes and a fresh one.
    let fresh = tempfile::tempdir().unwrap();
    for directory in [dir.path(), fresh.path()] {
        let engine = open(directory, &store, config()).await;
        for id in ["broken", "bad-descriptor"] {
            assert!(matches!(
                engine.volume(id),
                Err(EngineError::VolumeNotFound { .. })
            ));
        }
        let healthy = engine.volume("healthy").unwrap();
        assert_eq!(&healthy.read(0, 10_000).await.unwrap()[..], &data[..]);
        engine.shutdown().await;
    }
}
