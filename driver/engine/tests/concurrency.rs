//! Many writers at once, against a small log that keeps filling while segments upload, and
//! snapshots cut in the middle of it: every writer reads its own writes, the volume ends up
//! as the writers left it, and every snapshot is crash-consistent (each writer's region in it
//! is a state that writer went through, at the moment of the cut).

// Helpers here are not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use blockgate_blockstore::documents::Mode;
use blockgate_engine::{EngineConfig, Volume, VolumeSource};
use blockgate_objstore::{MemoryStore, ObjectStore};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

mod common;
use common::{DEADLINE, assert_same, config, create, open, pattern, read_all, spec, wait_uploaded};

const WRITERS: usize = 8;
const REGION: usize = 128 * 1024;
const OPS: usize = 80;
const SNAPSHOTS: usize = 4;

/// What one writer did: a checksum of its region after each of its operations.
struct History {
    states: Mutex<Vec<u32>>,
    completed: AtomicUsize,
}

async fn writer(volume: Arc<Volume>, index: usize, history: Arc<History>) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(index as u64);
    let base = (index * REGION) as u64;
    let mut image = vec![0u8; REGION];
    for op in 0..OPS {
        let offset = rng.gen_range(0..REGION - 1);
        let length = rng.gen_range(1..=(REGION - offset).min(20_000));
        match rng.gen_range(0..10) {
            0 => {
                volume
                    .write_zeroes(base + offset as u64, u32::try_from(length).unwrap(), false)
                    .await
                    .unwrap();
                image[offset..offset + length].fill(0);
            }
            1 => volume.flush().await.unwrap(),
            2 | 3 => {
                let got = volume
                    .read(base + offset as u64, u32::try_from(length).unwrap())
                    .await
                    .unwrap();
                assert_same(
                    &got,
                    &image[offset..offset + length],
                    &format!("writer {index} reading its own writes at op {op}"),
                );
            }
            _ => {
                let data = pattern((index * OPS + op) as u64, length);
                let fua = rng.gen_bool(0.1);
                volume
                    .write(base + offset as u64, &data, fua)
                    .await
                    .unwrap();
                image[offset..offset + length].copy_from_slice(&data);
            }
        }
        history.states.lock().unwrap().push(crc32c::crc32c(&image));
        history.completed.fetch_add(1, Ordering::SeqCst);
        tokio::task::yield_now().await;
    }
    image
}

async fn many_writers(mode: Mode) {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let busy = EngineConfig {
        segment_target: 32 * 1024,
        log_capacity: 256 * 1024,
        upload_concurrency: 3,
        ..config()
    };
    let engine = open(dir.path(), &store, busy.clone()).await;
    // Uploads slower than the writers (about 3 MB of writes at 2 MiB/s into a 256 KiB log),
    // so the log fills and writes wait, however fast this machine uploads.
    engine.set_upload_limit(2 << 20);
    let size = (WRITERS * REGION) as u64;
    let volume = create(&engine, "vol", size, mode).await;
    let histories: Vec<Arc<History>> = (0..WRITERS)
        .map(|_| {
            Arc::new(History {
                states: Mutex::new(vec![crc32c::crc32c(&vec![0u8; REGION])]),
                completed: AtomicUsize::new(0),
            })
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|index| tokio::spawn(writer(volume.clone(), index, histories[index].clone())))
        .collect();

    // Cut snapshots while the writers run, noting how far each writer was before and after.
    let mut cuts = Vec::new();
    for n in 0..SNAPSHOTS {
        common::wait_until("the writers make progress", || {
            histories
                .iter()
                .map(|h| h.completed.load(Ordering::SeqCst))
                .sum::<usize>()
                >= (n + 1) * WRITERS * OPS / (SNAPSHOTS + 1)
        })
        .await;
        let before: Vec<usize> = histories
            .iter()
            .map(|h| h.completed.load(Ordering::SeqCst))
            .collect();
        let id = format!("snap-{n}");
        engine.create_snapshot("vol", &id).await.unwrap();
        let after: Vec<usize> = histories
            .iter()
            .map(|h| h.completed.load(Ordering::SeqCst))
            .collect();
        cuts.push((id, before, after));
    }
    let mut expected = Vec::new();
    for writer in writers {
        expected.extend_from_slice(&writer.await.unwrap());
    }
    assert_same(
        &read_all(&volume).await,
        &expected,
        "the volume after all writers",
    );
    assert!(
        volume.counters.log_full_waits.load(Ordering::Relaxed) > 0,
        "the log never filled: the test did not exercise backpressure"
    );

    for (id, before, after) in &cuts {
        engine.wait_snapshot_ready(id, DEADLINE).await.unwrap();
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
        let image = read_all(&restored).await;
        for (index, history) in histories.iter().enumerate() {
            let region = crc32c::crc32c(&image[index * REGION..(index + 1) * REGION]);
            let states = history.states.lock().unwrap();
            // A write in flight during the cut may be in it or not: one more than `after`.
            let last = (after[index] + 1).min(states.len() - 1);
            assert!(
                states[before[index]..=last].contains(&region),
                "snapshot {id}: writer {index}'s region is none of its states {}..={last}",
                before[index]
            );
        }
        drop(restored);
        engine.delete_volume(&restored_id).await.unwrap();
    }

    wait_uploaded(&volume).await;
    engine.shutdown().await;
    drop(volume);
    drop(engine);
    let fresh = tempfile::tempdir().unwrap();
    let engine = open(fresh.path(), &store, busy).await;
    assert_same(
        &read_all(&engine.volume("vol").unwrap()).await,
        &expected,
        "the volume rebuilt from the bucket",
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_writers_on_a_cached_volume() {
    many_writers(Mode::Cached).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_writers_on_a_stored_volume() {
    many_writers(Mode::Stored).await;
}
