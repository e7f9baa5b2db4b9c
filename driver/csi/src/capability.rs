//! Which CSI volume capabilities blockgate supports.
//!
//! A blockgate volume has one writer node at a time (DESIGN.md §9.4), and any number of
//! reader nodes while no writer is attached. So the single-node modes and
//! MULTI_NODE_READER_ONLY are supported; the multi-node writer modes are not. Access types:
//! raw Block, or Mount with ext4 or xfs (empty means the plugin's default, ext4).

use blockgate_proto::csi::v1::{
    VolumeCapability,
    volume_capability::{AccessType, access_mode::Mode},
};

/// Filesystems the node plugin formats.
pub const SUPPORTED_FS_TYPES: [&str; 2] = ["ext4", "xfs"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    #[error("volume capability has no access mode")]
    MissingAccessMode,
    #[error("volume capability has no access type (block or mount)")]
    MissingAccessType,
    #[error("access mode {0} is unknown")]
    UnknownAccessMode(i32),
    #[error(
        "access mode {0} is not supported: a blockgate volume has one writer node; supported are \
         SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER, SINGLE_NODE_MULTI_WRITER, \
         SINGLE_NODE_READER_ONLY and MULTI_NODE_READER_ONLY"
    )]
    UnsupportedAccessMode(&'static str),
    #[error("filesystem type {0:?} is not supported (use ext4 or xfs)")]
    UnsupportedFsType(String),
}

/// What a supported capability asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checked {
    /// The capability allows no writes (a *_READER_ONLY mode).
    pub read_only: bool,
    /// Raw block access rather than a filesystem.
    pub block: bool,
}

/// Checks one capability.
pub fn check(capability: &VolumeCapability) -> Result<Checked, CapabilityError> {
    let mode = capability
        .access_mode
        .as_ref()
        .ok_or(CapabilityError::MissingAccessMode)?
        .mode;
    let mode = Mode::try_from(mode).map_err(|_| CapabilityError::UnknownAccessMode(mode))?;
    let read_only = match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter => {
            false
        }
        Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly => true,
        Mode::Unknown | Mode::MultiNodeSingleWriter | Mode::MultiNodeMultiWriter => {
            return Err(CapabilityError::UnsupportedAccessMode(mode.as_str_name()));
        }
    };
    let block = match capability
        .access_type
        .as_ref()
        .ok_or(CapabilityError::MissingAccessType)?
    {
        AccessType::Block(_) => true,
        AccessType::Mount(mount) => {
            check_fs_type(&mount.fs_type)?;
            false
        }
    };
    Ok(Checked { read_only, block })
}

/// Checks every capability of a request; `Ok` with the checked list when all are supported.
pub fn check_all(capabilities: &[VolumeCapability]) -> Result<Vec<Checked>, CapabilityError> {
    capabilities.iter().map(check).collect()
}

/// An empty filesystem type means the node plugin's default.
pub fn check_fs_type(fs_type: &str) -> Result<(), CapabilityError> {
    if fs_type.is_empty() || SUPPORTED_FS_TYPES.contains(&fs_type) {
        Ok(())
    } else {
        Err(CapabilityError::UnsupportedFsType(fs_type.to_owned()))
    }
}

#[cfg(test)]
pub mod fixtures {
    use blockgate_proto::csi::v1::{
        VolumeCapability,
        volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume, access_mode::Mode},
    };

    pub fn mount(mode: Mode, fs_type: &str) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode.into() }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs_type.to_owned(),
                ..MountVolume::default()
            })),
        }
    }

    pub fn block(mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode.into() }),
            access_type: Some(AccessType::Block(BlockVolume {})),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{block, mount};
    use super::*;

    #[test]
    fn single_node_modes_and_read_only_many_are_supported() {
        for (mode, read_only) in [
            (Mode::SingleNodeWriter, false),
            (Mode::SingleNodeSingleWriter, false),
            (Mode::SingleNodeMultiWriter, false),
            (Mode::SingleNodeReaderOnly, true),
            (Mode::MultiNodeReaderOnly, true),
        ] {
            assert_eq!(
                check(&block(mode)),
                Ok(Checked {
                    read_only,
                    block: true
                })
            );
            for fs in ["", "ext4", "xfs"] {
                assert_eq!(
                    check(&mount(mode, fs)),
                    Ok(Checked {
                        read_only,
                        block: false
                    })
                );
            }
        }
    }

    #[test]
    fn multi_node_writers_are_refused_by_name() {
        for mode in [
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
            Mode::Unknown,
        ] {
            let error = check(&block(mode)).expect_err("must be refused");
            assert!(error.to_string().contains(mode.as_str_name()), "{error}");
        }
        assert_eq!(
            check(&VolumeCapability {
                access_mode: Some(blockgate_proto::csi::v1::volume_capability::AccessMode {
                    mode: 99
                }),
                access_type: block(Mode::SingleNodeWriter).access_type,
            }),
            Err(CapabilityError::UnknownAccessMode(99))
        );
    }

    #[test]
    fn other_filesystems_and_incomplete_capabilities_are_refused() {
        assert_eq!(
            check(&mount(Mode::SingleNodeWriter, "btrfs")),
            Err(CapabilityError::UnsupportedFsType("btrfs".into()))
        );
        let mut no_type = block(Mode::SingleNodeWriter);
        no_type.access_type = None;
        assert_eq!(check(&no_type), Err(CapabilityError::MissingAccessType));
        let mut no_mode = block(Mode::SingleNodeWriter);
        no_mode.access_mode = None;
        assert_eq!(check(&no_mode), Err(CapabilityError::MissingAccessMode));
        assert!(
            check_all(&[
                block(Mode::SingleNodeWriter),
                block(Mode::MultiNodeMultiWriter)
            ])
            .is_err()
        );
    }
}
