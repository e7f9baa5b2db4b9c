//! The bucket alone is enough (DESIGN.md §9.2): with the gateway's data directory lost,
//! a fresh gateway brings back every volume (cached and stored), every snapshot and all the
//! data, from a local-directory store and from a real S3-compatible server (s3s-fs).

// Helpers here are not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use blockgate_blockstore::documents::Mode;
use blockgate_engine::{Engine, VolumeSource};
use blockgate_objstore::{LocalDirStore, ObjectStore, S3Store, S3sFsServer};

mod common;
use common::{
    DEADLINE, assert_same, config, create, open, pattern, read_all, spec, wait_all_uploaded,
    wait_until,
};

const SIZE: u64 = 1 << 20;

/// Writes `count` pieces of patterned data into `volume` and its expected image.
async fn fill(volume: &blockgate_engine::Volume, image: &mut [u8], seed: u64, count: u64) {
    for n in 0..count {
        let length = 10_000 + usize::try_from(n * 7919 % 60_000).unwrap();
        let offset = usize::try_from((seed * 31 + n) * 104_729).unwrap() % (image.len() - length);
        let data = pattern(seed * 1000 + n, length);
        volume.write(offset as u64, &data, false).await.unwrap();
        image[offset..offset + length].copy_from_slice(&data);
    }
}

/// What the first gateway left in the bucket: volume images and snapshot images.
struct Expected {
    volumes: BTreeMap<String, (Mode, Vec<u8>)>,
    snapshots: BTreeMap<String, (String, Vec<u8>)>,
}

async fn build(engine: &Engine) -> Expected {
    let size = usize::try_from(SIZE).unwrap();
    let cached = create(engine, "cached", SIZE, Mode::Cached).await;
    let stored = create(engine, "stored", SIZE, Mode::Stored).await;
    let mut cached_image = vec![0u8; size];
    let mut stored_image = vec![0u8; size];
    fill(&cached, &mut cached_image, 1, 12).await;
    fill(&stored, &mut stored_image, 2, 12).await;
    stored.write_zeroes(0, 8192, false).await.unwrap();
    stored_image[..8192].fill(0);

    engine
        .create_snapshot("cached", "cached-snap")
        .await
        .unwrap();
    engine
        .create_snapshot("stored", "stored-snap")
        .await
        .unwrap();
    let cached_at_snapshot = cached_image.clone();
    let stored_at_snapshot = stored_image.clone();
    fill(&cached, &mut cached_image, 3, 6).await;
    fill(&stored, &mut stored_image, 4, 6).await;
    engine
        .wait_snapshot_ready("cached-snap", DEADLINE)
        .await
        .unwrap();

    // A volume restored from a snapshot, then changed, and grown.
    let restored = engine
        .create_volume(spec(
            "restored",
            0,
            Mode::Stored,
            VolumeSource::Snapshot("cached-snap".into()),
        ))
        .await
        .unwrap();
    let mut restored_image = cached_at_snapshot.clone();
    fill(&restored, &mut restored_image, 5, 4).await;
    engine.expand_volume("restored", 2 * SIZE).await.unwrap();
    restored_image.resize(2 * size, 0);
    let tail = pattern(6, 5000);
    restored.write(2 * SIZE - 5000, &tail, false).await.unwrap();
    restored_image[2 * size - 5000..].copy_from_slice(&tail);

    // A clone.
    let clone = engine
        .create_volume(spec(
            "clone",
            0,
            Mode::Cached,
            VolumeSource::Volume("stored".into()),
        ))
        .await
        .unwrap();
    let mut clone_image = stored_image.clone();
    fill(&clone, &mut clone_image, 7, 3).await;

    wait_all_uploaded(engine).await;
    let volumes = BTreeMap::from([
        ("cached".to_string(), (Mode::Cached, cached_image)),
        ("stored".to_string(), (Mode::Stored, stored_image)),
        ("restored".to_string(), (Mode::Stored, restored_image)),
        ("clone".to_string(), (Mode::Cached, clone_image)),
    ]);
    let snapshots = BTreeMap::from([
        (
            "cached-snap".to_string(),
            ("cached".to_string(), cached_at_snapshot),
        ),
        (
            "stored-snap".to_string(),
            ("stored".to_string(), stored_at_snapshot),
        ),
    ]);
    Expected { volumes, snapshots }
}

