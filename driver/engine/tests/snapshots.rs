//! Snapshots, restores, clones, expansion, deletion and garbage collection, as a user of the
//! engine sees them.

// Helpers here are not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use blockgate_blockstore::documents::Mode;
use blockgate_engine::{Engine, EngineError, VolumeSource};
use blockgate_objstore::{FaultStore, MemoryStore, ObjectStore};

mod common;
use common::{
    DEADLINE, assert_same, config, create, open, pattern, read_all, spec, wait_until, wait_uploaded,
};

const SIZE: u64 = 1 << 20;

fn keys_under(store: &MemoryStore, prefix: &str) -> Vec<String> {
    store
        .keys()
        .into_iter()
        .filter(|key| key.starts_with(prefix))
        .collect()
}

async fn write(volume: &blockgate_engine::Volume, expected: &mut [u8], offset: u64, seed: u64) {
    let data = pattern(seed, 30_000);
    volume.write(offset, &data, false).await.unwrap();
    let at = usize::try_from(offset).unwrap();
    expected[at..at + data.len()].copy_from_slice(&data);
}

async fn restore(
    engine: &Engine,
    id: &str,
    snapshot: &str,
    mode: Mode,
) -> Arc<blockgate_engine::Volume> {
    engine
        .create_volume(spec(id, 0, mode, VolumeSource::Snapshot(snapshot.into())))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_cut_at_once_during_an_outage_and_ready_after_it() {
    let memory: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let (faulty, faults) = FaultStore::new(memory.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(faulty);
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let volume = create(&engine, "vol", SIZE, Mode::Cached).await;
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];
    write(&volume, &mut expected, 0, 1).await;

    faults.set_outage(true);
    let at_cut = {
        let mut at_cut = expected.clone();
        write(&volume, &mut at_cut, 200_000, 2).await;
        at_cut
    };
    let info = tokio::time::timeout(
        Duration::from_secs(2),
        engine.create_snapshot("vol", "snap"),
    )
    .await
    .expect("cutting a snapshot does not wait for the bucket")
    .unwrap();
    assert!(!info.ready);
    assert_eq!(info.size, SIZE);
    // Writes after the cut are not in the snapshot.
    write(&volume, &mut expected, 200_000, 3).await;
    assert!(!engine.snapshot("snap").await.unwrap().ready);
    let still = engine
        .wait_snapshot_ready("snap", Duration::from_millis(300))
        .await
        .unwrap();
    assert!(
        !still.ready,
        "a snapshot cannot be ready while its data is not in the bucket"
    );
    // Cutting it again is idempotent, even during the outage.
    assert!(!engine.create_snapshot("vol", "snap").await.unwrap().ready);

    faults.set_outage(false);
    let ready = engine.wait_snapshot_ready("snap", DEADLINE).await.unwrap();
    assert!(ready.ready);
    assert_eq!(ready.volume, "vol");
    let restored = restore(&engine, "restored", "snap", Mode::Cached).await;
    assert_same(
        &read_all(&restored).await,
        &at_cut[..],
        "the restored snapshot",
    );
    assert_same(&read_all(&volume).await, &expected, "the source");
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_volume_reads_the_snapshot_while_the_source_changes() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let source = create(&engine, "src", SIZE, Mode::Stored).await;
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];
    for n in 0..10 {
        write(&source, &mut expected, n * 90_000, n).await;
    }
    // Part of the data is uploaded before the cut, part is still in the log.
    wait_uploaded(&source).await;
    write(&source, &mut expected, 45_000, 100).await;
    source.write_zeroes(600_000, 20_000, false).await.unwrap();
    expected[600_000..620_000].fill(0);
    let at_cut = expected.clone();
    engine.create_snapshot("src", "snap").await.unwrap();

    for n in 0..10 {
        write(&source, &mut expected, n * 70_000 + 1, 200 + n).await;
    }
    engine.wait_snapshot_ready("snap", DEADLINE).await.unwrap();
    for mode in [Mode::Cached, Mode::Stored] {
        let id = format!("restored-{mode}");
        let restored = restore(&engine, &id, "snap", mode).await;
        // Reads work at once, before a stored copy is hydrated, and keep working after.
        let mut reads = 0;
        loop {
            write(&source, &mut expected, 300_000 + reads, 300 + reads).await;
            assert_same(
                &read_all(&restored).await,
                &at_cut,
                &format!("{id} after {reads} source writes"),
            );
            reads += 1;
            if restored.status().unwrap().hydrated {
                break;
            }
        }
        // The restored volume is a volume of its own.
        let own = pattern(400, 5000);
        restored.write(45_000, &own, false).await.unwrap();
        let mut restored_expected = at_cut.clone();
        restored_expected[45_000..50_000].copy_from_slice(&own);
        assert_same(&read_all(&restored).await, &restored_expected, &id);
    }
    assert_same(&read_all(&source).await, &expected, "the source");

    // After a restart all of it still holds.
    wait_uploaded(&source).await;
    engine.shutdown().await;
    drop(source);
    drop(engine);
    let engine = open(dir.path(), &store, config()).await;
    assert_same(
        &read_all(&engine.volume("src").unwrap()).await,
        &expected,
        "the source after a restart",
    );
    let restored = engine.volume("restored-cached").unwrap();
    assert_same(
        &read_all(&restored).await[..45_000],
        &at_cut[..45_000],
        "restored after a restart",
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_starts_as_a_copy_of_its_source_and_then_goes_its_own_way() {
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let source = create(&engine, "src", SIZE, Mode::Cached).await;
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];
    for n in 0..6 {
        write(&source, &mut expected, n * 150_000, n).await;
    }
    // Unflushed, still in the log: a clone includes it all the same.
    write(&source, &mut expected, 1000, 50).await;

    let clone = engine
        .create_volume(spec(
            "clone",
            2 * SIZE,
            Mode::Stored,
            VolumeSource::Volume("src".into()),
        ))
        .await
        .unwrap();
    assert_eq!(clone.size(), 2 * SIZE);
    let mut clone_expected = expected.clone();
    clone_expected.resize(usize::try_from(2 * SIZE).unwrap(), 0);
    assert_same(&read_all(&clone).await, &clone_expected, "the clone");
    // Creating it again is idempotent.
    engine
        .create_volume(spec(
            "clone",
            2 * SIZE,
            Mode::Stored,
            VolumeSource::Volume("src".into()),
        ))
        .await
        .unwrap();

    write(&source, &mut expected, 0, 60).await;
    let mine = pattern(61, 10_000);
    clone.write(SIZE + 5, &mine, false).await.unwrap();
    clone_expected[usize::try_from(SIZE).unwrap() + 5..usize::try_from(SIZE).unwrap() + 10_005]
        .copy_from_slice(&mine);
    assert_same(&read_all(&source).await, &expected, "the source");
    assert_same(&read_all(&clone).await, &clone_expected, "the clone");

    // The clone's internal snapshot is not a user's snapshot to delete while the clone
    // lives, and goes away with the clone.
    assert!(matches!(
        engine.delete_snapshot("clone-clone").await,
        Err(EngineError::SnapshotInUse { .. })
    ));
    wait_uploaded(&clone).await;
    drop(clone);
    engine.delete_volume("clone").await.unwrap();
    assert!(matches!(
        engine.snapshot("clone-clone").await,
        Err(EngineError::SnapshotNotFound { .. })
    ));
    assert!(
        keys_under(&memory, "volumes/clone/").is_empty(),
        "{:?}",
        keys_under(&memory, "volumes/clone/")
    );
    assert_same(
        &read_all(&source).await,
        &expected,
        "the source after the clone is gone",
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expansion_adds_zeros_and_persists() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    for mode in [Mode::Cached, Mode::Stored] {
        let id = format!("vol-{mode}");
        let volume = create(&engine, &id, SIZE, mode).await;
        let old = pattern(1, 4096);
        volume.write(SIZE - 4096, &old, false).await.unwrap();
        assert!(matches!(
            volume.read(SIZE, 4096).await,
            Err(EngineError::OutOfRange { .. })
        ));
        assert!(matches!(
            engine.expand_volume(&id, SIZE / 2).await,
            Err(EngineError::Shrink { .. })
        ));
        assert!(matches!(
            engine.expand_volume(&id, 3 * SIZE + 1).await,
            Err(EngineError::InvalidArgument(_))
        ));
        engine.expand_volume(&id, 3 * SIZE).await.unwrap();
        assert_eq!(volume.size(), 3 * SIZE);
        assert_eq!(&volume.read(SIZE - 4096, 4096).await.unwrap()[..], &old[..]);
        assert!(
            volume
                .read(SIZE, u32::try_from(2 * SIZE).unwrap())
                .await
                .unwrap()
                .iter()
                .all(|b| *b == 0)
        );
        let new = pattern(2, 4096);
        volume.write(3 * SIZE - 4096, &new, false).await.unwrap();
        volume.flush().await.unwrap();
    }
    // Across a restart, with the resize still in the log.
    engine.shutdown().await;
    drop(engine);
    let engine = open(dir.path(), &store, config()).await;
    for volume in engine.volumes() {
        assert_eq!(volume.size(), 3 * SIZE, "{}", volume.id);
        assert_eq!(
            &volume.read(SIZE - 4096, 4096).await.unwrap()[..],
            &pattern(1, 4096)[..]
        );
        assert_eq!(
            &volume.read(3 * SIZE - 4096, 4096).await.unwrap()[..],
            &pattern(2, 4096)[..]
        );
        assert!(
            volume
                .read(SIZE, 4096)
                .await
                .unwrap()
                .iter()
                .all(|b| *b == 0)
        );
        wait_uploaded(&volume).await;
    }
    // And from the bucket alone.
    engine.shutdown().await;
    drop(engine);
    let fresh = tempfile::tempdir().unwrap();
    let engine = open(fresh.path(), &store, config()).await;
    assert_eq!(engine.volumes().len(), 2);
    for volume in engine.volumes() {
        assert_eq!(volume.size(), 3 * SIZE, "{} from the bucket", volume.id);
        assert_eq!(
            &volume.read(3 * SIZE - 4096, 4096).await.unwrap()[..],
            &pattern(2, 4096)[..]
        );
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_in_use_by_a_volume_cannot_be_deleted() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let volume = create(&engine, "vol", SIZE, Mode::Cached).await;
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];
    write(&volume, &mut expected, 0, 1).await;
    engine.create_snapshot("vol", "snap").await.unwrap();
    engine.wait_snapshot_ready("snap", DEADLINE).await.unwrap();
    let restored = restore(&engine, "restored", "snap", Mode::Cached).await;

    match engine.delete_snapshot("snap").await {
        Err(EngineError::SnapshotInUse { snapshot, volume }) => {
            assert_eq!((snapshot.as_str(), volume.as_str()), ("snap", "restored"));
        }
        other => panic!("deleting a snapshot in use gave {other:?}"),
    }
    assert!(engine.snapshot("snap").await.unwrap().ready);
    assert_same(&read_all(&restored).await, &expected, "the restored volume");

    drop(restored);
    engine.delete_volume("restored").await.unwrap();
    engine.delete_snapshot("snap").await.unwrap();
    assert!(matches!(
        engine.snapshot("snap").await,
        Err(EngineError::SnapshotNotFound { .. })
    ));
    assert!(matches!(
        engine.delete_snapshot("snap").await,
        Err(EngineError::SnapshotNotFound { .. })
    ));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collection_keeps_what_snapshots_need() {
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let volume = create(&engine, "vol", SIZE, Mode::Cached).await;
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];
    for n in 0..8 {
        write(&volume, &mut expected, n * 100_000, n).await;
    }
    wait_uploaded(&volume).await;
    engine.create_snapshot("vol", "snap").await.unwrap();
    engine.wait_snapshot_ready("snap", DEADLINE).await.unwrap();
    let at_snapshot = expected.clone();
    // Overwrite everything several times: the old segments are needed by the snapshot only.
    for round in 0..3 {
        for n in 0..8 {
            write(&volume, &mut expected, n * 100_000, 100 * (round + 1) + n).await;
        }
        wait_uploaded(&volume).await;
    }
    let before = keys_under(&memory, "volumes/vol/segments/").len();
    let report = engine.collect_garbage().await.unwrap();
    assert!(report.deleted_segments > 0, "{report:?}");
    let after = keys_under(&memory, "volumes/vol/segments/").len();
    assert_eq!(
        before - after,
        usize::try_from(report.deleted_segments).unwrap()
    );
    assert_same(&read_all(&volume).await, &expected, "the volume after GC");
    let restored = restore(&engine, "restored", "snap", Mode::Cached).await;
    assert_same(
        &read_all(&restored).await,
        &at_snapshot,
        "the snapshot after GC",
    );
    drop(restored);
    engine.delete_volume("restored").await.unwrap();

    // Delete the volume: only what the snapshot needs stays.
    drop(volume);
    engine.delete_volume("vol").await.unwrap();
    assert!(matches!(
        engine.volume("vol"),
        Err(EngineError::VolumeNotFound { .. })
    ));
    engine.collect_garbage().await.unwrap();
    let kept = keys_under(&memory, "volumes/vol/segments/").len();
    assert!(kept > 0 && kept < after, "kept {kept} of {after} segments");
    let restored = restore(&engine, "restored-again", "snap", Mode::Stored).await;
    assert_same(
        &read_all(&restored).await,
        &at_snapshot,
        "the snapshot of a deleted volume",
    );
    wait_until("the restored copy is hydrated", || {
        restored.status().unwrap().hydrated
    })
    .await;
    assert_same(
        &read_all(&restored).await,
        &at_snapshot,
        "the hydrated restore",
    );

    // Once nothing needs them, the deleted volume's objects go entirely.
    drop(restored);
    engine.delete_volume("restored-again").await.unwrap();
    engine.delete_snapshot("snap").await.unwrap();
    let report = engine.collect_garbage().await.unwrap();
    assert_eq!(report.purged_volumes, vec!["vol".to_string()], "{report:?}");
    assert!(
        keys_under(&memory, "volumes/vol/").is_empty(),
        "{:?}",
        keys_under(&memory, "volumes/vol/")
    );
    // The id is free again.
    let volume = create(&engine, "vol", SIZE, Mode::Cached).await;
    assert!(read_all(&volume).await.iter().all(|b| *b == 0));
    engine.shutdown().await;
}

/// Snapshot of a restored volume: its data lives partly in the original volume's segments.
/// Deleting everything but that last snapshot must keep all of it readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_collection_follows_snapshots_across_volumes() {
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let original = create(&engine, "original", SIZE, Mode::Cached).await;
    let mut image = vec![0u8; usize::try_from(SIZE).unwrap()];
    for n in 0..6 {
        write(&original, &mut image, n * 150_000, n).await;
    }
    engine.create_snapshot("original", "first").await.unwrap();
    engine.wait_snapshot_ready("first", DEADLINE).await.unwrap();
    let restored = restore(&engine, "restored", "first", Mode::Stored).await;
    write(&restored, &mut image, 20_000, 50).await;
    engine.create_snapshot("restored", "second").await.unwrap();
    engine
        .wait_snapshot_ready("second", DEADLINE)
        .await
        .unwrap();
    let at_second = image.clone();
    // Both volumes move on.
    write(&restored, &mut image, 300_000, 51).await;
    for n in 0..6 {
        original
            .write(n * 150_000, &pattern(60 + n, 30_000), false)
            .await
            .unwrap();
    }
    wait_uploaded(&original).await;
    wait_uploaded(&restored).await;

    // "first" is in use by "restored"; delete "restored", then "first", then "original".
    assert!(matches!(
        engine.delete_snapshot("first").await,
        Err(EngineError::SnapshotInUse { .. })
    ));
    drop((original, restored));
    engine.delete_volume("restored").await.unwrap();
    engine.delete_snapshot("first").await.unwrap();
    engine.delete_volume("original").await.unwrap();
    let report = engine.collect_garbage().await.unwrap();
    assert!(report.purged_volumes.is_empty(), "{report:?}");
    assert!(!keys_under(&memory, "volumes/original/segments/").is_empty());

    let from_second = restore(&engine, "from-second", "second", Mode::Cached).await;
    assert_same(
        &read_all(&from_second).await,
        &at_second,
        "restored from \"second\" after GC",
    );
    drop(from_second);
    engine.delete_volume("from-second").await.unwrap();

    // And from the bucket alone, on a fresh gateway.
    engine.shutdown().await;
    drop(engine);
    let fresh = tempfile::tempdir().unwrap();
    let engine = open(fresh.path(), &store, config()).await;
    assert!(engine.volumes().is_empty());
    let from_second = restore(&engine, "from-second", "second", Mode::Cached).await;
    assert_same(
        &read_all(&from_second).await,
        &at_second,
        "restored on a fresh gateway",
    );
    drop(from_second);
    engine.delete_volume("from-second").await.unwrap();

    // Without the last snapshot, nothing of either volume is needed any more.
    engine.delete_snapshot("second").await.unwrap();
    let report = engine.collect_garbage().await.unwrap();
    let mut purged = report.purged_volumes.clone();
    purged.sort();
    assert!(
        purged.contains(&"original".to_string()) && purged.contains(&"restored".to_string()),
        "{report:?}"
    );
    let left: Vec<String> = keys_under(&memory, "volumes/")
        .into_iter()
        .filter(|key| key.starts_with("volumes/original/") || key.starts_with("volumes/restored/"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    engine.shutdown().await;
}

/// A clone outlives its source: deleting the source keeps what the clone reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clone_keeps_reading_after_its_source_is_deleted_and_collected() {
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let source = create(&engine, "source", SIZE, Mode::Stored).await;
    let mut image = vec![0u8; usize::try_from(SIZE).unwrap()];
    for n in 0..5 {
        write(&source, &mut image, n * 200_000, n).await;
    }
    let clone = engine
        .create_volume(spec(
            "clone",
            0,
            Mode::Cached,
            VolumeSource::Volume("source".into()),
        ))
        .await
        .unwrap();
    drop(source);
    engine.delete_volume("source").await.unwrap();
    engine.collect_garbage().await.unwrap();
    assert_same(
        &read_all(&clone).await,
        &image,
        "the clone after its source is gone",
    );

    drop(clone);
    engine.delete_volume("clone").await.unwrap();
    let report = engine.collect_garbage().await.unwrap();
    assert!(
        report.purged_volumes.contains(&"source".to_string()),
        "{report:?}"
    );
    assert!(
        memory
            .keys()
            .iter()
            .all(|key| key.starts_with("snapshots/") || !key.contains("source"))
    );
    engine.shutdown().await;
}
