//! Managed attachments: the control plane attaches a volume to one gateway with a writer
//! epoch, and detaches it. What a user notices: a stale attach is refused, a re-attach keeps
//! every acknowledged write, a detach leaves nothing behind that only this gateway has, and a
//! writer whose volume was attached elsewhere is refused instead of serving stale data.

// Helpers here are not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blockgate_blockstore::documents::Mode;
use blockgate_engine::{Engine, EngineConfig, EngineError};
use blockgate_objstore::{FaultStore, MemoryStore, ObjectStore};

mod common;
use common::{DEADLINE, assert_same, config, create, pattern, read_all, wait_until, wait_uploaded};

const SIZE: u64 = 1 << 20;

fn managed() -> EngineConfig {
    EngineConfig {
        attach_only: true,
        ..config()
    }
}

async fn open_managed(dir: &Path, store: &Arc<dyn ObjectStore>) -> Arc<Engine> {
    Engine::open(dir, store.clone(), managed()).await.unwrap()
}

/// The segment keys of `volume` written with writer epoch `epoch`.
fn segments_of_epoch(memory: &MemoryStore, volume: &str, epoch: u64) -> Vec<String> {
    let prefix = format!("volumes/{volume}/segments/{epoch:010}-");
    memory
        .keys()
        .into_iter()
        .filter(|key| key.starts_with(&prefix))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attach_is_idempotent_and_a_stale_epoch_is_refused() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let engine = open_managed(dir.path(), &store).await;
    let created = create(&engine, "vol", SIZE, Mode::Cached).await;
    assert_eq!(created.epoch(), 1);
    let data = pattern(1, 40_000);
    created.write(0, &data, true).await.unwrap();

    let attached = engine.attach_volume("vol", 5).await.unwrap();
    assert_eq!(attached.status().unwrap().epoch, 5);
    assert_eq!(&attached.read(0, 40_000).await.unwrap()[..], &data[..]);
    let again = engine.attach_volume("vol", 5).await.unwrap();
    assert!(
        Arc::ptr_eq(&attached, &again),
        "a repeated attach reopened the volume"
    );
    for stale in [1, 4] {
        assert!(
            matches!(
                engine.attach_volume("vol", stale).await,
                Err(EngineError::Fenced {
                    ours,
                    current: 5,
                    ..
                }) if ours == stale
            ),
            "attach with stale epoch {stale} was not refused"
        );
    }
    // The refused attaches changed nothing.
    assert!(Arc::ptr_eq(&engine.volume("vol").unwrap(), &attached));
    assert_eq!(&attached.read(0, 40_000).await.unwrap()[..], &data[..]);
    assert!(matches!(
        engine.attach_volume("missing", 7).await,
        Err(EngineError::VolumeNotFound { .. })
    ));
    engine.shutdown().await;
}

/// Writes acknowledged but never uploaded (the log file is not sealed before the gateway
/// stops) survive a restart and a re-attach with a newer epoch on the same data directory,
/// and reach the bucket under that epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reattach_with_a_newer_epoch_keeps_unuploaded_writes() {
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let dir = tempfile::tempdir().unwrap();
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];
    // Nothing is sealed by time or size: what is written stays in the log until sealed.
    let log_only = EngineConfig {
        seal_interval: Duration::from_secs(3600),
        segment_target: 4 << 20,
        ..managed()
    };

    let engine = Engine::open(dir.path(), store.clone(), log_only.clone())
        .await
        .unwrap();
    let created = create(&engine, "vol", SIZE, Mode::Stored).await;
    let uploaded = pattern(1, 100_000);
    created.write(0, &uploaded, true).await.unwrap();
    expected[..100_000].copy_from_slice(&uploaded);
    wait_uploaded(&created).await;

    let volume = engine.attach_volume("vol", 2).await.unwrap();
    let unuploaded = pattern(2, 70_000);
    volume.write(300_000, &unuploaded, true).await.unwrap();
    expected[300_000..370_000].copy_from_slice(&unuploaded);
    assert!(volume.status().unwrap().log_bytes > 0);
    engine.shutdown().await;
    drop((created, volume, engine));

    // Restarted in managed mode: the attached volume opens from its local state.
    let engine = Engine::open(dir.path(), store.clone(), log_only)
        .await
        .unwrap();
    let volume = engine.volume("vol").unwrap();
    assert_eq!(volume.epoch(), 2);
    assert!(volume.status().unwrap().log_bytes > 0);
    // Re-attached with a newer epoch (the control plane's answer to a node restart).
    let volume = engine.attach_volume("vol", 3).await.unwrap();
    assert_eq!(volume.epoch(), 3);
    assert_same(&read_all(&volume).await, &expected, "after the re-attach");
    wait_uploaded(&volume).await;
    assert!(
        segments_of_epoch(&memory, "vol", 2).is_empty(),
        "epoch 2 uploaded a segment: {:?}",
        memory.keys()
    );
    assert!(
        !segments_of_epoch(&memory, "vol", 3).is_empty(),
        "the kept write log was not uploaded under the new epoch: {:?}",
        memory.keys()
    );
    engine.shutdown().await;
    drop((volume, engine));

    let other_dir = tempfile::tempdir().unwrap();
    let other = open_managed(other_dir.path(), &store).await;
    let volume = other.attach_volume("vol", 4).await.unwrap();
    assert_same(
        &read_all(&volume).await,
        &expected,
        "the volume rebuilt from the bucket",
    );
    other.shutdown().await;
}

