//! Extent-map checkpoints: the whole map of a volume as of one segment, so that opening a
//! volume reads one checkpoint and the few segments after it instead of every segment ever
//! written.
//!
//! ```text
//! header (64 bytes)  magic, version, epoch, seq, volume size, segment count, extent count,
//!                    header crc32c
//! segment table      per segment: volume id length (u16), volume id, epoch, seq
//! extents            per extent (48 bytes): offset, length, segment index, run offset,
//!                    run length, skip
//! trailer            crc32c of everything between header and trailer
//! ```
//!
//! The segment table comes first so that a reader that only needs to know which segments a
//! checkpoint references (garbage collection) can stop there.

use std::sync::Arc;

use bytes::Bytes;

use crate::keys::{Name, SegmentRef};
use crate::segment::RunLocation;
use crate::{DecodeError, read_u32, read_u64};

pub const MAGIC: [u8; 8] = *b"BGCKPT\0\x01";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
const EXTENT_LEN: usize = 48;

/// A decoded checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub name: Name,
    pub volume_size: u64,
    pub segments: Vec<SegmentRef>,
    /// (volume offset, length, location), sorted and non-overlapping.
    pub extents: Vec<(u64, u64, RunLocation)>,
}

/// Encodes a checkpoint. `extents` must reference only indexes into `segments`.
pub fn encode<'a>(
    name: Name,
    volume_size: u64,
    segments: &[SegmentRef],
    extents: impl ExactSizeIterator<Item = (u64, u64, &'a RunLocation)>,
) -> Bytes {
    let extent_count = extents.len() as u64;
    let mut out =
        Vec::with_capacity(HEADER_LEN + segments.len() * 40 + extents.len() * EXTENT_LEN + 4);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&name.epoch.to_le_bytes());
    out.extend_from_slice(&name.seq.to_le_bytes());
    out.extend_from_slice(&volume_size.to_le_bytes());
    out.extend_from_slice(&(segments.len() as u64).to_le_bytes());
    out.extend_from_slice(&extent_count.to_le_bytes());
    out.resize(60, 0);
    let header_crc = crc32c::crc32c(&out[..60]);
    out.extend_from_slice(&header_crc.to_le_bytes());
    for segment in segments {
        let id = segment.volume.as_bytes();
        // Volume ids are at most 128 bytes (validate_id).
        let id_len = u16::try_from(id.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&id_len.to_le_bytes());
        out.extend_from_slice(&id[..usize::from(id_len)]);
        out.extend_from_slice(&segment.name.epoch.to_le_bytes());
        out.extend_from_slice(&segment.name.seq.to_le_bytes());
    }
    for (offset, length, location) in extents {
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&location.segment.to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
        out.extend_from_slice(&location.run_offset.to_le_bytes());
        out.extend_from_slice(&location.run_length.to_le_bytes());
        out.extend_from_slice(&location.skip.to_le_bytes());
    }
    let body_crc = crc32c::crc32c(&out[HEADER_LEN..]);
    out.extend_from_slice(&body_crc.to_le_bytes());
    Bytes::from(out)
}

struct Header {
    name: Name,
    volume_size: u64,
    segment_count: u64,
    extent_count: u64,
}

fn decode_header(bytes: &[u8]) -> Result<Header, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated {
            needed: HEADER_LEN as u64,
            actual: bytes.len() as u64,
        });
    }
    if bytes[..8] != MAGIC {
        return Err(DecodeError::BadMagic { what: "checkpoint" });
    }
    let stored = read_u32(bytes, 60);
    let computed = crc32c::crc32c(&bytes[..60]);
    if stored != computed {
        return Err(DecodeError::ChecksumMismatch {
            what: "checkpoint header",
            stored,
            computed,
        });
    }
    let version = read_u32(bytes, 8);
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion {
            what: "checkpoint",
            version,
        });
    }
    Ok(Header {
        name: Name {
            epoch: read_u64(bytes, 16),
            seq: read_u64(bytes, 24),
        },
        volume_size: read_u64(bytes, 32),
        segment_count: read_u64(bytes, 40),
        extent_count: read_u64(bytes, 48),
    })
}

fn malformed(reason: &str) -> DecodeError {
    DecodeError::Malformed {
        what: "checkpoint",
        reason: reason.to_string(),
    }
}

