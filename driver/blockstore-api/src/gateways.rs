//! Reaching the gateway that holds a volume.
//!
//! A snapshot of an attached volume must include what is still in that gateway's write log,
//! and an attached volume grows through its gateway: the API asks the holder. The operator's
//! control channel (DESIGN.md §6) will implement [`Gateways`]; until it exists, a gateway's
//! local admin socket does ([`AdminSocketGateways`]), for gateways on the same machine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tonic::Code;

/// A snapshot as the holding gateway reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GatewaySnapshot {
    pub id: String,
    pub volume: String,
    pub size: u64,
    pub ready: bool,
    #[serde(default)]
    pub parent: Option<String>,
    pub created_unix: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no way to reach the gateway of node {node:?}: {reason}")]
    Unreachable { node: String, reason: String },
    #[error("the gateway of node {node:?} refused ({kind}): {message}")]
    Refused {
        node: String,
        kind: String,
        message: String,
    },
}

impl GatewayError {
    pub fn code(&self) -> Code {
        match self {
            GatewayError::Unreachable { .. } => Code::Unavailable,
            GatewayError::Refused { kind, .. } => match kind.as_str() {
                "not-found" => Code::NotFound,
                "already-exists" => Code::AlreadyExists,
                "invalid-argument" => Code::InvalidArgument,
                "failed-precondition" => Code::FailedPrecondition,
                "unavailable" => Code::Unavailable,
                "resource-exhausted" => Code::ResourceExhausted,
                "deadline-exceeded" => Code::DeadlineExceeded,
                _ => Code::Internal,
            },
        }
    }
}

/// The gateways that hold volumes, by node.
#[async_trait]
pub trait Gateways: std::fmt::Debug + Send + Sync + 'static {
    /// Cuts a snapshot of an attached volume; it is ready once the gateway uploaded it.
    async fn create_snapshot(
        &self,
        node: &str,
        volume: &str,
        snapshot: &str,
    ) -> Result<GatewaySnapshot, GatewayError>;

    /// A snapshot the gateway is still uploading (or has finished), if it knows it.
    async fn get_snapshot(
        &self,
        node: &str,
        snapshot: &str,
    ) -> Result<Option<GatewaySnapshot>, GatewayError>;

    /// Waits up to `timeout` for a snapshot to be ready.
    async fn wait_snapshot(
        &self,
        node: &str,
        snapshot: &str,
        timeout: Duration,
    ) -> Result<GatewaySnapshot, GatewayError>;

    async fn expand_volume(&self, node: &str, volume: &str, size: u64) -> Result<(), GatewayError>;

    /// Uploads everything the gateway holds of a volume and closes it there.
    async fn detach_volume(&self, node: &str, volume: &str) -> Result<(), GatewayError>;

    /// Whether the API knows how to reach this node's gateway at all.
    fn knows(&self, node: &str) -> bool;
}

/// Gateways reached through their local admin sockets (`<data-dir>/admin.sock`).
#[derive(Debug, Default, Clone)]
pub struct AdminSocketGateways {
    sockets: HashMap<String, PathBuf>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum AdminResponse {
    Ok(serde_json::Value),
    Error { kind: String, message: String },
}

/// Long enough for a detach to upload a full write log over a slow link.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(600);

impl AdminSocketGateways {
    pub fn new(sockets: HashMap<String, PathBuf>) -> AdminSocketGateways {
        AdminSocketGateways { sockets }
    }

    async fn call(
        &self,
        node: &str,
        request: serde_json::Value,
    ) -> Result<serde_json::Value, GatewayError> {
        let unreachable = |reason: String| GatewayError::Unreachable {
            node: node.to_string(),
            reason,
        };
        let path = self.sockets.get(node).ok_or_else(|| {
            unreachable("no admin socket configured for it (--gateway NODE=SOCKET)".to_string())
        })?;
        let exchange = async {
            let mut stream = UnixStream::connect(path)
                .await
                .map_err(|e| unreachable(format!("connect {}: {e}", path.display())))?;
            let mut line = serde_json::to_vec(&request)
                .map_err(|e| unreachable(format!("encode request: {e}")))?;
            line.push(b'\n');
            stream
                .write_all(&line)
                .await
                .map_err(|e| unreachable(format!("send to {}: {e}", path.display())))?;
            let mut reply = String::new();
            BufReader::new(stream)
                .read_line(&mut reply)
                .await
                .map_err(|e| unreachable(format!("read from {}: {e}", path.display())))?;
            if reply.is_empty() {
                return Err(unreachable(format!(
                    "{} closed without a reply",
                    path.display()
                )));
            }
            match serde_json::from_str::<AdminResponse>(&reply) {
                Ok(AdminResponse::Ok(value)) => Ok(value),
                Ok(AdminResponse::Error { kind, message }) => Err(GatewayError::Refused {
                    node: node.to_string(),
                    kind,
                    message,
                }),
                Err(e) => Err(unreachable(format!("unexpected reply {reply:?}: {e}"))),
            }
        };
        tokio::time::timeout(ADMIN_TIMEOUT, exchange)
            .await
            .map_err(|_| unreachable(format!("no reply within {ADMIN_TIMEOUT:?}")))?
    }

    fn snapshot(node: &str, value: serde_json::Value) -> Result<GatewaySnapshot, GatewayError> {
        serde_json::from_value(value.clone()).map_err(|e| GatewayError::Unreachable {
            node: node.to_string(),
            reason: format!("unexpected snapshot {value}: {e}"),
        })
    }
}

#[async_trait]
impl Gateways for AdminSocketGateways {
    async fn create_snapshot(
        &self,
        node: &str,
        volume: &str,
        snapshot: &str,
    ) -> Result<GatewaySnapshot, GatewayError> {
        let value = self
            .call(
                node,
                serde_json::json!({"op": "create-snapshot", "volume": volume, "id": snapshot}),
            )
            .await?;
        Self::snapshot(node, value)
    }

    async fn get_snapshot(
        &self,
        node: &str,
        snapshot: &str,
    ) -> Result<Option<GatewaySnapshot>, GatewayError> {
        match self
            .call(
                node,
                serde_json::json!({"op": "get-snapshot", "id": snapshot}),
            )
            .await
        {
            Ok(value) => Self::snapshot(node, value).map(Some),
            Err(GatewayError::Refused { kind, .. }) if kind == "not-found" => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn wait_snapshot(
        &self,
        node: &str,
        snapshot: &str,
        timeout: Duration,
    ) -> Result<GatewaySnapshot, GatewayError> {
        let value = self
            .call(
                node,
                serde_json::json!({"op": "wait-snapshot", "id": snapshot,
                    "timeout_seconds": timeout.as_secs().max(1)}),
            )
            .await?;
        Self::snapshot(node, value)
    }

    async fn expand_volume(&self, node: &str, volume: &str, size: u64) -> Result<(), GatewayError> {
        self.call(
            node,
            serde_json::json!({"op": "expand-volume", "id": volume, "size": size}),
        )
        .await
        .map(|_| ())
    }

    async fn detach_volume(&self, node: &str, volume: &str) -> Result<(), GatewayError> {
        match self
            .call(
                node,
                serde_json::json!({"op": "detach-volume", "id": volume,
                    "timeout_seconds": ADMIN_TIMEOUT.as_secs()}),
            )
            .await
        {
            Ok(_) => Ok(()),
            // Not open there: nothing to upload.
            Err(GatewayError::Refused { kind, .. }) if kind == "not-found" => Ok(()),
            Err(error) => Err(error),
        }
    }

    fn knows(&self, node: &str) -> bool {
        self.sockets.contains_key(node)
    }
}
