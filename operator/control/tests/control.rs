//! The control server over loopback TCP with real TLS: activation, the mutual-TLS `Connect`
//! stream, commands through a fake gateway, and forwarding between two replicas.

// Helpers here are not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use blockgate_operator_control::{
    ActivationService, CertificateAuthority, ConnectionEvent, Hub, HubConfig, InMemoryRegistry,
    InMemoryReportSink, InMemoryTokenStore, Peer, SendError, ServerTls, StaticPeers, ca, serve,
};
use blockgate_proto::control::v1::activation_client::ActivationClient;
use blockgate_proto::control::v1::control_client::ControlClient;
use blockgate_proto::control::v1::{
    ActivateRequest, CollectDiagnostics, Command, CommandOutput, CommandResult, CreateSnapshot,
    Diagnostics, ExpandVolume, Flush, GatewayMessage, Hello, OperatorMessage, SnapshotResult,
    StatusReport, VolumeReport, command, command_output, command_result, gateway_message,
    operator_message,
};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const DAY: Duration = Duration::from_secs(86_400);
const WAIT: Duration = Duration::from_secs(10);
const STORAGE_GATEWAY: &str = "ns/sg";

struct Operator {
    endpoint: String,
    hub: Arc<Hub>,
    sink: Arc<InMemoryReportSink>,
    peers: Arc<StaticPeers>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

struct Cluster {
    ca: Arc<CertificateAuthority>,
    tls: ServerTls,
    tokens: Arc<InMemoryTokenStore>,
    registry: Arc<InMemoryRegistry>,
}

impl Cluster {
    fn new() -> Cluster {
        let ca = Arc::new(CertificateAuthority::create(DAY).unwrap());
        let issued = ca
            .issue_operator_certificate(&["localhost".into(), "127.0.0.1".into()], DAY)
            .unwrap();
        let tls = ServerTls {
            ca_pem: ca.certificate_pem().to_string(),
            certificate_pem: issued.certificate_pem,
            key_pem: issued.key_pem,
        };
        Cluster {
            ca,
            tls,
            tokens: Arc::new(InMemoryTokenStore::new()),
            registry: Arc::new(InMemoryRegistry::new()),
        }
    }

    async fn listener() -> (tokio::net::TcpListener, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        (listener, endpoint)
    }