/// Decodes and verifies a whole checkpoint.
pub fn decode(bytes: &[u8]) -> Result<Checkpoint, DecodeError> {
    let header = decode_header(bytes)?;
    if bytes.len() < HEADER_LEN + 4 {
        return Err(DecodeError::Truncated {
            needed: HEADER_LEN as u64 + 4,
            actual: bytes.len() as u64,
        });
    }
    let body_end = bytes.len() - 4;
    let stored = read_u32(bytes, body_end);
    let computed = crc32c::crc32c(&bytes[HEADER_LEN..body_end]);
    if stored != computed {
        return Err(DecodeError::ChecksumMismatch {
            what: "checkpoint body",
            stored,
            computed,
        });
    }
    let body = &bytes[..body_end];
    let mut at = HEADER_LEN;
    let segment_count =
        usize::try_from(header.segment_count).map_err(|_| malformed("too many segments"))?;
    let mut segments = Vec::with_capacity(segment_count.min(1 << 20));
    let mut ids: Vec<Arc<str>> = Vec::new();
    for _ in 0..segment_count {
        if at + 2 > body.len() {
            return Err(malformed("segment table runs past the end"));
        }
        let id_len = usize::from(u16::from_le_bytes([body[at], body[at + 1]]));
        at += 2;
        if at + id_len + 16 > body.len() {
            return Err(malformed("segment table runs past the end"));
        }
        let id = std::str::from_utf8(&body[at..at + id_len])
            .map_err(|_| malformed("volume id is not utf-8"))?;
        // Consecutive entries usually share a volume: share the string.
        let volume = match ids.last() {
            Some(last) if &**last == id => last.clone(),
            _ => {
                let new: Arc<str> = Arc::from(id);
                ids.push(new.clone());
                new
            }
        };
        at += id_len;
        let name = Name {
            epoch: read_u64(body, at),
            seq: read_u64(body, at + 8),
        };
        at += 16;
        segments.push(SegmentRef { volume, name });
    }
    let extent_count =
        usize::try_from(header.extent_count).map_err(|_| malformed("too many extents"))?;
    if body.len() - at != extent_count.saturating_mul(EXTENT_LEN) {
        return Err(malformed("extent table size does not match its count"));
    }
    let mut extents = Vec::with_capacity(extent_count);
    let mut previous_end = 0u64;
    for entry in body[at..].chunks_exact(EXTENT_LEN) {
        let offset = read_u64(entry, 0);
        let length = read_u64(entry, 8);
        let location = RunLocation {
            segment: read_u32(entry, 16),
            run_offset: read_u64(entry, 24),
            run_length: read_u64(entry, 32),
            skip: read_u64(entry, 40),
        };
        let in_table = (location.segment as usize) < segments.len();
        let in_run = location
            .skip
            .checked_add(length)
            .is_some_and(|end| end <= location.run_length);
        if length == 0 || offset < previous_end || !in_table || !in_run {
            return Err(malformed(
                "extent empty, overlapping, or outside its run or segment table",
            ));
        }
        previous_end = offset
            .checked_add(length)
            .ok_or_else(|| malformed("extent overflows"))?;
        extents.push((offset, length, location));
    }
    Ok(Checkpoint {
        name: header.name,
        volume_size: header.volume_size,
        segments,
        extents,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<SegmentRef>, Vec<(u64, u64, RunLocation)>) {
        let a: Arc<str> = Arc::from("vol-a");
        let segments = vec![
            SegmentRef {
                volume: a.clone(),
                name: Name { epoch: 1, seq: 1 },
            },
            SegmentRef {
                volume: Arc::from("src"),
                name: Name { epoch: 4, seq: 9 },
            },
        ];
        let extents = vec![
            (
                0,
                4096,
                RunLocation {
                    segment: 0,
                    run_offset: 96,
                    run_length: 8192,
                    skip: 4096,
                },
            ),
            (
                1 << 40,
                512,
                RunLocation {
                    segment: 1,
                    run_offset: 64,
                    run_length: 512,
                    skip: 0,
                },
            ),
        ];
        (segments, extents)
    }

    #[test]
    fn round_trip() {
        let (segments, extents) = sample();
        let name = Name { epoch: 2, seq: 30 };
        let bytes = encode(
            name,
            1 << 41,
            &segments,
            extents.iter().map(|(o, l, loc)| (*o, *l, loc)),
        );
        let decoded = decode(&bytes).unwrap();
        assert_eq!(
            decoded,
            Checkpoint {
                name,
                volume_size: 1 << 41,
                segments,
                extents
            }
        );
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let (segments, extents) = sample();
        let bytes = encode(
            Name { epoch: 1, seq: 1 },
            1 << 41,
            &segments,
            extents.iter().map(|(o, l, loc)| (*o, *l, loc)),
        );
        for position in 0..bytes.len() {
            let mut bad = bytes.to_vec();
            bad[position] ^= 0x10;
            assert!(decode(&bad).is_err(), "flip at {position} went unnoticed");
        }
    }

    #[test]
    fn truncation_is_detected() {
        let (segments, extents) = sample();
        let bytes = encode(
            Name { epoch: 1, seq: 1 },
            1 << 41,
            &segments,
            extents.iter().map(|(o, l, loc)| (*o, *l, loc)),
        );
        for length in 0..bytes.len() {
            assert!(decode(&bytes[..length]).is_err());
        }
    }
}
