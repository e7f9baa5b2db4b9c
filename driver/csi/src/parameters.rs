//! StorageClass parameters (DESIGN.md §8): `mode`, `compression`, `encrypted`,
//! `storageGateway`, `fsType`. Keys under `csi.storage.k8s.io/` belong to the sidecars and are
//! ignored; any other key is refused so a typo never silently changes a volume.

use std::collections::HashMap;

use blockgate_proto::blockstore::v1::{Compression, VolumeMode};

use crate::capability::{self, CapabilityError};

/// Keys the Kubernetes sidecars add on their own.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParameterError {
    #[error(
        "parameter {key:?} is unknown (known: mode, compression, encrypted, storageGateway, fsType)"
    )]
    Unknown { key: String },
    #[error("parameter mode={0:?} is invalid (cached or stored)")]
    Mode(String),
    #[error("parameter compression={0:?} is invalid (none, lz4 or zstd)")]
    Compression(String),
    #[error("parameter encrypted={0:?} is invalid (true or false)")]
    Encrypted(String),
    #[error("parameter fsType is invalid")]
    FsType(#[source] CapabilityError),
}

/// Parsed StorageClass parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameters {
    pub mode: VolumeMode,
    /// `None` leaves the choice to the block-storage API.
    pub compression: Option<Compression>,
    /// `None` leaves the choice to the block-storage API.
    pub encrypted: Option<bool>,
    pub storage_gateway: Option<String>,
    pub fs_type: Option<String>,
}

impl Parameters {
    pub fn parse(parameters: &HashMap<String, String>) -> Result<Parameters, ParameterError> {
        let mut parsed = Parameters {
            mode: VolumeMode::Cached,
            compression: None,
            encrypted: None,
            storage_gateway: None,
            fs_type: None,
        };
        for (key, value) in parameters {
            match key.as_str() {
                "mode" => {
                    parsed.mode = match value.as_str() {
                        "cached" => VolumeMode::Cached,
                        "stored" => VolumeMode::Stored,
                        _ => return Err(ParameterError::Mode(value.clone())),
                    }
                }
                "compression" => {
                    parsed.compression = Some(match value.as_str() {
                        "none" => Compression::None,
                        "lz4" => Compression::Lz4,
                        "zstd" => Compression::Zstd,
                        _ => return Err(ParameterError::Compression(value.clone())),
                    })
                }
                "encrypted" => {
                    parsed.encrypted = Some(match value.as_str() {
                        "true" => true,
                        "false" => false,
                        _ => return Err(ParameterError::Encrypted(value.clone())),
                    })
                }
                "storageGateway" => parsed.storage_gateway = Some(value.clone()),
                "fsType" => {
                    capability::check_fs_type(value).map_err(ParameterError::FsType)?;
                    parsed.fs_type = Some(value.clone()).filter(|fs| !fs.is_empty());
                }
                key if key.starts_with(SIDECAR_PREFIX) => {}
                key => {
                    return Err(ParameterError::Unknown {
                        key: key.to_owned(),
                    });
                }
            }
        }
        Ok(parsed)
    }

    /// The volume context handed to the node plugin with every publish.
    pub fn volume_context(&self) -> HashMap<String, String> {
        let mut context = HashMap::new();
        context.insert("mode".to_owned(), mode_name(self.mode).to_owned());
        if let Some(compression) = self.compression {
            context.insert(
                "compression".to_owned(),
                compression_name(compression).to_owned(),
            );
        }
        if let Some(encrypted) = self.encrypted {
            context.insert("encrypted".to_owned(), encrypted.to_string());
        }
        if let Some(gateway) = &self.storage_gateway {
            context.insert("storageGateway".to_owned(), gateway.clone());
        }
        if let Some(fs_type) = &self.fs_type {
            context.insert("fsType".to_owned(), fs_type.clone());
        }
        context
    }
}

pub fn mode_name(mode: VolumeMode) -> &'static str {
    match mode {
        VolumeMode::Unspecified | VolumeMode::Cached => "cached",
        VolumeMode::Stored => "stored",
    }
}

pub fn compression_name(compression: Compression) -> &'static str {
    match compression {
        Compression::Unspecified => "default",
        Compression::None => "none",
        Compression::Lz4 => "lz4",
        Compression::Zstd => "zstd",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pairs: &[(&str, &str)]) -> Result<Parameters, ParameterError> {
        Parameters::parse(
            &pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    #[test]
    fn defaults_are_cached_and_the_api_choices() {
        let parsed = parse(&[]).expect("empty parameters are valid");
        assert_eq!(parsed.mode, VolumeMode::Cached);
        assert_eq!(parsed.compression, None);
        assert_eq!(parsed.encrypted, None);
        assert_eq!(
            parsed.volume_context().get("mode").map(String::as_str),
            Some("cached")
        );
    }

    #[test]
    fn every_known_parameter_parses() {
        let parsed = parse(&[
            ("mode", "stored"),
            ("compression", "zstd"),
            ("encrypted", "true"),
            ("storageGateway", "fleet-a"),
            ("fsType", "xfs"),
            ("csi.storage.k8s.io/pvc/name", "data"),
            ("csi.storage.k8s.io/provisioner-secret-name", "s3"),
        ])
        .expect("valid parameters");
        assert_eq!(
            parsed,
            Parameters {
                mode: VolumeMode::Stored,
                compression: Some(Compression::Zstd),
                encrypted: Some(true),
                storage_gateway: Some("fleet-a".into()),
                fs_type: Some("xfs".into()),
            }
        );
        let context = parsed.volume_context();
        assert_eq!(context.get("fsType").map(String::as_str), Some("xfs"));
        assert_eq!(
            context.get("storageGateway").map(String::as_str),
            Some("fleet-a")
        );
        assert!(!context.keys().any(|k| k.starts_with("csi.storage.k8s.io/")));
    }

    #[test]
    fn bad_values_and_unknown_keys_are_named() {
        assert_eq!(
            parse(&[("mode", "hot")]),
            Err(ParameterError::Mode("hot".into()))
        );
        assert_eq!(
            parse(&[("compression", "gzip")]),
            Err(ParameterError::Compression("gzip".into()))
        );
        assert_eq!(
            parse(&[("encrypted", "yes")]),
            Err(ParameterError::Encrypted("yes".into()))
        );
        assert!(matches!(
            parse(&[("fsType", "btrfs")]),
            Err(ParameterError::FsType(_))
        ));
        let unknown = parse(&[("replicas", "3")]).expect_err("unknown key");
        assert!(unknown.to_string().contains("replicas"), "{unknown}");
    }
}
