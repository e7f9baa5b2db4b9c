//! The data path against a reference model (STYLE.md habit 5): random sequences of writes
//! (some with FUA), zeroes, flushes, reads, crashes, clean restarts, uploads, snapshots,
//! restores, clones, snapshot deletions, garbage collection, expansion and disaster recovery
//! on a cached or stored volume, checked against a plain byte array.
//!
//! A crash is `shutdown` without a flush and a reopen from the same directory and store. The
//! engine may lose writes that no flush covered, so the model keeps, for every byte written
//! since the last flush, every value it may hold after a crash (its value at the flush and
//! each value written since), checks the reopened volume against those, and then takes what
//! the volume holds as the new truth. Everything else must read back exactly. (Shutdown
//! leaves the log whole; torn log tails are the business of `write_log.rs`.)
//!
//! Shrunk failures are pinned below as named tests. `PROPTEST_CASES` runs more cases.

// Helpers here are not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use blockgate_blockstore::documents::Mode;
use blockgate_engine::{Engine, Volume, VolumeSource};
use blockgate_objstore::{MemoryStore, ObjectStore};
use proptest::prelude::*;

mod common;
use common::{BLOCK, assert_same, config, create, pattern, read_all, spec, wait_all_uploaded};

const VOLUME: &str = "vol";
const INITIAL_SIZE: u64 = 256 * 1024;
const GROWTH: u64 = 64 * 1024;
const MAX_SIZE: u64 = INITIAL_SIZE + 3 * GROWTH;

#[derive(Debug, Clone)]
enum Op {
    /// `offset` and `length` are folded into the volume's size when the op runs.
    Write {
        offset: u64,
        length: usize,
        seed: u64,
        fua: bool,
    },
    Zero {
        offset: u64,
        length: u32,
    },
    Flush,
    Read {
        offset: u64,
        length: u32,
    },
    Crash,
    Restart,
    WaitUpload,
    Snapshot,
    Restore {
        pick: usize,
        mode: Mode,
    },
    DeleteSnapshot {
        pick: usize,
    },
    CollectGarbage,
    Expand,
    DisasterRecovery,
    /// Clones the volume, compares and deletes the clone.
    Clone {
        mode: Mode,
    },
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..MAX_SIZE,
        (0..MAX_SIZE / BLOCK).prop_map(|block| block * BLOCK),
        // A small hot area, so that writes overlap often.
        0..16 * 1024u64,
    ]
}

fn length() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 1..9000usize,
        2 => (1..5usize).prop_map(|blocks| blocks * 4096),
        // Longer than a segment frame (64 KiB) and than a log file's target.
        1 => 60_000..140_000usize,
    ]
}

fn mode() -> impl Strategy<Value = Mode> {
    prop_oneof![Just(Mode::Cached), Just(Mode::Stored)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (offset(), length(), any::<u64>(), proptest::bool::weighted(0.1)).prop_map(|(offset, length, seed, fua)| Op::Write { offset, length, seed, fua }),
        3 => (offset(), length()).prop_map(|(offset, length)| Op::Zero { offset, length: u32::try_from(length).unwrap_or(1) }),
        3 => Just(Op::Flush),
        4 => (offset(), length()).prop_map(|(offset, length)| Op::Read { offset, length: u32::try_from(length).unwrap_or(1) }),
        2 => Just(Op::Crash),
        1 => Just(Op::Restart),
        2 => Just(Op::WaitUpload),
        2 => Just(Op::Snapshot),
        2 => (any::<usize>(), mode()).prop_map(|(pick, mode)| Op::Restore { pick, mode }),
        1 => any::<usize>().prop_map(|pick| Op::DeleteSnapshot { pick }),
        1 => Just(Op::CollectGarbage),
        1 => Just(Op::Expand),
        1 => Just(Op::DisasterRecovery),
        1 => mode().prop_map(|mode| Op::Clone { mode }),
    ]
}

/// What a snapshot must read back as.
#[derive(Debug)]
struct SnapshotModel {
    id: String,
    bytes: Vec<u8>,
    /// Bytes that were not yet durable when the snapshot was cut, with the values they may
    /// hold (see `Model::unsure`).
    unsure: HashMap<usize, Vec<u8>>,
    /// `Model::crashes` when the snapshot was cut.
    crashes_at_cut: u32,
    deleted: bool,
}

