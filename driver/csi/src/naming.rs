//! Mapping CSI names onto block-storage ids.
//!
//! The block-storage API names a volume or snapshot by its id: 1 to 128 characters of
//! `[a-z0-9._-]`, starting with a letter or digit (`blockgate_blockstore::keys::validate_id`). A CSI name that already is such an id
//! is used as it is (the external-provisioner's `pvc-<uid>` and the snapshotter's
//! `snapshot-<uid>` always are), so ids stay readable in the bucket. Any other name maps to
//! `csi-` followed by the lowercase hex SHA-256 of the name: deterministic, so a retried
//! CreateVolume or CreateSnapshot finds what the first call made, and always a valid id.

use sha2::{Digest, Sha256};

/// The longest id the block-storage API accepts.
const MAX_ID_LEN: usize = 128;
/// The prefix of ids derived from names that are not valid ids.
const HASHED_PREFIX: &str = "csi-";

/// Whether the block-storage API accepts `name` as an id.
pub fn is_valid_id(name: &str) -> bool {
    let mut chars = name.chars();
    let Some(first) = chars.next() else {
        return false;
    };
    name.len() <= MAX_ID_LEN
        && (first.is_ascii_lowercase() || first.is_ascii_digit())
        && chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'))
}

/// The block-storage id for the CSI volume or snapshot name `name` (not empty).
pub fn id_for_name(name: &str) -> String {
    if is_valid_id(name) {
        return name.to_owned();
    }
    let digest = Sha256::digest(name.as_bytes());
    let mut id = String::with_capacity(HASHED_PREFIX.len() + 64);
    id.push_str(HASHED_PREFIX);
    for byte in digest.iter() {
        id.push(hex_digit(byte >> 4));
        id.push(hex_digit(byte & 0x0f));
    }
    id
}

fn hex_digit(nibble: u8) -> char {
    char::from(b"0123456789abcdef"[usize::from(nibble & 0x0f)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids_are_kept() {
        for name in [
            "pvc-0b4f9c1e-7d7a-4f5e-9a43-1c2d3e4f5a6b",
            "a",
            "snapshot-1.2_3",
            &"x".repeat(128),
        ] {
            assert!(is_valid_id(name), "{name}");
            assert_eq!(id_for_name(name), name);
        }
    }

    #[test]
    fn other_names_map_to_a_hash_deterministically() {
        for name in [
            "-starts-with-dash",
            ".dot",
            "has space",
            "slash/inside",
            "ünïcode",
            "Upper-Case",
            &"y".repeat(129),
        ] {
            assert!(!is_valid_id(name), "{name}");
            let id = id_for_name(name);
            assert!(id.starts_with("csi-"), "{id}");
            assert_eq!(id.len(), 4 + 64);
            assert!(is_valid_id(&id), "{id}");
            assert_eq!(id, id_for_name(name), "the mapping is deterministic");
        }
        assert_ne!(id_for_name("a b"), id_for_name("a  b"));
        // SHA-256("has space"), as sha256sum computes it.
        assert_eq!(
            id_for_name("has space"),
            "csi-47b5c36fc0b017ba576f10f988d0cbcbc78256dab5de0e4689980898e7c715e3"
        );
    }
}