/// Detach uploads everything and frees the local state; another gateway attaching with a
/// newer epoch sees every write, and the detached gateway cannot take the volume back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detach_drains_and_another_gateway_sees_everything() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let first_dir = tempfile::tempdir().unwrap();
    let second_dir = tempfile::tempdir().unwrap();
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];

    let first = open_managed(first_dir.path(), &store).await;
    create(&first, "vol", SIZE, Mode::Cached).await;
    let volume = first.attach_volume("vol", 2).await.unwrap();
    for n in 0..6u64 {
        let data = pattern(10 + n, 50_000);
        let at = usize::try_from(n * 150_000).unwrap();
        volume.write(n * 150_000, &data, false).await.unwrap();
        expected[at..at + 50_000].copy_from_slice(&data);
    }
    // Not flushed, not sealed: the detach does both.
    first.detach_volume("vol", DEADLINE).await.unwrap();
    assert!(first.volume("vol").is_err());
    assert!(first.volumes().is_empty());
    assert!(
        !first_dir.path().join("volumes").join("vol").exists(),
        "the detached volume's local state is still there"
    );
    // Requests on a handle kept from before are refused, not served from a closed volume.
    assert!(matches!(
        volume.write(0, &[1; 4096], false).await,
        Err(EngineError::Closed { .. })
    ));
    first.detach_volume("vol", DEADLINE).await.unwrap();

    let second = open_managed(second_dir.path(), &store).await;
    assert!(
        second.volumes().is_empty(),
        "a managed gateway opened a volume it was not attached"
    );
    let moved = second.attach_volume("vol", 3).await.unwrap();
    assert_same(
        &read_all(&moved).await,
        &expected,
        "the volume attached on the other gateway",
    );
    // Nor with the epoch the other gateway holds: two writers of one epoch would write the
    // same keys.
    for epoch in [2, 3] {
        assert!(matches!(
            first.attach_volume("vol", epoch).await,
            Err(EngineError::Fenced { current: 3, .. })
        ));
    }
    first.shutdown().await;
    second.shutdown().await;
}

