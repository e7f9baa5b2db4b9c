//! The write log across restarts: a torn or garbage tail (a crash in the middle of an append)
//! is dropped, never applied, and everything before it survives.

// Helpers here are not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blockgate_blockstore::documents::Mode;
use blockgate_engine::EngineConfig;
use blockgate_objstore::{FaultStore, MemoryStore, ObjectStore};

mod common;
use common::{assert_same, config, create, open, pattern, read_all, wait_uploaded};

const SIZE: u64 = 1 << 20;
const RECORD_MAGIC: u32 = 0x424C_4752;
const HEADER: u64 = 32;

/// Keeps writes in the log: nothing is sealed by time, and files are large.
fn log_only() -> EngineConfig {
    EngineConfig {
        seal_interval: Duration::from_secs(3600),
        segment_target: 4 << 20,
        ..config()
    }
}

/// The newest file of a volume's write log.
fn newest_log_file(dir: &Path, volume: &str) -> PathBuf {
    let log = dir.join("volumes").join(volume).join("log");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&log)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files.pop().unwrap()
}

/// A write record as the log stores it (see the engine's `log` module).
fn record(offset: u64, seq: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&RECORD_MAGIC.to_le_bytes());
    out.push(1);
    out.extend_from_slice(&[0u8; 3]);
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..28]), data);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(data);
    out
}

fn write_at(path: &Path, position: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, position).unwrap();
    file.sync_all().unwrap();
}

#[derive(Debug, Clone, Copy)]
enum Tail {
    /// A record whose header made it to disk but only part of its data.
    HalfRecord,
    /// A whole record whose data does not match its checksum.
    BadChecksum,
    /// Random bytes where the next record would start.
    Garbage,
    /// Garbage appended past the end of the (preallocated) file.
    AppendedGarbage,
    /// The control: a whole, valid record (a write that reached the disk before the crash)
    /// is replayed, which shows the torn variants are placed where a record would be.
    WholeRecord,
}