async fn check(engine: &Engine, expected: &Expected) {
    let ids: Vec<String> = engine.volumes().iter().map(|v| v.id.clone()).collect();
    assert_eq!(
        ids,
        expected.volumes.keys().cloned().collect::<Vec<_>>(),
        "volumes"
    );
    for (id, (mode, image)) in &expected.volumes {
        let volume = engine.volume(id).unwrap();
        assert_eq!(volume.mode, *mode, "{id}");
        assert_eq!(volume.size(), image.len() as u64, "{id}");
        // Reads are served at once, from the bucket where the copy is not local yet.
        assert_same(&read_all(&volume).await, image, id);
        if *mode == Mode::Stored {
            wait_until(&format!("{id} is hydrated"), || {
                volume.status().is_ok_and(|s| s.hydrated)
            })
            .await;
            assert_same(&read_all(&volume).await, image, &format!("{id} hydrated"));
        }
    }
    let snapshots = engine.list_snapshots(None).await.unwrap();
    let listed: Vec<(String, String, bool)> = snapshots
        .iter()
        .filter(|s| !s.internal)
        .map(|s| (s.id.clone(), s.volume.clone(), s.ready))
        .collect();
    let wanted: Vec<(String, String, bool)> = expected
        .snapshots
        .iter()
        .map(|(id, (volume, _))| (id.clone(), volume.clone(), true))
        .collect();
    assert_eq!(listed, wanted, "snapshots");
    for (id, (_, image)) in &expected.snapshots {
        let restored_id = format!("from-{id}");
        let restored = engine
            .create_volume(spec(
                &restored_id,
                0,
                Mode::Cached,
                VolumeSource::Snapshot(id.clone()),
            ))
            .await
            .unwrap();
        assert_same(&read_all(&restored).await, image, &restored_id);
        drop(restored);
        engine.delete_volume(&restored_id).await.unwrap();
    }
}

/// Builds volumes and snapshots on a first gateway, loses its data directory, and checks
/// that a fresh gateway on the same bucket brings back all of it.
async fn round_trip(store: Arc<dyn ObjectStore>) {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let expected = build(&engine).await;
    engine.shutdown().await;
    drop(engine);
    std::fs::remove_dir_all(dir.path()).unwrap();

    let engine = open(dir.path(), &store, config()).await;
    check(&engine, &expected).await;
    engine.shutdown().await;
    drop(engine);
    // And again, on yet another directory, after the takeover above.
    let other = tempfile::tempdir().unwrap();
    let engine = open(other.path(), &store, config()).await;
    check(&engine, &expected).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn everything_comes_back_from_a_local_directory_store() {
    let bucket = tempfile::tempdir().unwrap();
    let store: Arc<dyn ObjectStore> =
        Arc::new(LocalDirStore::new(bucket.path().join("bucket")).unwrap());
    round_trip(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn everything_comes_back_from_a_real_s3_server() {
    // Fails rather than skips when s3s-fs is missing, so that this cannot pass by testing
    // nothing.
    let server = S3sFsServer::start().unwrap_or_else(|e| panic!("{e}"));
    let store: Arc<dyn ObjectStore> =
        Arc::new(S3Store::new(server.config("gateway-1")).await.unwrap());
    round_trip(store).await;
    drop(server);
}

/// Volume ids that sort around each other (`a`, `a-b`, `a.b`, `a0`, `ab`), with keys of
/// their own, are each found once, on every store (listing skips from volume to volume).
async fn every_volume_id_is_listed(store: Arc<dyn ObjectStore>) {
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let ids = ["a", "a-b", "a.b", "a0", "a_b", "ab", "b"];
    for id in ids {
        let volume = create(&engine, id, 64 * 1024, Mode::Cached).await;
        volume.write(0, id.as_bytes(), false).await.unwrap();
    }
    wait_all_uploaded(&engine).await;
    let mut listed = blockgate_engine::list_volume_ids(&*store).await.unwrap();
    listed.sort();
    let mut expected: Vec<&str> = ids.to_vec();
    expected.sort_unstable();
    assert_eq!(listed, expected);
    engine.shutdown().await;
    drop(engine);
    let fresh = tempfile::tempdir().unwrap();
    let engine = open(fresh.path(), &store, config()).await;
    for id in ids {
        let volume = engine.volume(id).unwrap();
        assert_eq!(
            &volume
                .read(0, u32::try_from(id.len()).unwrap())
                .await
                .unwrap()[..],
            id.as_bytes()
        );
    }
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_volume_id_is_listed_on_every_store() {
    every_volume_id_is_listed(Arc::new(blockgate_objstore::MemoryStore::new())).await;
    let bucket = tempfile::tempdir().unwrap();
    every_volume_id_is_listed(Arc::new(
        LocalDirStore::new(bucket.path().join("bucket")).unwrap(),
    ))
    .await;
    let server = S3sFsServer::start().unwrap_or_else(|e| panic!("{e}"));
    every_volume_id_is_listed(Arc::new(
        S3Store::new(server.config("prefixed")).await.unwrap(),
    ))
    .await;
}
