//! The CSI Controller service over the block-storage API (CSI spec v1.12).
//!
//! Volume and snapshot ids are block-storage ids (see `naming`); every RPC is idempotent the
//! way the spec asks. This module never forces an attach or a delete: fencing a writer is
//! the operator's decision, not the CO's.

use std::collections::HashMap;

use blockgate_proto::blockstore::v1 as bs;
use blockgate_proto::csi::v1 as csi;
use csi::controller_service_capability::rpc::Type as Rpc;
use tonic::{Code, Request, Response, Status};

use crate::blockstore::BlockStore;
use crate::capability::{self, CapabilityError};
use crate::capacity::{self, CapacityError, Limits, Range};
use crate::errors::{ApiError, CsiError, reply};
use crate::naming;
use crate::page_token::{self, Cursor, InvalidToken};
use crate::parameters::{self, ParameterError, Parameters};

/// The capabilities ControllerGetCapabilities advertises.
const CAPABILITIES: [Rpc; 14] = [
    Rpc::CreateDeleteVolume,
    Rpc::PublishUnpublishVolume,
    Rpc::ListVolumes,
    Rpc::GetCapacity,
    Rpc::CreateDeleteSnapshot,
    Rpc::ListSnapshots,
    Rpc::CloneVolume,
    Rpc::PublishReadonly,
    Rpc::ExpandVolume,
    Rpc::ListVolumesPublishedNodes,
    Rpc::VolumeCondition,
    Rpc::GetVolume,
    Rpc::SingleNodeMultiWriter,
    Rpc::GetSnapshot,
];

/// publish_context keys the node plugin reads.
pub const PUBLISH_EPOCH: &str = "blockgate.io/epoch";
pub const PUBLISH_NODE: &str = "blockgate.io/node";
pub const PUBLISH_READONLY: &str = "blockgate.io/readonly";

#[derive(Debug)]
pub struct Controller {
    blockstore: BlockStore,
}

impl Controller {
    pub fn new(blockstore: BlockStore) -> Controller {
        Controller { blockstore }
    }
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn is_not_found(status: &Status) -> bool {
    status.code() == Code::NotFound
}

// ---------------------------------------------------------------------------------------
// Reads shared by several handlers.

impl Controller {
    async fn limits(&self) -> Result<Limits, ApiError> {
        let info = self
            .blockstore
            .service_info()
            .await
            .map_err(|status| ApiError::new("GetServiceInfo", status))?;
        Ok(Limits {
            volume_block_size: u64::from(info.volume_block_size),
            max_volume_size: info.max_volume_size,
        })
    }

    /// The volume, `None` when it does not exist (or `id` cannot be an id at all).
    async fn find_volume(&self, id: &str) -> Result<Option<bs::Volume>, ApiError> {
        if !naming::is_valid_id(id) {
            return Ok(None);
        }
        match self
            .blockstore
            .store()
            .get_volume(bs::GetVolumeRequest { id: id.to_owned() })
            .await
        {
            Ok(volume) => Ok(Some(volume.into_inner())),
            Err(status) if is_not_found(&status) => Ok(None),
            Err(status) => Err(ApiError::new("GetVolume", status)),
        }
    }

    async fn find_snapshot(&self, id: &str) -> Result<Option<bs::Snapshot>, ApiError> {
        if !naming::is_valid_id(id) {
            return Ok(None);
        }
        match self
            .blockstore
            .store()
            .get_snapshot(bs::GetSnapshotRequest { id: id.to_owned() })
            .await
        {
            Ok(snapshot) => Ok(Some(snapshot.into_inner())),
            Err(status) if is_not_found(&status) => Ok(None),
            Err(status) => Err(ApiError::new("GetSnapshot", status)),
        }
    }

    /// Every attachment, of one node or (`node_id` empty) of all.
    async fn attachments(&self, node_id: &str) -> Result<Vec<bs::Attachment>, ApiError> {
        let mut all = Vec::new();
        let mut page_token = String::new();
        loop {
            let page = self
                .blockstore
                .store()
                .list_attachments(bs::ListAttachmentsRequest {
                    node_id: node_id.to_owned(),
                    page_size: 0,
                    page_token,
                })
                .await
                .map_err(|status| ApiError::new("ListAttachments", status))?
                .into_inner();
            all.extend(page.attachments);
            if page.next_page_token.is_empty() {
                return Ok(all);
            }
            page_token = page.next_page_token;
        }
    }

    /// Nodes each volume is published to, sorted.
    async fn published_nodes(&self) -> Result<HashMap<String, Vec<String>>, ApiError> {
        let mut nodes: HashMap<String, Vec<String>> = HashMap::new();
        for attachment in self.attachments("").await? {
            nodes
                .entry(attachment.volume_id)
                .or_default()
                .push(attachment.node_id);
        }
        for list in nodes.values_mut() {
            list.sort();
            list.dedup();
        }
        Ok(nodes)
    }
}

/// The volume context of an existing volume, from what the API knows of it.
fn volume_context_of(volume: &bs::Volume) -> HashMap<String, String> {
    let mut context = HashMap::new();
    context.insert(
        "mode".to_owned(),
        parameters::mode_name(volume.mode()).to_owned(),
    );
    if volume.compression() != bs::Compression::Unspecified {
        context.insert(
            "compression".to_owned(),
            parameters::compression_name(volume.compression()).to_owned(),
        );
    }
    context.insert("encrypted".to_owned(), volume.encrypted.to_string());
    context
}

fn content_source_of(source: Option<&bs::VolumeSource>) -> Option<csi::VolumeContentSource> {
    use csi::volume_content_source::{SnapshotSource, Type, VolumeSource};
    let kind = match source?.kind.as_ref()? {
        bs::volume_source::Kind::SnapshotId(id) => Type::Snapshot(SnapshotSource {
            snapshot_id: id.clone(),
        }),
        bs::volume_source::Kind::VolumeId(id) => Type::Volume(VolumeSource {
            volume_id: id.clone(),
        }),
    };
    Some(csi::VolumeContentSource { r#type: Some(kind) })
}

fn csi_volume(volume: &bs::Volume, context: HashMap<String, String>) -> csi::Volume {
    csi::Volume {
        capacity_bytes: to_i64(volume.size_bytes),
        volume_id: volume.id.clone(),
        volume_context: context,
        content_source: content_source_of(volume.source.as_ref()),
        accessible_topology: Vec::new(),
    }
}

fn condition_of(volume: &bs::Volume) -> csi::VolumeCondition {
    let message = match &volume.attachment {
        Some(writer) => format!(
            "healthy; written by node {} (epoch {})",
            writer.node_id, writer.epoch
        ),
        None => "healthy".to_owned(),
    };
    csi::VolumeCondition {
        abnormal: false,
        message,
    }
}

fn csi_snapshot(snapshot: &bs::Snapshot) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: to_i64(snapshot.size_bytes),
        snapshot_id: snapshot.id.clone(),
        source_volume_id: snapshot.volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: to_i64(snapshot.created_unix),
            nanos: 0,
        }),
        ready_to_use: snapshot.ready_to_use,
        group_snapshot_id: String::new(),
    }
}