    async fn start(
        &self,
        replica: &str,
        listener: tokio::net::TcpListener,
        endpoint: String,
    ) -> Operator {
        let sink = Arc::new(InMemoryReportSink::new());
        let peers = Arc::new(StaticPeers::new(Vec::new()));
        let hub = Hub::new(
            HubConfig {
                replica: replica.to_string(),
                peer_tls: Some(self.tls.peer_client_config(None)),
                report_interval: Duration::from_secs(1),
            },
            self.registry.clone(),
            peers.clone(),
            sink.clone(),
        );
        let activation = ActivationService::new(self.ca.clone(), self.tokens.clone(), DAY);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let tls = self.tls.clone();
        let served = hub.clone();
        tokio::spawn(async move {
            serve(listener, &tls, served, activation, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Operator {
            endpoint,
            hub,
            sink,
            peers,
            _stop: stop,
        }
    }

    async fn operator(&self, replica: &str) -> Operator {
        let (listener, endpoint) = Cluster::listener().await;
        self.start(replica, listener, endpoint).await
    }

    fn token(&self, storage_gateway: &str) -> String {
        let token = blockgate_operator_control::generate_token();
        self.tokens.insert(&token, storage_gateway, DAY);
        token
    }
}

async fn channel(endpoint: &str, tls: ClientTlsConfig) -> Result<Channel, tonic::transport::Error> {
    blockgate_operator_control::install_crypto_provider();
    Endpoint::from_shared(endpoint.to_string())?
        .tls_config(tls)?
        .connect()
        .await
}

fn server_verified(cluster: &Cluster) -> ClientTlsConfig {
    ClientTlsConfig::new().ca_certificate(Certificate::from_pem(cluster.ca.certificate_pem()))
}

struct Credentials {
    certificate_pem: String,
    key_pem: String,
}

async fn activate(
    operator: &Operator,
    cluster: &Cluster,
    token: &str,
    storage_gateway: &str,
    node: &str,
) -> Result<Credentials, tonic::Status> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let mut client = ActivationClient::new(
        channel(&operator.endpoint, server_verified(cluster))
            .await
            .unwrap(),
    );
    let response = client
        .activate(ActivateRequest {
            token: token.to_string(),
            storage_gateway: storage_gateway.to_string(),
            node: node.to_string(),
            csr_pem: csr,
            version: "test".to_string(),
        })
        .await?
        .into_inner();
    assert_eq!(response.ca_certificate_pem, cluster.ca.certificate_pem());
    assert!(response.not_after_unix > 0);
    Ok(Credentials {
        certificate_pem: response.certificate_pem,
        key_pem: key.serialize_pem(),
    })
}

fn mutual(cluster: &Cluster, credentials: &Credentials) -> ClientTlsConfig {
    server_verified(cluster).identity(Identity::from_pem(
        &credentials.certificate_pem,
        &credentials.key_pem,
    ))
}

/// A gateway that answers commands: snapshots are ready at once, `expand_volume` never
/// answers (for deadlines). Counts how often each command id ran.
struct FakeGateway {
    runs: Arc<Mutex<HashMap<String, u32>>>,
    _up: mpsc::Sender<GatewayMessage>,
}

impl FakeGateway {
    async fn connect(
        operator: &Operator,
        cluster: &Cluster,
        credentials: &Credentials,
        hello_id: &str,
    ) -> Result<FakeGateway, tonic::Status> {
        let channel = channel(&operator.endpoint, mutual(cluster, credentials))
            .await
            .unwrap();
        let (up, outbound) = mpsc::channel(16);
        up.send(hello(hello_id)).await.unwrap();
        let mut down = ControlClient::new(channel)
            .connect(ReceiverStream::new(outbound))
            .await?
            .into_inner();
        let first = down.message().await?;
        assert!(
            matches!(
                first,
                Some(OperatorMessage {
                    kind: Some(operator_message::Kind::HelloAck(_))
                })
            ),
            "{first:?}"
        );
        let runs = Arc::new(Mutex::new(HashMap::new()));
        let counted = runs.clone();
        let answers = up.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = down.message().await {
                let Some(operator_message::Kind::Command(command)) = message.kind else {
                    continue;
                };
                *counted
                    .lock()
                    .unwrap()
                    .entry(command.id.clone())
                    .or_insert(0) += 1;
                let output = match command.kind {
                    Some(command::Kind::CreateSnapshot(snapshot)) => {
                        Some(command_output::Value::Snapshot(SnapshotResult {
                            snapshot_id: snapshot.snapshot_id,
                            volume_id: snapshot.volume_id,
                            ready: true,
                            ..SnapshotResult::default()
                        }))
                    }
                    Some(command::Kind::CollectDiagnostics(_)) => {
                        Some(command_output::Value::Diagnostics(Diagnostics {
                            log_lines: vec!["a line".into()],
                            state_json: "{}".into(),
                        }))
                    }
                    Some(command::Kind::ExpandVolume(_)) => continue,
                    _ => None,
                };
                let result = CommandResult {
                    id: command.id,
                    outcome: Some(command_result::Outcome::Ok(CommandOutput { value: output })),
                };
                let message = GatewayMessage {
                    kind: Some(gateway_message::Kind::Result(result)),
                };
                if answers.send(message).await.is_err() {
                    break;
                }
            }
        });
        Ok(FakeGateway { runs, _up: up })
    }

