//! The block-storage API's [`Gateways`] over the control channel: a snapshot of an attached
//! volume, an expansion or a detach is a command on the holding gateway's stream, wherever
//! that stream is ([`Hub::send`] forwards between replicas).
//!
//! A node's gateway is `<namespace>/<storage-gateway>/<node>`: the API serves one
//! StorageGateway's bucket, and that StorageGateway's Gateway objects name the nodes that
//! have one.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use blockgate_blockstore_api::{GatewayError, GatewaySnapshot, Gateways};
use blockgate_operator_api::Gateway;
use blockgate_operator_control::{Hub, SendError};
use blockgate_proto::control::v1::{
    Command, CommandResult, CreateSnapshot, DetachVolume, ExpandVolume, command, command_output,
    command_result,
};
use kube::Api;
use kube::api::ListParams;

/// How long a snapshot command may take: the gateway waits for the upload within it and
/// answers "not ready" before it ends, so a longer wait only delays that answer.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a status question about a snapshot may take.
pub const SNAPSHOT_QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Expansion changes metadata only.
pub const EXPAND_TIMEOUT: Duration = Duration::from_secs(60);
/// Long enough for a detach to upload a full write log over a slow link (the admin socket's
/// limit too).
pub const DETACH_TIMEOUT: Duration = Duration::from_secs(600);

/// [`Gateways`] over a [`Hub`].
pub struct HubGateways {
    hub: Arc<Hub>,
    namespace: String,
    storage_gateway: String,
    /// Nodes with a Gateway object, refreshed by [`HubGateways::refresh_nodes`].
    nodes: Mutex<BTreeSet<String>>,
    /// The volume of each snapshot cut here, to ask about it again (the control channel
    /// asks by volume and snapshot).
    snapshots: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for HubGateways {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("HubGateways")
            .field(
                "storage_gateway",
                &format!("{}/{}", self.namespace, self.storage_gateway),
            )
            .finish_non_exhaustive()
    }
}

impl HubGateways {
    pub fn new(hub: Arc<Hub>, namespace: &str, storage_gateway: &str) -> HubGateways {
        HubGateways {
            hub,
            namespace: namespace.to_owned(),
            storage_gateway: storage_gateway.to_owned(),
            nodes: Mutex::new(BTreeSet::new()),
            snapshots: Mutex::new(HashMap::new()),
        }
    }

    fn gateway_id(&self, node: &str) -> String {
        format!("{}/{}/{node}", self.namespace, self.storage_gateway)
    }

    /// Re-reads which nodes have a Gateway of this StorageGateway.
    pub async fn refresh_nodes(&self, api: &Api<Gateway>) -> Result<(), kube::Error> {
        let gateways = api
            .list(
                &ListParams::default()
                    .fields(&format!("spec.storageGateway={}", self.storage_gateway)),
            )
            .await?;
        let nodes = gateways
            .items
            .into_iter()
            .map(|g| g.spec.node_name)
            .collect();
        *self.nodes.lock().unwrap_or_else(PoisonError::into_inner) = nodes;
        Ok(())
    }

    /// Refreshes the node list every `every` until the task is dropped.
    pub async fn keep_nodes_fresh(self: Arc<Self>, api: Api<Gateway>, every: Duration) {
        loop {
            if let Err(error) = self.refresh_nodes(&api).await {
                tracing::warn!(%error, "cannot list the Gateways to know which nodes have one");
            }
            tokio::time::sleep(every).await;
        }
    }

    async fn run(
        &self,
        node: &str,
        id: String,
        kind: command::Kind,
        timeout: Duration,
    ) -> Result<Option<command_output::Value>, GatewayError> {
        let gateway = self.gateway_id(node);
        let command = Command {
            id,
            deadline_unix_ms: 0,
            kind: Some(kind),
        };
        let result = self
            .hub
            .send(&gateway, command, timeout)
            .await
            .map_err(|error| send_error(node, &error))?;
        outcome(node, result)
    }

    fn remember(&self, snapshot: &str, volume: &str) {
        self.snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(snapshot.to_owned(), volume.to_owned());
    }

