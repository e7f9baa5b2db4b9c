//! Cold sequential reads from the bucket: a reader that misses the cache fetches large
//! pieces, and reads of bytes another read is already fetching wait for that fetch instead
//! of asking the store again.

// Helpers here are not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use blockgate_blockstore::documents::Mode;
use blockgate_engine::EngineConfig;
use blockgate_objstore::{FaultStore, MemoryStore, ObjectStore};
use futures::StreamExt;

mod common;
use common::{assert_same, config, create, open, pattern, wait_uploaded};

const SIZE: u64 = 16 << 20;
const WRITE: usize = 1 << 20;
const READ: u32 = 256 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cold_sequential_scan_fetches_each_byte_once_in_large_pieces() {
    let (fault, faults) = FaultStore::new(Arc::new(MemoryStore::new()));
    let store: Arc<dyn ObjectStore> = Arc::new(fault);
    let writer_config = EngineConfig {
        segment_target: 4 << 20,
        ..config()
    };
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, writer_config).await;
    let volume = create(&engine, "vol", SIZE, Mode::Cached).await;
    let mut expected = Vec::new();
    for n in 0..SIZE / WRITE as u64 {
        let data = pattern(n, WRITE);
        volume.write(n * WRITE as u64, &data, false).await.unwrap();
        expected.extend_from_slice(&data);
    }
    volume.flush().await.unwrap();
    wait_uploaded(&volume).await;
    engine.shutdown().await;
    drop(volume);
    drop(engine);

    // A fresh gateway: nothing cached. Reads of 256 KiB, 16 in flight, in order (as nbdcopy
    // or the kernel's read-ahead issue them).
    let reader_config = EngineConfig {
        cache_capacity: 64 << 20,
        readahead: 4 << 20,
        ..config()
    };
    let fresh = tempfile::tempdir().unwrap();
    let engine = open(fresh.path(), &store, reader_config).await;
    let volume = engine.volume("vol").unwrap();
    let gets_before = faults.gets();
    let reads = futures::stream::iter((0..SIZE / u64::from(READ)).map(|n| {
        let volume = volume.clone();
        async move { volume.read(n * u64::from(READ), READ).await.unwrap() }
    }))
    .buffered(16)
    .collect::<Vec<_>>()
    .await;
    let got: Vec<u8> = reads.iter().flat_map(|b| b.iter().copied()).collect();
    assert_same(&got, &expected, "the volume read cold from the bucket");
    let gets = faults.gets() - gets_before;
    // One GET per cache chunk (256 KiB) would be 64; large pieces and no duplicate fetches
    // make it a few per 4 MiB segment (11 when written; 25 before either).
    assert!(
        gets <= 16,
        "{gets} GETs for a 16 MiB cold scan: reads were not coalesced"
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_waits_for_a_fetch_of_its_bytes_and_sees_its_failure_as_its_own() {
    let (fault, faults) = FaultStore::new(Arc::new(MemoryStore::new()));
    let store: Arc<dyn ObjectStore> = Arc::new(fault);
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, config()).await;
    let volume = create(&engine, "vol", 1 << 20, Mode::Cached).await;
    let data = pattern(7, 1 << 20);
    volume.write(0, &data, false).await.unwrap();
    volume.flush().await.unwrap();
    wait_uploaded(&volume).await;
    engine.shutdown().await;
    drop(volume);
    drop(engine);

    let fresh = tempfile::tempdir().unwrap();
    let engine = open(fresh.path(), &store, config()).await;
    let volume = engine.volume("vol").unwrap();
    // The store fails the next read: the reads of the same bytes at the same time either
    // fail with it or fetch again themselves; none returns wrong data or hangs.
    faults.fail_next_gets(1);
    let results = futures::future::join_all((0..8).map(|_| {
        let volume = volume.clone();
        async move { volume.read(4096, 65536).await }
    }))
    .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert!(failed <= 1, "{failed} of 8 reads failed for one failed GET");
    for result in results.into_iter().flatten() {
        assert_same(
            &result,
            &data[4096..4096 + 65536],
            "a read after a failed fetch",
        );
    }
    // And the bytes are readable afterwards.
    let again = volume.read(4096, 65536).await.unwrap();
    assert_same(&again, &data[4096..4096 + 65536], "the same read later");
    engine.shutdown().await;
}
