//! The CSI Node service (CSI spec v1.12): stages a volume by attaching it through this
//! node's gateway and mounting (or, for raw block, just recording) its kernel device, and
//! publishes it into pods by bind mounts.
//!
//! Every step first looks at what is already done (the state file, the mount table, the
//! gateway's attachments), so each RPC is idempotent and safe to repeat after a crash at any
//! point. A failed stage undoes what it did, but never detaches a device that something
//! still has mounted; this module never formats a device that carries any signature.

use std::collections::HashSet;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockgate_proto::csi::v1 as csi;
use blockgate_proto::gateway::v1 as gw;
use csi::node_service_capability::rpc::Type as Rpc;
use csi::volume_capability::AccessType;
use tonic::{Code, Request, Response, Status};
use tracing::Instrument as _;

use crate::capability::{self, CapabilityError};
use crate::controller::{PUBLISH_EPOCH, PUBLISH_READONLY};
use crate::errors::{CsiError, reply};
use crate::gateway::{Gateway, GatewayError};
use crate::host::{FsType, HostError, HostOps};
use crate::mount::{MountEntry, Signature, mount_at};
use crate::naming;
use crate::staging::{StagedVolume, StateDir, StateError};

/// The capabilities NodeGetCapabilities advertises.
const CAPABILITIES: [Rpc; 5] = [
    Rpc::StageUnstageVolume,
    Rpc::GetVolumeStats,
    Rpc::ExpandVolume,
    Rpc::VolumeCondition,
    Rpc::SingleNodeMultiWriter,
];

/// How long DetachVolume may upload before the gateway answers DEADLINE_EXCEEDED. Below
/// kubelet's 2-minute CSI call timeout, so kubelet sees UNAVAILABLE and retries rather than
/// cancelling the call.
const DETACH_TIMEOUT_SECONDS: u32 = 90;
/// How long NodeGetVolumeStats waits for the gateway's view of the volume.
const STATS_TIMEOUT: Duration = Duration::from_secs(3);
/// More mounts than this stacked at one path is not something a retry left behind.
const MAX_STACKED_MOUNTS: usize = 8;

#[derive(Debug)]
pub struct Node<H> {
    node_id: String,
    max_volumes_per_node: i64,
    gateway: Gateway,
    host: Arc<H>,
    state: StateDir,
    in_flight: Arc<Mutex<HashSet<String>>>,
}

impl<H: HostOps> Node<H> {
    pub fn new(
        node_id: String,
        max_volumes_per_node: i64,
        gateway: Gateway,
        host: H,
        state: StateDir,
    ) -> Node<H> {
        Node {
            node_id,
            max_volumes_per_node,
            gateway,
            host: Arc::new(host),
            state,
            in_flight: Arc::default(),
        }
    }

    /// Runs blocking host work (commands, procfs) off the async workers.
    async fn on_host<T: Send + 'static>(
        &self,
        work: impl FnOnce(&H) -> Result<T, HostError> + Send + 'static,
    ) -> Result<T, HostError> {
        let host = Arc::clone(&self.host);
        tokio::task::spawn_blocking(move || work(&host))
            .await
            .map_err(|_| HostError::Panicked)?
    }

    /// Claims `volume_id` for one RPC; `None` when another holds it (the spec's ABORTED).
    fn claim(&self, volume_id: &str) -> Option<VolumeClaim> {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        in_flight.insert(volume_id.to_owned()).then(|| VolumeClaim {
            in_flight: Arc::clone(&self.in_flight),
            volume_id: volume_id.to_owned(),
        })
    }

    /// Mount points that use `device`: mounts of its filesystem (and binds of them) and binds
    /// of the device node itself.
    async fn device_users(&self, device: &Path) -> Result<Vec<PathBuf>, HostError> {
        let device = device.to_owned();
        self.on_host(move |host| {
            let number = host.device_number(&device).ok();
            Ok(host
                .mounts()?
                .into_iter()
                .filter(|entry| {
                    mounts_device(entry, &device, number) || binds_device(entry, &device)
                })
                .map(|entry| entry.mount_point)
                .collect())
        })
        .await
    }
}

/// Releases a volume claimed by [`Node::claim`] when dropped.
#[derive(Debug)]
struct VolumeClaim {
    in_flight: Arc<Mutex<HashSet<String>>>,
    volume_id: String,
}

impl Drop for VolumeClaim {
    fn drop(&mut self) {
        self.in_flight
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.volume_id);
    }
}

/// A mount of the filesystem on `device` (or a bind of such a mount).
fn mounts_device(entry: &MountEntry, device: &Path, number: Option<(u32, u32)>) -> bool {
    Path::new(&entry.source) == device || number == Some((entry.major, entry.minor))
}

/// A bind of the device node itself (a raw block publish): the mount shows the node's file
/// in `/dev`'s filesystem.
fn binds_device(entry: &MountEntry, device: &Path) -> bool {
    matches!(entry.fs_type.as_str(), "devtmpfs" | "tmpfs")
        && entry.root.parent() == Some(Path::new("/"))
        && entry.root.file_name().is_some()
        && entry.root.file_name() == device.file_name()
}

/// Unmounts everything stacked at `path`; whether anything was mounted.
fn unmount_all<H: HostOps>(host: &H, path: &Path) -> Result<bool, HostError> {
    let resolved = host.resolve(path);
    let mut unmounted = false;
    for _ in 0..MAX_STACKED_MOUNTS {
        if mount_at(&host.mounts()?, &resolved).is_none() {
            return Ok(unmounted);
        }
        host.unmount(path)?;
        unmounted = true;
    }
    Err(HostError::Busy {
        path: path.to_owned(),
        command: "umount".to_owned(),
        stderr: format!("still mounted after {MAX_STACKED_MOUNTS} unmounts"),
    })
}

