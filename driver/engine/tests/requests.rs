//! Bad requests get a clear error and change nothing (DESIGN.md §9.5); repeated requests are
//! idempotent.

// Helpers here are not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use blockgate_blockstore::documents::Mode;
use blockgate_engine::{EngineError, VolumeSource};
use blockgate_objstore::{MemoryStore, ObjectStore};

mod common;
use common::{DEADLINE, config, create, open, pattern, read_all, spec, wait_uploaded};

const SIZE: u64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused_and_change_nothing() {
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let volume = create(&engine, "vol", SIZE, Mode::Cached).await;
    let data = pattern(1, 8192);
    volume.write(SIZE - 8192, &data, false).await.unwrap();
    engine.create_snapshot("vol", "snap").await.unwrap();
    engine.wait_snapshot_ready("snap", DEADLINE).await.unwrap();
    wait_uploaded(&volume).await;
    let image = read_all(&volume).await;
    let keys = memory.keys();

    // Out of range, including offsets whose end overflows.
    for (offset, length) in [(SIZE, 1u32), (SIZE - 4096, 4097), (u64::MAX - 10, 100)] {
        assert!(matches!(
            volume.read(offset, length).await,
            Err(EngineError::OutOfRange { .. })
        ));
        assert!(matches!(
            volume
                .write(offset, &vec![0xee; length as usize], true)
                .await,
            Err(EngineError::OutOfRange { .. })
        ));
        assert!(matches!(
            volume.write_zeroes(offset, length, true).await,
            Err(EngineError::OutOfRange { .. })
        ));
    }
    // Volumes.
    for id in ["", "Upper", "a/b", "-dash", "../up"] {
        assert!(matches!(
            engine
                .create_volume(spec(id, SIZE, Mode::Cached, VolumeSource::Empty))
                .await,
            Err(EngineError::InvalidArgument(_))
        ));
    }
    for size in [0, 4097] {
        assert!(matches!(
            engine
                .create_volume(spec("new", size, Mode::Cached, VolumeSource::Empty))
                .await,
            Err(EngineError::InvalidArgument(_))
        ));
    }
    for other in [
        spec("vol", SIZE, Mode::Stored, VolumeSource::Empty),
        spec("vol", 2 * SIZE, Mode::Cached, VolumeSource::Empty),
        spec(
            "vol",
            SIZE,
            Mode::Cached,
            VolumeSource::Snapshot("snap".into()),
        ),
    ] {
        assert!(matches!(
            engine.create_volume(other).await,
            Err(EngineError::VolumeExists { .. })
        ));
    }
    assert!(matches!(
        engine
            .create_volume(spec(
                "new",
                0,
                Mode::Cached,
                VolumeSource::Snapshot("missing".into())
            ))
            .await,
        Err(EngineError::SnapshotNotFound { .. })
    ));
    assert!(matches!(
        engine
            .create_volume(spec(
                "new",
                SIZE / 2,
                Mode::Cached,
                VolumeSource::Snapshot("snap".into())
            ))
            .await,
        Err(EngineError::InvalidArgument(_))
    ));
    assert!(matches!(
        engine
            .create_volume(spec(
                "new",
                0,
                Mode::Cached,
                VolumeSource::Volume("missing".into())
            ))
            .await,
        Err(EngineError::VolumeNotFound { .. })
    ));
    assert!(matches!(
        engine.expand_volume("vol", SIZE - 4096).await,
        Err(EngineError::Shrink { .. })
    ));
    assert!(matches!(
        engine.expand_volume("missing", SIZE).await,
        Err(EngineError::VolumeNotFound { .. })
    ));
    assert!(matches!(
        engine.delete_volume("missing").await,
        Err(EngineError::VolumeNotFound { .. })
    ));
    // Snapshots.
    assert!(matches!(
        engine.create_snapshot("missing", "s2").await,
        Err(EngineError::VolumeNotFound { .. })
    ));
    assert!(matches!(
        engine.create_snapshot("vol", "Bad Id").await,
        Err(EngineError::InvalidArgument(_))
    ));
    assert!(matches!(
        engine.delete_snapshot("missing").await,
        Err(EngineError::SnapshotNotFound { .. })
    ));
    let other = create(&engine, "other", SIZE, Mode::Cached).await;
    assert!(matches!(
        engine.create_snapshot("other", "snap").await,
        Err(EngineError::SnapshotExists { .. })
    ));
    drop(other);
    engine.delete_volume("other").await.unwrap();
    wait_uploaded(&volume).await;

    assert_eq!(memory.keys(), keys, "a refused request changed the bucket");
    assert_eq!(
        read_all(&volume).await,
        image,
        "a refused request changed the volume"
    );
    assert_eq!(volume.size(), SIZE);

    // Repeating a request that succeeded is not an error.
    let again = engine
        .create_volume(spec("vol", SIZE, Mode::Cached, VolumeSource::Empty))
        .await
        .unwrap();
    assert!(Arc::ptr_eq(&again, &volume));
    assert!(engine.create_snapshot("vol", "snap").await.unwrap().ready);
    engine.expand_volume("vol", SIZE).await.unwrap();

    // A handle to a deleted volume fails cleanly.
    drop(again);
    engine.delete_volume("vol").await.unwrap();
    assert!(matches!(
        volume.read(0, 1).await,
        Err(EngineError::Closed { .. })
    ));
    assert!(matches!(
        volume.write(0, &[1], false).await,
        Err(EngineError::Closed { .. })
    ));
    engine.shutdown().await;
}
