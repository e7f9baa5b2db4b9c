//! Object keys. Epochs and sequence numbers are zero-padded so that lexicographic listing
//! order is numeric order.

use std::fmt;
use std::sync::Arc;

/// A segment or checkpoint name: the writer's fencing epoch and the sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name {
    pub epoch: u64,
    pub seq: u64,
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:010}-{:016}", self.epoch, self.seq)
    }
}

impl Name {
    /// Parses `<epoch>-<seq>` as written by [`Name`]'s `Display`.
    pub fn parse(text: &str) -> Option<Name> {
        let (epoch, seq) = text.split_once('-')?;
        if epoch.len() != 10 || seq.len() != 16 {
            return None;
        }
        Some(Name {
            epoch: epoch.parse().ok()?,
            seq: seq.parse().ok()?,
        })
    }
}

/// A segment of some volume: clones and restored volumes read segments of their source.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SegmentRef {
    pub volume: Arc<str>,
    pub name: Name,
}

impl SegmentRef {
    pub fn key(&self) -> String {
        segment_key(&self.volume, self.name)
    }
}

/// Volume and snapshot ids: 1–128 characters of `[a-z0-9._-]`, starting with a letter or
/// digit, so they are safe in keys, paths, NBD export names and Kubernetes names.
pub fn validate_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 128 {
        return Err(format!("id {id:?} must be 1 to 128 characters long"));
    }
    let first_ok = id
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let all_ok = id
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if !first_ok || !all_ok {
        return Err(format!(
            "id {id:?} may only contain a-z, 0-9, '.', '_' and '-', and must start with a letter or digit"
        ));
    }
    Ok(())
}

pub const VOLUMES_PREFIX: &str = "volumes/";
pub const SNAPSHOTS_PREFIX: &str = "snapshots/";

pub fn volume_prefix(volume: &str) -> String {
    format!("{VOLUMES_PREFIX}{volume}/")
}

pub fn descriptor_key(volume: &str) -> String {
    format!("{VOLUMES_PREFIX}{volume}/volume.json")
}

pub fn tombstone_key(volume: &str) -> String {
    format!("{VOLUMES_PREFIX}{volume}/deleted.json")
}

pub fn segments_prefix(volume: &str) -> String {
    format!("{VOLUMES_PREFIX}{volume}/segments/")
}

/// All segments of one epoch of a volume, in sequence order when listed.
pub fn segments_epoch_prefix(volume: &str, epoch: u64) -> String {
    format!("{VOLUMES_PREFIX}{volume}/segments/{epoch:010}-")
}

pub fn segment_key(volume: &str, name: Name) -> String {
    format!("{VOLUMES_PREFIX}{volume}/segments/{name}")
}

pub fn checkpoints_prefix(volume: &str) -> String {
    format!("{VOLUMES_PREFIX}{volume}/checkpoints/")
}

pub fn checkpoint_key(volume: &str, name: Name) -> String {
    format!("{VOLUMES_PREFIX}{volume}/checkpoints/{name}")
}

/// `volumes/<id>/attachments/`: one record per writer attachment, named by its epoch, and a
/// marker when it ended. Both are written once; the newest record without a marker is the
/// current writer.
pub fn attachments_prefix(volume: &str) -> String {
    format!("{VOLUMES_PREFIX}{volume}/attachments/")
}

pub fn attachment_key(volume: &str, epoch: u64) -> String {
    format!("{VOLUMES_PREFIX}{volume}/attachments/{epoch:010}.json")
}

pub fn detachment_key(volume: &str, epoch: u64) -> String {
    format!("{VOLUMES_PREFIX}{volume}/attachments/{epoch:010}.detached.json")
}

/// The epoch of an attachment record key, and whether it is the end marker.
pub fn attachment_of_key(key: &str) -> Option<(u64, bool)> {
    let file = key.rsplit('/').next()?;
    let (epoch, ended) = match file.strip_suffix(".detached.json") {
        Some(epoch) => (epoch, true),
        None => (file.strip_suffix(".json")?, false),
    };
    if epoch.len() != 10 {
        return None;
    }
    Some((epoch.parse().ok()?, ended))
}

/// `volumes/<id>/readers/<node>.json`: a read-only attachment; deleted when it ends.
pub fn readers_prefix(volume: &str) -> String {
    format!("{VOLUMES_PREFIX}{volume}/readers/")
}

pub fn reader_key(volume: &str, node: &str) -> String {
    format!("{VOLUMES_PREFIX}{volume}/readers/{node}.json")
}

pub const IMPORTS_PREFIX: &str = "imports/";

/// `imports/<snapshot-id>.json`: a snapshot being imported through the block-data API. Its
/// blocks are segments of the hidden volume [`import_volume`] until it completes.
pub fn import_key(snapshot: &str) -> String {
    format!("{IMPORTS_PREFIX}{snapshot}.json")
}

pub fn import_of_key(key: &str) -> Option<&str> {
    key.strip_prefix(IMPORTS_PREFIX)?.strip_suffix(".json")
}

/// The volume that holds an imported snapshot's data.
pub fn import_volume(snapshot: &str) -> String {
    format!("import.{snapshot}")
}

pub fn snapshot_key(snapshot: &str) -> String {
    format!("{SNAPSHOTS_PREFIX}{snapshot}.json")
}

/// The volume id of a key under `volumes/`, if it is one.
pub fn volume_of_key(key: &str) -> Option<&str> {
    let rest = key.strip_prefix(VOLUMES_PREFIX)?;
    let (id, _) = rest.split_once('/')?;
    Some(id)
}

/// A listing position just past every key of `volumes/<volume>/`, used to skip from one
/// volume to the next when listing volume ids without a delimiter.
pub fn after_volume(volume: &str) -> String {
    format!("{VOLUMES_PREFIX}{volume}/\u{7f}")
}

/// The snapshot id of a key under `snapshots/`.
pub fn snapshot_of_key(key: &str) -> Option<&str> {
    key.strip_prefix(SNAPSHOTS_PREFIX)?.strip_suffix(".json")
}

/// The name at the end of a segment or checkpoint key.
pub fn name_of_key(key: &str) -> Option<Name> {
    Name::parse(key.rsplit('/').next()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_sort_numerically_and_round_trip() {
        let a = Name { epoch: 2, seq: 9 };
        let b = Name { epoch: 2, seq: 10 };
        assert!(a.to_string() < b.to_string());
        assert_eq!(Name::parse(&b.to_string()), Some(b));
        assert_eq!(name_of_key(&segment_key("v", b)), Some(b));
        assert_eq!(Name::parse("1-2"), None);
    }

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("pvc-1234.a_b").is_ok());
        assert!(validate_id("").is_err());
        assert!(validate_id("-x").is_err());
        assert!(validate_id("A").is_err());
        assert!(validate_id("a/b").is_err());
        assert!(validate_id(&"a".repeat(129)).is_err());
    }

    #[test]
    fn keys_parse_back() {
        assert_eq!(volume_of_key(&descriptor_key("vol-1")), Some("vol-1"));
        assert_eq!(snapshot_of_key(&snapshot_key("s1")), Some("s1"));
        assert!(after_volume("a").as_str() > segment_key("a", Name { epoch: 9, seq: 9 }).as_str());
        assert!(after_volume("a").as_str() < descriptor_key("a0").as_str());
    }
}