/// A writer whose volume was attached to another gateway is fenced at its next upload: it
/// uploads nothing more and refuses writes, flushes and reads; the bucket holds the new
/// writer's volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_attached_elsewhere_is_fenced_at_its_next_upload() {
    let memory = Arc::new(MemoryStore::new());
    let store: Arc<dyn ObjectStore> = memory.clone();
    let old_dir = tempfile::tempdir().unwrap();
    let new_dir = tempfile::tempdir().unwrap();
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];

    let old_gateway = open_managed(old_dir.path(), &store).await;
    create(&old_gateway, "vol", SIZE, Mode::Cached).await;
    let old_writer = old_gateway.attach_volume("vol", 2).await.unwrap();
    let data = pattern(1, 200_000);
    old_writer.write(0, &data, true).await.unwrap();
    expected[..200_000].copy_from_slice(&data);
    wait_uploaded(&old_writer).await;

    // A forced attach elsewhere (the old node is unreachable for the control plane).
    let new_gateway = open_managed(new_dir.path(), &store).await;
    let new_writer = new_gateway.attach_volume("vol", 3).await.unwrap();
    let old_segments = segments_of_epoch(&memory, "vol", 2);

    // The old writer does not know yet: the write lands in its log. Its upload finds the
    // newer epoch.
    old_writer
        .write(0, &pattern(9, 100_000), false)
        .await
        .unwrap();
    old_writer.seal_now().unwrap();
    wait_until("the old writer is fenced", || old_writer.is_fenced()).await;
    let status = old_writer.status().unwrap();
    assert!(status.fenced);
    assert_eq!(status.epoch, 2);
    // Attaching the new writer's epoch here too is refused: the old gateway keeps its
    // (fenced) volume and takes nothing over.
    assert!(matches!(
        old_gateway.attach_volume("vol", 3).await,
        Err(EngineError::Fenced { current: 3, .. })
    ));
    assert!(Arc::ptr_eq(
        &old_gateway.volume("vol").unwrap(),
        &old_writer
    ));
    assert!(matches!(
        old_writer.write(0, &[7; 4096], false).await,
        Err(EngineError::Fenced {
            ours: 2,
            current: 3,
            ..
        })
    ));
    assert!(matches!(
        old_writer.write_zeroes(0, 4096, false).await,
        Err(EngineError::Fenced { .. })
    ));
    assert!(matches!(
        old_writer.flush().await,
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
    assert_eq!(
        segments_of_epoch(&memory, "vol", 2),
        old_segments,
        "the fenced writer uploaded after the new writer's attach"
    );
    assert_same(
        &read_all(&new_writer).await,
        &expected,
        "the new writer's view",
    );

    // A fenced volume detaches at once: what it holds can never become the volume's.
    tokio::time::timeout(
        DEADLINE,
        old_gateway.detach_volume("vol", Duration::from_secs(3600)),
    )
    .await
    .expect("detaching a fenced volume does not wait for uploads")
    .unwrap();
    assert!(!old_dir.path().join("volumes").join("vol").exists());
    old_gateway.shutdown().await;
    new_gateway.shutdown().await;
    drop((old_writer, new_writer, old_gateway, new_gateway));

    let reader_dir = tempfile::tempdir().unwrap();
    let reader = open_managed(reader_dir.path(), &store).await;
    let volume = reader.attach_volume("vol", 4).await.unwrap();
    assert_same(
        &read_all(&volume).await,
        &expected,
        "the volume rebuilt from the bucket",
    );
    reader.shutdown().await;
}

/// A detach that cannot upload fails with the store's error and keeps the volume attached
/// and serving; once the bucket is back it succeeds and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detach_during_an_outage_fails_and_loses_nothing() {
    let memory: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let (faulty, faults) = FaultStore::new(memory.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(faulty);
    let dir = tempfile::tempdir().unwrap();
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];

    let engine = open_managed(dir.path(), &store).await;
    create(&engine, "vol", SIZE, Mode::Cached).await;
    let volume = engine.attach_volume("vol", 2).await.unwrap();
    faults.set_outage(true);
    let data = pattern(3, 120_000);
    volume.write(4096, &data, true).await.unwrap();
    expected[4096..124_096].copy_from_slice(&data);

    let failed = engine.detach_volume("vol", Duration::from_secs(1)).await;
    assert!(
        matches!(failed, Err(EngineError::Store { .. })),
        "detach during an outage: {failed:?}"
    );
    assert!(Arc::ptr_eq(&engine.volume("vol").unwrap(), &volume));
    assert!(dir.path().join("volumes").join("vol").exists());
    // Still attached and serving, writes included.
    let more = pattern(4, 8192);
    tokio::time::timeout(DEADLINE, volume.write(600_000, &more, true))
        .await
        .expect("a write after a failed detach does not wait")
        .unwrap();
    expected[600_000..608_192].copy_from_slice(&more);
    assert_same(
        &read_all(&volume).await,
        &expected,
        "after the failed detach",
    );

    faults.set_outage(false);
    engine.detach_volume("vol", DEADLINE).await.unwrap();
    assert!(!dir.path().join("volumes").join("vol").exists());
    engine.shutdown().await;
    drop((volume, engine));

    let other_dir = tempfile::tempdir().unwrap();
    let other = open_managed(other_dir.path(), &memory).await;
    let volume = other.attach_volume("vol", 3).await.unwrap();
    assert_same(
        &read_all(&volume).await,
        &expected,
        "the volume after the detach",
    );
    other.shutdown().await;
}

/// A CSI unstage detaches the volume and a later stage of the same ControllerPublish attaches
/// it again with the same epoch: the gateway that detached it cleanly may, and continues the
/// epoch's chain; another gateway may not use that epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_detach_can_be_attached_again_with_the_same_epoch_here_only() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let engine = open_managed(&dir.path().join("a"), &store).await;
    create(&engine, "vol", SIZE, Mode::Cached).await;
    let volume = engine.attach_volume("vol", 3).await.unwrap();
    let first = pattern(1, 64 << 10);
    volume.write(0, &first, true).await.unwrap();
    let snapshot = engine.create_snapshot("vol", "s1").await.unwrap();
    drop(volume);
    engine.detach_volume("vol", DEADLINE).await.unwrap();
    assert!(engine.snapshot("s1").await.unwrap().ready, "{snapshot:?}");

    let elsewhere = open_managed(&dir.path().join("b"), &store).await;
    assert!(
        matches!(
            elsewhere.attach_volume("vol", 3).await,
            Err(EngineError::Fenced { .. })
        ),
        "another gateway must not reuse the epoch"
    );

    let again = engine.attach_volume("vol", 3).await.unwrap();
    assert_eq!(again.epoch(), 3);
    assert_eq!(&again.read(0, 64 << 10).await.unwrap()[..], &first[..]);
    let second = pattern(2, 64 << 10);
    again.write(64 << 10, &second, true).await.unwrap();
    let next = engine.create_snapshot("vol", "s2").await.unwrap();
    assert_eq!(
        next.parent.as_deref(),
        Some("s1"),
        "the snapshot chain goes on"
    );
    drop(again);
    engine.detach_volume("vol", DEADLINE).await.unwrap();

    // Everything is in the bucket: a newer epoch on the other gateway sees both writes.
    let moved = elsewhere.attach_volume("vol", 4).await.unwrap();
    assert_eq!(&moved.read(0, 64 << 10).await.unwrap()[..], &first[..]);
    assert_eq!(
        &moved.read(64 << 10, 64 << 10).await.unwrap()[..],
        &second[..]
    );
    // And the first gateway's memory of epoch 3 is now stale.
    assert!(matches!(
        engine.attach_volume("vol", 3).await,
        Err(EngineError::Fenced { .. })
    ));
}
