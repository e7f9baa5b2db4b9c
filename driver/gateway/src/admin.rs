//! The local admin endpoint: a unix socket in the data directory that the gateway's own
//! command-line tools use to manage volumes and snapshots while it serves.
//!
//! One JSON request per line, one JSON response per line. This is a local convenience, not
//! the control plane: the operator's control channel (DESIGN.md §6) replaces it for managed
//! gateways.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blockgate_blockstore::documents::Mode;
use blockgate_engine::{Engine, EngineError, Volume, VolumeSource, VolumeSpec};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    CreateVolume {
        id: String,
        size: u64,
        mode: Mode,
        #[serde(default)]
        from_snapshot: Option<String>,
        #[serde(default)]
        clone_of: Option<String>,
    },
    ListVolumes,
    ExpandVolume {
        id: String,
        size: u64,
    },
    DeleteVolume {
        id: String,
    },
    FlushVolume {
        id: String,
    },
    CreateSnapshot {
        volume: String,
        id: String,
    },
    GetSnapshot {
        id: String,
    },
    WaitSnapshot {
        id: String,
        timeout_seconds: u64,
    },
    ListSnapshots {
        #[serde(default)]
        volume: Option<String>,
    },
    DeleteSnapshot {
        id: String,
    },
    CollectGarbage,
    /// Attach a volume to this gateway as its writer with `epoch` (from the control plane).
    AttachVolume {
        id: String,
        epoch: u64,
    },
    /// Upload everything, then close the volume and remove its local state.
    DetachVolume {
        id: String,
        #[serde(default = "default_detach_timeout")]
        timeout_seconds: u64,
    },
}

/// How long a detach waits for the write log to reach the bucket when the request does not
/// say.
pub const DEFAULT_DETACH_TIMEOUT_SECONDS: u64 = 300;

fn default_detach_timeout() -> u64 {
    DEFAULT_DETACH_TIMEOUT_SECONDS
}

/// What admin requests act on.
#[derive(Debug)]
pub struct AdminContext {
    pub engine: Arc<Engine>,
    /// The NBD unix socket, for the export URIs in volume answers.
    pub nbd_socket: PathBuf,
}

impl AdminContext {
    /// `nbd+unix:///ID?socket=...`, as the gateway prints for its exports.
    pub fn export_uri(&self, volume: &str) -> String {
        export_uri(volume, &self.nbd_socket)
    }

    /// A volume's status with the URI it is exported at.
    fn volume_json(&self, volume: &Volume) -> Result<serde_json::Value, EngineError> {
        let mut value = serde_json::to_value(volume.status()?).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.insert(
                "export_uri".to_string(),
                serde_json::Value::String(self.export_uri(&volume.id)),
            );
        }
        Ok(value)
    }
}

/// `nbd+unix:///ID?socket=...`.
pub fn export_uri(volume: &str, nbd_socket: &Path) -> String {
    format!("nbd+unix:///{volume}?socket={}", nbd_socket.display())
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Response {
    Ok(serde_json::Value),
    Error { kind: String, message: String },
}

fn error_kind(error: &EngineError) -> &'static str {
    match error {
        EngineError::VolumeNotFound { .. } | EngineError::SnapshotNotFound { .. } => "not-found",
        EngineError::VolumeExists { .. } | EngineError::SnapshotExists { .. } => "already-exists",
        EngineError::InvalidArgument(_)
        | EngineError::OutOfRange { .. }
        | EngineError::Shrink { .. } => "invalid-argument",
        EngineError::SnapshotInUse { .. }
        | EngineError::Fenced { .. }
        | EngineError::Closed { .. } => "failed-precondition",
        EngineError::Store { .. } => "unavailable",
        EngineError::DrainTimeout { .. } => "deadline-exceeded",
        EngineError::LogDiskFull { .. } => "resource-exhausted",
        EngineError::Corrupt { .. }
        | EngineError::LogIo { .. }
        | EngineError::LocalIo { .. }
        | EngineError::DirectoryLocked { .. } => "internal",
    }
}