    fn volume_of(&self, snapshot: &str) -> Option<String> {
        self.snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(snapshot)
            .cloned()
    }

    /// Asks for the snapshot again: the gateway's create is idempotent by snapshot id, and a
    /// new command id makes it answer anew rather than from the result cache.
    async fn ask_snapshot(
        &self,
        node: &str,
        volume: &str,
        snapshot: &str,
        timeout: Duration,
    ) -> Result<GatewaySnapshot, GatewayError> {
        let value = self
            .run(
                node,
                format!("snapshot-{snapshot}-{}", random_suffix()),
                command::Kind::CreateSnapshot(CreateSnapshot {
                    volume_id: volume.to_owned(),
                    snapshot_id: snapshot.to_owned(),
                }),
                timeout,
            )
            .await?;
        snapshot_of(node, value)
    }
}

/// A fresh command id's tail; uniqueness, not secrecy, is what matters.
fn random_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn send_error(node: &str, error: &SendError) -> GatewayError {
    match error {
        SendError::NotConnected { .. } | SendError::Disconnected | SendError::Registry(_) => {
            GatewayError::Unreachable {
                node: node.to_owned(),
                reason: error.to_string(),
            }
        }
        SendError::DeadlineExceeded => GatewayError::Refused {
            node: node.to_owned(),
            kind: "deadline-exceeded".to_owned(),
            message: error.to_string(),
        },
        SendError::InvalidCommand => GatewayError::Refused {
            node: node.to_owned(),
            kind: "invalid-argument".to_owned(),
            message: error.to_string(),
        },
        SendError::Forward { status, .. } => GatewayError::Refused {
            node: node.to_owned(),
            kind: code_kind(status.code()).to_owned(),
            message: error.to_string(),
        },
    }
}

/// The kinds [`GatewayError::code`] maps back to gRPC codes.
fn code_kind(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::NotFound => "not-found",
        tonic::Code::AlreadyExists => "already-exists",
        tonic::Code::InvalidArgument | tonic::Code::OutOfRange => "invalid-argument",
        tonic::Code::FailedPrecondition => "failed-precondition",
        tonic::Code::Unavailable => "unavailable",
        tonic::Code::ResourceExhausted => "resource-exhausted",
        tonic::Code::DeadlineExceeded => "deadline-exceeded",
        _ => "internal",
    }
}

fn outcome(
    node: &str,
    result: CommandResult,
) -> Result<Option<command_output::Value>, GatewayError> {
    match result.outcome {
        Some(command_result::Outcome::Ok(output)) => Ok(output.value),
        Some(command_result::Outcome::Failure(failure)) => Err(GatewayError::Refused {
            node: node.to_owned(),
            kind: code_kind(tonic::Code::from_i32(failure.code)).to_owned(),
            message: failure.message,
        }),
        None => Err(GatewayError::Refused {
            node: node.to_owned(),
            kind: "internal".to_owned(),
            message: "the gateway's result has no outcome".to_owned(),
        }),
    }
}

fn snapshot_of(
    node: &str,
    value: Option<command_output::Value>,
) -> Result<GatewaySnapshot, GatewayError> {
    match value {
        Some(command_output::Value::Snapshot(snapshot)) => Ok(GatewaySnapshot {
            id: snapshot.snapshot_id,
            volume: snapshot.volume_id,
            size: snapshot.size_bytes,
            ready: snapshot.ready,
            parent: (!snapshot.parent_id.is_empty()).then_some(snapshot.parent_id),
            created_unix: snapshot.created_unix,
        }),
        _ => Err(GatewayError::Refused {
            node: node.to_owned(),
            kind: "internal".to_owned(),
            message: "the gateway answered a snapshot command without a snapshot".to_owned(),
        }),
    }
}