// ---------------------------------------------------------------------------------------
// CreateVolume

#[derive(Debug, thiserror::Error)]
pub enum CreateVolumeError {
    #[error("name is required")]
    MissingName,
    #[error("volume_capabilities are required")]
    MissingCapabilities,
    #[error("unsupported volume capability")]
    Capability(#[source] CapabilityError),
    #[error("invalid StorageClass parameters")]
    Parameter(#[source] ParameterError),
    #[error("invalid capacity range")]
    Capacity(#[source] CapacityError),
    #[error("volume_content_source names no snapshot or volume")]
    EmptySource,
    #[error("source snapshot {0} does not exist")]
    SnapshotSourceNotFound(String),
    #[error("source volume {0} does not exist")]
    VolumeSourceNotFound(String),
    #[error("the source holds {source_size} bytes, more than the capacity limit {limit}")]
    SourceAboveLimit { source_size: u64, limit: u64 },
    #[error("volume {id} already exists with {reason}")]
    Incompatible { id: String, reason: String },
    #[error(transparent)]
    Api(ApiError),
}

impl CsiError for CreateVolumeError {
    fn code(&self) -> Code {
        match self {
            Self::MissingName
            | Self::MissingCapabilities
            | Self::Capability(_)
            | Self::Parameter(_)
            | Self::EmptySource => Code::InvalidArgument,
            Self::Capacity(CapacityError::Negative { .. }) => Code::InvalidArgument,
            Self::Capacity(
                CapacityError::LimitBelowRequired { .. }
                | CapacityError::RoundedAboveLimit { .. }
                | CapacityError::LimitBelowBlock { .. }
                | CapacityError::AboveMaximum { .. },
            ) => Code::OutOfRange,
            Self::SnapshotSourceNotFound(_) | Self::VolumeSourceNotFound(_) => Code::NotFound,
            Self::SourceAboveLimit { .. } => Code::OutOfRange,
            Self::Incompatible { .. } => Code::AlreadyExists,
            Self::Api(error) => error.code(),
        }
    }
}

/// The source of a new volume as the API and CSI name it, and its size.
struct Source {
    api: bs::VolumeSource,
    size: u64,
}

impl Controller {
    async fn resolve_source(
        &self,
        source: &csi::VolumeContentSource,
    ) -> Result<Source, CreateVolumeError> {
        use csi::volume_content_source::Type;
        match source.r#type.as_ref() {
            Some(Type::Snapshot(snapshot)) if !snapshot.snapshot_id.is_empty() => {
                let found = self
                    .find_snapshot(&snapshot.snapshot_id)
                    .await
                    .map_err(CreateVolumeError::Api)?
                    .ok_or_else(|| {
                        CreateVolumeError::SnapshotSourceNotFound(snapshot.snapshot_id.clone())
                    })?;
                Ok(Source {
                    api: bs::VolumeSource {
                        kind: Some(bs::volume_source::Kind::SnapshotId(found.id)),
                    },
                    size: found.size_bytes,
                })
            }
            Some(Type::Volume(volume)) if !volume.volume_id.is_empty() => {
                let found = self
                    .find_volume(&volume.volume_id)
                    .await
                    .map_err(CreateVolumeError::Api)?
                    .ok_or_else(|| {
                        CreateVolumeError::VolumeSourceNotFound(volume.volume_id.clone())
                    })?;
                Ok(Source {
                    api: bs::VolumeSource {
                        kind: Some(bs::volume_source::Kind::VolumeId(found.id)),
                    },
                    size: found.size_bytes,
                })
            }
            Some(Type::Snapshot(_) | Type::Volume(_)) | None => Err(CreateVolumeError::EmptySource),
        }
    }

    async fn create_volume(
        &self,
        request: csi::CreateVolumeRequest,
    ) -> Result<csi::CreateVolumeResponse, CreateVolumeError> {
        if request.name.is_empty() {
            return Err(CreateVolumeError::MissingName);
        }
        if request.volume_capabilities.is_empty() {
            return Err(CreateVolumeError::MissingCapabilities);
        }
        capability::check_all(&request.volume_capabilities)
            .map_err(CreateVolumeError::Capability)?;
        let parameters =
            Parameters::parse(&request.parameters).map_err(CreateVolumeError::Parameter)?;
        let range = request
            .capacity_range
            .as_ref()
            .map(Range::from_csi)
            .transpose()
            .map_err(CreateVolumeError::Capacity)?;
        let limits = self.limits().await.map_err(CreateVolumeError::Api)?;
        let source = match &request.volume_content_source {
            Some(source) => Some(self.resolve_source(source).await?),
            None => None,
        };

        let size = match (range, &source) {
            (Some(range), source) => {
                let size = capacity::size_for(range, capacity::DEFAULT_VOLUME_SIZE, limits)
                    .map_err(CreateVolumeError::Capacity)?;
                // A volume is at least as large as its source.
                match source {
                    Some(source) if source.size > size => {
                        if range.limit != 0 && source.size > range.limit {
                            return Err(CreateVolumeError::SourceAboveLimit {
                                source_size: source.size,
                                limit: range.limit,
                            });
                        }
                        source.size
                    }
                    _ => size,
                }
            }
            (None, Some(source)) => source.size,
            (None, None) => capacity::size_for(
                Range {
                    required: 0,
                    limit: 0,
                },
                capacity::DEFAULT_VOLUME_SIZE,
                limits,
            )
            .map_err(CreateVolumeError::Capacity)?,
        };

        let id = naming::id_for_name(&request.name);
        let mut context = parameters.volume_context();
        let volume = match self
            .find_volume(&id)
            .await
            .map_err(CreateVolumeError::Api)?
        {
            Some(existing) => {
                check_compatible(&existing, range, size, &parameters, source.as_ref())?;
                existing
            }
            None => self
                .blockstore
                .store()
                .create_volume(bs::CreateVolumeRequest {
                    name: id.clone(),
                    size_bytes: size,
                    mode: parameters.mode.into(),
                    compression: parameters.compression.unwrap_or_default().into(),
                    encrypted: parameters.encrypted.unwrap_or(false),
                    source: source.as_ref().map(|source| source.api.clone()),
                })
                .await
                .map_err(|status| match status.code() {
                    Code::AlreadyExists => CreateVolumeError::Incompatible {
                        id: id.clone(),
                        reason: format!("other parameters ({})", status.message()),
                    },
                    _ => CreateVolumeError::Api(ApiError::new("CreateVolume", status)),
                })?
                .into_inner(),
        };
        for (key, value) in volume_context_of(&volume) {
            context.entry(key).or_insert(value);
        }
        let mut csi_volume = csi_volume(&volume, context);
        if source.is_some() {
            // Report the source as the CO named it.
            csi_volume.content_source = request.volume_content_source;
        }
        Ok(csi::CreateVolumeResponse {
            volume: Some(csi_volume),
        })
    }
}

/// Whether an existing volume is what a repeated CreateVolume asks for.
fn check_compatible(
    existing: &bs::Volume,
    range: Option<Range>,
    size: u64,
    parameters: &Parameters,
    source: Option<&Source>,
) -> Result<(), CreateVolumeError> {
    let incompatible = |reason: String| CreateVolumeError::Incompatible {
        id: existing.id.clone(),
        reason,
    };
    let size_fits = match range {
        Some(range) => range.admits(existing.size_bytes),
        None => existing.size_bytes >= size,
    };
    if !size_fits {
        return Err(incompatible(format!(
            "size {} bytes, outside the requested capacity range",
            existing.size_bytes
        )));
    }
    let wanted_source = source.map(|source| &source.api);
    let existing_source = existing
        .source
        .as_ref()
        .filter(|source| source.kind.is_some());
    if wanted_source != existing_source {
        return Err(incompatible("another content source".to_owned()));
    }
    if existing.mode() != bs::VolumeMode::Unspecified && existing.mode() != parameters.mode {
        return Err(incompatible(format!(
            "mode {}",
            parameters::mode_name(existing.mode())
        )));
    }
    if let Some(compression) = parameters.compression
        && existing.compression() != compression
    {
        return Err(incompatible(format!(
            "compression {}",
            parameters::compression_name(existing.compression())
        )));
    }
    if let Some(encrypted) = parameters.encrypted
        && existing.encrypted != encrypted
    {
        return Err(incompatible(format!("encrypted={}", existing.encrypted)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// DeleteVolume

#[derive(Debug, thiserror::Error)]
pub enum DeleteVolumeError {
    #[error("volume_id is required")]
    MissingVolumeId,
    #[error("volume {0} is still attached; unpublish it first")]
    Attached(String, #[source] Status),
    #[error(transparent)]
    Api(ApiError),
}

impl CsiError for DeleteVolumeError {
    fn code(&self) -> Code {
        match self {
            Self::MissingVolumeId => Code::InvalidArgument,
            Self::Attached(..) => Code::FailedPrecondition,
            Self::Api(error) => error.code(),
        }
    }
}

impl Controller {
    async fn delete_volume(
        &self,
        request: csi::DeleteVolumeRequest,
    ) -> Result<csi::DeleteVolumeResponse, DeleteVolumeError> {
        if request.volume_id.is_empty() {
            return Err(DeleteVolumeError::MissingVolumeId);
        }
        if !naming::is_valid_id(&request.volume_id) {
            // It cannot exist, so it is deleted.
            return Ok(csi::DeleteVolumeResponse {});
        }
        match self
            .blockstore
            .store()
            .delete_volume(bs::DeleteVolumeRequest {
                id: request.volume_id.clone(),
                force: false,
            })
            .await
        {
            Ok(_) => Ok(csi::DeleteVolumeResponse {}),
            Err(status) if is_not_found(&status) => Ok(csi::DeleteVolumeResponse {}),
            Err(status) if status.code() == Code::FailedPrecondition => {
                Err(DeleteVolumeError::Attached(request.volume_id, status))
            }
            Err(status) => Err(DeleteVolumeError::Api(ApiError::new(
                "DeleteVolume",
                status,
            ))),
        }
    }
}

// ---------------------------------------------------------------------------------------
// ControllerPublishVolume / ControllerUnpublishVolume

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("volume_id is required")]
    MissingVolumeId,
    #[error("node_id is required")]
    MissingNodeId,
    #[error("volume_capability is required")]
    MissingCapability,
    #[error("unsupported volume capability")]
    Capability(#[source] CapabilityError),
    #[error("volume {0} does not exist")]
    VolumeNotFound(String),
    #[error("volume {volume} is already published to node {node} with readonly={readonly}")]
    PublishedIncompatibly {
        volume: String,
        node: String,
        readonly: bool,
    },
    #[error("volume {0} is attached to another node")]
    AttachedElsewhere(String, #[source] Status),
    #[error("volume {0} or node {1} not found")]
    AttachNotFound(String, String, #[source] Status),
    #[error(transparent)]
    Api(ApiError),
}

impl CsiError for PublishError {
    fn code(&self) -> Code {
        match self {
            Self::MissingVolumeId
            | Self::MissingNodeId
            | Self::MissingCapability
            | Self::Capability(_) => Code::InvalidArgument,
            Self::VolumeNotFound(_) | Self::AttachNotFound(..) => Code::NotFound,
            Self::PublishedIncompatibly { .. } => Code::AlreadyExists,
            Self::AttachedElsewhere(..) => Code::FailedPrecondition,
            Self::Api(error) => error.code(),
        }
    }
}

fn publish_context(attachment: &bs::Attachment) -> HashMap<String, String> {
    HashMap::from([
        (PUBLISH_EPOCH.to_owned(), attachment.epoch.to_string()),
        (PUBLISH_NODE.to_owned(), attachment.node_id.clone()),
        (PUBLISH_READONLY.to_owned(), attachment.readonly.to_string()),
    ])
}

impl Controller {
    async fn publish(
        &self,
        request: csi::ControllerPublishVolumeRequest,
    ) -> Result<csi::ControllerPublishVolumeResponse, PublishError> {
        if request.volume_id.is_empty() {
            return Err(PublishError::MissingVolumeId);
        }
        if request.node_id.is_empty() {
            return Err(PublishError::MissingNodeId);
        }
        let capability = request
            .volume_capability
            .as_ref()
            .ok_or(PublishError::MissingCapability)?;
        let checked = capability::check(capability).map_err(PublishError::Capability)?;
        let readonly = request.readonly || checked.read_only;
        if self
            .find_volume(&request.volume_id)
            .await
            .map_err(PublishError::Api)?
            .is_none()
        {
            return Err(PublishError::VolumeNotFound(request.volume_id));
        }
        let existing = self
            .attachments(&request.node_id)
            .await
            .map_err(PublishError::Api)?
            .into_iter()
            .find(|attachment| attachment.volume_id == request.volume_id);
        let attachment = match existing {
            Some(attachment) if attachment.readonly != readonly => {
                return Err(PublishError::PublishedIncompatibly {
                    volume: request.volume_id,
                    node: request.node_id,
                    readonly: attachment.readonly,
                });
            }
            Some(attachment) => attachment,
            None => self
                .blockstore
                .store()
                .attach_volume(bs::AttachVolumeRequest {
                    volume_id: request.volume_id.clone(),
                    node_id: request.node_id.clone(),
                    force: false,
                    readonly,
                })
                .await
                .map_err(|status| match status.code() {
                    Code::FailedPrecondition => {
                        PublishError::AttachedElsewhere(request.volume_id.clone(), status)
                    }
                    Code::NotFound => PublishError::AttachNotFound(
                        request.volume_id.clone(),
                        request.node_id.clone(),
                        status,
                    ),
                    _ => PublishError::Api(ApiError::new("AttachVolume", status)),
                })?
                .into_inner(),
        };
        Ok(csi::ControllerPublishVolumeResponse {
            publish_context: publish_context(&attachment),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpublishError {
    #[error("volume_id is required")]
    MissingVolumeId,
    #[error(transparent)]
    Api(ApiError),
}

impl CsiError for UnpublishError {
    fn code(&self) -> Code {
        match self {
            Self::MissingVolumeId => Code::InvalidArgument,
            Self::Api(error) => error.code(),
        }
    }
}

impl Controller {
    async fn unpublish(
        &self,
        request: csi::ControllerUnpublishVolumeRequest,
    ) -> Result<csi::ControllerUnpublishVolumeResponse, UnpublishError> {
        if request.volume_id.is_empty() {
            return Err(UnpublishError::MissingVolumeId);
        }
        if !naming::is_valid_id(&request.volume_id) {
            return Ok(csi::ControllerUnpublishVolumeResponse {});
        }
        let nodes = if request.node_id.is_empty() {
            self.attachments("")
                .await
                .map_err(UnpublishError::Api)?
                .into_iter()
                .filter(|attachment| attachment.volume_id == request.volume_id)
                .map(|attachment| attachment.node_id)
                .collect()
        } else {
            vec![request.node_id]
        };
        for node_id in nodes {
            match self
                .blockstore
                .store()
                .detach_volume(bs::DetachVolumeRequest {
                    volume_id: request.volume_id.clone(),
                    node_id,
                })
                .await
            {
                Ok(_) => {}
                Err(status) if is_not_found(&status) => {}
                Err(status) => {
                    return Err(UnpublishError::Api(ApiError::new("DetachVolume", status)));
                }
            }
        }
        Ok(csi::ControllerUnpublishVolumeResponse {})
    }
}

// ---------------------------------------------------------------------------------------
// ValidateVolumeCapabilities

#[derive(Debug, thiserror::Error)]
pub enum ValidateError {
    #[error("volume_id is required")]
    MissingVolumeId,
    #[error("volume_capabilities are required")]
    MissingCapabilities,
    #[error("volume {0} does not exist")]
    VolumeNotFound(String),
    #[error(transparent)]
    Api(ApiError),
}

impl CsiError for ValidateError {
    fn code(&self) -> Code {
        match self {
            Self::MissingVolumeId | Self::MissingCapabilities => Code::InvalidArgument,
            Self::VolumeNotFound(_) => Code::NotFound,
            Self::Api(error) => error.code(),
        }
    }
}

impl Controller {
    async fn validate(
        &self,
        request: csi::ValidateVolumeCapabilitiesRequest,
    ) -> Result<csi::ValidateVolumeCapabilitiesResponse, ValidateError> {
        if request.volume_id.is_empty() {
            return Err(ValidateError::MissingVolumeId);
        }
        if request.volume_capabilities.is_empty() {
            return Err(ValidateError::MissingCapabilities);
        }
        if self
            .find_volume(&request.volume_id)
            .await
            .map_err(ValidateError::Api)?
            .is_none()
        {
            return Err(ValidateError::VolumeNotFound(request.volume_id));
        }
        let verdict = capability::check_all(&request.volume_capabilities)
            .map(|_| ())
            .map_err(|error| error.to_string())
            .and_then(|()| {
                Parameters::parse(&request.parameters)
                    .map(|_| ())
                    .map_err(|error| crate::errors::chain(&error))
            });
        Ok(match verdict {
            Ok(()) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                    volume_context: request.volume_context,
                    volume_capabilities: request.volume_capabilities,
                    parameters: request.parameters,
                    mutable_parameters: request.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(message) => csi::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message,
            },
        })
    }
}

// ---------------------------------------------------------------------------------------
// ListVolumes / ControllerGetVolume

#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("max_entries {0} is negative")]
    NegativeMaxEntries(i32),
    #[error("invalid starting_token")]
    Token(#[source] InvalidToken),
    #[error("starting_token is no longer valid")]
    StaleToken(#[source] Status),
    #[error(transparent)]
    Api(ApiError),
}

impl CsiError for ListError {
    fn code(&self) -> Code {
        match self {
            Self::NegativeMaxEntries(_) => Code::InvalidArgument,
            Self::Token(_) | Self::StaleToken(_) => Code::Aborted,
            Self::Api(error) => error.code(),
        }
    }
}

fn paging(max_entries: i32, starting_token: &str) -> Result<(usize, Cursor), ListError> {
    let max =
        usize::try_from(max_entries).map_err(|_| ListError::NegativeMaxEntries(max_entries))?;
    let cursor = Cursor::decode(starting_token).map_err(ListError::Token)?;
    Ok((max, cursor))
}

/// An API listing failure; INVALID_ARGUMENT there means our inner page token went stale.
fn list_failure(call: &'static str, status: Status, from_token: bool) -> ListError {
    if from_token && status.code() == Code::InvalidArgument {
        ListError::StaleToken(status)
    } else {
        ListError::Api(ApiError::new(call, status))
    }
}

impl Controller {
    async fn list_volumes(
        &self,
        request: csi::ListVolumesRequest,
    ) -> Result<csi::ListVolumesResponse, ListError> {
        let (max, cursor) = paging(request.max_entries, &request.starting_token)?;
        let store = self.blockstore.store();
        let (volumes, next_token) = page_token::collect(cursor, max, |page_size, page_token| {
            let mut store = store.clone();
            async move {
                let from_token = !page_token.is_empty();
                let page = store
                    .list_volumes(bs::ListVolumesRequest {
                        page_size,
                        page_token,
                    })
                    .await
                    .map_err(|status| list_failure("ListVolumes", status, from_token))?
                    .into_inner();
                Ok::<_, ListError>((page.volumes, page.next_page_token))
            }
        })
        .await?;
        let mut published = self.published_nodes().await.map_err(ListError::Api)?;
        let entries = volumes
            .iter()
            .map(|volume| csi::list_volumes_response::Entry {
                volume: Some(csi_volume(volume, volume_context_of(volume))),
                status: Some(csi::list_volumes_response::VolumeStatus {
                    published_node_ids: published.remove(&volume.id).unwrap_or_default(),
                    volume_condition: Some(condition_of(volume)),
                }),
            })
            .collect();
        Ok(csi::ListVolumesResponse {
            entries,
            next_token,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GetVolumeError {
    #[error("volume_id is required")]
    MissingVolumeId,
    #[error("volume {0} does not exist")]
    VolumeNotFound(String),
    #[error(transparent)]
    Api(ApiError),
}

impl CsiError for GetVolumeError {
    fn code(&self) -> Code {
        match self {
            Self::MissingVolumeId => Code::InvalidArgument,
            Self::VolumeNotFound(_) => Code::NotFound,
            Self::Api(error) => error.code(),
        }
    }
}

impl Controller {
    async fn get_volume(
        &self,
        request: csi::ControllerGetVolumeRequest,
    ) -> Result<csi::ControllerGetVolumeResponse, GetVolumeError> {
        if request.volume_id.is_empty() {
            return Err(GetVolumeError::MissingVolumeId);
        }
        let volume = self
            .find_volume(&request.volume_id)
            .await
            .map_err(GetVolumeError::Api)?
            .ok_or_else(|| GetVolumeError::VolumeNotFound(request.volume_id.clone()))?;
        let mut nodes: Vec<String> = self
            .attachments("")
            .await
            .map_err(GetVolumeError::Api)?
            .into_iter()
            .filter(|attachment| attachment.volume_id == volume.id)
            .map(|attachment| attachment.node_id)
            .collect();
        nodes.sort();
        nodes.dedup();
        Ok(csi::ControllerGetVolumeResponse {
            volume: Some(csi_volume(&volume, volume_context_of(&volume))),
            status: Some(csi::controller_get_volume_response::VolumeStatus {
                published_node_ids: nodes,
                volume_condition: Some(condition_of(&volume)),
            }),
        })
    }
}

// ---------------------------------------------------------------------------------------
// GetCapacity

#[derive(Debug, thiserror::Error)]
pub enum GetCapacityError {
    #[error("invalid StorageClass parameters")]
    Parameter(#[source] ParameterError),
    #[error(transparent)]
    Api(ApiError),
}

impl CsiError for GetCapacityError {
    fn code(&self) -> Code {
        match self {
            Self::Parameter(_) => Code::InvalidArgument,
            Self::Api(error) => error.code(),
        }
    }
}

impl Controller {
    async fn get_capacity(
        &self,
        request: csi::GetCapacityRequest,
    ) -> Result<csi::GetCapacityResponse, GetCapacityError> {
        Parameters::parse(&request.parameters).map_err(GetCapacityError::Parameter)?;
        let limits = self.limits().await.map_err(GetCapacityError::Api)?;
        // The object store has no meaningful bound; the largest volume is the useful answer.
        // Capabilities blockgate cannot serve have no capacity at all.
        let supported = capability::check_all(&request.volume_capabilities).is_ok();
        let maximum = to_i64(limits.max_volume_size);
        Ok(csi::GetCapacityResponse {
            available_capacity: if supported { maximum } else { 0 },
            maximum_volume_size: Some(maximum),
            minimum_volume_size: Some(to_i64(limits.volume_block_size)),
        })
    }
}

// ---------------------------------------------------------------------------------------
// ControllerExpandVolume

#[derive(Debug, thiserror::Error)]
pub enum ExpandError {
    #[error("volume_id is required")]
    MissingVolumeId,
    #[error("capacity_range with a required or limit size is required")]
    MissingCapacityRange,
    #[error("unsupported volume capability")]
    Capability(#[source] CapabilityError),
    #[error("invalid capacity range")]
    Capacity(#[source] CapacityError),
    #[error("volume {0} does not exist")]
    VolumeNotFound(String),
    #[error("volume {id} holds {current} bytes; it cannot shrink to {requested}")]
    Shrink {
        id: String,
        current: u64,
        requested: u64,
    },
    #[error(transparent)]
    Api(ApiError),
}

impl CsiError for ExpandError {
    fn code(&self) -> Code {
        match self {
            Self::MissingVolumeId | Self::MissingCapacityRange | Self::Capability(_) => {
                Code::InvalidArgument
            }
            Self::Capacity(CapacityError::Negative { .. }) => Code::InvalidArgument,
            Self::Capacity(
                CapacityError::LimitBelowRequired { .. }
                | CapacityError::RoundedAboveLimit { .. }
                | CapacityError::LimitBelowBlock { .. }
                | CapacityError::AboveMaximum { .. },
            ) => Code::OutOfRange,
            Self::VolumeNotFound(_) => Code::NotFound,
            Self::Shrink { .. } => Code::OutOfRange,
            Self::Api(error) => error.code(),
        }
    }
}

impl Controller {
    async fn expand(
        &self,
        request: csi::ControllerExpandVolumeRequest,
    ) -> Result<csi::ControllerExpandVolumeResponse, ExpandError> {
        if request.volume_id.is_empty() {
            return Err(ExpandError::MissingVolumeId);
        }
        let range = request
            .capacity_range
            .as_ref()
            .ok_or(ExpandError::MissingCapacityRange)
            .and_then(|range| Range::from_csi(range).map_err(ExpandError::Capacity))?;
        if range.required == 0 && range.limit == 0 {
            return Err(ExpandError::MissingCapacityRange);
        }
        let block = match request.volume_capability.as_ref() {
            Some(capability) => {
                capability::check(capability)
                    .map_err(ExpandError::Capability)?
                    .block
            }
            None => false,
        };
        let limits = self.limits().await.map_err(ExpandError::Api)?;
        let volume = self
            .find_volume(&request.volume_id)
            .await
            .map_err(ExpandError::Api)?
            .ok_or_else(|| ExpandError::VolumeNotFound(request.volume_id.clone()))?;
        let size =
            capacity::size_for(range, volume.size_bytes, limits).map_err(ExpandError::Capacity)?;
        let capacity = if size < volume.size_bytes {
            return Err(ExpandError::Shrink {
                id: volume.id,
                current: volume.size_bytes,
                requested: size,
            });
        } else if size == volume.size_bytes {
            volume.size_bytes
        } else {
            self.blockstore
                .store()
                .expand_volume(bs::ExpandVolumeRequest {
                    id: volume.id.clone(),
                    size_bytes: size,
                })
                .await
                .map_err(|status| match status.code() {
                    Code::NotFound => ExpandError::VolumeNotFound(volume.id.clone()),
                    _ => ExpandError::Api(ApiError::new("ExpandVolume", status)),
                })?
                .into_inner()
                .size_bytes
        };
        Ok(csi::ControllerExpandVolumeResponse {
            capacity_bytes: to_i64(capacity),
            node_expansion_required: !block,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Snapshots

#[derive(Debug, thiserror::Error)]
pub enum CreateSnapshotError {
    #[error("source_volume_id is required")]
    MissingSourceVolumeId,
    #[error("name is required")]
    MissingName,
    #[error("parameter {0:?} is unknown (VolumeSnapshotClass parameters take none)")]
    UnknownParameter(String),
    #[error("source volume {0} does not exist")]
    SourceNotFound(String),
    #[error("snapshot {id} already exists for volume {volume}")]
    NameTaken { id: String, volume: String },
    #[error(transparent)]
    Api(ApiError),
}

impl CsiError for CreateSnapshotError {
    fn code(&self) -> Code {
        match self {
            Self::MissingSourceVolumeId | Self::MissingName | Self::UnknownParameter(_) => {
                Code::InvalidArgument
            }
            Self::SourceNotFound(_) => Code::NotFound,
            Self::NameTaken { .. } => Code::AlreadyExists,
            Self::Api(error) => error.code(),
        }
    }
}

impl Controller {
    async fn create_snapshot(
        &self,
        request: csi::CreateSnapshotRequest,
    ) -> Result<csi::CreateSnapshotResponse, CreateSnapshotError> {
        if request.source_volume_id.is_empty() {
            return Err(CreateSnapshotError::MissingSourceVolumeId);
        }
        if request.name.is_empty() {
            return Err(CreateSnapshotError::MissingName);
        }
        if let Some(key) = request
            .parameters
            .keys()
            .find(|key| !key.starts_with("csi.storage.k8s.io/"))
        {
            return Err(CreateSnapshotError::UnknownParameter(key.clone()));
        }
        let id = naming::id_for_name(&request.name);
        if let Some(existing) = self
            .find_snapshot(&id)
            .await
            .map_err(CreateSnapshotError::Api)?
        {
            if existing.volume_id != request.source_volume_id {
                return Err(CreateSnapshotError::NameTaken {
                    id,
                    volume: existing.volume_id,
                });
            }
            return Ok(csi::CreateSnapshotResponse {
                snapshot: Some(csi_snapshot(&existing)),
            });
        }
        if !naming::is_valid_id(&request.source_volume_id) {
            return Err(CreateSnapshotError::SourceNotFound(
                request.source_volume_id,
            ));
        }
        let snapshot = self
            .blockstore
            .store()
            .create_snapshot(bs::CreateSnapshotRequest {
                name: id.clone(),
                volume_id: request.source_volume_id.clone(),
            })
            .await
            .map_err(|status| match status.code() {
                Code::NotFound => {
                    CreateSnapshotError::SourceNotFound(request.source_volume_id.clone())
                }
                Code::AlreadyExists => CreateSnapshotError::NameTaken {
                    id: id.clone(),
                    volume: "another volume".to_owned(),
                },
                _ => CreateSnapshotError::Api(ApiError::new("CreateSnapshot", status)),
            })?
            .into_inner();
        Ok(csi::CreateSnapshotResponse {
            snapshot: Some(csi_snapshot(&snapshot)),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DeleteSnapshotError {
    #[error("snapshot_id is required")]
    MissingSnapshotId,
    #[error("snapshot {0} is still in use")]
    InUse(String, #[source] Status),
    #[error(transparent)]
    Api(ApiError),
}

impl CsiError for DeleteSnapshotError {
    fn code(&self) -> Code {
        match self {
            Self::MissingSnapshotId => Code::InvalidArgument,
            Self::InUse(..) => Code::FailedPrecondition,
            Self::Api(error) => error.code(),
        }
    }
}

impl Controller {
    async fn delete_snapshot(
        &self,
        request: csi::DeleteSnapshotRequest,
    ) -> Result<csi::DeleteSnapshotResponse, DeleteSnapshotError> {
        if request.snapshot_id.is_empty() {
            return Err(DeleteSnapshotError::MissingSnapshotId);
        }
        if !naming::is_valid_id(&request.snapshot_id) {
            return Ok(csi::DeleteSnapshotResponse {});
        }
        match self
            .blockstore
            .store()
            .delete_snapshot(bs::DeleteSnapshotRequest {
                id: request.snapshot_id.clone(),
            })
            .await
        {
            Ok(_) => Ok(csi::DeleteSnapshotResponse {}),
            Err(status) if is_not_found(&status) => Ok(csi::DeleteSnapshotResponse {}),
            Err(status) if status.code() == Code::FailedPrecondition => {
                Err(DeleteSnapshotError::InUse(request.snapshot_id, status))
            }
            Err(status) => Err(DeleteSnapshotError::Api(ApiError::new(
                "DeleteSnapshot",
                status,
            ))),
        }
    }

    async fn list_snapshots(
        &self,
        request: csi::ListSnapshotsRequest,
    ) -> Result<csi::ListSnapshotsResponse, ListError> {
        let (max, cursor) = paging(request.max_entries, &request.starting_token)?;
        let entry = |snapshot: &bs::Snapshot| csi::list_snapshots_response::Entry {
            snapshot: Some(csi_snapshot(snapshot)),
        };
        if !request.snapshot_id.is_empty() {
            // One snapshot at most; a missing one is an empty list, not an error.
            let found = self
                .find_snapshot(&request.snapshot_id)
                .await
                .map_err(ListError::Api)?
                .filter(|snapshot| {
                    request.source_volume_id.is_empty()
                        || snapshot.volume_id == request.source_volume_id
                });
            return Ok(csi::ListSnapshotsResponse {
                entries: found.iter().map(entry).collect(),
                next_token: String::new(),
            });
        }
        if !request.source_volume_id.is_empty() && !naming::is_valid_id(&request.source_volume_id) {
            return Ok(csi::ListSnapshotsResponse::default());
        }
        let store = self.blockstore.store();
        let volume_id = request.source_volume_id;
        let (snapshots, next_token) = page_token::collect(cursor, max, |page_size, page_token| {
            let mut store = store.clone();
            let volume_id = volume_id.clone();
            async move {
                let from_token = !page_token.is_empty();
                match store
                    .list_snapshots(bs::ListSnapshotsRequest {
                        volume_id,
                        page_size,
                        page_token,
                    })
                    .await
                {
                    Ok(page) => {
                        let page = page.into_inner();
                        Ok((page.snapshots, page.next_page_token))
                    }
                    // The source volume is gone: it has no snapshots to list.
                    Err(status) if is_not_found(&status) => Ok((Vec::new(), String::new())),
                    Err(status) => Err(list_failure("ListSnapshots", status, from_token)),
                }
            }
        })
        .await?;
        Ok(csi::ListSnapshotsResponse {
            entries: snapshots.iter().map(entry).collect(),
            next_token,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum GetSnapshotError {
    #[error("snapshot_id is required")]
    MissingSnapshotId,
    #[error("snapshot {0} does not exist")]
    NotFound(String),
    #[error(transparent)]
    Api(ApiError),
}

impl CsiError for GetSnapshotError {
    fn code(&self) -> Code {
        match self {
            Self::MissingSnapshotId => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::Api(error) => error.code(),
        }
    }
}

impl Controller {
    async fn get_snapshot(
        &self,
        request: csi::GetSnapshotRequest,
    ) -> Result<csi::GetSnapshotResponse, GetSnapshotError> {
        if request.snapshot_id.is_empty() {
            return Err(GetSnapshotError::MissingSnapshotId);
        }
        let snapshot = self
            .find_snapshot(&request.snapshot_id)
            .await
            .map_err(GetSnapshotError::Api)?
            .ok_or(GetSnapshotError::NotFound(request.snapshot_id))?;
        Ok(csi::GetSnapshotResponse {
            snapshot: Some(csi_snapshot(&snapshot)),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModifyVolumeError {
    #[error(
        "ControllerModifyVolume is not supported by blockgate (MODIFY_VOLUME is not advertised)"
    )]
    Unsupported,
}

impl CsiError for ModifyVolumeError {
    fn code(&self) -> Code {
        match self {
            Self::Unsupported => Code::Unimplemented,
        }
    }
}

/// Requests carry secrets: the span names only the RPC and the object it is about.
macro_rules! handle {
    ($rpc:literal, $object:expr, $call:expr) => {{
        use tracing::Instrument as _;
        let span = tracing::info_span!($rpc, object = %$object);
        async { reply($rpc, $call.await) }.instrument(span).await
    }};
}

#[tonic::async_trait]
impl csi::controller_server::Controller for Controller {
    async fn create_volume(
        &self,
        request: Request<csi::CreateVolumeRequest>,
    ) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        let request = request.into_inner();
        handle!(
            "CreateVolume",
            request.name.clone(),
            self.create_volume(request)
        )
    }

    async fn delete_volume(
        &self,
        request: Request<csi::DeleteVolumeRequest>,
    ) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let request = request.into_inner();
        handle!(
            "DeleteVolume",
            request.volume_id.clone(),
            self.delete_volume(request)
        )
    }

    async fn controller_publish_volume(
        &self,
        request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let object = format!("{}@{}", request.volume_id, request.node_id);
        handle!("ControllerPublishVolume", object, self.publish(request))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let object = format!("{}@{}", request.volume_id, request.node_id);
        handle!("ControllerUnpublishVolume", object, self.unpublish(request))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let request = request.into_inner();
        handle!(
            "ValidateVolumeCapabilities",
            request.volume_id.clone(),
            self.validate(request)
        )
    }

    async fn list_volumes(
        &self,
        request: Request<csi::ListVolumesRequest>,
    ) -> Result<Response<csi::ListVolumesResponse>, Status> {
        handle!("ListVolumes", "", self.list_volumes(request.into_inner()))
    }

    async fn get_capacity(
        &self,
        request: Request<csi::GetCapacityRequest>,
    ) -> Result<Response<csi::GetCapacityResponse>, Status> {
        handle!("GetCapacity", "", self.get_capacity(request.into_inner()))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: CAPABILITIES
                .iter()
                .map(|rpc| csi::ControllerServiceCapability {
                    r#type: Some(csi::controller_service_capability::Type::Rpc(
                        csi::controller_service_capability::Rpc {
                            r#type: (*rpc).into(),
                        },
                    )),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        request: Request<csi::CreateSnapshotRequest>,
    ) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let request = request.into_inner();
        handle!(
            "CreateSnapshot",
            request.name.clone(),
            self.create_snapshot(request)
        )
    }

    async fn delete_snapshot(
        &self,
        request: Request<csi::DeleteSnapshotRequest>,
    ) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let request = request.into_inner();
        handle!(
            "DeleteSnapshot",
            request.snapshot_id.clone(),
            self.delete_snapshot(request)
        )
    }

    async fn list_snapshots(
        &self,
        request: Request<csi::ListSnapshotsRequest>,
    ) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        handle!(
            "ListSnapshots",
            "",
            self.list_snapshots(request.into_inner())
        )
    }

    async fn get_snapshot(
        &self,
        request: Request<csi::GetSnapshotRequest>,
    ) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let request = request.into_inner();
        handle!(
            "GetSnapshot",
            request.snapshot_id.clone(),
            self.get_snapshot(request)
        )
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let request = request.into_inner();
        handle!(
            "ControllerExpandVolume",
            request.volume_id.clone(),
            self.expand(request)
        )
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let request = request.into_inner();
        handle!(
            "ControllerGetVolume",
            request.volume_id.clone(),
            self.get_volume(request)
        )
    }

    async fn controller_modify_volume(
        &self,
        request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        let volume_id = request.into_inner().volume_id;
        handle!("ControllerModifyVolume", volume_id, async {
            Err::<csi::ControllerModifyVolumeResponse, _>(ModifyVolumeError::Unsupported)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    type Sorted = BTreeMap<String, String>;

    fn volume(size: u64) -> bs::Volume {
        bs::Volume {
            id: "pvc-1".into(),
            size_bytes: size,
            block_size: 4096,
            mode: bs::VolumeMode::Cached.into(),
            compression: bs::Compression::Lz4.into(),
            encrypted: false,
            source: None,
            created_unix: 1,
            attachment: None,
        }
    }

    fn defaults() -> Parameters {
        Parameters::parse(&HashMap::new()).expect("empty parameters are valid")
    }

    #[test]
    fn an_existing_volume_is_compatible_only_with_matching_requests() {
        let existing = volume(1 << 30);
        let exact = Range {
            required: 1 << 30,
            limit: 0,
        };
        assert!(check_compatible(&existing, Some(exact), 1 << 30, &defaults(), None).is_ok());
        let bigger = Range {
            required: 2 << 30,
            limit: 0,
        };
        assert!(matches!(
            check_compatible(&existing, Some(bigger), 2 << 30, &defaults(), None),
            Err(CreateVolumeError::Incompatible { .. })
        ));
        let stored = Parameters {
            mode: bs::VolumeMode::Stored,
            ..defaults()
        };
        assert!(check_compatible(&existing, Some(exact), 1 << 30, &stored, None).is_err());
        let zstd = Parameters {
            compression: Some(bs::Compression::Zstd),
            ..defaults()
        };
        assert!(check_compatible(&existing, Some(exact), 1 << 30, &zstd, None).is_err());
        let from_snapshot = Source {
            api: bs::VolumeSource {
                kind: Some(bs::volume_source::Kind::SnapshotId("snap-1".into())),
            },
            size: 1 << 30,
        };
        assert!(
            check_compatible(
                &existing,
                Some(exact),
                1 << 30,
                &defaults(),
                Some(&from_snapshot)
            )
            .is_err()
        );
    }

    #[test]
    fn errors_map_to_the_spec_codes() {
        assert_eq!(CreateVolumeError::MissingName.code(), Code::InvalidArgument);
        assert_eq!(
            CreateVolumeError::Capacity(CapacityError::AboveMaximum { size: 2, max: 1 }).code(),
            Code::OutOfRange
        );
        assert_eq!(
            CreateVolumeError::SnapshotSourceNotFound("s".into()).code(),
            Code::NotFound
        );
        assert_eq!(
            DeleteVolumeError::Attached("v".into(), Status::failed_precondition("attached")).code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            ListError::Token(InvalidToken("x".into())).code(),
            Code::Aborted
        );
        assert_eq!(
            PublishError::AttachedElsewhere("v".into(), Status::failed_precondition("n2")).code(),
            Code::FailedPrecondition
        );
        assert_eq!(ModifyVolumeError::Unsupported.code(), Code::Unimplemented);
    }

    #[test]
    fn publish_context_names_epoch_node_and_readonly() {
        let context = publish_context(&bs::Attachment {
            volume_id: "pvc-1".into(),
            node_id: "node-a".into(),
            epoch: 7,
            attached_unix: 0,
            readonly: false,
        });
        let sorted: Sorted = context.into_iter().collect();
        assert_eq!(
            sorted,
            Sorted::from([
                (PUBLISH_EPOCH.into(), "7".into()),
                (PUBLISH_NODE.into(), "node-a".into()),
                (PUBLISH_READONLY.into(), "false".into()),
            ])
        );
    }
}