async fn handle(
    context: &AdminContext,
    request: Request,
) -> Result<serde_json::Value, EngineError> {
    let engine = &context.engine;
    let json = |value: &dyn erased::Json| value.to_json();
    match request {
        Request::CreateVolume {
            id,
            size,
            mode,
            from_snapshot,
            clone_of,
        } => {
            let source = match (from_snapshot, clone_of) {
                (None, None) => VolumeSource::Empty,
                (Some(snapshot), None) => VolumeSource::Snapshot(snapshot),
                (None, Some(volume)) => VolumeSource::Volume(volume),
                (Some(_), Some(_)) => {
                    return Err(EngineError::InvalidArgument(
                        "give a source snapshot or a volume to clone, not both".to_string(),
                    ));
                }
            };
            let volume = engine
                .create_volume(VolumeSpec {
                    id,
                    size,
                    mode,
                    source,
                })
                .await?;
            context.volume_json(&volume)
        }
        Request::ListVolumes => {
            let mut statuses = Vec::new();
            for volume in engine.volumes() {
                statuses.push(context.volume_json(&volume)?);
            }
            Ok(serde_json::Value::Array(statuses))
        }
        Request::ExpandVolume { id, size } => {
            engine.expand_volume(&id, size).await?;
            Ok(json(&engine.volume(&id)?.status()?))
        }
        Request::DeleteVolume { id } => {
            engine.delete_volume(&id).await?;
            Ok(serde_json::Value::Null)
        }
        Request::FlushVolume { id } => {
            engine.volume(&id)?.flush().await?;
            Ok(serde_json::Value::Null)
        }
        Request::CreateSnapshot { volume, id } => {
            Ok(json(&engine.create_snapshot(&volume, &id).await?))
        }
        Request::GetSnapshot { id } => Ok(json(&engine.snapshot(&id).await?)),
        Request::WaitSnapshot {
            id,
            timeout_seconds,
        } => Ok(json(
            &engine
                .wait_snapshot_ready(&id, Duration::from_secs(timeout_seconds))
                .await?,
        )),
        Request::ListSnapshots { volume } => {
            Ok(json(&engine.list_snapshots(volume.as_deref()).await?))
        }
        Request::DeleteSnapshot { id } => {
            engine.delete_snapshot(&id).await?;
            Ok(serde_json::Value::Null)
        }
        Request::CollectGarbage => Ok(json(&engine.collect_garbage().await?)),
        Request::AttachVolume { id, epoch } => {
            let volume = engine.attach_volume(&id, epoch).await?;
            context.volume_json(&volume)
        }
        Request::DetachVolume {
            id,
            timeout_seconds,
        } => {
            engine
                .detach_volume(&id, Duration::from_secs(timeout_seconds))
                .await?;
            Ok(serde_json::Value::Null)
        }
    }
}

mod erased {
    /// Lets `handle` turn any serialisable answer into JSON in one place.
    pub trait Json {
        fn to_json(&self) -> serde_json::Value;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> serde_json::Value {
            serde_json::to_value(self).unwrap_or(serde_json::Value::Null)
        }
    }
}

/// Serves the admin socket until the task is dropped.
pub async fn serve(listener: UnixListener, context: Arc<AdminContext>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin socket accept failed");
                continue;
            }
        };
        let context = context.clone();
        tokio::spawn(async move {
            if let Err(error) = serve_connection(stream, &context).await {
                tracing::debug!(%error, "admin connection ended");
            }
        });
    }
}

async fn serve_connection(stream: UnixStream, context: &AdminContext) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                tracing::info!(?request, "admin request");
                match handle(context, request).await {
                    Ok(value) => Response::Ok(value),
                    Err(error) => {
                        tracing::warn!(%error, cause = %blockgate_engine::error_chain(&error), "admin request failed");
                        Response::Error {
                            kind: error_kind(&error).to_string(),
                            message: format!("{error}{}", cause_suffix(&error)),
                        }
                    }
                }
            }
            Err(error) => Response::Error {
                kind: "invalid-argument".to_string(),
                message: format!("malformed admin request: {error}"),
            },
        };
        let mut body = serde_json::to_vec(&response).unwrap_or_default();
        body.push(b'\n');
        write.write_all(&body).await?;
    }
    Ok(())
}

fn cause_suffix(error: &EngineError) -> String {
    let chain = blockgate_engine::error_chain(error);
    if chain.is_empty() {
        String::new()
    } else {
        format!(": {chain}")
    }
}

/// Sends one request to a gateway's admin socket.
pub async fn call(socket: &Path, request: &Request) -> anyhow::Result<serde_json::Value> {
    let stream = UnixStream::connect(socket).await.map_err(|error| {
        anyhow::anyhow!(
            "cannot reach the gateway's admin socket {}: {error} (is `blockgate-gateway serve` running with this --data-dir?)",
            socket.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut body = serde_json::to_vec(request)?;
    body.push(b'\n');
    write.write_all(&body).await?;
    let mut lines = BufReader::new(read).lines();
    let line = lines.next_line().await?.ok_or_else(|| {
        anyhow::anyhow!("the gateway closed the admin connection without answering")
    })?;
    match serde_json::from_str::<Response>(&line)? {
        Response::Ok(value) => Ok(value),
        Response::Error { kind, message } => Err(anyhow::anyhow!("{kind}: {message}")),
    }
}
