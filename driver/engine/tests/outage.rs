//! An unreachable object store: writes keep landing in the write log, a full log makes new
//! writes wait (never fail), and once the store is back every write reaches the bucket.

// Helpers here are not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use blockgate_blockstore::documents::Mode;
use blockgate_engine::EngineConfig;
use blockgate_objstore::{FaultStore, MemoryStore, ObjectStore};

mod common;
use common::{
    DEADLINE, assert_same, config, create, open, pattern, read_all, wait_until, wait_uploaded,
};

const SIZE: u64 = 4 << 20;
const CHUNK: usize = 64 * 1024;
/// A write record's header in the log.
const RECORD_HEADER: u64 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_continue_through_an_outage_wait_when_the_log_is_full_and_all_reach_the_bucket() {
    let memory: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let (faulty, faults) = FaultStore::new(memory.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(faulty);
    let dir = tempfile::tempdir().unwrap();
    let mut small_log = config();
    small_log.log_capacity = 512 * 1024;
    let log_capacity = small_log.log_capacity;
    let engine = open(dir.path(), &store, small_log).await;
    let volume = create(&engine, "vol", SIZE, Mode::Cached).await;
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];

    faults.set_outage(true);
    // Below the log's capacity, writes are acknowledged from the log as usual.
    let mut written = 0u64;
    let mut chunk = 0usize;
    while written + (CHUNK as u64 + RECORD_HEADER) <= log_capacity {
        let data = pattern(chunk as u64, CHUNK);
        let offset = (chunk * CHUNK) as u64;
        tokio::time::timeout(DEADLINE, volume.write(offset, &data, false))
            .await
            .expect("a write below the log's capacity does not wait")
            .unwrap();
        expected[chunk * CHUNK..(chunk + 1) * CHUNK].copy_from_slice(&data);
        written += CHUNK as u64 + RECORD_HEADER;
        chunk += 1;
    }
    volume.flush().await.unwrap();
    // The uploader tried and says why it is behind; reads are served from the log.
    wait_until("the uploader reports the outage", || {
        volume
            .status()
            .is_ok_and(|status| status.last_upload_error.is_some())
    })
    .await;
    assert!(volume.counters.upload_errors.load(Ordering::Relaxed) > 0);
    assert!(!volume.is_drained());
    assert_same(
        &read_all(&volume).await,
        &expected,
        "reads during the outage",
    );

    // The log is full: the next write waits for uploads instead of failing.
    let data = pattern(1000, CHUNK);
    let waiting_offset = (chunk * CHUNK) as u64;
    let mut waiting = tokio::spawn({
        let volume = volume.clone();
        let data = data.clone();
        async move { volume.write(waiting_offset, &data, true).await }
    });
    wait_until("the write waits for log space", || {
        volume.counters.log_full_waits.load(Ordering::Relaxed) > 0
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut waiting)
            .await
            .is_err(),
        "a write into a full log during an outage must wait"
    );
    let status = volume.status().unwrap();
    assert!(
        status.log_bytes <= log_capacity,
        "the log holds {} bytes, more than its capacity {log_capacity}",
        status.log_bytes
    );
    // Everything acknowledged so far still reads back while the writer waits.
    assert_same(&read_all(&volume).await, &expected, "reads with a full log");

    faults.set_outage(false);
    tokio::time::timeout(DEADLINE, waiting)
        .await
        .expect("the waiting write completes once the store is back")
        .unwrap()
        .unwrap();
    expected[chunk * CHUNK..(chunk + 1) * CHUNK].copy_from_slice(&data);
    wait_uploaded(&volume).await;
    assert!(volume.status().unwrap().last_upload_error.is_none());
    engine.shutdown().await;
    drop(volume);
    drop(engine);

    // The bucket alone holds every write.
    let fresh = tempfile::tempdir().unwrap();
    let engine = open(fresh.path(), &memory, config()).await;
    assert_same(
        &read_all(&engine.volume("vol").unwrap()).await,
        &expected,
        "the volume rebuilt from the bucket",
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_uploads_are_retried_until_the_bucket_has_every_write() {
    let memory: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let (faulty, faults) = FaultStore::new(memory.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(faulty);
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let volume = create(&engine, "vol", SIZE, Mode::Stored).await;
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];

    faults.fail_next_puts(7);
    for n in 0..20usize {
        let offset = n * 150_000 % (expected.len() - 70_000);
        let data = pattern(n as u64, 70_000);
        volume.write(offset as u64, &data, false).await.unwrap();
        expected[offset..offset + data.len()].copy_from_slice(&data);
    }
    wait_uploaded(&volume).await;
    assert!(volume.counters.upload_errors.load(Ordering::Relaxed) > 0);
    engine.shutdown().await;
    drop(volume);
    drop(engine);

    let fresh = tempfile::tempdir().unwrap();
    let engine = open(fresh.path(), &memory, config()).await;
    assert_same(
        &read_all(&engine.volume("vol").unwrap()).await,
        &expected,
        "the volume rebuilt from the bucket",
    );
    engine.shutdown().await;
}

/// The same against a real S3-compatible server that goes away and comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_s3_server_going_away_loses_no_write() {
    use blockgate_objstore::{S3Store, S3sFsServer};
    let mut server = S3sFsServer::start().unwrap_or_else(|e| panic!("{e}"));
    let store: Arc<dyn ObjectStore> =
        Arc::new(S3Store::new(server.config("outage")).await.unwrap());
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let volume = create(&engine, "vol", SIZE, Mode::Stored).await;
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];
    let before = pattern(1, 100_000);
    volume.write(0, &before, false).await.unwrap();
    expected[..100_000].copy_from_slice(&before);
    wait_uploaded(&volume).await;

    server.stop();
    for n in 1..8usize {
        let data = pattern(n as u64 + 1, CHUNK);
        let offset = n * 300_000;
        volume.write(offset as u64, &data, false).await.unwrap();
        expected[offset..offset + CHUNK].copy_from_slice(&data);
    }
    volume.flush().await.unwrap();
    let snapshot = engine.create_snapshot("vol", "during").await.unwrap();
    assert!(!snapshot.ready);
    let at_snapshot = expected.clone();
    wait_until("the uploader reports the outage", || {
        volume
            .status()
            .is_ok_and(|status| status.last_upload_error.is_some())
    })
    .await;
    assert_same(
        &read_all(&volume).await,
        &expected,
        "reads while S3 is down",
    );

    server.restart().unwrap();
    assert!(
        engine
            .wait_snapshot_ready("during", DEADLINE)
            .await
            .unwrap()
            .ready
    );
    wait_uploaded(&volume).await;
    engine.shutdown().await;
    drop((volume, engine));

    let fresh = tempfile::tempdir().unwrap();
    let engine = open(fresh.path(), &store, config()).await;
    assert_same(
        &read_all(&engine.volume("vol").unwrap()).await,
        &expected,
        "the volume rebuilt from the bucket",
    );
    let restored = engine
        .create_volume(common::spec(
            "restored",
            0,
            Mode::Cached,
            blockgate_engine::VolumeSource::Snapshot("during".into()),
        ))
        .await
        .unwrap();
    assert_same(
        &read_all(&restored).await,
        &at_snapshot,
        "the snapshot cut during the outage",
    );
    engine.shutdown().await;
}