#[derive(Debug, Default)]
struct Model {
    bytes: Vec<u8>,
    /// Bytes written since the last flush (or upload): the values each may hold after a
    /// crash.
    unsure: HashMap<usize, Vec<u8>>,
    snapshots: Vec<SnapshotModel>,
    crashes: u32,
    restores: u32,
}

impl Model {
    fn write(&mut self, offset: u64, data: &[u8]) {
        let start = usize::try_from(offset).unwrap();
        for (i, value) in data.iter().enumerate() {
            let at = start + i;
            let old = self.bytes[at];
            self.unsure
                .entry(at)
                .or_insert_with(|| vec![old])
                .push(*value);
            self.bytes[at] = *value;
        }
    }

    /// Everything written so far is durable.
    fn durable(&mut self) {
        self.unsure.clear();
        for snapshot in &mut self.snapshots {
            if snapshot.crashes_at_cut == self.crashes {
                snapshot.unsure.clear();
            }
        }
    }

    /// Everything written so far is in the bucket, every snapshot included.
    fn uploaded(&mut self) {
        self.unsure.clear();
        for snapshot in &mut self.snapshots {
            snapshot.unsure.clear();
        }
    }

    fn live_snapshot(&self, pick: usize) -> Option<usize> {
        let live: Vec<usize> = (0..self.snapshots.len())
            .filter(|&n| !self.snapshots[n].deleted)
            .collect();
        (!live.is_empty()).then(|| live[pick % live.len()])
    }
}

/// Checks bytes that may have lost unflushed writes.
#[track_caller]
fn assert_possible(got: &[u8], expected: &[u8], unsure: &HashMap<usize, Vec<u8>>, what: &str) {
    assert_eq!(got.len(), expected.len(), "{what}: size differs");
    for (at, (value, wanted)) in got.iter().zip(expected).enumerate() {
        let ok = match unsure.get(&at) {
            Some(candidates) => candidates.contains(value),
            None => value == wanted,
        };
        assert!(
            ok,
            "{what}: byte {at} is {value:#04x}; expected {wanted:#04x} (or one of {:?})",
            unsure.get(&at)
        );
    }
}

struct Harness {
    dir: tempfile::TempDir,
    store: Arc<dyn ObjectStore>,
    engine: Option<Arc<Engine>>,
    model: Model,
}

impl Harness {
    fn engine(&self) -> &Arc<Engine> {
        self.engine.as_ref().unwrap()
    }