#[async_trait]
impl Gateways for HubGateways {
    async fn create_snapshot(
        &self,
        node: &str,
        volume: &str,
        snapshot: &str,
    ) -> Result<GatewaySnapshot, GatewayError> {
        self.remember(snapshot, volume);
        // The command id is the snapshot's: sent again (a retried CreateSnapshot), it gets
        // the first result instead of running twice.
        let value = self
            .run(
                node,
                format!("snapshot-{snapshot}"),
                command::Kind::CreateSnapshot(CreateSnapshot {
                    volume_id: volume.to_owned(),
                    snapshot_id: snapshot.to_owned(),
                }),
                SNAPSHOT_TIMEOUT,
            )
            .await?;
        snapshot_of(node, value)
    }

    async fn get_snapshot(
        &self,
        node: &str,
        snapshot: &str,
    ) -> Result<Option<GatewaySnapshot>, GatewayError> {
        let Some(volume) = self.volume_of(snapshot) else {
            return Ok(None);
        };
        match self
            .ask_snapshot(node, &volume, snapshot, SNAPSHOT_QUERY_TIMEOUT)
            .await
        {
            Ok(found) => Ok(Some(found)),
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
        let volume = self
            .volume_of(snapshot)
            .ok_or_else(|| GatewayError::Refused {
                node: node.to_owned(),
                kind: "not-found".to_owned(),
                message: format!("snapshot {snapshot} was not cut through this operator replica"),
            })?;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            // Each question lets the gateway wait for the upload within its deadline.
            let found = self
                .ask_snapshot(
                    node,
                    &volume,
                    snapshot,
                    remaining.max(Duration::from_secs(1)),
                )
                .await?;
            if found.ready || tokio::time::Instant::now() >= deadline {
                return Ok(found);
            }
        }
    }

    async fn expand_volume(&self, node: &str, volume: &str, size: u64) -> Result<(), GatewayError> {
        self.run(
            node,
            format!("expand-{volume}-{size}"),
            command::Kind::ExpandVolume(ExpandVolume {
                volume_id: volume.to_owned(),
                size_bytes: size,
            }),
            EXPAND_TIMEOUT,
        )
        .await
        .map(|_| ())
    }

    async fn detach_volume(&self, node: &str, volume: &str) -> Result<(), GatewayError> {
        let result = self
            .run(
                node,
                // Unique: a volume can be attached and detached many times.
                format!("detach-{volume}-{}", random_suffix()),
                command::Kind::DetachVolume(DetachVolume {
                    volume_id: volume.to_owned(),
                    timeout_seconds: u32::try_from(DETACH_TIMEOUT.as_secs()).unwrap_or(u32::MAX),
                }),
                DETACH_TIMEOUT + Duration::from_secs(10),
            )
            .await;
        match result {
            Ok(_) => Ok(()),
            // Not open there: nothing to upload.
            Err(GatewayError::Refused { kind, .. }) if kind == "not-found" => Ok(()),
            Err(error) => Err(error),
        }
    }

