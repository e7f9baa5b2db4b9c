//! What the node plugin remembers about each staged volume: one small JSON file per volume
//! in `--state-dir`, written atomically (temporary file, fsync, rename).
//!
//! The file is written once the gateway has attached the volume and removed once it is
//! detached, so after a crash it says which device a staged volume uses. It is a record,
//! never the truth about mounts: the node service checks the mount table and the gateway too.

use std::io::{ErrorKind, Write as _};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::naming;

/// A volume staged on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StagedVolume {
    pub volume_id: String,
    pub staging_target_path: PathBuf,
    /// The kernel block device the gateway attached.
    pub device_path: PathBuf,
    pub epoch: u64,
    pub read_only: bool,
    /// Raw block access rather than a filesystem.
    pub block: bool,
    /// The requested filesystem type as the capability spelled it (empty: the default).
    #[serde(default)]
    pub requested_fs_type: String,
    /// The filesystem on the device once it is mounted (`ext4` or `xfs`).
    #[serde(default)]
    pub fs_type: Option<String>,
    #[serde(default)]
    pub mount_flags: Vec<String>,
}

impl StagedVolume {
    /// Whether a stage request asking for `other` is the same stage as this one.
    pub fn same_stage(&self, other: &StagedVolume) -> bool {
        self.staging_target_path == other.staging_target_path
            && self.read_only == other.read_only
            && self.block == other.block
            && self.requested_fs_type == other.requested_fs_type
            && self.mount_flags == other.mount_flags
    }

    /// A short description for error messages.
    pub fn describe(&self) -> String {
        let access = if self.block {
            "block".to_owned()
        } else {
            let fs = if self.requested_fs_type.is_empty() {
                "default"
            } else {
                &self.requested_fs_type
            };
            format!("mount ({fs}, flags {:?})", self.mount_flags)
        };
        format!(
            "{access}, {}, at {}",
            if self.read_only {
                "read-only"
            } else {
                "read-write"
            },
            self.staging_target_path.display()
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot read the state file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the state file {} is corrupt", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write the state file {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The directory of state files.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: PathBuf) -> StateDir {
        StateDir { dir }
    }

    /// The file of `volume_id`; `None` for ids no volume can have (so never a path outside
    /// the directory).
    fn file(&self, volume_id: &str) -> Option<PathBuf> {
        naming::is_valid_id(volume_id).then(|| self.dir.join(format!("{volume_id}.json")))
    }

    pub fn load(&self, volume_id: &str) -> Result<Option<StagedVolume>, StateError> {
        let Some(path) = self.file(volume_id) else {
            return Ok(None);
        };
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StateError::Corrupt { path, source })
    }

    pub fn save(&self, volume: &StagedVolume) -> Result<(), StateError> {
        let Some(path) = self.file(&volume.volume_id) else {
            // The node service refuses such ids before it stages anything.
            return Ok(());
        };
        let write_error = |source| StateError::Write {
            path: path.clone(),
            source,
        };
        let bytes = serde_json::to_vec_pretty(volume)
            .map_err(|error| write_error(std::io::Error::other(error)))?;
        std::fs::create_dir_all(&self.dir).map_err(write_error)?;
        let temporary = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temporary).map_err(write_error)?;
        file.write_all(&bytes).map_err(write_error)?;
        file.sync_all().map_err(write_error)?;
        drop(file);
        std::fs::rename(&temporary, &path).map_err(write_error)?;
        // The rename itself must survive a crash too.
        if let Ok(dir) = std::fs::File::open(&self.dir) {
            let _ = dir.sync_all();
        }
        Ok(())
    }

    pub fn remove(&self, volume_id: &str) -> Result<(), StateError> {
        let Some(path) = self.file(volume_id) else {
            return Ok(());
        };
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Write { path, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged() -> StagedVolume {
        StagedVolume {
            volume_id: "pvc-1".into(),
            staging_target_path: "/staging/pvc-1".into(),
            device_path: "/dev/nbd0".into(),
            epoch: 3,
            read_only: false,
            block: false,
            requested_fs_type: "xfs".into(),
            fs_type: Some("xfs".into()),
            mount_flags: vec!["noatime".into()],
        }
    }

    #[test]
    fn state_files_round_trip_and_removal_is_idempotent() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = StateDir::new(dir.path().join("csi"));
        assert_eq!(state.load("pvc-1").expect("load"), None);
        state.save(&staged()).expect("save");
        assert_eq!(state.load("pvc-1").expect("load"), Some(staged()));
        state.remove("pvc-1").expect("remove");
        state.remove("pvc-1").expect("remove again");
        assert_eq!(state.load("pvc-1").expect("load"), None);
        // Ids no volume can have never name a file.
        assert_eq!(state.load("../etc/passwd").expect("load"), None);
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = StateDir::new(dir.path().to_owned());
        std::fs::write(dir.path().join("pvc-1.json"), b"{not json").expect("write");
        let error = state.load("pvc-1").expect_err("corrupt");
        assert!(error.to_string().contains("pvc-1.json"), "{error}");
    }

    #[test]
    fn stages_differ_by_path_access_and_flags_but_not_device() {
        let one = staged();
        let mut other = staged();
        other.device_path = "/dev/nbd3".into();
        other.epoch = 4;
        assert!(one.same_stage(&other));
        other.read_only = true;
        assert!(!one.same_stage(&other));
        let mut other = staged();
        other.mount_flags.clear();
        assert!(!one.same_stage(&other));
        assert!(one.describe().contains("xfs"), "{}", one.describe());
    }
}
