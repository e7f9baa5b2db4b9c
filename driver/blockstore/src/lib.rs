//! The object-store layout of blockgate, and its only owner.
//!
//! Everything that names a key in the bucket or encodes an object lives here: the key scheme
//! ([`keys`]), segments ([`segment`]), extent-map checkpoints ([`checkpoint`]) and the JSON
//! documents for volumes and snapshots ([`documents`]). The engine builds on these; nothing
//! else invents a key or a byte format.
//!
//! ```text
//! volumes/<volume-id>/volume.json                   descriptor, written once
//! volumes/<volume-id>/deleted.json                  tombstone, written once on delete
//! volumes/<volume-id>/segments/<epoch>-<seq>        immutable segment
//! volumes/<volume-id>/checkpoints/<epoch>-<seq>     extent-map checkpoint as of segment <seq>
//! snapshots/<snapshot-id>.json                      manifest, written once when ready
//! ```

pub mod checkpoint;
pub mod documents;
pub mod keys;
pub mod segment;

pub use keys::{Name, SegmentRef, validate_id};

/// Why an object could not be decoded. Every variant means the object is corrupt or not
/// ours; the caller reports an I/O error and never uses its contents.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("object is {actual} bytes, shorter than the {needed} its header requires")]
    Truncated { needed: u64, actual: u64 },
    #[error("bad magic: not a blockgate {what}")]
    BadMagic { what: &'static str },
    #[error("unsupported {what} format version {version}")]
    UnsupportedVersion { what: &'static str, version: u32 },
    #[error("{what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    ChecksumMismatch {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
}

pub(crate) fn read_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

pub(crate) fn read_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_le_bytes(b)
}
