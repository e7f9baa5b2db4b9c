//! The write log: the files where every write lands before it is acknowledged.
//!
//! A volume's log is a directory of numbered files; file `<seq>.log` becomes segment `<seq>`
//! when it is sealed and uploaded, and is deleted once the segment is applied. Each record is
//!
//! ```text
//! magic u32 | kind u8 | 3 bytes 0 | volume offset u64 | length u32 | record seq u64 | crc32c u32
//! data (length bytes, for writes only)
//! ```
//!
//! The crc covers the header's first 28 bytes and the data; the record sequence number grows
//! by one per record across all files of a volume. Replay stops at the first record whose
//! magic, crc or sequence number is wrong: that is a torn tail, never applied.
//!
//! This module only does file I/O; group commit and the map live in the volume.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

pub const RECORD_MAGIC: u32 = 0x424C_4752;
pub const HEADER_LEN: u64 = HEADER_BYTES as u64;
const HEADER_BYTES: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Write = 1,
    Zero = 2,
    /// The volume grew to `offset` bytes.
    Resize = 3,
}

impl RecordKind {
    fn from_byte(byte: u8) -> Option<RecordKind> {
        match byte {
            1 => Some(RecordKind::Write),
            2 => Some(RecordKind::Zero),
            3 => Some(RecordKind::Resize),
            _ => None,
        }
    }
}

/// A record found in a log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    pub offset: u64,
    pub length: u32,
    pub seq: u64,
    /// Where the record's data starts in the file.
    pub data_position: u64,
}

impl Record {
    pub fn data_length(&self) -> u64 {
        if self.kind == RecordKind::Write {
            u64::from(self.length)
        } else {
            0
        }
    }
}

/// Encodes a record: header followed by `data` (empty for zero and resize records).
pub fn encode_record(kind: RecordKind, offset: u64, length: u32, seq: u64, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + data.len());
    out.extend_from_slice(&encode_header(kind, offset, length, seq, data));
    out.extend_from_slice(data);
    out
}

/// The 32-byte header of a record whose data is `data` (written right after it).
pub fn encode_header(
    kind: RecordKind,
    offset: u64,
    length: u32,
    seq: u64,
    data: &[u8],
) -> [u8; 32] {
    let mut header = [0u8; 32];
    header[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
    header[4] = kind as u8;
    header[8..16].copy_from_slice(&offset.to_le_bytes());
    header[16..20].copy_from_slice(&length.to_le_bytes());
    header[20..28].copy_from_slice(&seq.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..28]), data);
    header[28..32].copy_from_slice(&crc.to_le_bytes());
    header
}

/// One file of the write log.
#[derive(Debug)]
pub struct LogFile {
    pub seq: u64,
    pub path: PathBuf,
    file: File,
    /// Written since the last fdatasync started.
    dirty: AtomicBool,
    /// Held for the whole of a sync, so that a caller who finds the file clean knows the
    /// sync that cleaned it has finished, not merely begun (a flush racing with the
    /// uploader's sync of the same file must not return early).
    syncing: Mutex<()>,
    /// Created but its directory entry not yet made durable. Creating a file happens while
    /// writers wait (sealing), so the directory fsync is left to the file's first sync: a
    /// flush or the upload, which is when the file's contents must survive a crash anyway.
    directory_unsynced: AtomicBool,
    /// An fdatasync failed. Linux may drop the failed pages and report the next fdatasync as
    /// a success, so a failure is final: every later sync fails too, and the volume stops
    /// acknowledging flushes until a restart replays what truly reached the disk.
    sync_failed: AtomicBool,
}

impl LogFile {
    pub fn path_for(dir: &Path, seq: u64) -> PathBuf {
        dir.join(format!("{seq:016}.log"))
    }