/// The CSI code for a host failure: a busy mount is the caller's to resolve; anything else
/// is ours.
fn host_code(error: &HostError) -> Code {
    match error {
        HostError::Busy { .. } => Code::FailedPrecondition,
        HostError::Spawn { .. }
        | HostError::Command { .. }
        | HostError::Read { .. }
        | HostError::MountInfo { .. }
        | HostError::Size { .. }
        | HostError::Panicked => Code::Internal,
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Mount options for staging: the requested flags plus what blockgate needs.
fn stage_mount_options(fs_type: FsType, read_only: bool, flags: &[String]) -> Vec<String> {
    let mut options = Vec::new();
    if read_only {
        options.push("ro".to_owned());
    }
    // Clones and restored snapshots carry their source's XFS UUID; without `nouuid` a
    // second one on the same node would refuse to mount. ext4 does not check.
    if fs_type == FsType::Xfs {
        options.push("nouuid".to_owned());
    }
    for flag in flags {
        if !options.contains(flag) {
            options.push(flag.clone());
        }
    }
    options
}

// ---------------------------------------------------------------------------------------
// NodeStageVolume

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error("volume_id is required")]
    MissingVolumeId,
    #[error("staging_target_path is required")]
    MissingStagingPath,
    #[error("volume_capability is required")]
    MissingCapability,
    #[error(transparent)]
    Capability(CapabilityError),
    #[error(
        "publish_context has no {PUBLISH_EPOCH}: a writer needs the epoch ControllerPublishVolume returned"
    )]
    MissingEpoch,
    #[error("publish_context {PUBLISH_EPOCH} {0:?} is not a number")]
    InvalidEpoch(String),
    #[error("volume {0} does not exist")]
    VolumeNotFound(String, #[source] Option<Status>),
    #[error(
        "volume {0} cannot be attached with this epoch: it was attached elsewhere since ControllerPublishVolume, or it is fenced"
    )]
    StaleEpoch(String, #[source] Status),
    #[error("no free kernel block device on this node")]
    NoFreeDevice(#[source] Status),
    #[error("the gateway attached volume {0} without a device path")]
    NoDevice(String),
    #[error(transparent)]
    Gateway(GatewayError),
    #[error("volume {volume} is already staged on this node as {staged}; requested {requested}")]
    StagedIncompatibly {
        volume: String,
        staged: String,
        requested: String,
    },
    #[error("staging path {} already holds another mount ({holder})", path.display())]
    StagingPathTaken { path: PathBuf, holder: String },
    #[error("{} holds {found}, not {requested}: refusing to mount or format it", device.display())]
    WrongFilesystem {
        device: PathBuf,
        found: Signature,
        requested: String,
    },
    #[error("{} has no filesystem and is attached read-only, so none can be created", device.display())]
    UnformattedReadOnly { device: PathBuf },
    #[error("cannot create a {} filesystem on {}", fs_type.as_str(), device.display())]
    Format {
        device: PathBuf,
        fs_type: FsType,
        #[source]
        error: HostError,
    },
    #[error("cannot mount {} at {}", device.display(), path.display())]
    Mount {
        device: PathBuf,
        path: PathBuf,
        #[source]
        error: HostError,
    },
    #[error(transparent)]
    Host(HostError),
    #[error(transparent)]
    State(StateError),
    #[error("another operation on volume {0} is in progress")]
    Pending(String),
}

impl CsiError for StageError {
    fn code(&self) -> Code {
        match self {
            Self::MissingVolumeId
            | Self::MissingStagingPath
            | Self::MissingCapability
            | Self::Capability(_)
            | Self::MissingEpoch
            | Self::InvalidEpoch(_) => Code::InvalidArgument,
            Self::VolumeNotFound(..) => Code::NotFound,
            Self::StaleEpoch(..)
            | Self::WrongFilesystem { .. }
            | Self::UnformattedReadOnly { .. } => Code::FailedPrecondition,
            Self::NoFreeDevice(_) => Code::ResourceExhausted,
            Self::StagedIncompatibly { .. } | Self::StagingPathTaken { .. } => Code::AlreadyExists,
            Self::Gateway(error) => error.code(),
            Self::Format { error, .. } | Self::Mount { error, .. } | Self::Host(error) => {
                host_code(error)
            }
            Self::NoDevice(_) | Self::State(_) => Code::Internal,
            Self::Pending(_) => Code::Aborted,
        }
    }
}

impl<H: HostOps> Node<H> {
    async fn stage(
        &self,
        request: csi::NodeStageVolumeRequest,
    ) -> Result<csi::NodeStageVolumeResponse, StageError> {
        if request.volume_id.is_empty() {
            return Err(StageError::MissingVolumeId);
        }
        if request.staging_target_path.is_empty() {
            return Err(StageError::MissingStagingPath);
        }
        let capability = request
            .volume_capability
            .as_ref()
            .ok_or(StageError::MissingCapability)?;
        let checked = capability::check(capability).map_err(StageError::Capability)?;
        let (requested_fs_type, mount_flags) = match &capability.access_type {
            Some(AccessType::Mount(mount)) => (mount.fs_type.clone(), mount.mount_flags.clone()),
            Some(AccessType::Block(_)) | None => (String::new(), Vec::new()),
        };
        let read_only = checked.read_only
            || request
                .publish_context
                .get(PUBLISH_READONLY)
                .is_some_and(|value| value == "true");
        let epoch = match request.publish_context.get(PUBLISH_EPOCH) {
            Some(text) => text
                .parse::<u64>()
                .map_err(|_| StageError::InvalidEpoch(text.clone()))?,
            None if read_only => 0,
            None => return Err(StageError::MissingEpoch),
        };
        let volume_id = request.volume_id;
        if !naming::is_valid_id(&volume_id) {
            return Err(StageError::VolumeNotFound(volume_id, None));
        }
        let _claim = self
            .claim(&volume_id)
            .ok_or_else(|| StageError::Pending(volume_id.clone()))?;
        let wanted = StagedVolume {
            volume_id: volume_id.clone(),
            staging_target_path: PathBuf::from(&request.staging_target_path),
            device_path: PathBuf::new(),
            epoch,
            read_only,
            block: checked.block,
            requested_fs_type,
            fs_type: None,
            mount_flags,
        };
        let previous = self.state.load(&volume_id).map_err(StageError::State)?;
        if let Some(previous) = &previous
            && !previous.same_stage(&wanted)
        {
            return Err(StageError::StagedIncompatibly {
                volume: volume_id,
                staged: previous.describe(),
                requested: wanted.describe(),
            });
        }

        // Attaching an attached volume again with the same epoch returns the same device.
        let attachment = self
            .gateway
            .client()
            .attach_volume(gw::AttachVolumeRequest {
                volume_id: volume_id.clone(),
                epoch,
                readonly: read_only,
                connections: 0,
            })
            .await
            .map_err(|status| match status.code() {
                Code::NotFound => StageError::VolumeNotFound(volume_id.clone(), Some(status)),
                Code::FailedPrecondition => StageError::StaleEpoch(volume_id.clone(), status),
                Code::ResourceExhausted => StageError::NoFreeDevice(status),
                _ => StageError::Gateway(self.gateway.error("AttachVolume", status)),
            })?
            .into_inner();
        if attachment.readonly != read_only {
            return Err(StageError::StagedIncompatibly {
                volume: volume_id,
                staged: format!(
                    "attached {} by the gateway",
                    if attachment.readonly {
                        "read-only"
                    } else {
                        "read-write"
                    }
                ),
                requested: wanted.describe(),
            });
        }
        if attachment.device_path.is_empty() {
            return Err(StageError::NoDevice(volume_id));
        }
        let mut record = StagedVolume {
            device_path: PathBuf::from(attachment.device_path),
            fs_type: previous
                .as_ref()
                .and_then(|previous| previous.fs_type.clone()),
            ..wanted
        };
        self.state.save(&record).map_err(StageError::State)?;
        tracing::info!(volume = %volume_id, device = %record.device_path.display(), epoch, read_only, "attached");
        if record.block {
            // Nothing goes at the staging path: publish binds the device node itself.
            return Ok(csi::NodeStageVolumeResponse {});
        }
        match self.mount_staging(&record).await {
            Ok(fs_type) => {
                if record.fs_type.as_deref() != Some(fs_type.as_str()) {
                    record.fs_type = Some(fs_type.as_str().to_owned());
                    self.state.save(&record).map_err(StageError::State)?;
                }
                Ok(csi::NodeStageVolumeResponse {})
            }
            Err(error) => {
                if previous.is_none() {
                    self.undo_stage(&record).await;
                }
                Err(error)
            }
        }
    }

    /// Mounts the staged device's filesystem at the staging path, creating the filesystem
    /// when the device is blank; the filesystem type mounted.
    async fn mount_staging(&self, record: &StagedVolume) -> Result<FsType, StageError> {
        let device = record.device_path.clone();
        let staging = record.staging_target_path.clone();
        let (mounts, resolved, number) = {
            let (device, staging) = (device.clone(), staging.clone());
            self.on_host(move |host| {
                Ok((
                    host.mounts()?,
                    host.resolve(&staging),
                    host.device_number(&device).ok(),
                ))
            })
            .await
            .map_err(StageError::Host)?
        };
        let requested = FsType::parse(&record.requested_fs_type).unwrap_or(FsType::Ext4);
        if let Some(entry) = mount_at(&mounts, &resolved) {
            if mounts_device(entry, &device, number) {
                return FsType::parse(&entry.fs_type).ok_or_else(|| StageError::WrongFilesystem {
                    device: device.clone(),
                    found: Signature::Filesystem(entry.fs_type.clone()),
                    requested: requested.as_str().to_owned(),
                });
            }
            return Err(StageError::StagingPathTaken {
                path: staging,
                holder: format!("{} ({})", entry.source, entry.fs_type),
            });
        }

        let signature = {
            let device = device.clone();
            self.on_host(move |host| host.probe_signature(&device))
                .await
                .map_err(StageError::Host)?
        };
        let fs_type = match signature {
            Signature::Empty if record.read_only => {
                return Err(StageError::UnformattedReadOnly { device });
            }
            Signature::Empty => {
                tracing::info!(volume = %record.volume_id, device = %device.display(), fs_type = requested.as_str(), "formatting a blank device");
                let target = device.clone();
                self.on_host(move |host| host.format(&target, requested))
                    .await
                    .map_err(|error| StageError::Format {
                        device: device.clone(),
                        fs_type: requested,
                        error,
                    })?;
                requested
            }
            Signature::Filesystem(ref found) => match FsType::parse(found) {
                // An empty fs_type takes whichever supported filesystem the volume has (a
                // restored snapshot keeps its source's).
                Some(fs_type) if record.requested_fs_type.is_empty() || fs_type == requested => {
                    fs_type
                }
                Some(_) | None => {
                    return Err(StageError::WrongFilesystem {
                        device,
                        found: signature,
                        requested: requested.as_str().to_owned(),
                    });
                }
            },
            Signature::Other(_) => {
                return Err(StageError::WrongFilesystem {
                    device,
                    found: signature,
                    requested: requested.as_str().to_owned(),
                });
            }
        };
        let options = stage_mount_options(fs_type, record.read_only, &record.mount_flags);
        {
            let (device, staging) = (device.clone(), staging.clone());
            self.on_host(move |host| host.mount(&device, &staging, fs_type, &options))
                .await
        }
        .map_err(|error| StageError::Mount {
            device,
            path: staging,
            error,
        })?;
        Ok(fs_type)
    }

    /// Detaches a volume whose first stage failed after the attach, unless something has
    /// its device mounted; failures are logged, the stage's own error is what the CO sees.
    async fn undo_stage(&self, record: &StagedVolume) {
        let volume = &record.volume_id;
        match self.device_users(&record.device_path).await {
            Ok(users) if users.is_empty() => {}
            Ok(users) => {
                tracing::warn!(%volume, ?users, "stage failed; the device is in use, so it stays attached");
                return;
            }
            Err(error) => {
                tracing::warn!(%volume, error = %crate::errors::chain(&error), "stage failed; cannot tell whether the device is in use, so it stays attached");
                return;
            }
        }
        match self
            .gateway
            .client()
            .detach_volume(gw::DetachVolumeRequest {
                volume_id: volume.clone(),
                timeout_seconds: DETACH_TIMEOUT_SECONDS,
            })
            .await
        {
            Ok(_) => {
                if let Err(error) = self.state.remove(volume) {
                    tracing::warn!(%volume, error = %crate::errors::chain(&error), "cannot remove the state file");
                }
                tracing::info!(%volume, "stage failed; detached again");
            }
            Err(status) => {
                tracing::warn!(%volume, code = ?status.code(), message = status.message(), "stage failed and the detach too; NodeUnstageVolume will retry it");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// NodeUnstageVolume

#[derive(Debug, thiserror::Error)]
pub enum UnstageError {
    #[error("volume_id is required")]
    MissingVolumeId,
    #[error("staging_target_path is required")]
    MissingStagingPath,
    #[error("cannot unmount the staging path {}", path.display())]
    Unmount {
        path: PathBuf,
        #[source]
        error: HostError,
    },
    #[error(
        "the device {} of volume {volume} is still mounted at {users:?}; unpublish it first",
        device.display()
    )]
    DeviceBusy {
        volume: String,
        device: PathBuf,
        users: Vec<PathBuf>,
    },
    #[error("cannot detach volume {0}")]
    Detach(String, #[source] GatewayError),
    #[error(transparent)]
    Gateway(GatewayError),
    #[error(transparent)]
    Host(HostError),
    #[error(transparent)]
    State(StateError),
    #[error("another operation on volume {0} is in progress")]
    Pending(String),
}

impl CsiError for UnstageError {
    fn code(&self) -> Code {
        match self {
            Self::MissingVolumeId | Self::MissingStagingPath => Code::InvalidArgument,
            Self::Unmount { error, .. } | Self::Host(error) => host_code(error),
            Self::DeviceBusy { .. } => Code::FailedPrecondition,
            // An upload that ran out of time is retried by the CO (the volume stays attached).
            Self::Detach(_, error) => match error.status.code() {
                Code::DeadlineExceeded | Code::Unavailable => Code::Unavailable,
                _ => error.code(),
            },
            Self::Gateway(error) => error.code(),
            Self::State(_) => Code::Internal,
            Self::Pending(_) => Code::Aborted,
        }
    }
}

impl<H: HostOps> Node<H> {
    async fn unstage(
        &self,
        request: csi::NodeUnstageVolumeRequest,
    ) -> Result<csi::NodeUnstageVolumeResponse, UnstageError> {
        if request.volume_id.is_empty() {
            return Err(UnstageError::MissingVolumeId);
        }
        if request.staging_target_path.is_empty() {
            return Err(UnstageError::MissingStagingPath);
        }
        let volume_id = request.volume_id;
        let staging = PathBuf::from(request.staging_target_path);
        let _claim = self
            .claim(&volume_id)
            .ok_or_else(|| UnstageError::Pending(volume_id.clone()))?;
        let record = self.state.load(&volume_id).map_err(UnstageError::State)?;

        // Which device: without a state file (a crash between attach and its write), the
        // gateway knows; an id no volume can have was never attached.
        let device = match record {
            Some(record) => Some(record.device_path),
            None if !naming::is_valid_id(&volume_id) => None,
            None => self
                .gateway
                .client()
                .list_attachments(gw::ListAttachmentsRequest {})
                .await
                .map_err(|status| {
                    UnstageError::Gateway(self.gateway.error("ListAttachments", status))
                })?
                .into_inner()
                .attachments
                .into_iter()
                .find(|attachment| attachment.volume_id == volume_id)
                .map(|attachment| PathBuf::from(attachment.device_path)),
        };
        // Refuse before touching anything while a publish still uses the device.
        if let Some(device) = &device {
            let staging_resolved = {
                let staging = staging.clone();
                self.on_host(move |host| Ok(host.resolve(&staging)))
                    .await
                    .map_err(UnstageError::Host)?
            };
            let users: Vec<PathBuf> = self
                .device_users(device)
                .await
                .map_err(UnstageError::Host)?
                .into_iter()
                .filter(|user| *user != staging_resolved)
                .collect();
            if !users.is_empty() {
                return Err(UnstageError::DeviceBusy {
                    volume: volume_id,
                    device: device.clone(),
                    users,
                });
            }
        }
        {
            let staging = staging.clone();
            self.on_host(move |host| unmount_all(host, &staging)).await
        }
        .map_err(|error| UnstageError::Unmount {
            path: staging.clone(),
            error,
        })?;
        let Some(device) = device else {
            return Ok(csi::NodeUnstageVolumeResponse {});
        };
        self.gateway
            .client()
            .detach_volume(gw::DetachVolumeRequest {
                volume_id: volume_id.clone(),
                timeout_seconds: DETACH_TIMEOUT_SECONDS,
            })
            .await
            .map_err(|status| {
                UnstageError::Detach(
                    volume_id.clone(),
                    self.gateway.error("DetachVolume", status),
                )
            })?;
        self.state.remove(&volume_id).map_err(UnstageError::State)?;
        tracing::info!(volume = %volume_id, device = %device.display(), "detached");
        Ok(csi::NodeUnstageVolumeResponse {})
    }
}

// ---------------------------------------------------------------------------------------
// NodePublishVolume

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("volume_id is required")]
    MissingVolumeId,
    #[error("target_path is required")]
    MissingTargetPath,
    #[error("staging_target_path is required (the plugin has STAGE_UNSTAGE_VOLUME)")]
    MissingStagingPath,
    #[error("volume_capability is required")]
    MissingCapability,
    #[error(transparent)]
    Capability(CapabilityError),
    #[error("volume {volume} is not staged at {}", staging.display())]
    NotStaged { volume: String, staging: PathBuf },
    #[error("volume {volume} is staged at {}, not at {}", staged.display(), requested.display())]
    StagedElsewhere {
        volume: String,
        staged: PathBuf,
        requested: PathBuf,
    },
    #[error("volume {volume} is staged for {staged} access; the publish asks for {requested}")]
    AccessTypeMismatch {
        volume: String,
        staged: &'static str,
        requested: &'static str,
    },
    #[error("{} already holds another mount or a publish with other options ({holder})", target.display())]
    PublishedIncompatibly { target: PathBuf, holder: String },
    #[error("cannot create the target {}", path.display())]
    CreateTarget {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("cannot bind {} onto {}", source_path.display(), target.display())]
    Bind {
        source_path: PathBuf,
        target: PathBuf,
        #[source]
        error: HostError,
    },
    #[error(transparent)]
    Host(HostError),
    #[error(transparent)]
    State(StateError),
    #[error("another operation on volume {0} is in progress")]
    Pending(String),
}

impl CsiError for PublishError {
    fn code(&self) -> Code {
        match self {
            Self::MissingVolumeId
            | Self::MissingTargetPath
            | Self::MissingStagingPath
            | Self::MissingCapability
            | Self::Capability(_) => Code::InvalidArgument,
            Self::NotStaged { .. }
            | Self::StagedElsewhere { .. }
            | Self::AccessTypeMismatch { .. } => Code::FailedPrecondition,
            Self::PublishedIncompatibly { .. } => Code::AlreadyExists,
            Self::Bind { error, .. } | Self::Host(error) => host_code(error),
            Self::CreateTarget { .. } | Self::State(_) => Code::Internal,
            Self::Pending(_) => Code::Aborted,
        }
    }
}

fn access_name(block: bool) -> &'static str {
    if block { "block" } else { "mount" }
}

impl<H: HostOps> Node<H> {
    async fn publish(
        &self,
        request: csi::NodePublishVolumeRequest,
    ) -> Result<csi::NodePublishVolumeResponse, PublishError> {
        if request.volume_id.is_empty() {
            return Err(PublishError::MissingVolumeId);
        }
        if request.target_path.is_empty() {
            return Err(PublishError::MissingTargetPath);
        }
        if request.staging_target_path.is_empty() {
            return Err(PublishError::MissingStagingPath);
        }
        let capability = request
            .volume_capability
            .as_ref()
            .ok_or(PublishError::MissingCapability)?;
        let checked = capability::check(capability).map_err(PublishError::Capability)?;
        let read_only = request.readonly || checked.read_only;
        let volume_id = request.volume_id;
        let staging = PathBuf::from(request.staging_target_path);
        let target = PathBuf::from(request.target_path);
        let _claim = self
            .claim(&volume_id)
            .ok_or_else(|| PublishError::Pending(volume_id.clone()))?;
        let record = self
            .state
            .load(&volume_id)
            .map_err(PublishError::State)?
            .ok_or_else(|| PublishError::NotStaged {
                volume: volume_id.clone(),
                staging: staging.clone(),
            })?;
        if record.staging_target_path != staging {
            return Err(PublishError::StagedElsewhere {
                volume: volume_id,
                staged: record.staging_target_path,
                requested: staging,
            });
        }
        if record.block != checked.block {
            return Err(PublishError::AccessTypeMismatch {
                volume: volume_id,
                staged: access_name(record.block),
                requested: access_name(checked.block),
            });
        }
        let (mounts, target_resolved, staging_resolved) = {
            let (target, staging) = (target.clone(), staging.clone());
            self.on_host(move |host| {
                Ok((
                    host.mounts()?,
                    host.resolve(&target),
                    host.resolve(&staging),
                ))
            })
            .await
            .map_err(PublishError::Host)?
        };
        let existing = mount_at(&mounts, &target_resolved);
        let source = if record.block {
            if let Some(entry) = existing {
                return if binds_device(entry, &record.device_path) && entry.read_only() == read_only
                {
                    Ok(csi::NodePublishVolumeResponse {})
                } else {
                    Err(incompatible(target, entry))
                };
            }
            record.device_path.clone()
        } else {
            let staged =
                mount_at(&mounts, &staging_resolved).ok_or_else(|| PublishError::NotStaged {
                    volume: volume_id.clone(),
                    staging: staging.clone(),
                })?;
            if let Some(entry) = existing {
                let same = (entry.major, entry.minor, &entry.root)
                    == (staged.major, staged.minor, &staged.root);
                return if same && entry.read_only() == read_only {
                    Ok(csi::NodePublishVolumeResponse {})
                } else {
                    Err(incompatible(target, entry))
                };
            }
            staging.clone()
        };

        let created =
            create_target(&target, record.block).map_err(|error| PublishError::CreateTarget {
                path: target.clone(),
                error,
            })?;
        let bound = {
            let (source, target) = (source.clone(), target.clone());
            self.on_host(move |host| host.bind_mount(&source, &target, read_only))
                .await
        };
        if let Err(error) = bound {
            if created {
                let _ = remove_target(&target);
            }
            return Err(PublishError::Bind {
                source_path: source,
                target,
                error,
            });
        }
        tracing::info!(volume = %volume_id, target = %target.display(), read_only, "published");
        Ok(csi::NodePublishVolumeResponse {})
    }
}

fn incompatible(target: PathBuf, entry: &MountEntry) -> PublishError {
    PublishError::PublishedIncompatibly {
        target,
        holder: format!(
            "{} {} of {}, {}",
            entry.fs_type,
            entry.root.display(),
            entry.source,
            if entry.read_only() { "ro" } else { "rw" }
        ),
    }
}

/// Creates the publish target (a directory, or an empty file for a device bind) if it is
/// not there; whether it created it.
fn create_target(target: &Path, block: bool) -> std::io::Result<bool> {
    match std::fs::symlink_metadata(target) {
        Ok(_) => return Ok(false),
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    if block {
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(target)?;
    } else {
        std::fs::create_dir_all(target)?;
    }
    Ok(true)
}

/// Removes a publish target (an empty directory or a file); gone already is fine.
fn remove_target(target: &Path) -> std::io::Result<()> {
    let removed = match std::fs::symlink_metadata(target) {
        Ok(metadata) if metadata.is_dir() => std::fs::remove_dir(target),
        Ok(_) => std::fs::remove_file(target),
        Err(error) => Err(error),
    };
    match removed {
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

// ---------------------------------------------------------------------------------------
// NodeUnpublishVolume

#[derive(Debug, thiserror::Error)]
pub enum UnpublishError {
    #[error("volume_id is required")]
    MissingVolumeId,
    #[error("target_path is required")]
    MissingTargetPath,
    #[error("cannot unmount {}", path.display())]
    Unmount {
        path: PathBuf,
        #[source]
        error: HostError,
    },
    #[error("cannot remove {} after unmounting it", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("another operation on volume {0} is in progress")]
    Pending(String),
}

impl CsiError for UnpublishError {
    fn code(&self) -> Code {
        match self {
            Self::MissingVolumeId | Self::MissingTargetPath => Code::InvalidArgument,
            Self::Unmount { error, .. } => host_code(error),
            Self::Remove { .. } => Code::Internal,
            Self::Pending(_) => Code::Aborted,
        }
    }
}

impl<H: HostOps> Node<H> {
    /// OK when the volume is not published at `target_path` (any more): the spec makes
    /// NodeUnpublishVolume idempotent, and the node cannot tell a volume that never existed
    /// from one already unpublished.
    async fn unpublish(
        &self,
        request: csi::NodeUnpublishVolumeRequest,
    ) -> Result<csi::NodeUnpublishVolumeResponse, UnpublishError> {
        if request.volume_id.is_empty() {
            return Err(UnpublishError::MissingVolumeId);
        }
        if request.target_path.is_empty() {
            return Err(UnpublishError::MissingTargetPath);
        }
        let volume_id = request.volume_id;
        let target = PathBuf::from(request.target_path);
        let _claim = self
            .claim(&volume_id)
            .ok_or_else(|| UnpublishError::Pending(volume_id.clone()))?;
        {
            let target = target.clone();
            self.on_host(move |host| unmount_all(host, &target)).await
        }
        .map_err(|error| UnpublishError::Unmount {
            path: target.clone(),
            error,
        })?;
        remove_target(&target).map_err(|error| UnpublishError::Remove {
            path: target.clone(),
            error,
        })?;
        tracing::info!(volume = %volume_id, target = %target.display(), "unpublished");
        Ok(csi::NodeUnpublishVolumeResponse {})
    }
}

// ---------------------------------------------------------------------------------------
// NodeExpandVolume

#[derive(Debug, thiserror::Error)]
pub enum ExpandError {
    #[error("volume_id is required")]
    MissingVolumeId,
    #[error("volume_path is required")]
    MissingVolumePath,
    #[error("capacity_range is invalid: {0}")]
    InvalidRange(&'static str),
    #[error("volume_path {} does not exist", .0.display())]
    PathNotFound(PathBuf),
    #[error("volume {0} is not staged on this node")]
    NotStaged(String),
    #[error(transparent)]
    Gateway(GatewayError),
    #[error("{} is {size} bytes after the gateway grew it to {required}", device.display())]
    DeviceNotGrown {
        device: PathBuf,
        size: u64,
        required: u64,
    },
    #[error("cannot grow the {} filesystem on {}", fs_type.as_str(), device.display())]
    Resize {
        device: PathBuf,
        fs_type: FsType,
        #[source]
        error: HostError,
    },
    #[error(transparent)]
    Host(HostError),
    #[error(transparent)]
    State(StateError),
    #[error("another operation on volume {0} is in progress")]
    Pending(String),
}

impl CsiError for ExpandError {
    fn code(&self) -> Code {
        match self {
            Self::MissingVolumeId | Self::MissingVolumePath | Self::InvalidRange(_) => {
                Code::InvalidArgument
            }
            Self::PathNotFound(_) | Self::NotStaged(_) => Code::NotFound,
            Self::Gateway(error) => error.code(),
            Self::Resize { error, .. } | Self::Host(error) => host_code(error),
            Self::DeviceNotGrown { .. } | Self::State(_) => Code::Internal,
            Self::Pending(_) => Code::Aborted,
        }
    }
}

impl<H: HostOps> Node<H> {
    async fn expand(
        &self,
        request: csi::NodeExpandVolumeRequest,
    ) -> Result<csi::NodeExpandVolumeResponse, ExpandError> {
        if request.volume_id.is_empty() {
            return Err(ExpandError::MissingVolumeId);
        }
        if request.volume_path.is_empty() {
            return Err(ExpandError::MissingVolumePath);
        }
        let (required, limit) = request
            .capacity_range
            .map(|range| (range.required_bytes, range.limit_bytes))
            .unwrap_or_default();
        let required = u64::try_from(required)
            .map_err(|_| ExpandError::InvalidRange("negative required_bytes"))?;
        let limit =
            u64::try_from(limit).map_err(|_| ExpandError::InvalidRange("negative limit_bytes"))?;
        if limit != 0 && required > limit {
            return Err(ExpandError::InvalidRange(
                "required_bytes above limit_bytes",
            ));
        }
        let volume_path = PathBuf::from(request.volume_path);
        if std::fs::symlink_metadata(&volume_path).is_err() {
            return Err(ExpandError::PathNotFound(volume_path));
        }
        let volume_id = request.volume_id;
        let _claim = self
            .claim(&volume_id)
            .ok_or_else(|| ExpandError::Pending(volume_id.clone()))?;
        let record = self
            .state
            .load(&volume_id)
            .map_err(ExpandError::State)?
            .ok_or_else(|| ExpandError::NotStaged(volume_id.clone()))?;
        let device = record.device_path.clone();
        let device_size = |device: PathBuf| self.on_host(move |host| host.device_size(&device));
        let mut size = device_size(device.clone())
            .await
            .map_err(ExpandError::Host)?;
        if required > size {
            self.gateway
                .client()
                .expand_volume(gw::ExpandVolumeRequest {
                    volume_id: volume_id.clone(),
                    size_bytes: required,
                })
                .await
                .map_err(|status| {
                    ExpandError::Gateway(self.gateway.error("ExpandVolume", status))
                })?;
            size = device_size(device.clone())
                .await
                .map_err(ExpandError::Host)?;
            if size < required {
                return Err(ExpandError::DeviceNotGrown {
                    device,
                    size,
                    required,
                });
            }
        }
        // A read-only filesystem cannot be grown; its readers see the new size on the next stage.
        if !record.block && !record.read_only {
            let fs_type = record
                .fs_type
                .as_deref()
                .and_then(FsType::parse)
                .ok_or_else(|| ExpandError::NotStaged(volume_id.clone()))?;
            let (target, staging) = (device.clone(), record.staging_target_path.clone());
            self.on_host(move |host| host.resize_fs(fs_type, &target, &staging))
                .await
                .map_err(|error| ExpandError::Resize {
                    device,
                    fs_type,
                    error,
                })?;
        }
        tracing::info!(volume = %volume_id, size, "expanded");
        Ok(csi::NodeExpandVolumeResponse {
            capacity_bytes: to_i64(size),
        })
    }
}

// ---------------------------------------------------------------------------------------
// NodeGetVolumeStats

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("volume_id is required")]
    MissingVolumeId,
    #[error("volume_path is required")]
    MissingVolumePath,
    #[error("volume_path {} does not exist", .0.display())]
    PathNotFound(PathBuf),
    #[error("volume {0} is not staged on this node")]
    NotStaged(String),
    #[error(transparent)]
    Host(HostError),
    #[error(transparent)]
    State(StateError),
}

impl CsiError for StatsError {
    fn code(&self) -> Code {
        match self {
            Self::MissingVolumeId | Self::MissingVolumePath => Code::InvalidArgument,
            Self::PathNotFound(_) | Self::NotStaged(_) => Code::NotFound,
            Self::Host(error) => host_code(error),
            Self::State(_) => Code::Internal,
        }
    }
}

fn usage(unit: csi::volume_usage::Unit, total: u64, available: u64, used: u64) -> csi::VolumeUsage {
    csi::VolumeUsage {
        available: to_i64(available),
        total: to_i64(total),
        used: to_i64(used),
        unit: unit.into(),
    }
}

impl<H: HostOps> Node<H> {
    async fn stats(
        &self,
        request: csi::NodeGetVolumeStatsRequest,
    ) -> Result<csi::NodeGetVolumeStatsResponse, StatsError> {
        use csi::volume_usage::Unit;
        if request.volume_id.is_empty() {
            return Err(StatsError::MissingVolumeId);
        }
        if request.volume_path.is_empty() {
            return Err(StatsError::MissingVolumePath);
        }
        let volume_path = PathBuf::from(request.volume_path);
        if std::fs::symlink_metadata(&volume_path).is_err() {
            return Err(StatsError::PathNotFound(volume_path));
        }
        let volume_id = request.volume_id;
        let record = self
            .state
            .load(&volume_id)
            .map_err(StatsError::State)?
            .ok_or_else(|| StatsError::NotStaged(volume_id.clone()))?;
        let (usage, problem) = if record.block {
            let device = record.device_path.clone();
            let size = self
                .on_host(move |host| host.device_size(&device))
                .await
                .map_err(StatsError::Host)?;
            (vec![usage(Unit::Bytes, size, 0, 0)], None)
        } else {
            let path = volume_path.clone();
            let (stats, mounted) = self
                .on_host(move |host| {
                    let mounted = mount_at(&host.mounts()?, &host.resolve(&path)).is_some();
                    Ok((host.statvfs(&path)?, mounted))
                })
                .await
                .map_err(StatsError::Host)?;
            (
                vec![
                    usage(
                        Unit::Bytes,
                        stats.total_bytes,
                        stats.available_bytes,
                        stats.used_bytes,
                    ),
                    usage(
                        Unit::Inodes,
                        stats.total_inodes,
                        stats.free_inodes,
                        stats.used_inodes,
                    ),
                ],
                (!mounted).then(|| format!("{} is not mounted", volume_path.display())),
            )
        };
        let volume_condition = match problem {
            Some(message) => csi::VolumeCondition {
                abnormal: true,
                message,
            },
            None => self.volume_condition(&volume_id).await,
        };
        Ok(csi::NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(volume_condition),
        })
    }

    /// The gateway's view of the volume; a gateway that does not answer makes the volume
    /// abnormal rather than the call an error.
    async fn volume_condition(&self, volume_id: &str) -> csi::VolumeCondition {
        let mut client = self.gateway.client();
        let call = client.get_volume_stats(gw::GetVolumeStatsRequest {
            volume_id: volume_id.to_owned(),
        });
        let (abnormal, message) = match tokio::time::timeout(STATS_TIMEOUT, call).await {
            Ok(Ok(stats)) => {
                let stats = stats.into_inner();
                let condition = stats.condition.unwrap_or_default();
                if stats.fenced {
                    (
                        true,
                        format!(
                            "fenced: volume {volume_id} was attached elsewhere after epoch {}; writes here fail",
                            stats.epoch
                        ),
                    )
                } else if condition.abnormal {
                    (true, condition.message)
                } else if condition.message.is_empty() {
                    (false, "healthy".to_owned())
                } else {
                    (false, condition.message)
                }
            }
            Ok(Err(status)) => (
                true,
                format!(
                    "the gateway ({}) cannot report on the volume: {:?}: {}",
                    self.gateway.socket().display(),
                    status.code(),
                    status.message()
                ),
            ),
            Err(_) => (
                true,
                format!(
                    "the gateway ({}) did not answer within {STATS_TIMEOUT:?}",
                    self.gateway.socket().display()
                ),
            ),
        };
        csi::VolumeCondition { abnormal, message }
    }
}

// ---------------------------------------------------------------------------------------
// The service.

#[tonic::async_trait]
impl<H: HostOps> csi::node_server::Node for Node<H> {
    async fn node_stage_volume(
        &self,
        request: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::info_span!("NodeStageVolume", volume = %request.volume_id);
        reply(
            "NodeStageVolume",
            self.stage(request).instrument(span).await,
        )
    }

    async fn node_unstage_volume(
        &self,
        request: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::info_span!("NodeUnstageVolume", volume = %request.volume_id);
        reply(
            "NodeUnstageVolume",
            self.unstage(request).instrument(span).await,
        )
    }

    async fn node_publish_volume(
        &self,
        request: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::info_span!("NodePublishVolume", volume = %request.volume_id);
        reply(
            "NodePublishVolume",
            self.publish(request).instrument(span).await,
        )
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::info_span!("NodeUnpublishVolume", volume = %request.volume_id);
        reply(
            "NodeUnpublishVolume",
            self.unpublish(request).instrument(span).await,
        )
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::debug_span!("NodeGetVolumeStats", volume = %request.volume_id);
        reply(
            "NodeGetVolumeStats",
            self.stats(request).instrument(span).await,
        )
    }

    async fn node_expand_volume(
        &self,
        request: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let request = request.into_inner();
        let span = tracing::info_span!("NodeExpandVolume", volume = %request.volume_id);
        reply(
            "NodeExpandVolume",
            self.expand(request).instrument(span).await,
        )
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: CAPABILITIES
                .iter()
                .map(|rpc| csi::NodeServiceCapability {
                    r#type: Some(csi::node_service_capability::Type::Rpc(
                        csi::node_service_capability::Rpc {
                            r#type: (*rpc).into(),
                        },
                    )),
                })
                .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _request: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: self.max_volumes_per_node,
            accessible_topology: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use csi::volume_capability::access_mode::Mode;

    use super::*;
    use crate::capability::fixtures::{block, mount};
    use crate::controller::PUBLISH_NODE;
    use crate::fixtures::{FakeGateway, FakeHost};

    const GIB: u64 = 1 << 30;

    struct Harness {
        node: Node<FakeHost>,
        host: FakeHost,
        gateway: FakeGateway,
        dir: tempfile::TempDir,
        server: tokio::task::JoinHandle<()>,
    }

    impl Drop for Harness {
        fn drop(&mut self) {
            self.server.abort();
        }
    }

    async fn harness() -> Harness {
        let dir = tempfile::tempdir().expect("temp dir");
        let host = FakeHost::default();
        let gateway = FakeGateway::new(host.clone());
        gateway.add_volume("pvc-1", GIB);
        let socket = dir.path().join("node.sock");
        let server = gateway.serve(&socket);
        std::fs::create_dir_all(dir.path().join("staging/pvc-1")).expect("staging dir");
        std::fs::create_dir_all(dir.path().join("pods/uid-a")).expect("pod dir");
        std::fs::create_dir_all(dir.path().join("pods/uid-b")).expect("pod dir");
        let node = Node::new(
            "node-a".into(),
            0,
            Gateway::connect_lazy(socket),
            host.clone(),
            StateDir::new(dir.path().join("state")),
        );
        Harness {
            node,
            host,
            gateway,
            dir,
            server,
        }
    }

    impl Harness {
        fn staging(&self) -> PathBuf {
            self.dir.path().join("staging/pvc-1")
        }

        fn target(&self, pod: &str) -> PathBuf {
            self.dir.path().join("pods").join(pod).join("mount")
        }

        fn stage_request(&self, capability: csi::VolumeCapability) -> csi::NodeStageVolumeRequest {
            csi::NodeStageVolumeRequest {
                volume_id: "pvc-1".into(),
                publish_context: HashMap::from([
                    (PUBLISH_EPOCH.to_owned(), "7".to_owned()),
                    (PUBLISH_NODE.to_owned(), "node-a".to_owned()),
                    (PUBLISH_READONLY.to_owned(), "false".to_owned()),
                ]),
                staging_target_path: self.staging().display().to_string(),
                volume_capability: Some(capability),
                ..Default::default()
            }
        }

        fn publish_request(
            &self,
            pod: &str,
            capability: csi::VolumeCapability,
            readonly: bool,
        ) -> csi::NodePublishVolumeRequest {
            csi::NodePublishVolumeRequest {
                volume_id: "pvc-1".into(),
                staging_target_path: self.staging().display().to_string(),
                target_path: self.target(pod).display().to_string(),
                volume_capability: Some(capability),
                readonly,
                ..Default::default()
            }
        }

        fn unpublish_request(&self, pod: &str) -> csi::NodeUnpublishVolumeRequest {
            csi::NodeUnpublishVolumeRequest {
                volume_id: "pvc-1".into(),
                target_path: self.target(pod).display().to_string(),
            }
        }

        fn unstage_request(&self) -> csi::NodeUnstageVolumeRequest {
            csi::NodeUnstageVolumeRequest {
                volume_id: "pvc-1".into(),
                staging_target_path: self.staging().display().to_string(),
            }
        }

        fn count(&self, prefix: &str) -> usize {
            self.host
                .commands()
                .iter()
                .filter(|command| command.starts_with(prefix))
                .count()
        }
    }

    fn writer_ext4() -> csi::VolumeCapability {
        mount(Mode::SingleNodeWriter, "")
    }

    #[tokio::test]
    async fn a_mount_volume_stages_publishes_and_tears_down_idempotently() {
        let h = harness().await;
        h.node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect("stage");
        h.node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect("stage again");
        assert_eq!(h.count("mkfs.ext4 /dev/nbd0"), 1, "{:?}", h.host.commands());
        assert_eq!(
            h.count("mount -t ext4"),
            1,
            "mounted once: {:?}",
            h.host.commands()
        );
        let staged = h.host.mounted_at(&h.staging()).expect("staged");
        assert_eq!(staged.source, "/dev/nbd0");
        assert_eq!(h.gateway.state().calls[0], "AttachVolume pvc-1 7");
        let record = h.node.state.load("pvc-1").expect("load").expect("state");
        assert_eq!(record.fs_type.as_deref(), Some("ext4"));

        for _ in 0..2 {
            h.node
                .publish(h.publish_request("uid-a", writer_ext4(), false))
                .await
                .expect("publish");
        }
        let published = h.host.mounted_at(&h.target("uid-a")).expect("published");
        assert!(!published.read_only());
        assert!(h.target("uid-a").is_dir());
        assert_eq!(h.host.mount_count(), 2);

        // The device is in use: unstage refuses rather than pulling it away.
        let busy = h
            .node
            .unstage(h.unstage_request())
            .await
            .expect_err("still published");
        assert!(matches!(busy, UnstageError::DeviceBusy { .. }), "{busy}");
        assert_eq!(busy.code(), Code::FailedPrecondition);
        assert!(
            h.host.mounted_at(&h.staging()).is_some(),
            "the refused unstage touched nothing"
        );
        h.node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect("stage again");

        for _ in 0..2 {
            h.node
                .unpublish(h.unpublish_request("uid-a"))
                .await
                .expect("unpublish");
        }
        assert!(!h.target("uid-a").exists(), "the target is removed");
        for _ in 0..2 {
            h.node.unstage(h.unstage_request()).await.expect("unstage");
        }
        assert_eq!(h.host.mount_count(), 0);
        assert!(h.gateway.state().attachments.is_empty());
        assert_eq!(h.node.state.load("pvc-1").expect("load"), None);

        // Staging again finds the filesystem and never formats twice.
        h.node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect("stage after unstage");
        assert_eq!(h.count("mkfs"), 1);
    }

    #[tokio::test]
    async fn xfs_mounts_with_nouuid_and_flags() {
        let h = harness().await;
        let mut capability = mount(Mode::SingleNodeWriter, "xfs");
        if let Some(AccessType::Mount(mount)) = capability.access_type.as_mut() {
            mount.mount_flags = vec!["noatime".into()];
        }
        h.node
            .stage(h.stage_request(capability))
            .await
            .expect("stage");
        assert!(
            h.host.commands().contains(&format!(
                "mount -t xfs -o nouuid,noatime /dev/nbd0 {}",
                h.staging().display()
            )),
            "{:?}",
            h.host.commands()
        );
        assert_eq!(h.count("mkfs.xfs"), 1);
    }

    #[tokio::test]
    async fn incompatible_stages_and_wrong_filesystems_are_refused() {
        let h = harness().await;
        h.node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect("stage");
        let error = h
            .node
            .stage(h.stage_request(mount(Mode::SingleNodeWriter, "xfs")))
            .await
            .expect_err("other fs type");
        assert_eq!(error.code(), Code::AlreadyExists, "{error}");
        let error = h
            .node
            .stage(h.stage_request(block(Mode::SingleNodeWriter)))
            .await
            .expect_err("block");
        assert_eq!(error.code(), Code::AlreadyExists, "{error}");

        // A fresh volume that already carries xfs, staged as ext4.
        let h = harness().await;
        h.host.add_device(Path::new("/dev/nbd0"), GIB);
        h.host
            .set_signature(Path::new("/dev/nbd0"), Signature::Filesystem("xfs".into()));
        let error = h
            .node
            .stage(h.stage_request(mount(Mode::SingleNodeWriter, "ext4")))
            .await
            .expect_err("wrong filesystem");
        assert_eq!(error.code(), Code::FailedPrecondition);
        assert!(error.to_string().contains("xfs"), "{error}");
        assert_eq!(h.count("mkfs"), 0);
        // The failed first stage detached again and left nothing behind.
        assert!(h.gateway.state().attachments.is_empty());
        assert_eq!(h.node.state.load("pvc-1").expect("load"), None);
        // With no fs_type asked for, the existing xfs is used.
        h.node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect("default fs type takes xfs");
        assert_eq!(
            h.host.mounted_at(&h.staging()).expect("mounted").fs_type,
            "xfs"
        );

        // A partition table is never formatted over.
        let h = harness().await;
        h.host.add_device(Path::new("/dev/nbd0"), GIB);
        h.host.set_signature(
            Path::new("/dev/nbd0"),
            Signature::Other("a gpt partition table".into()),
        );
        let error = h
            .node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect_err("partition table");
        assert!(error.to_string().contains("gpt partition table"), "{error}");
        assert_eq!(h.count("mkfs"), 0);
    }

    #[tokio::test]
    async fn a_failed_mount_is_undone_and_a_retry_succeeds() {
        let h = harness().await;
        h.host.state().fail_next_mount = Some("wrong fs type, bad option".into());
        let error = h
            .node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect_err("mount fails");
        assert!(matches!(error, StageError::Mount { .. }), "{error}");
        assert!(
            error.to_string().contains("cannot mount /dev/nbd0"),
            "{error}"
        );
        assert!(h.gateway.state().attachments.is_empty(), "detached again");
        h.node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect("retry");
        assert!(h.host.mounted_at(&h.staging()).is_some());
    }

    #[tokio::test]
    async fn required_fields_and_epochs_are_checked() {
        let h = harness().await;
        let mut request = h.stage_request(writer_ext4());
        request.volume_id.clear();
        assert!(matches!(
            h.node.stage(request).await,
            Err(StageError::MissingVolumeId)
        ));
        let mut request = h.stage_request(writer_ext4());
        request.staging_target_path.clear();
        assert!(matches!(
            h.node.stage(request).await,
            Err(StageError::MissingStagingPath)
        ));
        let mut request = h.stage_request(writer_ext4());
        request.volume_capability = None;
        assert!(matches!(
            h.node.stage(request).await,
            Err(StageError::MissingCapability)
        ));
        let mut request = h.stage_request(writer_ext4());
        request.publish_context.remove(PUBLISH_EPOCH);
        let error = h.node.stage(request).await.expect_err("no epoch");
        assert_eq!(error.code(), Code::InvalidArgument);
        let mut request = h.stage_request(mount(Mode::MultiNodeMultiWriter, ""));
        request.publish_context.clear();
        assert_eq!(
            h.node.stage(request).await.expect_err("mode").code(),
            Code::InvalidArgument
        );
        let mut request = h.stage_request(writer_ext4());
        request.volume_id = "pvc-missing".into();
        assert_eq!(
            h.node.stage(request).await.expect_err("missing").code(),
            Code::NotFound
        );
        // A stale epoch: the volume is attached here with another one.
        h.node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect("stage");
        let mut request = h.stage_request(writer_ext4());
        request
            .publish_context
            .insert(PUBLISH_EPOCH.into(), "6".into());
        let error = h.node.stage(request).await.expect_err("stale");
        assert_eq!(error.code(), Code::FailedPrecondition, "{error}");
        assert!(h.host.mounted_at(&h.staging()).is_some(), "the stage stays");

        let publish = |f: fn(&mut csi::NodePublishVolumeRequest)| {
            let mut request = h.publish_request("uid-a", writer_ext4(), false);
            f(&mut request);
            request
        };
        for request in [
            publish(|r| r.volume_id.clear()),
            publish(|r| r.target_path.clear()),
            publish(|r| r.staging_target_path.clear()),
            publish(|r| r.volume_capability = None),
        ] {
            assert_eq!(
                h.node.publish(request).await.expect_err("invalid").code(),
                Code::InvalidArgument
            );
        }
        let mut request = h.unpublish_request("uid-a");
        request.target_path.clear();
        assert_eq!(
            h.node.unpublish(request).await.expect_err("invalid").code(),
            Code::InvalidArgument
        );
        let mut request = h.unstage_request();
        request.volume_id.clear();
        assert_eq!(
            h.node.unstage(request).await.expect_err("invalid").code(),
            Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn publishing_an_unstaged_volume_fails_precondition_and_unpublish_of_nothing_is_ok() {
        let h = harness().await;
        let error = h
            .node
            .publish(h.publish_request("uid-a", writer_ext4(), false))
            .await
            .expect_err("not staged");
        assert_eq!(error.code(), Code::FailedPrecondition);
        h.node
            .unpublish(h.unpublish_request("uid-a"))
            .await
            .expect("nothing published is OK");
        h.node
            .unstage(h.unstage_request())
            .await
            .expect("nothing staged is OK");
    }

    #[tokio::test]
    async fn read_only_publishes_are_read_only_and_conflicts_are_already_exists() {
        let h = harness().await;
        h.node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect("stage");
        h.node
            .publish(h.publish_request("uid-a", writer_ext4(), true))
            .await
            .expect("publish read-only");
        assert!(
            h.host
                .mounted_at(&h.target("uid-a"))
                .expect("published")
                .read_only()
        );
        h.node
            .publish(h.publish_request("uid-a", writer_ext4(), true))
            .await
            .expect("again");
        let error = h
            .node
            .publish(h.publish_request("uid-a", writer_ext4(), false))
            .await
            .expect_err("read-write at a read-only target");
        assert_eq!(error.code(), Code::AlreadyExists);
        // A second pod on the same node (SINGLE_NODE_MULTI_WRITER) gets its own bind.
        h.node
            .publish(h.publish_request("uid-b", mount(Mode::SingleNodeMultiWriter, ""), false))
            .await
            .expect("second pod");
        assert!(
            !h.host
                .mounted_at(&h.target("uid-b"))
                .expect("published")
                .read_only()
        );
    }

    #[tokio::test]
    async fn a_reader_attaches_read_only_without_an_epoch_and_never_formats() {
        let h = harness().await;
        let mut request = h.stage_request(mount(Mode::MultiNodeReaderOnly, ""));
        request.publish_context = HashMap::from([(PUBLISH_READONLY.to_owned(), "true".to_owned())]);
        let error = h.node.stage(request.clone()).await.expect_err("blank");
        assert!(
            matches!(error, StageError::UnformattedReadOnly { .. }),
            "{error}"
        );
        assert_eq!(h.count("mkfs"), 0);
        h.host
            .set_signature(Path::new("/dev/nbd0"), Signature::Filesystem("ext4".into()));
        h.node.stage(request).await.expect("stage read-only");
        assert!(h.gateway.state().attachments["pvc-1"].readonly);
        assert!(
            h.host
                .mounted_at(&h.staging())
                .expect("mounted")
                .read_only()
        );
    }

    #[tokio::test]
    async fn block_volumes_bind_the_device_node() {
        let h = harness().await;
        let capability = block(Mode::SingleNodeWriter);
        h.node
            .stage(h.stage_request(capability.clone()))
            .await
            .expect("stage");
        assert_eq!(h.host.mount_count(), 0, "nothing at the staging path");
        assert_eq!(h.count("mkfs"), 0, "block volumes are never formatted");
        for _ in 0..2 {
            h.node
                .publish(h.publish_request("uid-a", capability.clone(), false))
                .await
                .expect("publish");
        }
        assert!(h.target("uid-a").is_file());
        let bound = h.host.mounted_at(&h.target("uid-a")).expect("bound");
        assert_eq!(bound.root, Path::new("/nbd0"));
        let error = h
            .node
            .publish(h.publish_request("uid-a", writer_ext4(), false))
            .await
            .expect_err("mount publish of a block stage");
        assert_eq!(error.code(), Code::FailedPrecondition);

        let stats = h
            .node
            .stats(csi::NodeGetVolumeStatsRequest {
                volume_id: "pvc-1".into(),
                volume_path: h.target("uid-a").display().to_string(),
                staging_target_path: String::new(),
            })
            .await
            .expect("stats");
        assert_eq!(stats.usage.len(), 1);
        assert_eq!(stats.usage[0].total, to_i64(GIB));
        assert!(!stats.volume_condition.expect("condition").abnormal);

        let busy = h
            .node
            .unstage(h.unstage_request())
            .await
            .expect_err("bound");
        assert!(matches!(busy, UnstageError::DeviceBusy { .. }), "{busy}");
        h.node
            .unpublish(h.unpublish_request("uid-a"))
            .await
            .expect("unpublish");
        assert!(!h.target("uid-a").exists());
        h.node.unstage(h.unstage_request()).await.expect("unstage");
        assert!(h.gateway.state().attachments.is_empty());
    }

    #[tokio::test]
    async fn unstage_maps_a_slow_upload_to_unavailable_and_keeps_state_for_the_retry() {
        let h = harness().await;
        h.node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect("stage");
        h.gateway.state().detach_error = Some(Status::deadline_exceeded("upload not done"));
        let error = h.node.unstage(h.unstage_request()).await.expect_err("slow");
        assert_eq!(error.code(), Code::Unavailable, "{error}");
        assert!(h.node.state.load("pvc-1").expect("load").is_some());
        h.node.unstage(h.unstage_request()).await.expect("retry");
        assert!(h.gateway.state().attachments.is_empty());
        assert_eq!(h.node.state.load("pvc-1").expect("load"), None);
    }

    #[tokio::test]
    async fn unstage_without_a_state_file_asks_the_gateway() {
        let h = harness().await;
        h.node
            .stage(h.stage_request(block(Mode::SingleNodeWriter)))
            .await
            .expect("stage");
        // A crash between AttachVolume and the state file.
        h.node.state.remove("pvc-1").expect("remove");
        h.node.unstage(h.unstage_request()).await.expect("unstage");
        assert!(h.gateway.state().attachments.is_empty());
    }

    #[tokio::test]
    async fn a_busy_target_is_a_clear_error() {
        let h = harness().await;
        h.node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect("stage");
        h.node
            .publish(h.publish_request("uid-a", writer_ext4(), false))
            .await
            .expect("publish");
        h.host.state().busy.insert(h.target("uid-a"));
        let error = h
            .node
            .unpublish(h.unpublish_request("uid-a"))
            .await
            .expect_err("busy");
        assert_eq!(error.code(), Code::FailedPrecondition);
        assert!(crate::errors::chain(&error).contains("busy"), "{error}");
    }

    #[tokio::test]
    async fn expansion_asks_the_gateway_then_grows_the_filesystem() {
        let h = harness().await;
        h.node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect("stage");
        let request = |required: u64| csi::NodeExpandVolumeRequest {
            volume_id: "pvc-1".into(),
            volume_path: h.staging().display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: to_i64(required),
                limit_bytes: 0,
            }),
            ..Default::default()
        };
        let grown = h.node.expand(request(2 * GIB)).await.expect("expand");
        assert_eq!(grown.capacity_bytes, to_i64(2 * GIB));
        assert!(
            h.gateway
                .state()
                .calls
                .contains(&format!("ExpandVolume pvc-1 {}", 2 * GIB))
        );
        assert_eq!(h.count("resize2fs /dev/nbd0"), 1);
        // Again: the device is big enough already, the gateway is not asked.
        let again = h.node.expand(request(2 * GIB)).await.expect("again");
        assert_eq!(again.capacity_bytes, to_i64(2 * GIB));
        let asked = h
            .gateway
            .state()
            .calls
            .iter()
            .filter(|c| c.starts_with("ExpandVolume"))
            .count();
        assert_eq!(asked, 1);

        let mut missing = request(GIB);
        missing.volume_path = h.dir.path().join("nope").display().to_string();
        assert_eq!(
            h.node.expand(missing).await.expect_err("no path").code(),
            Code::NotFound
        );
        let mut other = request(GIB);
        other.volume_id = "pvc-9".into();
        assert_eq!(
            h.node.expand(other).await.expect_err("not staged").code(),
            Code::NotFound
        );
    }

    #[tokio::test]
    async fn stats_report_space_inodes_and_the_gateways_condition() {
        let h = harness().await;
        h.node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect("stage");
        let request = || csi::NodeGetVolumeStatsRequest {
            volume_id: "pvc-1".into(),
            volume_path: h.staging().display().to_string(),
            staging_target_path: String::new(),
        };
        let stats = h.node.stats(request()).await.expect("stats");
        use csi::volume_usage::Unit;
        assert_eq!(stats.usage.len(), 2);
        assert_eq!(stats.usage[0].unit, i32::from(Unit::Bytes));
        assert_eq!(stats.usage[0].total, to_i64(GIB));
        assert_eq!(stats.usage[1].unit, i32::from(Unit::Inodes));
        assert_eq!(stats.usage[1].used, 100);
        assert!(!stats.volume_condition.expect("condition").abnormal);

        h.gateway.state().fenced.insert("pvc-1".into());
        let condition = h
            .node
            .stats(request())
            .await
            .expect("stats")
            .volume_condition
            .expect("condition");
        assert!(condition.abnormal);
        assert!(
            condition.message.contains("fenced"),
            "{}",
            condition.message
        );

        h.gateway.state().stats_error = Some(Status::unavailable("down"));
        let condition = h
            .node
            .stats(request())
            .await
            .expect("stats")
            .volume_condition
            .expect("condition");
        assert!(condition.abnormal);
        assert!(
            condition.message.contains("gateway"),
            "{}",
            condition.message
        );

        let mut missing = request();
        missing.volume_path = h.dir.path().join("gone").display().to_string();
        assert_eq!(
            h.node.stats(missing).await.expect_err("gone").code(),
            Code::NotFound
        );
        let mut empty = request();
        empty.volume_id.clear();
        assert_eq!(
            h.node.stats(empty).await.expect_err("empty").code(),
            Code::InvalidArgument
        );
    }

    #[tokio::test]
    async fn a_missing_gateway_is_unavailable_with_a_hint() {
        let h = harness().await;
        h.server.abort();
        let _ = std::fs::remove_file(h.dir.path().join("node.sock"));
        let error = h
            .node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect_err("no gateway");
        assert_eq!(error.code(), Code::Unavailable, "{error}");
        assert!(
            error.to_string().contains("is blockgate-gateway running"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn concurrent_operations_on_one_volume_are_aborted() {
        let h = harness().await;
        let claim = h.node.claim("pvc-1").expect("first claim");
        let error = h
            .node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect_err("in flight");
        assert_eq!(error.code(), Code::Aborted);
        drop(claim);
        h.node
            .stage(h.stage_request(writer_ext4()))
            .await
            .expect("after release");
    }

    #[tokio::test]
    async fn capabilities_and_info() {
        use csi::node_server::Node as _;
        let h = harness().await;
        let capabilities = h
            .node
            .node_get_capabilities(Request::new(csi::NodeGetCapabilitiesRequest {}))
            .await
            .expect("capabilities")
            .into_inner()
            .capabilities;
        assert_eq!(capabilities.len(), CAPABILITIES.len());
        let info = h
            .node
            .node_get_info(Request::new(csi::NodeGetInfoRequest {}))
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info.node_id, "node-a");
        assert_eq!(info.max_volumes_per_node, 0);
    }

    #[test]
    fn mount_options_add_read_only_and_nouuid_once() {
        assert_eq!(
            stage_mount_options(FsType::Xfs, true, &["ro".into(), "noatime".into()]),
            vec!["ro", "nouuid", "noatime"]
        );
        assert_eq!(
            stage_mount_options(FsType::Ext4, false, &[]),
            Vec::<String>::new()
        );
    }
}