/// Writes, flushes, stops, puts `tail` after the log's last record, and reopens.
async fn replay_with_tail(tail: Tail) {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, log_only()).await;
    let volume = create(&engine, "vol", SIZE, Mode::Cached).await;
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];
    let first = pattern(1, 5000);
    let second = pattern(2, 4096);
    volume.write(3, &first, false).await.unwrap();
    volume.write(8192, &second, false).await.unwrap();
    volume.write_zeroes(4096, 1000, false).await.unwrap();
    volume.flush().await.unwrap();
    expected[3..5003].copy_from_slice(&first);
    expected[8192..12288].copy_from_slice(&second);
    expected[4096..5096].fill(0);
    engine.shutdown().await;
    drop(volume);
    drop(engine);

    // Three records: two writes and a zero, numbered 0, 1, 2.
    let valid_end = 3 * HEADER + 5000 + 4096;
    let path = newest_log_file(dir.path(), "vol");
    let garbage = vec![0xa5u8; 4096];
    match tail {
        Tail::HalfRecord => {
            let torn = record(0, 3, &garbage);
            write_at(
                &path,
                valid_end,
                &torn[..usize::try_from(HEADER).unwrap() + 1000],
            );
        }
        Tail::BadChecksum => {
            let mut bad = record(0, 3, &garbage);
            let last = bad.len() - 1;
            bad[last] ^= 1;
            write_at(&path, valid_end, &bad);
        }
        Tail::Garbage => write_at(&path, valid_end, &pattern(9, 3000)),
        Tail::AppendedGarbage => {
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            file.write_all(&record(0, 3, &garbage)).unwrap();
            file.sync_all().unwrap();
        }
        Tail::WholeRecord => {
            write_at(&path, valid_end, &record(0, 3, &garbage));
            expected[..garbage.len()].copy_from_slice(&garbage);
        }
    }

    let engine = open(dir.path(), &store, log_only()).await;
    let volume = engine.volume("vol").unwrap();
    assert_same(
        &read_all(&volume).await,
        &expected,
        &format!("after replaying a log with a {tail:?} tail"),
    );

    // New writes follow the valid records; the dropped tail never comes back.
    let third = pattern(3, 3000);
    volume.write(100_000, &third, false).await.unwrap();
    volume.flush().await.unwrap();
    expected[100_000..103_000].copy_from_slice(&third);
    engine.shutdown().await;
    drop(volume);
    drop(engine);
    let engine = open(dir.path(), &store, log_only()).await;
    let volume = engine.volume("vol").unwrap();
    assert_same(
        &read_all(&volume).await,
        &expected,
        &format!("after a write following a dropped {tail:?} tail and another restart"),
    );

    // And the bucket gets exactly that.
    wait_uploaded(&volume).await;
    engine.shutdown().await;
    drop(volume);
    drop(engine);
    let fresh = tempfile::tempdir().unwrap();
    let engine = open(fresh.path(), &store, config()).await;
    assert_same(
        &read_all(&engine.volume("vol").unwrap()).await,
        &expected,
        "the volume rebuilt from the bucket",
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_record_is_dropped() {
    replay_with_tail(Tail::HalfRecord).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_with_a_bad_checksum_is_dropped() {
    replay_with_tail(Tail::BadChecksum).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_after_the_last_record_is_dropped() {
    replay_with_tail(Tail::Garbage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_appended_to_the_log_file_is_dropped() {
    replay_with_tail(Tail::AppendedGarbage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_record_after_the_last_flush_is_replayed() {
    replay_with_tail(Tail::WholeRecord).await;
}

/// With uploads failing, several log files wait for upload; a torn tail in the newest one
/// leaves the older files and the newest file's valid records intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_tail_keeps_older_log_files_waiting_for_upload() {
    let memory: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let (faulty, faults) = FaultStore::new(memory.clone());
    let store: Arc<dyn ObjectStore> = Arc::new(faulty);
    let dir = tempfile::tempdir().unwrap();
    let engine = open(dir.path(), &store, log_only()).await;
    let volume = create(&engine, "vol", SIZE, Mode::Stored).await;
    // Uploads fail; listing and reading still work, so the engine can reopen.
    faults.fail_next_puts(u64::MAX);
    let mut expected = vec![0u8; usize::try_from(SIZE).unwrap()];
    for n in 0..3u64 {
        let data = pattern(10 + n, 20_000);
        let offset = n * 10_000;
        volume.write(offset, &data, false).await.unwrap();
        let at = usize::try_from(offset).unwrap();
        expected[at..at + data.len()].copy_from_slice(&data);
        volume.seal_now().unwrap();
    }
    let last = pattern(20, 777);
    volume.write(500_000, &last, true).await.unwrap();
    expected[500_000..500_777].copy_from_slice(&last);
    assert!(volume.status().unwrap().upload_backlog_segments >= 3);
    engine.shutdown().await;
    drop(volume);
    drop(engine);

    let path = newest_log_file(dir.path(), "vol");
    write_at(&path, HEADER + 777, &record(0, 4, &[0xa5u8; 4096])[..2000]);

    let engine = open(dir.path(), &store, log_only()).await;
    let volume = engine.volume("vol").unwrap();
    assert_same(&read_all(&volume).await, &expected, "after replay");
    faults.fail_next_puts(0);
    wait_uploaded(&volume).await;
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

/// A sealed log file that no longer verifies (the local disk corrupted it) cannot become a
/// segment. The uploader must not upload the files after it either: the bucket would hold a
/// sequence with a hole, which recovery cuts at the hole, and the hole's number would later be
/// uploaded again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_file_that_cannot_be_uploaded_stops_the_uploads_after_it() {
    let memory = Arc::new(MemoryStore::new());
    let (faulty, faults) = FaultStore::new(memory.clone() as Arc<dyn ObjectStore>);
    let store: Arc<dyn ObjectStore> = Arc::new(faulty);
    let dir = tempfile::tempdir().unwrap();
    let one_at_a_time = EngineConfig {
        upload_concurrency: 1,
        ..log_only()
    };
    let engine = open(dir.path(), &store, one_at_a_time).await;
    let volume = create(&engine, "vol", SIZE, Mode::Cached).await;
    // Log files 1, 2 and 3, sealed while uploads fail: file 1 is being uploaded, 2 and 3
    // wait their turn (and may be read ahead of it). File 2 is damaged on disk before it
    // is sealed, so it cannot be read back whenever the uploader gets to it.
    faults.fail_next_puts(u64::MAX);
    let second = dir
        .path()
        .join("volumes/vol/log")
        .join(format!("{:016}.log", 2));
    for n in 0..3u64 {
        volume
            .write(n * 100_000, &pattern(n, 10_000), true)
            .await
            .unwrap();
        if n == 1 {
            write_at(&second, HEADER + 10, &[0xff]);
        }
        volume.seal_now().unwrap();
    }
    faults.fail_next_puts(0);

    common::wait_until("file 2 fails and is reported", || {
        volume.status().is_ok_and(|status| {
            status.uploaded_seq == 1
                && status
                    .last_upload_error
                    .is_some_and(|e| e.contains("verifies only"))
        })
    })
    .await;
    let segments = || {
        memory
            .keys()
            .into_iter()
            .filter(|key| key.contains("/segments/"))
            .count()
    };
    // More writes and seals do not get past the hole.
    volume.write(500_000, &pattern(9, 100), true).await.unwrap();
    volume.seal_now().unwrap();
    assert!(
        tokio::time::timeout(
            Duration::from_millis(500),
            common::wait_until("a segment after the hole is uploaded", || segments() > 1),
        )
        .await
        .is_err(),
        "segments after an unreadable log file were uploaded: {:?}",
        memory.keys()
    );
    assert!(!volume.is_drained());
    assert_eq!(volume.status().unwrap().uploaded_seq, 1);
    engine.shutdown().await;
}
