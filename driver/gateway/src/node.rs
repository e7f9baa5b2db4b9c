//! The node API (`gateway.proto`, `NodeGateway`): what the CSI node plugin asks of this
//! gateway. An attachment is a volume opened here as its writer plus a kernel block device
//! (`/dev/nbdN`) whose sockets this gateway serves.
//!
//! Attachments live in the gateway, not in the plugin: they are recorded in
//! `<data>/node-attachments.json`, and a restarted gateway reopens the volumes (the engine
//! replays their write logs) and gives the kernel's devices, still waiting on their dead
//! connections, fresh sockets, so a mounted file system sees a pause and no error.
//!
//! This module owns the order of operations between the engine and the kernel; it never
//! touches volume data (the sessions do, through [`crate::exports::device`]) and never speaks
//! netlink itself ([`KernelDevices`]).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use blockgate_engine::{Engine, EngineError, Volume, error_chain};
use blockgate_proto::gateway::v1 as proto;
use proto::node_gateway_server::{NodeGateway, NodeGatewayServer};
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Code, Request, Response, Status};

use crate::kernel::{DeviceConfig, DeviceState, KernelDevices, KernelError};
use crate::reader::ReaderVolume;

/// Kernel connections per device when the request says 0.
pub const DEFAULT_CONNECTIONS: u32 = 2;
/// More would only add queues the write log serialises anyway.
pub const MAX_CONNECTIONS: u32 = 16;
/// Detach upload timeout when the request says 0 (gateway.proto).
pub const DEFAULT_DETACH_TIMEOUT: Duration = Duration::from_secs(600);
/// Wait before replacing a lost kernel connection.
const REPAIR_DELAY: Duration = Duration::from_millis(100);
/// The state file in the data directory.
pub const STATE_FILE: &str = "node-attachments.json";

/// Tunables of the node service.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Where the attachment records are kept: `<data>/node-attachments.json`.
    pub state_path: PathBuf,
    pub default_connections: u32,
    /// `NBD_ATTR_TIMEOUT`; 0 (the default) never times a request out: a write may wait on a
    /// full write log for as long as uploads take, and a dropped connection would only be
    /// retried.
    pub request_timeout_seconds: u64,
    /// `NBD_ATTR_DEAD_CONN_TIMEOUT`: how long the kernel holds I/O while the gateway is gone
    /// (a crash or an update), before failing it.
    pub dead_connection_timeout_seconds: u64,
}

impl NodeConfig {
    pub fn new(data_dir: &Path) -> NodeConfig {
        NodeConfig {
            state_path: data_dir.join(STATE_FILE),
            default_connections: DEFAULT_CONNECTIONS,
            request_timeout_seconds: 0,
            dead_connection_timeout_seconds: 120,
        }
    }
}

/// One attachment as recorded in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentRecord {
    pub volume: String,
    pub epoch: u64,
    /// `/dev/nbd<index>`.
    pub index: u32,
    pub readonly: bool,
    pub connections: u32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    attachments: Vec<AttachmentRecord>,
}

