//! One writer per volume: a gateway that takes a volume over from the bucket fences the one
//! that held it, and the fenced gateway can neither open the volume again nor damage it.

// Helpers here are not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use blockgate_blockstore::documents::Mode;
use blockgate_engine::{EngineError, Volume};
use blockgate_objstore::{MemoryStore, ObjectStore};

mod common;
use common::{assert_same, config, create, open, pattern, read_all, wait_until, wait_uploaded};

const SIZE: u64 = 1 << 20;

/// A write by a writer that is about to be fenced: accepted into its log, or refused once an
/// upload found the newer epoch. Anything else is a failure.
async fn write_until_fenced(volume: &Volume, offset: u64, data: &[u8]) {
    match volume.write(offset, data, false).await {
        Ok(()) => {}
        Err(EngineError::Fenced { .. }) => assert!(volume.is_fenced()),
        Err(other) => panic!("write by a writer being fenced: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_volume_was_taken_over_does_not_open_it_again() {
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let first_dir = tempfile::tempdir().unwrap();
    let second_dir = tempfile::tempdir().unwrap();
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];

    let first = open(first_dir.path(), &store, config()).await;
    let volume = create(&first, "vol", SIZE, Mode::Stored).await;
    let untouched = create(&first, "other", SIZE, Mode::Cached).await;
    let data = pattern(1, 50_000);
    volume.write(0, &data, true).await.unwrap();
    untouched.write(0, &data, true).await.unwrap();
    expected[..50_000].copy_from_slice(&data);
    wait_uploaded(&volume).await;
    let first_epoch = volume.status().unwrap().epoch;
    first.shutdown().await;
    drop((volume, untouched, first));

    // The second gateway takes the volume over from the bucket and writes to it.
    let second = open(second_dir.path(), &store, config()).await;
    let volume = second.volume("vol").unwrap();
    assert!(volume.status().unwrap().epoch > first_epoch);
    assert_same(&read_all(&volume).await, &expected, "the taken-over volume");
    let newer = pattern(2, 20_000);
    volume.write(10_000, &newer, true).await.unwrap();
    expected[10_000..30_000].copy_from_slice(&newer);
    wait_uploaded(&volume).await;
    second.shutdown().await;
    drop((volume, second));

    // The first gateway's local state is from an older epoch: the volume stays closed there,
    // and opening touches nothing in the bucket.
    let keys_before = memory.keys();
    let first = open(first_dir.path(), &store, config()).await;
    assert!(matches!(
        first.volume("vol"),
        Err(EngineError::VolumeNotFound { .. })
    ));
    assert!(first.volumes().iter().all(|v| v.id != "vol"));
    assert_eq!(
        memory.keys(),
        keys_before,
        "a fenced gateway wrote to the bucket"
    );
    first.shutdown().await;
    drop(first);

    // The bucket holds the second gateway's writes.
    let third_dir = tempfile::tempdir().unwrap();
    let third = open(third_dir.path(), &store, config()).await;
    assert_same(
        &read_all(&third.volume("vol").unwrap()).await,
        &expected,
        "the volume rebuilt from the bucket",
    );
    third.shutdown().await;
}

/// The old gateway cannot know of the takeover until it looks: its next upload finds the
/// newer epoch, and from then on it uploads nothing and refuses every request. Anything it
/// uploaded before it looked carries its old epoch and is never part of the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_gateway_still_running_cannot_change_the_volume() {
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let first_dir = tempfile::tempdir().unwrap();
    let second_dir = tempfile::tempdir().unwrap();
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];

    let first = open(first_dir.path(), &store, config()).await;
    let old_writer = create(&first, "vol", SIZE, Mode::Cached).await;
    let data = pattern(1, 100_000);
    old_writer.write(0, &data, true).await.unwrap();
    expected[..100_000].copy_from_slice(&data);
    wait_uploaded(&old_writer).await;

    let second = open(second_dir.path(), &store, config()).await;
    let new_writer = second.volume("vol").unwrap();
    let old_segments: Vec<String> = memory
        .keys()
        .into_iter()
        .filter(|key| key.contains("/segments/"))
        .collect();
    // The fenced writer cannot know yet: its writes land in its log until a sealed log file's
    // upload finds the newer epoch; from then on they are refused.
    for n in 0..5 {
        write_until_fenced(&old_writer, n * 150_000, &pattern(100 + n, 70_000)).await;
    }
    old_writer.seal_now().unwrap();
    // Its upload finds the newer epoch.
    wait_until("the old writer is fenced", || old_writer.is_fenced()).await;
    assert!(matches!(
        old_writer.write(0, &[1; 4096], false).await,
        Err(EngineError::Fenced { .. })
    ));
    assert!(matches!(
        old_writer.read(0, 4096).await,
        Err(EngineError::Fenced { .. })
    ));
    let newer = pattern(2, 30_000);
    new_writer.write(500_000, &newer, true).await.unwrap();
    expected[500_000..530_000].copy_from_slice(&newer);
    wait_uploaded(&new_writer).await;
    assert_same(
        &read_all(&new_writer).await,
        &expected,
        "the new writer's view",
    );
    let segments: Vec<String> = memory
        .keys()
        .into_iter()
        .filter(|key| key.contains("/segments/"))
        .collect();
    assert!(
        segments
            .iter()
            .all(|key| old_segments.contains(key) || key.contains("/segments/0000000002-")),
        "the fenced writer uploaded after the takeover: {segments:?}"
    );
    first.shutdown().await;
    second.shutdown().await;
    drop((old_writer, new_writer, first, second));

    let third_dir = tempfile::tempdir().unwrap();
    let third = open(third_dir.path(), &store, config()).await;
    assert_same(
        &read_all(&third.volume("vol").unwrap()).await,
        &expected,
        "the volume rebuilt from the bucket",
    );
    third.shutdown().await;
    drop(third);
    // And the fenced gateway, restarted, does not open the volume.
    let first = open(first_dir.path(), &store, config()).await;
    assert!(first.volume("vol").is_err());
    first.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_data_directory_serves_one_gateway() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let first = open(dir.path(), &store, config()).await;
    assert!(matches!(
        blockgate_engine::Engine::open(dir.path(), store.clone(), config()).await,
        Err(EngineError::DirectoryLocked { .. })
    ));
    first.shutdown().await;
}

