//! The JSON documents in the bucket: volume descriptors, tombstones and snapshot manifests.
//! Each is written once and never changed.

use serde::{Deserialize, Serialize};

use crate::keys::Name;

pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The bucket is primary; a bounded local cache serves hot reads.
    Cached,
    /// A full local copy serves every read; writes are shadowed to the bucket.
    Stored,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(text: &str) -> Result<Mode, String> {
        match text {
            "cached" => Ok(Mode::Cached),
            "stored" => Ok(Mode::Stored),
            other => Err(format!(
                "unknown volume mode {other:?}: use cached or stored"
            )),
        }
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Cached => "cached",
            Mode::Stored => "stored",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Source {
    /// Restored from a snapshot; reads fall through to the snapshot's segments.
    Snapshot { snapshot: String },
    /// A clone of a volume, made through an internal snapshot of it.
    Volume { volume: String, snapshot: String },
}

impl Source {
    /// The snapshot whose data the volume reads until it has overwritten it.
    pub fn snapshot(&self) -> &str {
        match self {
            Source::Snapshot { snapshot } | Source::Volume { snapshot, .. } => snapshot,
        }
    }
}

/// `volumes/<id>/volume.json`: how the volume was created. Its current size is in its
/// newest checkpoint or segment, since expansion never rewrites this.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeDescriptor {
    pub format: u32,
    pub id: String,
    pub size: u64,
    pub block_size: u32,
    pub mode: Mode,
    pub created_unix: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
}

/// `volumes/<id>/deleted.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    pub format: u32,
    pub deleted_unix: u64,
}

/// `snapshots/<id>.json`, written when the snapshot's data is in the bucket: the volume as of
/// segment `point` is checkpoint `checkpoint` with `segments` applied in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    pub format: u32,
    pub id: String,
    pub volume: String,
    pub point: NameDoc,
    pub size: u64,
    pub block_size: u32,
    pub checkpoint: NameDoc,
    pub segments: Vec<NameDoc>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub created_unix: u64,
    /// Made by blockgate to clone a volume; deleted with the clone.
    #[serde(default)]
    pub internal: bool,
}

/// `volumes/<id>/attachments/<epoch>.json`: a gateway (node) became the volume's writer with
/// this epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub format: u32,
    pub volume: String,
    pub node: String,
    pub epoch: u64,
    pub attached_unix: u64,
}

/// `volumes/<id>/attachments/<epoch>.detached.json`: that writer attachment ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachmentRecord {
    pub format: u32,
    pub detached_unix: u64,
    /// Ended by a forced attach of another node (the writer was fenced), not by a detach.
    #[serde(default)]
    pub fenced: bool,
}

/// `volumes/<id>/readers/<node>.json`: a read-only attachment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReaderRecord {
    pub format: u32,
    pub volume: String,
    pub node: String,
    pub attached_unix: u64,
}

/// `imports/<snapshot-id>.json`: an import in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRecord {
    pub format: u32,
    pub snapshot: String,
    pub volume_size: u64,
    pub block_size: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    pub started_unix: u64,
    pub expires_unix: u64,
}

/// A [`Name`] as it appears in JSON: `"0000000001-0000000000000007"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameDoc(pub Name);

impl Serialize for NameDoc {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0.to_string())
    }
}

impl<'de> Deserialize<'de> for NameDoc {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<NameDoc, D::Error> {
        let text = String::deserialize(deserializer)?;
        Name::parse(&text)
            .map(NameDoc)
            .ok_or_else(|| serde::de::Error::custom(format!("bad segment name {text:?}")))
    }
}

/// Decodes a document, naming the key in the error.
pub fn decode<T: for<'de> Deserialize<'de>>(
    key: &str,
    bytes: &[u8],
) -> Result<T, crate::DecodeError> {
    serde_json::from_slice(bytes).map_err(|error| crate::DecodeError::Malformed {
        what: "document",
        reason: format!("{key}: {error}"),
    })
}

/// Encodes a document.
pub fn encode<T: Serialize>(document: &T) -> bytes::Bytes {
    // Serialising these plain structs cannot fail.
    bytes::Bytes::from(serde_json::to_vec_pretty(document).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trip() {
        let manifest = SnapshotManifest {
            format: FORMAT,
            id: "s1".into(),
            volume: "v1".into(),
            point: NameDoc(Name { epoch: 1, seq: 5 }),
            size: 1 << 30,
            block_size: 4096,
            checkpoint: NameDoc(Name { epoch: 1, seq: 0 }),
            segments: vec![NameDoc(Name { epoch: 1, seq: 1 })],
            parent: None,
            created_unix: 1,
            internal: false,
        };
        let bytes = encode(&manifest);
        assert_eq!(decode::<SnapshotManifest>("k", &bytes).unwrap(), manifest);
        assert!(decode::<SnapshotManifest>("k", b"{}").is_err());
    }
}