/// Why a node request failed; each variant maps to one gRPC code (gateway.proto).
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("volume {volume}: {reason}")]
    ReadOnlyConflict { volume: String, reason: String },
    #[error("volume {volume} is not attached here")]
    NotAttached { volume: String },
    #[error("volume {volume}")]
    Engine {
        volume: String,
        #[source]
        source: EngineError,
    },
    #[error("kernel device of volume {volume}")]
    Kernel {
        volume: String,
        #[source]
        source: KernelError,
    },
    #[error("cannot save the attachment records to {path}")]
    SaveState {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the attachment records from {path}")]
    LoadState {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot create the sockets for the kernel")]
    Sockets(#[source] std::io::Error),
}

impl NodeError {
    pub fn code(&self) -> Code {
        match self {
            NodeError::InvalidArgument(_) => Code::InvalidArgument,
            NodeError::ReadOnlyConflict { .. } => Code::FailedPrecondition,
            NodeError::NotAttached { .. } => Code::NotFound,
            NodeError::Engine { source, .. } => engine_code(source),
            NodeError::Kernel { source, .. } => kernel_code(source),
            NodeError::SaveState { .. } | NodeError::LoadState { .. } | NodeError::Sockets(_) => {
                Code::Internal
            }
        }
    }
}

fn engine_code(error: &EngineError) -> Code {
    match error {
        EngineError::VolumeNotFound { .. } | EngineError::SnapshotNotFound { .. } => Code::NotFound,
        EngineError::VolumeExists { .. } | EngineError::SnapshotExists { .. } => {
            Code::AlreadyExists
        }
        EngineError::InvalidArgument(_)
        | EngineError::OutOfRange { .. }
        | EngineError::Shrink { .. } => Code::InvalidArgument,
        EngineError::Fenced { .. }
        | EngineError::SnapshotInUse { .. }
        | EngineError::Closed { .. } => Code::FailedPrecondition,
        EngineError::Store { .. } => Code::Unavailable,
        EngineError::DrainTimeout { .. } => Code::DeadlineExceeded,
        EngineError::LogDiskFull { .. } => Code::ResourceExhausted,
        EngineError::Corrupt { .. }
        | EngineError::LogIo { .. }
        | EngineError::LocalIo { .. }
        | EngineError::DirectoryLocked { .. } => Code::Internal,
    }
}

fn kernel_code(error: &KernelError) -> Code {
    match error {
        KernelError::NoNbdModule | KernelError::Netlink(_) | KernelError::Flush { .. } => {
            Code::Unavailable
        }
        KernelError::NoFreeDevice => Code::ResourceExhausted,
        KernelError::Refused { .. } => Code::FailedPrecondition,
        KernelError::Task(_) => Code::Internal,
    }
}

impl From<NodeError> for Status {
    fn from(error: NodeError) -> Status {
        let chain = error_chain(&error);
        let message = if chain.is_empty() {
            error.to_string()
        } else {
            format!("{error}: {chain}")
        };
        Status::new(error.code(), message)
    }
}

/// The sessions serving one device's sockets.
#[derive(Debug, Default)]
struct Sessions {
    tasks: Vec<JoinHandle<()>>,
    /// Sessions still running: 0 means the kernel device has no connection to this gateway.
    live: Arc<AtomicUsize>,
}

/// Counts a session as live from creation until it ends, however it ends (also aborted).
struct LiveSession(Arc<AtomicUsize>);

impl LiveSession {
    fn new(live: Arc<AtomicUsize>) -> LiveSession {
        live.fetch_add(1, Ordering::AcqRel);
        LiveSession(live)
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Sessions {
    fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Ends every session (its socket closes; the kernel marks the connection dead).
    async fn stop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

#[derive(Debug)]
struct Attached {
    record: AttachmentRecord,
    sessions: Sessions,
    /// The engine has uploaded and closed the volume (a detach that then failed to
    /// disconnect the device; the retry only disconnects).
    engine_detached: bool,
    /// The kernel refused to take new sockets for the device: nothing is repaired until an
    /// attach reconnects it.
    device_lost: bool,
    /// For a read-only attachment, what its device serves.
    reader: Option<Arc<ReaderVolume>>,
}

/// What a kernel device of an attachment serves: the volume's writer (the engine's open
/// volume) or a reader of its bucket state.
#[derive(Debug, Clone)]
enum Served {
    Writer(Arc<Volume>),
    Reader(Arc<ReaderVolume>),
}

impl Served {
    fn id(&self) -> &str {
        match self {
            Served::Writer(volume) => &volume.id,
            Served::Reader(reader) => &reader.id,
        }
    }

    fn size(&self) -> u64 {
        match self {
            Served::Writer(volume) => volume.size(),
            Served::Reader(reader) => reader.size(),
        }
    }

    fn block_size(&self) -> u32 {
        match self {
            Served::Writer(volume) => volume.block_size,
            Served::Reader(reader) => reader.block_size,
        }
    }

    fn info(&self) -> blockgate_nbd::ExportInfo {
        match self {
            Served::Writer(volume) => crate::exports::device_info(volume),
            Served::Reader(reader) => reader.info(),
        }
    }

    fn device(&self) -> Arc<dyn blockgate_nbd::BlockDevice> {
        match self {
            Served::Writer(volume) => crate::exports::device(volume.clone()),
            Served::Reader(reader) => reader.device(),
        }
    }
}

/// What an attach, expand or list answers.
fn attachment(
    record: &AttachmentRecord,
    served: Option<&Served>,
    device: &Path,
) -> proto::Attachment {
    proto::Attachment {
        volume_id: record.volume.clone(),
        epoch: record.epoch,
        device_path: device.display().to_string(),
        size_bytes: served.map_or(0, Served::size),
        block_size: served.map_or(4096, Served::block_size),
        readonly: record.readonly,
        frontend: "nbd".to_string(),
        connections: record.connections,
    }
}

/// The node service's state: attachments by volume, behind one lock so requests for the
/// node apply one at a time (they are rare and each is short next to its I/O).
#[derive(Debug)]
pub struct Node {
    engine: Arc<Engine>,
    kernel: Arc<dyn KernelDevices>,
    config: NodeConfig,
    attachments: Mutex<BTreeMap<String, Attached>>,
    /// Volumes whose kernel connection ended on its own (the kernel timed a request out and
    /// dropped the socket, or dropped a socket it had no dead slot for): the repair task
    /// gives the device a fresh one.
    repairs: mpsc::UnboundedSender<String>,
}

impl Node {
    /// The node service; also starts its connection-repair task (which ends with it).
    pub fn new(
        engine: Arc<Engine>,
        kernel: Arc<dyn KernelDevices>,
        config: NodeConfig,
    ) -> Arc<Node> {
        let (repairs, mut requests) = mpsc::unbounded_channel::<String>();
        let node = Arc::new(Node {
            engine,
            kernel,
            config,
            attachments: Mutex::new(BTreeMap::new()),
            repairs,
        });
        let weak = Arc::downgrade(&node);
        tokio::spawn(async move {
            while let Some(volume) = requests.recv().await {
                // A pause before acting: the kernel marks a connection dead from its own
                // worker, and a socket handed over before that would be dropped again.
                tokio::time::sleep(REPAIR_DELAY).await;
                let Some(node) = weak.upgrade() else { break };
                node.repair(&volume).await;
            }
        });
        node
    }

    /// Gives a device fresh sockets for the connections it lost while attached.
    async fn repair(&self, volume_id: &str) {
        let mut attachments = self.attachments.lock().await;
        let Some(attached) = attachments.get_mut(volume_id) else {
            return;
        };
        let wanted = usize::try_from(attached.record.connections).unwrap_or(usize::MAX);
        let missing = wanted.saturating_sub(attached.sessions.live());
        if attached.engine_detached || attached.device_lost || missing == 0 {
            return;
        }
        let served = match &attached.reader {
            Some(reader) => Served::Reader(reader.clone()),
            None => {
                let Ok(volume) = self.engine.volume(volume_id) else {
                    return;
                };
                if volume.epoch() != attached.record.epoch {
                    return;
                }
                Served::Writer(volume)
            }
        };
        let count = u32::try_from(missing).unwrap_or(attached.record.connections);
        let sockets = match self.serve_sockets(&served, count, &mut attached.sessions) {
            Ok(sockets) => sockets,
            Err(error) => {
                tracing::error!(volume = %volume_id, %error, cause = %error_chain(&error), "cannot create sockets to repair the kernel device");
                return;
            }
        };
        let index = attached.record.index;
        match self
            .kernel
            .reconfigure(index, &Node::backend(volume_id), sockets)
            .await
        {
            Ok(()) => {
                tracing::warn!(volume = %volume_id, index, connections = count, "kernel connections lost while attached were replaced")
            }
            Err(error) => {
                attached.device_lost = true;
                tracing::error!(volume = %volume_id, index, %error, cause = %error_chain(&error), "the kernel device is gone (disconnected outside this gateway?): attach again to reconnect");
            }
        }
    }

    fn backend(volume: &str) -> String {
        format!("blockgate:{volume}")
    }

    fn device_config(&self, served: &Served) -> DeviceConfig {
        DeviceConfig {
            size: served.size(),
            block_size: served.block_size(),
            server_flags: served.info().transmission_flags(),
            request_timeout_seconds: self.config.request_timeout_seconds,
            dead_connection_timeout_seconds: self.config.dead_connection_timeout_seconds,
            backend: Node::backend(served.id()),
        }
    }

    /// Creates `count` socketpairs, serves one end of each on `volume` as part of
    /// `sessions`, and returns the other ends for the kernel.
    fn serve_sockets(
        &self,
        served: &Served,
        count: u32,
        sessions: &mut Sessions,
    ) -> Result<Vec<OwnedFd>, NodeError> {
        let mut kernel_ends = Vec::new();
        let mut ours = Vec::new();
        for _ in 0..count {
            // std's pair() is socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC).
            let (kernel_end, our_end) =
                std::os::unix::net::UnixStream::pair().map_err(NodeError::Sockets)?;
            our_end.set_nonblocking(true).map_err(NodeError::Sockets)?;
            let stream = tokio::net::UnixStream::from_std(our_end).map_err(NodeError::Sockets)?;
            kernel_ends.push(OwnedFd::from(kernel_end));
            ours.push(stream);
        }
        for stream in ours {
            let device = served.device();
            let live = LiveSession::new(sessions.live.clone());
            let id = served.id().to_string();
            let repairs = self.repairs.clone();
            sessions.tasks.push(tokio::spawn(async move {
                let options = blockgate_nbd::ServeOptions {
                    max_in_flight: 128,
                    ..blockgate_nbd::ServeOptions::default()
                };
                match blockgate_nbd::serve_transmission(stream, device, &options).await {
                    Ok(()) => tracing::info!(volume = %id, "kernel connection closed"),
                    Err(error) => {
                        tracing::warn!(volume = %id, %error, cause = %error_chain(&error), "kernel connection ended with an error");
                    }
                }
                // Not reached when the session is stopped on purpose (the task is aborted).
                drop(live);
                let _ = repairs.send(id);
            }));
        }
        Ok(kernel_ends)
    }

    /// Gives the kernel a device serving `volume`: fresh sockets for the recorded device when
    /// the kernel still has it configured, else a newly connected device (at the recorded
    /// index when it is free). Returns the sessions and the device index.
    async fn connect_device(
        &self,
        served: &Served,
        connections: u32,
        recorded: Option<u32>,
    ) -> Result<(u32, Sessions), NodeError> {
        let kernel_error = |source| NodeError::Kernel {
            volume: served.id().to_string(),
            source,
        };
        if let Some(index) = recorded
            && self.kernel.status(index).await.map_err(kernel_error)?
                == Some(DeviceState::Configured)
        {
            let mut sessions = Sessions::default();
            let sockets = self.serve_sockets(served, connections, &mut sessions)?;
            match self
                .kernel
                .reconfigure(index, &Node::backend(served.id()), sockets)
                .await
            {
                Ok(()) => {
                    tracing::info!(volume = %served.id(), index, "kernel device reconnected to this gateway");
                    return Ok((index, sessions));
                }
                Err(error) => {
                    sessions.stop().await;
                    return Err(kernel_error(error));
                }
            }
        }
        let mut sessions = Sessions::default();
        let sockets = self.serve_sockets(served, connections, &mut sessions)?;
        let config = self.device_config(served);
        match self.kernel.connect(&config, recorded, sockets).await {
            Ok(index) => {
                if recorded.is_some() {
                    tracing::warn!(volume = %served.id(), index, "the kernel no longer had the device; connected it anew");
                }
                Ok((index, sessions))
            }
            Err(KernelError::NoFreeDevice | KernelError::Refused { .. }) if recorded.is_some() => {
                // The recorded index is taken by someone else: any free device will do,
                // though whoever mounted the old path must look again.
                sessions.stop().await;
                let mut sessions = Sessions::default();
                let sockets = self.serve_sockets(served, connections, &mut sessions)?;
                let index = self
                    .kernel
                    .connect(&config, None, sockets)
                    .await
                    .map_err(kernel_error)?;
                tracing::error!(volume = %served.id(), old_index = ?recorded, index, "the recorded nbd device is in use by something else: the volume is now on another device");
                Ok((index, sessions))
            }
            Err(error) => {
                sessions.stop().await;
                Err(kernel_error(error))
            }
        }
    }

    fn save(&self, attachments: &BTreeMap<String, Attached>) -> Result<(), NodeError> {
        let state = StateFile {
            attachments: attachments.values().map(|a| a.record.clone()).collect(),
        };
        let path = &self.config.state_path;
        let error = |source| NodeError::SaveState {
            path: path.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(&state).map_err(|e| error(e.into()))?;
        let temporary = path.with_extension("json.tmp");
        let mut file = std::fs::File::create(&temporary).map_err(error)?;
        file.write_all(&body).map_err(error)?;
        file.sync_all().map_err(error)?;
        std::fs::rename(&temporary, path).map_err(error)?;
        if let Some(parent) = path.parent() {
            std::fs::File::open(parent)
                .and_then(|dir| dir.sync_all())
                .map_err(error)?;
        }
        Ok(())
    }

    fn load(&self) -> Result<Vec<AttachmentRecord>, NodeError> {
        let path = &self.config.state_path;
        match std::fs::read(path) {
            Ok(body) => serde_json::from_slice::<StateFile>(&body)
                .map(|state| state.attachments)
                .map_err(|e| NodeError::LoadState {
                    path: path.clone(),
                    source: e.into(),
                }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(NodeError::LoadState {
                path: path.clone(),
                source,
            }),
        }
    }

    /// At start: reattach what the state file lists. A record that cannot be served now
    /// (the volume fails to open, the kernel cannot be reached) is kept, and shows as
    /// abnormal in its stats; attaching it again retries.
    pub async fn recover(&self) -> Result<(), NodeError> {
        let records = self.load()?;
        let mut attachments = self.attachments.lock().await;
        for record in records {
            let id = record.volume.clone();
            let mut attached = Attached {
                record,
                sessions: Sessions::default(),
                engine_detached: false,
                device_lost: false,
                reader: None,
            };
            let opened = if attached.record.readonly {
                ReaderVolume::open(
                    self.engine.store().clone(),
                    self.engine.config().block_size,
                    &id,
                )
                .await
                .map(|reader| {
                    attached.reader = Some(reader.clone());
                    Served::Reader(reader)
                })
            } else {
                self.engine
                    .attach_volume(&id, attached.record.epoch)
                    .await
                    .map(Served::Writer)
            };
            match opened {
                Ok(served) => {
                    match self
                        .connect_device(
                            &served,
                            attached.record.connections,
                            Some(attached.record.index),
                        )
                        .await
                    {
                        Ok((index, sessions)) => {
                            attached.record.index = index;
                            attached.sessions = sessions;
                        }
                        Err(error) => {
                            tracing::error!(volume = %id, %error, cause = %error_chain(&error), "attached volume not reconnected to its kernel device");
                        }
                    }
                }
                Err(error) => {
                    tracing::error!(volume = %id, %error, cause = %error_chain(&error), "attached volume cannot be reopened");
                }
            }
            attachments.insert(id, attached);
        }
        self.save(&attachments)
    }

    /// Ends every kernel connection, keeping the attachments (the gateway is stopping).
    pub async fn suspend(&self) {
        let mut attachments = self.attachments.lock().await;
        for attached in attachments.values_mut() {
            attached.sessions.stop().await;
        }
    }

    pub async fn attach(
        &self,
        volume_id: &str,
        epoch: u64,
        readonly: bool,
        connections: u32,
    ) -> Result<proto::Attachment, NodeError> {
        if volume_id.is_empty() {
            return Err(NodeError::InvalidArgument(
                "volume_id is required".to_string(),
            ));
        }
        let connections = match connections {
            0 => self.config.default_connections,
            n if n > MAX_CONNECTIONS => {
                return Err(NodeError::InvalidArgument(format!(
                    "connections {n} is over the limit of {MAX_CONNECTIONS}"
                )));
            }
            n => n,
        };
        if readonly {
            return self.attach_reader(volume_id, connections).await;
        }
        let engine_error = |source| NodeError::Engine {
            volume: volume_id.to_string(),
            source,
        };
        let mut attachments = self.attachments.lock().await;
        if attachments
            .get(volume_id)
            .is_some_and(|a| a.record.readonly)
        {
            return Err(NodeError::ReadOnlyConflict {
                volume: volume_id.to_string(),
                reason:
                    "it is attached read-only here; detach it before attaching it as the writer"
                        .to_string(),
            });
        }
        // The engine decides about epochs: the same one returns the open volume, a newer one
        // reopens it (the log continues), an older one is refused as stale.
        let volume = Served::Writer(
            self.engine
                .attach_volume(volume_id, epoch)
                .await
                .map_err(engine_error)?,
        );
        if let Some(attached) = attachments.get_mut(volume_id) {
            let same = attached.record.epoch == epoch && !attached.engine_detached;
            if same && attached.sessions.live() > 0 {
                return Ok(attachment(
                    &attached.record,
                    Some(&volume),
                    &self.kernel.device_path(attached.record.index),
                ));
            }
            // A new epoch (the old volume is closed, its sessions answer ESHUTDOWN), or the
            // device lost its connections: the same device gets sockets on this volume.
            attached.sessions.stop().await;
            let (index, sessions) = self
                .connect_device(&volume, connections, Some(attached.record.index))
                .await?;
            attached.sessions = sessions;
            attached.engine_detached = false;
            attached.device_lost = false;
            attached.record = AttachmentRecord {
                volume: volume_id.to_string(),
                epoch,
                index,
                readonly,
                connections,
            };
            let answer = attachment(
                &attached.record,
                Some(&volume),
                &self.kernel.device_path(index),
            );
            self.save(&attachments)?;
            return Ok(answer);
        }
        let (index, mut sessions) = self.connect_device(&volume, connections, None).await?;
        let record = AttachmentRecord {
            volume: volume_id.to_string(),
            epoch,
            index,
            readonly,
            connections,
        };
        let answer = attachment(&record, Some(&volume), &self.kernel.device_path(index));
        attachments.insert(
            volume_id.to_string(),
            Attached {
                record,
                sessions: Sessions::default(),
                engine_detached: false,
                device_lost: false,
                reader: None,
            },
        );
        if let Err(error) = self.save(&attachments) {
            // Unrecorded, the device would be orphaned by a restart: undo it.
            attachments.remove(volume_id);
            if let Err(undo) = self.kernel.disconnect(index).await {
                tracing::error!(volume = %volume_id, index, error = %undo, "cannot disconnect the device of a failed attach");
            }
            sessions.stop().await;
            return Err(error);
        }
        if let Some(attached) = attachments.get_mut(volume_id) {
            attached.sessions = sessions;
        }
        tracing::info!(volume = %volume_id, epoch, index, connections, "volume attached to a kernel device");
        Ok(answer)
    }

    /// Attaches a reader: the volume's bucket state on a read-only device. Refused while the
    /// volume is open here as a writer (the block-storage API refuses readers while any
    /// writer is attached, and this gateway must not serve both).
    async fn attach_reader(
        &self,
        volume_id: &str,
        connections: u32,
    ) -> Result<proto::Attachment, NodeError> {
        let mut attachments = self.attachments.lock().await;
        if self.engine.volume(volume_id).is_ok()
            || attachments
                .get(volume_id)
                .is_some_and(|a| !a.record.readonly)
        {
            return Err(NodeError::ReadOnlyConflict {
                volume: volume_id.to_string(),
                reason:
                    "it is attached here as the writer; detach it before attaching it read-only"
                        .to_string(),
            });
        }
        if let Some(attached) = attachments.get_mut(volume_id)
            && let Some(reader) = attached.reader.clone()
        {
            let served = Served::Reader(reader);
            if attached.sessions.live() == 0 || attached.device_lost {
                attached.sessions.stop().await;
                let (index, sessions) = self
                    .connect_device(&served, connections, Some(attached.record.index))
                    .await?;
                attached.sessions = sessions;
                attached.device_lost = false;
                attached.record.index = index;
                self.save(&attachments)?;
            }
            let attached = &attachments[volume_id];
            return Ok(attachment(
                &attached.record,
                Some(&served),
                &self.kernel.device_path(attached.record.index),
            ));
        }
        let reader = ReaderVolume::open(
            self.engine.store().clone(),
            self.engine.config().block_size,
            volume_id,
        )
        .await
        .map_err(|source| NodeError::Engine {
            volume: volume_id.to_string(),
            source,
        })?;
        let served = Served::Reader(reader.clone());
        let (index, mut sessions) = self.connect_device(&served, connections, None).await?;
        let record = AttachmentRecord {
            volume: volume_id.to_string(),
            epoch: 0,
            index,
            readonly: true,
            connections,
        };
        let answer = attachment(&record, Some(&served), &self.kernel.device_path(index));
        attachments.insert(
            volume_id.to_string(),
            Attached {
                record,
                sessions: Sessions::default(),
                engine_detached: false,
                device_lost: false,
                reader: Some(reader),
            },
        );
        if let Err(error) = self.save(&attachments) {
            attachments.remove(volume_id);
            if let Err(undo) = self.kernel.disconnect(index).await {
                tracing::error!(volume = %volume_id, index, error = %undo, "cannot disconnect the device of a failed attach");
            }
            sessions.stop().await;
            return Err(error);
        }
        if let Some(attached) = attachments.get_mut(volume_id) {
            attached.sessions = sessions;
        }
        tracing::info!(volume = %volume_id, index, connections, "volume attached read-only to a kernel device");
        Ok(answer)
    }

    /// Uploads everything, then disconnects the device.
    ///
    /// The order is drain first, disconnect second. By the time the CSI node plugin detaches,
    /// nothing is mounted above the device; the kernel is asked to write back anything it
    /// still caches of the device, then the engine uploads the log and closes the volume. If
    /// that fails (the bucket is unreachable, or the upload takes longer than the timeout),
    /// the device is still connected and the attachment unchanged, so a retry or a pod that
    /// comes back to this node finds it working. Disconnecting first would leave a failed
    /// detach with a volume attached and no device, and drop whatever the kernel still held.
    pub async fn detach(&self, volume_id: &str, timeout: Duration) -> Result<(), NodeError> {
        let mut attachments = self.attachments.lock().await;
        let Some(attached) = attachments.get_mut(volume_id) else {
            return Ok(());
        };
        let index = attached.record.index;
        let kernel_error = |source| NodeError::Kernel {
            volume: volume_id.to_string(),
            source,
        };
        if attached.record.readonly {
            // A reader holds nothing to upload.
            attached.engine_detached = true;
        }
        if !attached.engine_detached {
            if attached.sessions.live() > 0
                && let Err(error) = self.kernel.flush(index).await
            {
                tracing::warn!(volume = %volume_id, index, %error, cause = %error_chain(&error), "cannot write back the kernel's cache of the device before detach");
            }
            self.engine
                .detach_volume(volume_id, timeout)
                .await
                .map_err(|source| NodeError::Engine {
                    volume: volume_id.to_string(),
                    source,
                })?;
            attached.engine_detached = true;
        }
        match self.kernel.status(index).await.map_err(kernel_error)? {
            Some(DeviceState::Configured) => {
                self.kernel.disconnect(index).await.map_err(kernel_error)?;
            }
            Some(DeviceState::Unconfigured) | None => {}
        }
        attached.sessions.stop().await;
        attachments.remove(volume_id);
        self.save(&attachments)?;
        tracing::info!(volume = %volume_id, index, "volume detached and its device disconnected");
        Ok(())
    }

    pub async fn list(&self) -> Vec<proto::Attachment> {
        let attachments = self.attachments.lock().await;
        attachments
            .values()
            .map(|attached| {
                let served = match &attached.reader {
                    Some(reader) => Some(Served::Reader(reader.clone())),
                    None => self
                        .engine
                        .volume(&attached.record.volume)
                        .ok()
                        .map(Served::Writer),
                };
                attachment(
                    &attached.record,
                    served.as_ref(),
                    &self.kernel.device_path(attached.record.index),
                )
            })
            .collect()
    }

    pub async fn expand(&self, volume_id: &str, size: u64) -> Result<proto::Attachment, NodeError> {
        let attachments = self.attachments.lock().await;
        let attached = attachments
            .get(volume_id)
            .filter(|a| !a.engine_detached)
            .ok_or_else(|| NodeError::NotAttached {
                volume: volume_id.to_string(),
            })?;
        if attached.record.readonly {
            return Err(NodeError::ReadOnlyConflict {
                volume: volume_id.to_string(),
                reason: "it is attached read-only here and cannot grow".to_string(),
            });
        }
        let engine_error = |source| NodeError::Engine {
            volume: volume_id.to_string(),
            source,
        };
        self.engine
            .expand_volume(volume_id, size)
            .await
            .map_err(engine_error)?;
        let volume = self.engine.volume(volume_id).map_err(engine_error)?;
        let index = attached.record.index;
        self.kernel
            .resize(index, &Node::backend(volume_id), volume.size())
            .await
            .map_err(|source| NodeError::Kernel {
                volume: volume_id.to_string(),
                source,
            })?;
        Ok(attachment(
            &attached.record,
            Some(&Served::Writer(volume)),
            &self.kernel.device_path(index),
        ))
    }

    pub async fn stats(&self, volume_id: &str) -> Result<proto::VolumeStats, NodeError> {
        let attachments = self.attachments.lock().await;
        let attached = attachments
            .get(volume_id)
            .filter(|a| !a.engine_detached)
            .ok_or_else(|| NodeError::NotAttached {
                volume: volume_id.to_string(),
            })?;
        let device = match self.kernel.status(attached.record.index).await {
            Ok(state) => Ok(state),
            Err(error) => Err(error.to_string()),
        };
        if let Some(reader) = &attached.reader {
            let mut problems = Vec::new();
            if device.as_ref().ok() != Some(&Some(DeviceState::Configured)) {
                problems.push(format!(
                    "the kernel device nbd{} is not connected",
                    attached.record.index
                ));
            }
            if attached.sessions.live() == 0 {
                problems.push("no kernel connection is served by this gateway".to_string());
            }
            return Ok(proto::VolumeStats {
                volume_id: volume_id.to_string(),
                size_bytes: reader.size(),
                condition: Some(proto::VolumeCondition {
                    abnormal: !problems.is_empty(),
                    message: if problems.is_empty() {
                        "ok (read-only)".to_string()
                    } else {
                        problems.join("; ")
                    },
                }),
                epoch: 0,
                fenced: false,
                upload_backlog_bytes: 0,
                write_log_bytes: 0,
            });
        }
        let engine_error = |source| NodeError::Engine {
            volume: volume_id.to_string(),
            source,
        };
        let volume = self.engine.volume(volume_id).map_err(engine_error)?;
        let status = volume.status().map_err(engine_error)?;
        let mut problems = Vec::new();
        if status.fenced {
            problems.push(
                "the volume was taken over by a newer writer; this gateway refuses its I/O"
                    .to_string(),
            );
        }
        if let Some(error) = &status.last_upload_error {
            problems.push(format!("uploads to the object store are failing: {error}"));
        }
        match device {
            Ok(Some(DeviceState::Configured)) => {}
            Ok(_) => problems.push(format!(
                "the kernel device nbd{} is disconnected",
                attached.record.index
            )),
            Err(error) => problems.push(format!("the kernel device cannot be queried: {error}")),
        }
        if attached.sessions.live() == 0 {
            problems.push("no kernel connection is served by this gateway".to_string());
        }
        Ok(proto::VolumeStats {
            volume_id: volume_id.to_string(),
            size_bytes: status.size,
            condition: Some(proto::VolumeCondition {
                abnormal: !problems.is_empty(),
                message: if problems.is_empty() {
                    "ok".to_string()
                } else {
                    problems.join("; ")
                },
            }),
            epoch: status.epoch,
            fenced: status.fenced,
            // The write log holds exactly what is not uploaded yet: it frees data once the
            // bucket has it.
            upload_backlog_bytes: status.log_bytes,
            write_log_bytes: status.log_bytes,
        })
    }
}

/// `NodeGateway` over a [`Node`].
#[derive(Debug, Clone)]
pub struct NodeService {
    node: Arc<Node>,
}

impl NodeService {
    pub fn new(node: Arc<Node>) -> NodeService {
        NodeService { node }
    }
}

fn log_failure(call: &str, volume: &str, error: NodeError) -> Status {
    tracing::warn!(call, volume, %error, cause = %error_chain(&error), "node request failed");
    error.into()
}

#[tonic::async_trait]
impl NodeGateway for NodeService {
    async fn attach_volume(
        &self,
        request: Request<proto::AttachVolumeRequest>,
    ) -> Result<Response<proto::Attachment>, Status> {
        let request = request.into_inner();
        tracing::info!(volume = %request.volume_id, epoch = request.epoch, readonly = request.readonly, "attach");
        self.node
            .attach(
                &request.volume_id,
                request.epoch,
                request.readonly,
                request.connections,
            )
            .await
            .map(Response::new)
            .map_err(|e| log_failure("attach", &request.volume_id, e))
    }

    async fn detach_volume(
        &self,
        request: Request<proto::DetachVolumeRequest>,
    ) -> Result<Response<proto::DetachVolumeResponse>, Status> {
        let request = request.into_inner();
        tracing::info!(volume = %request.volume_id, "detach");
        let timeout = match request.timeout_seconds {
            0 => DEFAULT_DETACH_TIMEOUT,
            seconds => Duration::from_secs(u64::from(seconds)),
        };
        self.node
            .detach(&request.volume_id, timeout)
            .await
            .map(|()| Response::new(proto::DetachVolumeResponse {}))
            .map_err(|e| log_failure("detach", &request.volume_id, e))
    }

    async fn list_attachments(
        &self,
        _request: Request<proto::ListAttachmentsRequest>,
    ) -> Result<Response<proto::ListAttachmentsResponse>, Status> {
        Ok(Response::new(proto::ListAttachmentsResponse {
            attachments: self.node.list().await,
        }))
    }

    async fn expand_volume(
        &self,
        request: Request<proto::ExpandVolumeRequest>,
    ) -> Result<Response<proto::Attachment>, Status> {
        let request = request.into_inner();
        tracing::info!(volume = %request.volume_id, size = request.size_bytes, "expand");
        self.node
            .expand(&request.volume_id, request.size_bytes)
            .await
            .map(Response::new)
            .map_err(|e| log_failure("expand", &request.volume_id, e))
    }

    async fn get_volume_stats(
        &self,
        request: Request<proto::GetVolumeStatsRequest>,
    ) -> Result<Response<proto::VolumeStats>, Status> {
        let request = request.into_inner();
        self.node
            .stats(&request.volume_id)
            .await
            .map(Response::new)
            .map_err(|e| log_failure("stats", &request.volume_id, e))
    }
}

/// Serves the node API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    node: Arc<Node>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(NodeGatewayServer::new(NodeService::new(node)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await
}

/// A client of the node API on `socket`.
pub async fn connect(
    socket: &Path,
) -> Result<
    proto::node_gateway_client::NodeGatewayClient<tonic::transport::Channel>,
    tonic::transport::Error,
> {
    let channel = blockgate_proto::unix::connect(socket).await?;
    Ok(proto::node_gateway_client::NodeGatewayClient::new(channel))
}

/// An attachment as the CLI prints it.
pub fn attachment_json(attachment: &proto::Attachment) -> serde_json::Value {
    serde_json::json!({
        "volume_id": attachment.volume_id,
        "epoch": attachment.epoch,
        "device_path": attachment.device_path,
        "size_bytes": attachment.size_bytes,
        "block_size": attachment.block_size,
        "readonly": attachment.readonly,
        "frontend": attachment.frontend,
        "connections": attachment.connections,
    })
}

/// Volume stats as the CLI prints them.
pub fn stats_json(stats: &proto::VolumeStats) -> serde_json::Value {
    let condition = stats.condition.clone().unwrap_or_default();
    serde_json::json!({
        "volume_id": stats.volume_id,
        "size_bytes": stats.size_bytes,
        "epoch": stats.epoch,
        "fenced": stats.fenced,
        "upload_backlog_bytes": stats.upload_backlog_bytes,
        "write_log_bytes": stats.write_log_bytes,
        "condition": { "abnormal": condition.abnormal, "message": condition.message },
    })
}

#[cfg(test)]
mod tests;