    fn volume(&self) -> Arc<Volume> {
        self.engine().volume(VOLUME).unwrap()
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    async fn reopen(&mut self) {
        self.engine = Some(common::open(self.path(), &self.store, config()).await);
    }

    async fn stop(&mut self) {
        if let Some(engine) = self.engine.take() {
            engine.shutdown().await;
        }
    }

    /// Clamps a generated range into the volume.
    fn range(&self, offset: u64, length: u64) -> (u64, u64) {
        let size = self.model.bytes.len() as u64;
        let offset = offset % size;
        (offset, length.clamp(1, size - offset))
    }

    async fn check_volume(&self, what: &str) {
        let volume = self.volume();
        assert_eq!(volume.size(), self.model.bytes.len() as u64, "{what}: size");
        assert_same(&read_all(&volume).await, &self.model.bytes, what);
    }

    async fn apply(&mut self, op: &Op) {
        match *op {
            Op::Write {
                offset,
                length,
                seed,
                fua,
            } => {
                let (offset, length) = self.range(offset, length as u64);
                let data = pattern(seed, usize::try_from(length).unwrap());
                self.volume().write(offset, &data, fua).await.unwrap();
                self.model.write(offset, &data);
                if fua {
                    // Only this write is promised to be durable.
                    let start = usize::try_from(offset).unwrap();
                    for at in start..start + data.len() {
                        self.model.unsure.remove(&at);
                    }
                }
            }
            Op::Zero { offset, length } => {
                let (offset, length) = self.range(offset, u64::from(length));
                self.volume()
                    .write_zeroes(offset, u32::try_from(length).unwrap(), false)
                    .await
                    .unwrap();
                self.model
                    .write(offset, &vec![0u8; usize::try_from(length).unwrap()]);
            }
            Op::Flush => {
                self.volume().flush().await.unwrap();
                self.model.durable();
            }
            Op::Read { offset, length } => {
                let (offset, length) = self.range(offset, u64::from(length));
                let got = self
                    .volume()
                    .read(offset, u32::try_from(length).unwrap())
                    .await
                    .unwrap();
                let start = usize::try_from(offset).unwrap();
                let end = start + usize::try_from(length).unwrap();
                assert_same(&got, &self.model.bytes[start..end], "read");
            }
            Op::Crash => {
                self.stop().await;
                self.reopen().await;
                self.model.crashes += 1;
                let volume = self.volume();
                assert_eq!(
                    volume.size(),
                    self.model.bytes.len() as u64,
                    "size after crash"
                );
                let got = read_all(&volume).await;
                assert_possible(&got, &self.model.bytes, &self.model.unsure, "after a crash");
                // What replay kept is what the volume holds from now on.
                self.model.bytes = got;
                self.model.unsure.clear();
            }
            Op::Restart => {
                self.volume().flush().await.unwrap();
                self.model.durable();
                self.stop().await;
                self.reopen().await;
                self.check_volume("after a clean restart").await;
            }
            Op::WaitUpload => {
                wait_all_uploaded(self.engine()).await;
                self.model.uploaded();
            }
            Op::Snapshot => {
                let id = format!("snap-{}", self.model.snapshots.len());
                let info = self.engine().create_snapshot(VOLUME, &id).await.unwrap();
                assert_eq!(info.size, self.model.bytes.len() as u64);
                self.model.snapshots.push(SnapshotModel {
                    id,
                    bytes: self.model.bytes.clone(),
                    unsure: self.model.unsure.clone(),
                    crashes_at_cut: self.model.crashes,
                    deleted: false,
                });
            }
            Op::Restore { pick, mode } => {
                let Some(n) = self.model.live_snapshot(pick) else {
                    return;
                };
                self.restore(n, mode).await;
            }
            Op::DeleteSnapshot { pick } => {
                let Some(n) = self.model.live_snapshot(pick) else {
                    return;
                };
                let id = self.model.snapshots[n].id.clone();
                let info = self
                    .engine()
                    .wait_snapshot_ready(&id, common::DEADLINE)
                    .await
                    .unwrap();
                assert!(info.ready, "snapshot {id} never became ready");
                self.engine().delete_snapshot(&id).await.unwrap();
                self.model.snapshots[n].deleted = true;
            }
            Op::CollectGarbage => {
                self.engine().collect_garbage().await.unwrap();
            }
            Op::Expand => {
                let size = self.model.bytes.len() as u64;
                if size + GROWTH > MAX_SIZE {
                    return;
                }
                self.engine()
                    .expand_volume(VOLUME, size + GROWTH)
                    .await
                    .unwrap();
                self.model
                    .bytes
                    .resize(usize::try_from(size + GROWTH).unwrap(), 0);
                // Expansion flushes.
                self.model.durable();
            }
            Op::DisasterRecovery => self.disaster_recovery().await,
            Op::Clone { mode } => {
                self.model.restores += 1;
                let id = format!("clone-{}", self.model.restores);
                let clone = self
                    .engine()
                    .create_volume(spec(&id, 0, mode, VolumeSource::Volume(VOLUME.into())))
                    .await
                    .unwrap();
                assert_same(&read_all(&clone).await, &self.model.bytes, &id);
                drop(clone);
                self.engine().delete_volume(&id).await.unwrap();
            }
        }
    }

    async fn restore(&mut self, n: usize, mode: Mode) {
        let id = self.model.snapshots[n].id.clone();
        let info = self
            .engine()
            .wait_snapshot_ready(&id, common::DEADLINE)
            .await
            .unwrap();
        assert!(info.ready, "snapshot {id} never became ready");
        self.model.restores += 1;
        let restored_id = format!("restored-{}", self.model.restores);
        let restored = self
            .engine()
            .create_volume(spec(
                &restored_id,
                0,
                mode,
                VolumeSource::Snapshot(id.clone()),
            ))
            .await
            .unwrap();
        let snapshot = &self.model.snapshots[n];
        assert_eq!(restored.size(), snapshot.bytes.len() as u64);
        assert_possible(
            &read_all(&restored).await,
            &snapshot.bytes,
            &snapshot.unsure,
            &format!("volume restored from {id}"),
        );
        drop(restored);
        self.engine().delete_volume(&restored_id).await.unwrap();
    }

    /// Waits for the bucket to hold everything, loses the data directory and rebuilds from
    /// the bucket alone.
    async fn disaster_recovery(&mut self) {
        wait_all_uploaded(self.engine()).await;
        self.model.uploaded();
        self.stop().await;
        std::fs::remove_dir_all(self.path()).unwrap();
        self.reopen().await;
        self.check_volume("after disaster recovery").await;
        let listed = self.engine().list_snapshots(Some(VOLUME)).await.unwrap();
        let expected: Vec<&str> = self
            .model
            .snapshots
            .iter()
            .filter(|s| !s.deleted)
            .map(|s| s.id.as_str())
            .collect();
        let mut got: Vec<&str> = listed.iter().map(|s| s.id.as_str()).collect();
        got.sort_unstable();
        let mut expected_sorted = expected.clone();
        expected_sorted.sort_unstable();
        assert_eq!(got, expected_sorted, "snapshots after disaster recovery");
        assert!(listed.iter().all(|s| s.ready));
    }
}

fn run(mode: Mode, ops: &[Op]) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let mut harness = Harness {
            dir: tempfile::tempdir().unwrap(),
            store,
            engine: None,
            model: Model {
                bytes: vec![0; usize::try_from(INITIAL_SIZE).unwrap()],
                ..Model::default()
            },
        };
        harness.reopen().await;
        create(harness.engine(), VOLUME, INITIAL_SIZE, mode).await;
        for op in ops {
            harness.apply(op).await;
        }
        // Whatever the sequence, the bucket ends up holding the volume and every snapshot.
        harness.disaster_recovery().await;
        for n in 0..harness.model.snapshots.len() {
            if !harness.model.snapshots[n].deleted {
                harness.restore(n, Mode::Cached).await;
            }
        }
        harness.stop().await;
    });
}