    fn knows(&self, node: &str) -> bool {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(node)
            || self.hub.held().contains(&self.gateway_id(node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockgate_operator_control::{
        HubConfig, InMemoryRegistry, InMemoryReportSink, StaticPeers,
    };
    use blockgate_proto::control::v1::{
        CommandFailure, CommandOutput, Hello, OperatorMessage, SnapshotResult, operator_message,
    };
    use tokio::sync::mpsc;

    const GATEWAY: &str = "blockgate-system/fleet/node-1";

    /// A gateway on an in-process hub: snapshots are "uploading" the first time they are
    /// asked about and ready after; volume `gone` is not attached; volume `small` refuses
    /// to grow. Returns the hub and a log of the commands the gateway ran.
    async fn connected_gateway() -> (Arc<Hub>, Arc<Mutex<Vec<String>>>) {
        let hub = Hub::new(
            HubConfig {
                replica: "op-a".into(),
                peer_tls: None,
                report_interval: Duration::from_secs(10),
            },
            Arc::new(InMemoryRegistry::new()),
            Arc::new(StaticPeers::new(Vec::new())),
            Arc::new(InMemoryReportSink::new()),
        );
        let (outbound, mut commands) = mpsc::channel(16);
        let hello = Hello {
            gateway_id: GATEWAY.into(),
            node: "node-1".into(),
            version: "0.1.0".into(),
            ..Hello::default()
        };
        hub.connected(GATEWAY, hello, outbound).await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (gateway_hub, gateway_log) = (hub.clone(), log.clone());
        tokio::spawn(async move {
            let mut asked: HashMap<String, u32> = HashMap::new();
            while let Some(Ok(OperatorMessage {
                kind: Some(operator_message::Kind::Command(command)),
            })) = commands.recv().await
            {
                assert!(command.deadline_unix_ms > 0, "every command has a deadline");
                gateway_log.lock().unwrap().push(command.id.clone());
                let failure = |code: tonic::Code, message: &str| {
                    Some(command_result::Outcome::Failure(CommandFailure {
                        code: code as i32,
                        message: message.into(),
                    }))
                };
                let ok = |value| Some(command_result::Outcome::Ok(CommandOutput { value }));
                let outcome = match command.kind.unwrap() {
                    command::Kind::CreateSnapshot(request) => {
                        let times = asked.entry(request.snapshot_id.clone()).or_default();
                        *times += 1;
                        ok(Some(command_output::Value::Snapshot(SnapshotResult {
                            snapshot_id: request.snapshot_id,
                            volume_id: request.volume_id,
                            size_bytes: 1 << 30,
                            ready: *times > 1,
                            parent_id: String::new(),
                            created_unix: 1_700_000_000,
                        })))
                    }
                    command::Kind::ExpandVolume(request) if request.volume_id == "small" => {
                        failure(tonic::Code::FailedPrecondition, "cannot shrink")
                    }
                    command::Kind::DetachVolume(request) if request.volume_id == "gone" => {
                        failure(tonic::Code::NotFound, "not attached")
                    }
                    _ => ok(None),
                };
                gateway_hub.complete(
                    GATEWAY,
                    CommandResult {
                        id: command.id,
                        outcome,
                    },
                );
            }
        });
        (hub, log)
    }

    #[tokio::test]
    async fn a_snapshot_of_an_attached_volume_goes_through_the_control_channel() {
        let (hub, log) = connected_gateway().await;
        let gateways = HubGateways::new(hub, "blockgate-system", "fleet");
        assert!(gateways.knows("node-1"));
        assert!(!gateways.knows("node-2"));

        let cut = gateways
            .create_snapshot("node-1", "pvc-1", "snap-1")
            .await
            .unwrap();
        assert_eq!(
            cut,
            GatewaySnapshot {
                id: "snap-1".into(),
                volume: "pvc-1".into(),
                size: 1 << 30,
                ready: false,
                parent: None,
                created_unix: 1_700_000_000,
            }
        );
        // A retried CreateSnapshot gets the first result; the gateway ran it once.
        assert_eq!(
            gateways
                .create_snapshot("node-1", "pvc-1", "snap-1")
                .await
                .unwrap(),
            cut
        );
        assert_eq!(log.lock().unwrap().len(), 1);

        let ready = gateways
            .wait_snapshot("node-1", "snap-1", Duration::from_secs(5))
            .await
            .unwrap();
        assert!(ready.ready);
        assert!(
            gateways
                .get_snapshot("node-1", "snap-1")
                .await
                .unwrap()
                .unwrap()
                .ready
        );
        assert_eq!(
            gateways.get_snapshot("node-1", "unknown").await.unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn expansion_and_detach_map_the_gateways_answers_to_api_errors() {
        let (hub, _) = connected_gateway().await;
        let gateways = HubGateways::new(hub, "blockgate-system", "fleet");
        gateways
            .expand_volume("node-1", "pvc-1", 2 << 30)
            .await
            .unwrap();
        let refused = gateways
            .expand_volume("node-1", "small", 1)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        gateways.detach_volume("node-1", "pvc-1").await.unwrap();
        // Not attached there: nothing to upload, so nothing to refuse.
        gateways.detach_volume("node-1", "gone").await.unwrap();
        let unreachable = gateways
            .create_snapshot("node-2", "pvc-9", "snap-9")
            .await
            .unwrap_err();
        assert!(matches!(unreachable, GatewayError::Unreachable { .. }));
        assert_eq!(unreachable.code(), tonic::Code::Unavailable);
    }
}