    /// Creates a new, empty log file, preallocating `preallocate` bytes so that appends do
    /// not change its size (fdatasync then has no metadata to write) and a full disk shows
    /// up here rather than in the middle of a write.
    pub fn create(dir: &Path, seq: u64, preallocate: u64) -> io::Result<LogFile> {
        let path = Self::path_for(dir, seq);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        if preallocate > 0 {
            let length = libc::off_t::try_from(preallocate).unwrap_or(libc::off_t::MAX);
            // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
            let result = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, length) };
            if result != 0 {
                let error = io::Error::last_os_error();
                // A filesystem without fallocate still works, only slower to sync.
                if error.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    drop(file);
                    let _ = std::fs::remove_file(&path);
                    return Err(error);
                }
            }
        }
        Ok(LogFile {
            seq,
            path,
            file,
            dirty: AtomicBool::new(false),
            syncing: Mutex::new(()),
            directory_unsynced: AtomicBool::new(true),
            sync_failed: AtomicBool::new(false),
        })
    }

    pub fn open(path: PathBuf, seq: u64) -> io::Result<LogFile> {
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Ok(LogFile {
            seq,
            path,
            file,
            dirty: AtomicBool::new(false),
            syncing: Mutex::new(()),
            // Found after a restart: its entry may not have been made durable before.
            directory_unsynced: AtomicBool::new(true),
            sync_failed: AtomicBool::new(false),
        })
    }

    pub fn write_at(&self, bytes: &[u8], position: u64) -> io::Result<()> {
        self.file.write_all_at(bytes, position)?;
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    pub fn read_at(&self, buffer: &mut [u8], position: u64) -> io::Result<()> {
        self.file.read_exact_at(buffer, position)
    }

    /// Makes everything written so far durable, if anything was.
    pub fn sync(&self) -> io::Result<()> {
        // Nothing is ever left half-done under this lock, so a poisoned one is still good.
        let _turn = self.syncing.lock().unwrap_or_else(PoisonError::into_inner);
        if self.sync_failed.load(Ordering::Acquire) {
            return Err(io::Error::other(
                "an earlier fdatasync of this write-log file failed; restart to replay what reached the disk",
            ));
        }
        if self.dirty.swap(false, Ordering::AcqRel)
            && let Err(error) = self.file.sync_data()
        {
            self.dirty.store(true, Ordering::Release);
            self.sync_failed.store(true, Ordering::Release);
            return Err(error);
        }
        if self.directory_unsynced.swap(false, Ordering::AcqRel) {
            let directory = self.path.parent().unwrap_or(Path::new("."));
            if let Err(error) = sync_directory(directory) {
                self.directory_unsynced.store(true, Ordering::Release);
                return Err(error);
            }
        }
        Ok(())
    }

    /// Cuts the file at `length` (dropping a torn tail) and preallocates again.
    pub fn truncate(&self, length: u64, preallocate: u64) -> io::Result<()> {
        self.file.set_len(length)?;
        if preallocate > length {
            self.file.set_len(preallocate)?;
        }
        self.file.sync_all()
    }

    /// Reads the first `length` bytes of the file (fewer when it is shorter).
    pub fn read_prefix(&self, length: u64) -> io::Result<Vec<u8>> {
        let size = self.file.metadata()?.len().min(length);
        self.read_start(size)
    }

    /// Reads the whole file.
    pub fn read_all(&self) -> io::Result<Vec<u8>> {
        let size = self.file.metadata()?.len();
        self.read_start(size)
    }

    /// Reads the first `size` bytes through a handle of its own (its own file position)
    /// straight into a buffer's spare capacity: zeroing a segment-sized buffer first cost as
    /// much as the read itself.
    fn read_start(&self, size: u64) -> io::Result<Vec<u8>> {
        let mut buffer = Vec::with_capacity(usize::try_from(size).unwrap_or(usize::MAX));
        File::open(&self.path)?
            .take(size)
            .read_to_end(&mut buffer)?;
        if (buffer.len() as u64) < size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read {} of {size} bytes", buffer.len()),
            ));
        }
        Ok(buffer)
    }
}

