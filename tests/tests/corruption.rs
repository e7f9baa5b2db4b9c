//! One flipped byte inside a data frame of a segment in the bucket, as a bad disk or a buggy
//! object store would leave it: a gateway with a cold cache reports an I/O error for the
//! frame's range and never its bytes, serves every other range, and keeps serving (DESIGN.md
//! §9.3).

use std::path::{Path, PathBuf};
use std::time::Duration;

use blockgate_e2e::tools::qemu_io;
use blockgate_e2e::{GatewayOptions, TestDir, wait_until};

const HEADER_LEN: usize = 64;
const INDEX_ENTRY_LEN: usize = 32;
const FRAME_SIZE: u64 = 64 * 1024;
const CRC_LEN: u64 = 4;

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// Finds the segment object whose data run holds volume offset `offset`, and the object
/// offset of that byte, from the segment layout: a 64-byte header (entry count at 12, data
/// start at 40), 32-byte index entries (volume offset, length, object offset, kind), then
/// frames of up to 64 KiB each followed by a crc32c.
fn locate_byte(segments: &Path, offset: u64) -> (PathBuf, u64) {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(segments).expect("segments directory") {
        let path = entry.expect("directory entry").path();
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
        {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read segment");
        assert_eq!(
            &bytes[0..5],
            b"BGSEG",
            "{} is not a segment",
            path.display()
        );
        let entries = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        for index in 0..usize::try_from(entries).expect("fits") {
            let at = HEADER_LEN + index * INDEX_ENTRY_LEN;
            let (run_offset, run_length, object_offset) = (
                u64_at(&bytes, at),
                u64_at(&bytes, at + 8),
                u64_at(&bytes, at + 16),
            );
            let is_data = bytes[at + 24] == 0;
            if is_data && run_offset <= offset && offset < run_offset + run_length {
                let within = offset - run_offset;
                let frame = within / FRAME_SIZE;
                let position = object_offset + frame * (FRAME_SIZE + CRC_LEN) + within % FRAME_SIZE;
                found.push((path.clone(), position));
            }
        }
    }
    assert_eq!(
        found.len(),
        1,
        "expected exactly one segment holding volume offset {offset}: {found:?}"
    );
    found.remove(0)
}

fn flip_byte(path: &Path, position: u64) {
    let mut bytes = std::fs::read(path).expect("read segment");
    let index = usize::try_from(position).expect("fits");
    bytes[index] ^= 0x01;
    std::fs::write(path, bytes).expect("write segment");
}

/// A corrupt segment *index* (read when a gateway opens a volume from the bucket) is the
/// same kind of damage as a corrupt frame: it must take down at most its own volume. The
/// gateway starts, serves the intact volume, and never serves the damaged one's bytes.
#[test]
fn a_corrupt_segment_index_takes_only_its_own_volume_offline() {
    let dir = TestDir::new("corrupt-index");
    let bucket = dir.join("bucket");
    let options = GatewayOptions::new(dir.join("data"))
        .store_directory(&bucket)
        .volume("damaged=8MiB")
        .volume("intact=8MiB");
    let mut gateway = options.start();
    for volume in ["damaged", "intact"] {
        qemu_io(&gateway.uri(volume), &["write -P 0x5a 0 1M", "flush"]).expect_success();
        gateway.wait_uploaded(volume, Duration::from_secs(60));
    }
    gateway.stop();
    let (segment, _) = locate_byte(&bucket.join("volumes/damaged/segments"), 0);
    // The first index entry's volume offset.
    flip_byte(&segment, HEADER_LEN as u64 + 1);

    let cold = options.with_data_dir(dir.join("cold")).start();
    qemu_io(
        &cold.uri("intact"),
        &["read -P 0x5a 0 1M", "read -P 0 1M 7M"],
    )
    .expect_success();
    let damaged = qemu_io(&cold.uri("damaged"), &["read -P 0x5a 0 1M"]);
    assert!(
        !damaged.success(),
        "bytes of a volume with a corrupt segment index were served: {damaged}"
    );
    assert!(
        cold.log().contains("damaged/segments"),
        "the gateway log does not name the corrupt object\n{}",
        cold.log_tail()
    );
}

/// A cached and a stored volume get the same data; one byte of the frame holding volume
/// bytes [512 KiB, 576 KiB) is flipped in each one's segment; a gateway on a fresh data
/// directory (cold cache, unhydrated copy) over the same bucket directory is asked for it.
#[test]
fn a_corrupt_frame_is_an_io_error_and_everything_else_still_reads() {
    let dir = TestDir::new("corruption");
    let bucket = dir.join("bucket");
    let options = GatewayOptions::new(dir.join("data"))
        .store_directory(&bucket)
        .volume("cached=8MiB")
        .volume("stored=8MiB:stored");
    let mut gateway = options.start();
    for volume in ["cached", "stored"] {
        qemu_io(
            &gateway.uri(volume),
            &["write -P 0x5a 0 1M", "write -P 0xa5 2M 1M", "flush"],
        )
        .expect_success();
        gateway.wait_uploaded(volume, Duration::from_secs(60));
    }
    gateway.stop();

    // 100 bytes into the frame of volume bytes [512 KiB, 576 KiB).
    let corrupt_offset = 512 * 1024 + 100;
    for volume in ["cached", "stored"] {
        let (segment, position) = locate_byte(
            &bucket.join("volumes").join(volume).join("segments"),
            corrupt_offset,
        );
        flip_byte(&segment, position);
    }

    let mut cold = options.with_data_dir(dir.join("cold")).start();
    for volume in ["cached", "stored"] {
        let uri = cold.uri(volume);
        let failed = qemu_io(&uri, &["read -P 0x5a 512k 64k"]).expect_failure();
        let output = format!("{}{}", failed.stdout(), failed.stderr());
        assert!(
            output.contains("Input/output error"),
            "{volume}: expected an I/O error: {failed}"
        );
        assert!(
            !output.contains("Pattern verification failed"),
            "{volume}: corrupt bytes were served as data: {failed}"
        );
        // One sector of the frame, and a read spanning good and bad frames, fail too.
        qemu_io(&uri, &["read 540k 512"]).expect_failure();
        qemu_io(&uri, &["read 256k 512k"]).expect_failure();
        // Everything else reads back.
        qemu_io(
            &uri,
            &[
                "read -P 0x5a 0 512k",
                "read -P 0x5a 576k 448k",
                "read -P 0 1M 1M",
                "read -P 0xa5 2M 1M",
                "read -P 0 3M 5M",
            ],
        )
        .expect_success();
        // Asked again (a cache may now hold the fetched bytes), still an error.
        qemu_io(&uri, &["read -P 0x5a 512k 64k"]).expect_failure();
        // The gateway keeps serving, and rewriting the range repairs it.
        qemu_io(
            &uri,
            &["write -P 0x77 512k 64k", "flush", "read -P 0x77 512k 64k"],
        )
        .expect_success();
        qemu_io(&uri, &["read -P 0x5a 0 512k", "read -P 0xa5 2M 1M"]).expect_success();
        let errors = cold
            .metric(
                "blockgate_volume_read_errors_total",
                &format!("{{volume=\"{volume}\"}}"),
            )
            .expect("read errors metric");
        assert!(errors >= 3.0, "{volume}: read_errors_total is {errors}");
    }
    assert!(cold.is_running(), "{}", cold.log_tail());
    // With the bad frame overwritten, nothing stops the stored volume's local copy from
    // completing (the corrupt bytes were never copied into it: the reads above saw 0x5a).
    wait_until(
        Duration::from_secs(60),
        "the stored volume to finish hydrating",
        || {
            let status = cold.volume_status("stored");
            if status["hydrated"] == true {
                Ok(())
            } else {
                Err(status.to_string())
            }
        },
    );
    qemu_io(
        &cold.uri("stored"),
        &[
            "read -P 0x5a 0 512k",
            "read -P 0x77 512k 64k",
            "read -P 0x5a 576k 448k",
            "read -P 0xa5 2M 1M",
        ],
    )
    .expect_success();
    assert!(
        cold.log().contains("checksum mismatch"),
        "the gateway log does not say what was wrong\n{}",
        cold.log_tail()
    );
}