proptest! {
    #![proptest_config(ProptestConfig {
        // PROPTEST_CASES runs more when hunting for bugs.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(24),
        max_shrink_iters: 200,
        // Shrunk failures are pinned as named tests in this file instead.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_volume_behaves_like_a_byte_array(
        mode in mode(),
        ops in proptest::collection::vec(op(), 1..40),
    ) {
        run(mode, &ops);
    }
}

// Pinned sequences: each one failed once, or covers a path random sequences reach rarely.

#[test]
fn a_snapshot_cut_before_a_crash_restores_after_replay() {
    run(
        Mode::Cached,
        &[
            Op::Write {
                offset: 0,
                length: 10_000,
                seed: 1,
                fua: false,
            },
            Op::Snapshot,
            Op::Write {
                offset: 4096,
                length: 100,
                seed: 2,
                fua: false,
            },
            Op::Crash,
            Op::Restore {
                pick: 0,
                mode: Mode::Stored,
            },
        ],
    );
}

#[test]
fn a_stored_volume_survives_expansion_and_disaster_recovery() {
    run(
        Mode::Stored,
        &[
            Op::Write {
                offset: 250_000,
                length: 6_000,
                seed: 3,
                fua: true,
            },
            Op::Expand,
            Op::Write {
                offset: 256 * 1024 + 100,
                length: 70_000,
                seed: 4,
                fua: false,
            },
            Op::DisasterRecovery,
            Op::Zero {
                offset: 256 * 1024,
                length: 5000,
            },
            Op::Crash,
            Op::Read {
                offset: 256 * 1024,
                length: 80_000,
            },
        ],
    );
}

/// Reading a cached volume sequentially up to its end once started a read-ahead of zero bytes,
/// which panicked under the volume's lock and left the volume unusable (`Closed`).
#[test]
fn reading_a_cached_volume_to_its_end_keeps_it_usable() {
    run(
        Mode::Cached,
        &[
            Op::Expand,
            Op::Write {
                offset: 0,
                length: 1,
                seed: 0,
                fua: false,
            },
            Op::Crash,
        ],
    );
}