/// A backlog uploaded after a restart asks the bucket whether a newer writer holds the volume
/// once, not once per segment: each ask is a listing, a request that is billed and that some
/// servers answer by walking the bucket. (A writer taken over still uploads nothing it sealed
/// after the takeover: tests/fencing.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_uploaded_after_a_restart_checks_for_a_newer_writer_once() {
    let memory: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let (faulty, faults) = FaultStore::new(memory.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(faulty);
    let dir = tempfile::tempdir().unwrap();
    let no_checkpoints = EngineConfig {
        checkpoint_every: 1000,
        ..config()
    };
    let engine = open(dir.path(), &store, no_checkpoints.clone()).await;
    let volume = create(&engine, "vol", SIZE, Mode::Cached).await;
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];
    faults.set_outage(true);
    const SEGMENTS: usize = 12;
    for n in 0..SEGMENTS {
        let data = pattern(n as u64, CHUNK);
        volume.write((n * CHUNK) as u64, &data, true).await.unwrap();
        expected[n * CHUNK..(n + 1) * CHUNK].copy_from_slice(&data);
        volume.seal_now().unwrap();
    }
    engine.shutdown().await;
    drop((volume, engine));
    faults.set_outage(false);

    let checks_before = fence_checks(&faults);
    let engine = open(dir.path(), &store, no_checkpoints).await;
    let volume = engine.volume("vol").unwrap();
    wait_uploaded(&volume).await;
    let segments = memory
        .list("volumes/vol/segments/", None)
        .await
        .unwrap()
        .keys
        .len();
    assert!(segments >= SEGMENTS, "{segments} segments in the bucket");
    // Opening the volume lists its checkpoints to recover it (once), then the uploader asks
    // once for the whole backlog: it was sealed before the check started.
    assert_eq!(
        fence_checks(&faults) - checks_before,
        2,
        "listings of checkpoints from the restart until {segments} segments were uploaded: {:?}",
        faults.listed_prefixes()
    );
    engine.shutdown().await;
    drop((volume, engine));

    let fresh = tempfile::tempdir().unwrap();
    let engine = open(fresh.path(), &memory, config()).await;
    assert_same(
        &read_all(&engine.volume("vol").unwrap()).await,
        &expected,
        "the volume rebuilt from the bucket",
    );
    engine.shutdown().await;
}

/// Listings of a volume's checkpoints: how the engine asks whether a newer writer took over.
fn fence_checks(faults: &blockgate_objstore::Faults) -> usize {
    faults
        .listed_prefixes()
        .iter()
        .filter(|prefix| prefix.contains("/checkpoints"))
        .count()
}