    fn runs(&self, id: &str) -> u32 {
        self.runs.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    async fn report(&self, volume: &str) {
        let report = StatusReport {
            sequence: 1,
            volumes: vec![VolumeReport {
                volume_id: volume.to_string(),
                ..VolumeReport::default()
            }],
            ..StatusReport::default()
        };
        self._up
            .send(GatewayMessage {
                kind: Some(gateway_message::Kind::Report(report)),
            })
            .await
            .unwrap();
    }
}

fn hello(gateway_id: &str) -> GatewayMessage {
    GatewayMessage {
        kind: Some(gateway_message::Kind::Hello(Hello {
            gateway_id: gateway_id.to_string(),
            node: "node".into(),
            version: "test".into(),
            capabilities: vec!["create_snapshot".into()],
            started_unix: 0,
        })),
    }
}

fn command(id: &str, kind: command::Kind) -> Command {
    Command {
        id: id.to_string(),
        deadline_unix_ms: 0,
        kind: Some(kind),
    }
}

fn snapshot_command(id: &str) -> Command {
    command(
        id,
        command::Kind::CreateSnapshot(CreateSnapshot {
            volume_id: "vol".into(),
            snapshot_id: "snap".into(),
        }),
    )
}

fn snapshot_of(result: &CommandResult) -> &SnapshotResult {
    match &result.outcome {
        Some(command_result::Outcome::Ok(CommandOutput {
            value: Some(command_output::Value::Snapshot(snapshot)),
        })) => snapshot,
        other => panic!("not a snapshot result: {other:?}"),
    }
}

#[tokio::test]
async fn activation_issues_a_certificate_named_for_the_gateway() {
    let cluster = Cluster::new();
    let operator = cluster.operator("a").await;
    let token = cluster.token(STORAGE_GATEWAY);
    let credentials = activate(&operator, &cluster, &token, STORAGE_GATEWAY, "node-1")
        .await
        .unwrap();
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(credentials.certificate_pem.as_bytes()).unwrap();
    assert_eq!(
        ca::common_name(&pem.contents).as_deref(),
        Some("ns/sg/node-1")
    );
    // The certificate works for mutual TLS: the CA signed it.
    let gateway = FakeGateway::connect(&operator, &cluster, &credentials, "ns/sg/node-1")
        .await
        .unwrap();
    gateway.report("vol").await;
    assert!(
        operator
            .sink
            .wait_for(WAIT, |recorded| recorded.reports.iter().any(
                |(id, report)| id == "ns/sg/node-1" && report.volumes[0].volume_id == "vol"
            ))
            .await
    );
    assert!(matches!(
        operator.sink.recorded().events.first(),
        Some((id, ConnectionEvent::Connected(hello))) if id == "ns/sg/node-1" && hello.node == "node"
    ));

    // Used once.
    let again = activate(&operator, &cluster, &token, STORAGE_GATEWAY, "node-2").await;
    assert_eq!(
        again.err().map(|s| s.code()),
        Some(tonic::Code::Unauthenticated)
    );
}

#[tokio::test]
async fn activation_refuses_bad_tokens() {
    let cluster = Cluster::new();
    let operator = cluster.operator("a").await;
    let expired = blockgate_operator_control::generate_token();
    cluster.tokens.insert_expiring(
        &expired,
        STORAGE_GATEWAY,
        SystemTime::now() - Duration::from_secs(1),
    );
    let refused = activate(&operator, &cluster, &expired, STORAGE_GATEWAY, "n").await;
    let status = refused.err().unwrap();
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    assert!(status.message().contains("expired"), "{status}");

    let other = cluster.token("ns/other");
    let refused = activate(&operator, &cluster, &other, STORAGE_GATEWAY, "n").await;
    assert_eq!(
        refused.err().map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );

    let refused = activate(&operator, &cluster, "made-up", STORAGE_GATEWAY, "n").await;
    assert_eq!(
        refused.err().map(|s| s.code()),
        Some(tonic::Code::Unauthenticated)
    );

    // A refused wrong-StorageGateway attempt does not use the token up.
    assert!(
        activate(&operator, &cluster, &other, "ns/other", "n")
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn connect_needs_a_certificate_from_the_ca_naming_the_gateway() {
    let cluster = Cluster::new();
    let operator = cluster.operator("a").await;

    // No client certificate: the handshake succeeds (activation needs that), the call fails.
    let anonymous = channel(&operator.endpoint, server_verified(&cluster))
        .await
        .unwrap();
    let (up, outbound) = mpsc::channel(1);
    up.send(hello("ns/sg/n")).await.unwrap();
    let refused = ControlClient::new(anonymous)
        .connect(ReceiverStream::new(outbound))
        .await;
    assert_eq!(
        refused.err().map(|s| s.code()),
        Some(tonic::Code::Unauthenticated)
    );

    // A certificate from another CA: the handshake fails.
    let stranger = CertificateAuthority::create(DAY).unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .pem()
        .unwrap();
    let signed = stranger.sign_gateway_request(&csr, "ns/sg/n", DAY).unwrap();
    let forged = Credentials {
        certificate_pem: signed.certificate_pem,
        key_pem: key.serialize_pem(),
    };
    // With TLS 1.3 the client finishes its side of the handshake before the server refuses
    // the certificate, so the refusal (an alert) shows on the connect or on the first call.
    let refusal = match channel(&operator.endpoint, mutual(&cluster, &forged)).await {
        Err(error) => format!("{error:?}"),
        Ok(connected) => {
            let (up, outbound) = mpsc::channel(1);
            up.send(hello("ns/sg/n")).await.unwrap();
            match ControlClient::new(connected)
                .connect(ReceiverStream::new(outbound))
                .await
            {
                Ok(_) => panic!("a certificate from another CA was accepted"),
                Err(status) => format!("{status:?}"),
            }
        }
    };
    assert!(refusal.contains("alert"), "{refusal}");
    assert!(operator.hub.held().is_empty());

    // A good certificate, but the hello names another gateway.
    let token = cluster.token(STORAGE_GATEWAY);
    let credentials = activate(&operator, &cluster, &token, STORAGE_GATEWAY, "n")
        .await
        .unwrap();
    let refused =
        FakeGateway::connect(&operator, &cluster, &credentials, "ns/sg/someone-else").await;
    assert_eq!(
        refused.err().map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );
    assert!(operator.hub.held().is_empty());
}

#[tokio::test]
async fn commands_round_trip_with_deadlines_and_cached_results() {
    let cluster = Cluster::new();
    let operator = cluster.operator("a").await;
    let token = cluster.token(STORAGE_GATEWAY);
    let credentials = activate(&operator, &cluster, &token, STORAGE_GATEWAY, "n")
        .await
        .unwrap();
    let gateway = FakeGateway::connect(&operator, &cluster, &credentials, "ns/sg/n")
        .await
        .unwrap();
    let hub = &operator.hub;

    let result = hub
        .send("ns/sg/n", snapshot_command("c1"), WAIT)
        .await
        .unwrap();
    assert_eq!(result.id, "c1");
    assert!(snapshot_of(&result).ready);

    let flushed = hub
        .send(
            "ns/sg/n",
            command("c2", command::Kind::Flush(Flush::default())),
            WAIT,
        )
        .await
        .unwrap();
    assert!(matches!(
        flushed.outcome,
        Some(command_result::Outcome::Ok(_))
    ));

    let diagnostics = hub
        .send(
            "ns/sg/n",
            command(
                "c3",
                command::Kind::CollectDiagnostics(CollectDiagnostics { log_lines: 10 }),
            ),
            WAIT,
        )
        .await
        .unwrap();
    assert!(matches!(
        diagnostics.outcome,
        Some(command_result::Outcome::Ok(CommandOutput {
            value: Some(command_output::Value::Diagnostics(Diagnostics { ref log_lines, .. }))
        })) if log_lines == &["a line".to_string()]
    ));

    // The same id again: the cached result, not a second run.
    let again = hub
        .send("ns/sg/n", snapshot_command("c1"), WAIT)
        .await
        .unwrap();
    assert_eq!(again, result);
    assert_eq!(gateway.runs("c1"), 1);

    // No answer in time.
    let late = hub
        .send(
            "ns/sg/n",
            command(
                "c4",
                command::Kind::ExpandVolume(ExpandVolume {
                    volume_id: "vol".into(),
                    size_bytes: 1,
                }),
            ),
            Duration::from_millis(200),
        )
        .await;
    assert!(matches!(late, Err(SendError::DeadlineExceeded)), "{late:?}");

    let unknown = hub.send("ns/sg/nobody", snapshot_command("c5"), WAIT).await;
    assert!(
        matches!(unknown, Err(SendError::NotConnected { .. })),
        "{unknown:?}"
    );
}

#[tokio::test]
async fn a_replica_forwards_to_the_holder_through_the_registry_or_by_asking() {
    let cluster = Cluster::new();
    let (listener_a, endpoint_a) = Cluster::listener().await;
    let (listener_b, endpoint_b) = Cluster::listener().await;
    let a = cluster.start("a", listener_a, endpoint_a.clone()).await;
    let b = cluster.start("b", listener_b, endpoint_b.clone()).await;
    a.peers.set(vec![Peer {
        replica: "b".into(),
        endpoint: endpoint_b,
    }]);
    b.peers.set(vec![Peer {
        replica: "a".into(),
        endpoint: endpoint_a,
    }]);
    let token = cluster.token(STORAGE_GATEWAY);
    let credentials = activate(&a, &cluster, &token, STORAGE_GATEWAY, "n")
        .await
        .unwrap();
    let gateway = FakeGateway::connect(&a, &cluster, &credentials, "ns/sg/n")
        .await
        .unwrap();
    assert_eq!(a.hub.held(), vec!["ns/sg/n".to_string()]);
    assert!(b.hub.held().is_empty());

    // The registry names a.
    let result = b
        .hub
        .send("ns/sg/n", snapshot_command("f1"), WAIT)
        .await
        .unwrap();
    assert!(snapshot_of(&result).ready);
    assert_eq!(gateway.runs("f1"), 1);

    // The registry forgot: b asks its peers.
    cluster.registry.clear();
    let result = b
        .hub
        .send("ns/sg/n", snapshot_command("f2"), WAIT)
        .await
        .unwrap();
    assert_eq!(result.id, "f2");
    assert_eq!(gateway.runs("f2"), 1);

    // A peer client without the operator's certificate cannot use ControlPeer.
    let plain = channel(&b.endpoint, server_verified(&cluster))
        .await
        .unwrap();
    let mut peer = blockgate_proto::control::v1::control_peer_client::ControlPeerClient::new(plain);
    let refused = peer
        .held(blockgate_proto::control::v1::HeldRequest {})
        .await;
    assert_eq!(
        refused.err().map(|s| s.code()),
        Some(tonic::Code::Unauthenticated)
    );
    let gateway_tls = channel(&b.endpoint, mutual(&cluster, &credentials))
        .await
        .unwrap();
    let mut peer =
        blockgate_proto::control::v1::control_peer_client::ControlPeerClient::new(gateway_tls);
    let refused = peer
        .held(blockgate_proto::control::v1::HeldRequest {})
        .await;
    assert_eq!(
        refused.err().map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );
}