/// Garbage collection on a fenced gateway must not delete what the new writer reads: its own
/// map has moved on (it kept writing), but the new writer's map is the bucket's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collection_on_a_fenced_gateway_keeps_the_new_writers_data() {
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let first_dir = tempfile::tempdir().unwrap();
    let second_dir = tempfile::tempdir().unwrap();
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];

    let first = open(first_dir.path(), &store, config()).await;
    let old_writer = create(&first, "vol", SIZE, Mode::Cached).await;
    for n in 0..4u64 {
        let data = pattern(n, 60_000);
        old_writer.write(n * 200_000, &data, false).await.unwrap();
        let at = usize::try_from(n * 200_000).unwrap();
        expected[at..at + 60_000].copy_from_slice(&data);
        old_writer.seal_now().unwrap();
    }
    wait_uploaded(&old_writer).await;

    // Taken over; the new writer adds a little of its own.
    let second = open(second_dir.path(), &store, config()).await;
    let new_writer = second.volume("vol").unwrap();
    let newer = pattern(10, 5000);
    new_writer.write(900_000, &newer, true).await.unwrap();
    expected[900_000..905_000].copy_from_slice(&newer);
    wait_uploaded(&new_writer).await;

    // The fenced gateway overwrites what it wrote (into its log: it cannot know yet), finds
    // the newer epoch at its next upload, and collects garbage.
    for n in 0..4u64 {
        write_until_fenced(&old_writer, n * 200_000, &pattern(100 + n, 60_000)).await;
    }
    old_writer.seal_now().unwrap();
    wait_until("the old writer is fenced", || old_writer.is_fenced()).await;
    first.collect_garbage().await.unwrap();
    first.shutdown().await;
    drop((old_writer, first));

    assert_same(
        &read_all(&new_writer).await,
        &expected,
        "the new writer after the fenced gateway's GC",
    );
    second.shutdown().await;
    drop((new_writer, second));
    let third_dir = tempfile::tempdir().unwrap();
    let third = open(third_dir.path(), &store, config()).await;
    assert_same(
        &read_all(&third.volume("vol").unwrap()).await,
        &expected,
        "the volume rebuilt from the bucket",
    );
    third.shutdown().await;
}