/// Parses records from the start of a log file's bytes; returns them and where the valid
/// part ends.
pub fn parse_records(bytes: &[u8], first_seq: Option<u64>) -> (Vec<Record>, u64) {
    let mut records = Vec::new();
    let mut position = 0usize;
    let mut expected = first_seq;
    let header_len = HEADER_BYTES;
    while position + header_len <= bytes.len() {
        let mut header = [0u8; HEADER_BYTES];
        header.copy_from_slice(&bytes[position..position + header_len]);
        let Some(record) = parse_header(&header, position as u64) else {
            break;
        };
        if expected.is_some_and(|seq| seq != record.seq) {
            break;
        }
        let data_length = usize::try_from(record.data_length()).unwrap_or(usize::MAX);
        let data_start = position + header_len;
        if data_length > bytes.len() - data_start {
            break;
        }
        let data = &bytes[data_start..data_start + data_length];
        let crc = crc32c::crc32c_append(crc32c::crc32c(&header[..28]), data);
        if crc.to_le_bytes() != header[28..32] {
            break;
        }
        expected = Some(record.seq + 1);
        position = data_start + data_length;
        records.push(record);
    }
    (records, position as u64)
}

fn parse_header(header: &[u8; HEADER_BYTES], position: u64) -> Option<Record> {
    let word = |at: usize| {
        u32::from_le_bytes([header[at], header[at + 1], header[at + 2], header[at + 3]])
    };
    let long = |at: usize| {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(&header[at..at + 8]);
        u64::from_le_bytes(bytes)
    };
    if word(0) != RECORD_MAGIC {
        return None;
    }
    Some(Record {
        kind: RecordKind::from_byte(header[4])?,
        offset: long(8),
        length: word(16),
        seq: long(20),
        data_position: position + HEADER_LEN,
    })
}

/// fsyncs a directory so that a file created or removed in it stays so after a crash.
pub fn sync_directory(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The log files in `dir`, by sequence number.
pub fn list_files(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(seq) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        files.push((seq, entry.path()));
    }
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_returns_what_was_written_and_stops_at_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::create(dir.path(), 1, 1 << 20).unwrap();
        let mut position = 0;
        for seq in 0..3u64 {
            let record = encode_record(
                RecordKind::Write,
                seq * 4096,
                4096,
                10 + seq,
                &[u8::try_from(seq).unwrap(); 4096],
            );
            log.write_at(&record, position).unwrap();
            position += record.len() as u64;
        }
        let zero = encode_record(RecordKind::Zero, 0, 8192, 13, &[]);
        log.write_at(&zero, position).unwrap();
        position += zero.len() as u64;
        let (records, end) = parse_records(&log.read_all().unwrap(), Some(10));
        assert_eq!(records.len(), 4);
        assert_eq!(end, position);
        assert_eq!(records[3].kind, RecordKind::Zero);

        // Tear the last write: only the records before it survive.
        let (records, _) = {
            let mut flipped = [0u8; 1];
            log.read_at(&mut flipped, 2 * (32 + 4096) + 100).unwrap();
            flipped[0] ^= 0xff;
            log.write_at(&flipped, 2 * (32 + 4096) + 100).unwrap();
            parse_records(&log.read_all().unwrap(), Some(10))
        };
        assert_eq!(records.len(), 2);

        // A file that does not continue the sequence is not replayed.
        assert!(
            parse_records(&log.read_all().unwrap(), Some(11))
                .0
                .is_empty()
        );
    }

    #[test]
    fn a_sync_returns_only_once_a_sync_in_progress_has_finished() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(LogFile::create(dir.path(), 1, 1 << 20).unwrap());
        log.write_at(b"acknowledged", 0).unwrap();
        // Another thread (the uploader) has taken the dirty flag and is inside fdatasync.
        let in_progress = log.syncing.lock().unwrap();
        assert!(log.dirty.swap(false, Ordering::AcqRel));
        let (done, finished) = std::sync::mpsc::channel();
        let flusher = std::thread::spawn({
            let log = log.clone();
            move || {
                log.sync().unwrap();
                done.send(()).unwrap();
            }
        });
        assert!(
            finished
                .recv_timeout(std::time::Duration::from_millis(200))
                .is_err(),
            "a flush returned while the data was still being synced"
        );
        drop(in_progress);
        finished
            .recv_timeout(std::time::Duration::from_secs(30))
            .unwrap();
        flusher.join().unwrap();
    }
}
