//! The control channel for real, over TLS on loopback: two in-process operator replicas (each
//! its own hub and control server on its own port, one CA, a shared registry and token store
//! as the Kubernetes-backed ones give in a cluster, each naming the other as its peer) and
//! three real gateway processes, each activated with its own token and given both replicas'
//! endpoints. A command sent on the replica that does not hold a gateway reaches it through
//! the other; when a replica dies, its gateways reconnect to the survivor with their saved
//! certificates; a reused or expired token, a certificate from another CA and a plaintext
//! connection are all refused, and none of them shows up in a hub.

// Helpers here are not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use blockgate_e2e::binary::gateway_binary;
use blockgate_e2e::{TestDir, wait_until};
use blockgate_operator_control::{
    ActivationService, CertificateAuthority, ConnectionEvent, Hub, HubConfig, InMemoryRegistry,
    InMemoryReportSink, InMemoryTokenStore, Peer, Registry as _, ServerTls, StaticPeers,
    TokenStore as _, generate_token, serve,
};
use blockgate_proto::control::v1::activation_client::ActivationClient;
use blockgate_proto::control::v1::control_client::ControlClient;
use blockgate_proto::control::v1::control_peer_client::ControlPeerClient;
use blockgate_proto::control::v1::{
    ActivateRequest, CollectDiagnostics, Command as ControlCommand, CommandOutput, CommandResult,
    CreateSnapshot, GatewayMessage, HeldRequest, Hello, command, command_output, command_result,
    gateway_message,
};
use tonic::codegen::tokio_stream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const DAY: Duration = Duration::from_secs(86_400);
const WAIT: Duration = Duration::from_secs(60);
const STORAGE_GATEWAY: &str = "ns/sg";

fn gateway_id(node: &str) -> String {
    format!("{STORAGE_GATEWAY}/{node}")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// One operator replica, on a runtime of its own so that killing it drops every task,
/// stream and socket it has, as a crashed pod would.
struct Replica {
    name: &'static str,
    address: SocketAddr,
    hub: Arc<Hub>,
    sink: Arc<InMemoryReportSink>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Replica {
    fn start(
        name: &'static str,
        listener: std::net::TcpListener,
        ca: &Arc<CertificateAuthority>,
        registry: &Arc<InMemoryRegistry>,
        tokens: &Arc<InMemoryTokenStore>,
        peer: Peer,
    ) -> Replica {
        let address = listener.local_addr().unwrap();
        let issued = ca
            .issue_operator_certificate(&["127.0.0.1".into()], DAY)
            .unwrap();
        let tls = ServerTls {
            ca_pem: ca.certificate_pem().to_string(),
            certificate_pem: issued.certificate_pem,
            key_pem: issued.key_pem,
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .unwrap();
        let sink = Arc::new(InMemoryReportSink::new());
        let hub = Hub::new(
            HubConfig {
                replica: name.to_string(),
                peer_tls: Some(tls.peer_client_config(None)),
                report_interval: Duration::from_secs(1),
            },
            registry.clone(),
            Arc::new(StaticPeers::new(vec![peer])),
            sink.clone(),
        );
        let activation = ActivationService::new(ca.clone(), tokens.clone(), DAY);
        listener.set_nonblocking(true).unwrap();
        let served = hub.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            if let Err(error) =
                serve(listener, &tls, served, activation, std::future::pending()).await
            {
                eprintln!("replica {name}: the control server failed: {error}");
            }
        });
        Replica {
            name,
            address,
            hub,
            sink,
            runtime: Some(runtime),
        }
    }

    fn endpoint(&self) -> String {
        format!("https://{}", self.address)
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime
            .as_ref()
            .expect("the replica was killed")
            .block_on(future)
    }

    /// Runs `command` on `gateway` through this replica's hub (forwarded if another holds it).
    fn send(&self, gateway: &str, command: ControlCommand) -> CommandResult {
        self.block_on(self.hub.send(gateway, command, WAIT))
            .unwrap_or_else(|error| {
                panic!("{}: sending a command to {gateway}: {error}", self.name)
            })
    }

    fn hellos(&self, gateway: &str) -> Vec<Hello> {
        self.sink
            .recorded()
            .events
            .into_iter()
            .filter(|(id, _)| id == gateway)
            .filter_map(|(_, event)| match event {
                ConnectionEvent::Connected(hello) => Some(hello),
                ConnectionEvent::Disconnected => None,
            })
            .collect()
    }

    /// Every gateway that ever said hello here.
    fn ever_connected(&self) -> Vec<String> {
        self.sink
            .recorded()
            .events
            .into_iter()
            .filter(|(_, event)| matches!(event, ConnectionEvent::Connected(_)))
            .map(|(id, _)| id)
            .collect()
    }

    /// Kills the replica: its runtime goes, and with it its listener, its streams and its
    /// tasks. It releases nothing in the registry, as a crashed pod would not.
    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(10));
        }
    }
}

/// A gateway process, killed when dropped; its log is printed when the test fails.
struct GatewayProcess {
    node: String,
    child: Child,
    data: PathBuf,
    log: PathBuf,
}

impl GatewayProcess {
    /// `blockgate-gateway serve` with one volume on its own data directory (and the local
    /// bucket there), dialing `endpoints` in turn.
    fn spawn(dir: &TestDir, node: &str, endpoints: &[String], token: Option<&str>) -> Self {
        let data = dir.join(node);
        std::fs::create_dir_all(&data).unwrap();
        Self::spawn_on(dir, node, data, endpoints, token)
    }

    fn spawn_on(
        dir: &TestDir,
        node: &str,
        data: PathBuf,
        endpoints: &[String],
        token: Option<&str>,
    ) -> Self {
        let log = dir.join(&format!("{node}.log"));
        let output = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(gateway_binary());
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args(["--no-metrics", "--volume", "vol=8MiB"])
            .args(["--seal-interval-ms", "200", "--gc-interval-seconds", "0"])
            .args(["--control-endpoint", &endpoints.join(",")])
            .arg("--control-ca")
            .arg(dir.join("ca.pem"))
            .args(["--storage-gateway", STORAGE_GATEWAY, "--node-name", node]);
        if let Some(token) = token {
            let path = dir.join(&format!("{node}.token"));
            std::fs::write(&path, format!("{token}\n")).unwrap();
            command.arg("--activation-token-file").arg(path);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(output.try_clone().unwrap())
            .stderr(output)
            .spawn()
            .unwrap();
        GatewayProcess {
            node: node.to_string(),
            child,
            data,
            log,
        }
    }

    fn id(&self) -> String {
        gateway_id(&self.node)
    }

    fn log(&self) -> String {
        read(&self.log)
    }

    fn certificate(&self) -> PathBuf {
        self.data.join("control/cert.pem")
    }

    /// Waits until the log says `text` at least `count` times.
    fn wait_log(&self, text: &str, count: usize) -> String {
        wait_until(
            WAIT,
            &format!("{} to log {text:?} {count} times", self.node),
            || {
                let log = self.log();
                if log.matches(text).count() >= count {
                    for line in log.lines().filter(|line| line.contains(text)) {
                        eprintln!("{}: {line}", self.node);
                    }
                    Ok(log)
                } else {
                    Err(log.lines().last().unwrap_or_default().to_string())
                }
            },
        )
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- {} log -----\n{}", self.node, self.log());
        }
    }
}

fn snapshot_command(id: &str, snapshot: &str) -> ControlCommand {
    ControlCommand {
        id: id.into(),
        deadline_unix_ms: 0,
        kind: Some(command::Kind::CreateSnapshot(CreateSnapshot {
            volume_id: "vol".into(),
            snapshot_id: snapshot.into(),
        })),
    }
}

fn diagnostics_command(id: &str) -> ControlCommand {
    ControlCommand {
        id: id.into(),
        deadline_unix_ms: 0,
        kind: Some(command::Kind::CollectDiagnostics(CollectDiagnostics {
            log_lines: 200,
        })),
    }
}

/// A snapshot cut through `replica` on `gateway`, which must come back ready.
fn snapshot_through(replica: &Replica, gateway: &GatewayProcess, snapshot: &str) {
    let id = gateway.id();
    let result = replica.send(&id, snapshot_command(&format!("{snapshot}-cmd"), snapshot));
    match result.outcome {
        Some(command_result::Outcome::Ok(CommandOutput {
            value: Some(command_output::Value::Snapshot(info)),
        })) => {
            assert_eq!(
                (info.snapshot_id.as_str(), info.volume_id.as_str()),
                (snapshot, "vol"),
                "{info:?}"
            );
            assert!(info.ready, "{id}: snapshot not ready: {info:?}");
        }
        other => panic!("{id}: snapshot through {} failed: {other:?}", replica.name),
    }
}

/// Diagnostics through `replica` from `gateway`: its own state, and its log.
fn diagnostics_through(replica: &Replica, gateway: &GatewayProcess, command_id: &str) {
    let id = gateway.id();
    let result = replica.send(&id, diagnostics_command(command_id));
    let diagnostics = match result.outcome {
        Some(command_result::Outcome::Ok(CommandOutput {
            value: Some(command_output::Value::Diagnostics(diagnostics)),
        })) => diagnostics,
        other => panic!(
            "{id}: diagnostics through {} failed: {other:?}",
            replica.name
        ),
    };
    let state: serde_json::Value = serde_json::from_str(&diagnostics.state_json).unwrap();
    assert_eq!(state["gateway_id"], id.as_str());
    assert_eq!(state["volumes"][0]["id"], "vol");
    assert!(
        diagnostics
            .log_lines
            .iter()
            .any(|line| line.contains("snapshot cut")),
        "{id}: {:?}",
        diagnostics.log_lines
    );
}

/// Which replica holds each of `gateways`, once every one of them is held by exactly one.
fn holders(replicas: &[&Replica], gateways: &[&GatewayProcess]) -> BTreeMap<String, String> {
    wait_until(WAIT, "every gateway to be held by one replica", || {
        let mut holders = BTreeMap::new();
        for gateway in gateways {
            let id = gateway.id();
            let holding: Vec<&str> = replicas
                .iter()
                .filter(|replica| replica.hub.held().contains(&id))
                .map(|replica| replica.name)
                .collect();
            match holding.as_slice() {
                [holder] => {
                    holders.insert(id, (*holder).to_string());
                }
                _ => return Err(format!("{id} is held by {holding:?}")),
            }
        }
        Ok(holders)
    })
}

/// A client channel to `address` over TLS that trusts `ca_pem`, presenting `identity`.
async fn tls_channel(
    address: SocketAddr,
    ca_pem: &str,
    identity: (&str, &str),
) -> Result<Channel, tonic::transport::Error> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .identity(Identity::from_pem(identity.0, identity.1));
    Endpoint::from_shared(format!("https://{address}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
}

/// A gateway's stream: a hello, then open (a real gateway's would stay open).
fn hello_stream(id: &str) -> impl tokio_stream::Stream<Item = GatewayMessage> + use<> {
    let hello = GatewayMessage {
        kind: Some(gateway_message::Kind::Hello(Hello {
            gateway_id: id.to_string(),
            node: "intruder".into(),
            ..Hello::default()
        })),
    };
    tokio_stream::StreamExt::chain(tokio_stream::iter([hello]), tokio_stream::pending())
}

/// A refusal by the TLS layer, not by a handler (whose refusals are these codes).
fn assert_refused_by_transport(what: &str, status: &tonic::Status) {
    eprintln!("{what}: refused: {status:?}");
    assert!(
        !matches!(
            status.code(),
            tonic::Code::Ok | tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
        ),
        "{what}: {status:?}"
    );
}

#[test]
fn replicas_forward_commands_survive_a_dead_replica_and_refuse_intruders() {
    blockgate_operator_control::install_crypto_provider();
    // Built (if needed) before anything starts, so no deadline below waits on cargo.
    gateway_binary();
    let started = Instant::now();
    let dir = TestDir::new("control-fleet");
    let ca = Arc::new(CertificateAuthority::create(DAY).unwrap());
    std::fs::write(dir.join("ca.pem"), ca.certificate_pem()).unwrap();
    let registry = Arc::new(InMemoryRegistry::new());
    let tokens = Arc::new(InMemoryTokenStore::new());

    let listener_a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listener_b = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (address_a, address_b) = (
        listener_a.local_addr().unwrap(),
        listener_b.local_addr().unwrap(),
    );
    let mut a = Replica::start(
        "operator-a",
        listener_a,
        &ca,
        &registry,
        &tokens,
        Peer {
            replica: "operator-b".into(),
            endpoint: format!("https://{address_b}"),
        },
    );
    let b = Replica::start(
        "operator-b",
        listener_b,
        &ca,
        &registry,
        &tokens,
        Peer {
            replica: "operator-a".into(),
            endpoint: format!("https://{address_a}"),
        },
    );

    // Each gateway its own token. The first two list replica A first, the third B first:
    // a gateway dials the first endpoint of its list, so A holds two gateways and B one.
    let a_first = [a.endpoint(), b.endpoint()];
    let b_first = [b.endpoint(), a.endpoint()];
    let mut gateway_tokens = BTreeMap::new();
    for node in ["node-1", "node-2", "node-3"] {
        let token = generate_token();
        tokens.insert(&token, STORAGE_GATEWAY, DAY);
        gateway_tokens.insert(node, token);
    }
    let gateways = [
        GatewayProcess::spawn(&dir, "node-1", &a_first, Some(&gateway_tokens["node-1"])),
        GatewayProcess::spawn(&dir, "node-2", &a_first, Some(&gateway_tokens["node-2"])),
        GatewayProcess::spawn(&dir, "node-3", &b_first, Some(&gateway_tokens["node-3"])),
    ];
    let all: Vec<&GatewayProcess> = gateways.iter().collect();

    // All three say hello; which replica holds each.
    let held = holders(&[&a, &b], &all);
    eprintln!("[{:?}] holders: {held:?}", started.elapsed());
    let expected: BTreeMap<String, String> = [
        (gateway_id("node-1"), a.name.to_string()),
        (gateway_id("node-2"), a.name.to_string()),
        (gateway_id("node-3"), b.name.to_string()),
    ]
    .into();
    assert_eq!(held, expected);
    for gateway in &gateways {
        let holder = if held[&gateway.id()] == a.name {
            &a
        } else {
            &b
        };
        let hellos = holder.hellos(&gateway.id());
        assert_eq!(hellos.len(), 1, "{hellos:?}");
        assert_eq!(hellos[0].node, gateway.node);
        assert!(
            hellos[0]
                .capabilities
                .iter()
                .any(|capability| capability == "create_snapshot")
        );
        assert_eq!(
            a.block_on(registry.holder(&gateway.id()))
                .unwrap()
                .as_deref(),
            Some(holder.name)
        );
    }
    let certificates: Vec<Vec<u8>> = gateways
        .iter()
        .map(|gateway| std::fs::read(gateway.certificate()).unwrap())
        .collect();

    // A command sent on the replica that does not hold the gateway reaches it.
    for gateway in &gateways {
        let other = if held[&gateway.id()] == a.name {
            &b
        } else {
            &a
        };
        snapshot_through(other, gateway, &format!("snap-{}", gateway.node));
        diagnostics_through(other, gateway, &format!("diagnostics-{}", gateway.node));
        assert!(!other.hub.held().contains(&gateway.id()));
    }
    eprintln!("[{:?}] commands forwarded", started.elapsed());

    // Refusals, each leaving no trace in either hub. A token used already (node-1's), by
    // another gateway of the same StorageGateway: refused by both replicas.
    {
        let reused =
            GatewayProcess::spawn(&dir, "node-4", &a_first, Some(&gateway_tokens["node-1"]));
        let log = reused.wait_log("activation refused", 2);
        assert!(log.contains("used already"), "{log}");
        assert!(!reused.certificate().exists());
    }
    // An expired token.
    {
        let token = generate_token();
        tokens.insert_expiring(
            &token,
            STORAGE_GATEWAY,
            SystemTime::now() - Duration::from_secs(1),
        );
        let expired = GatewayProcess::spawn(&dir, "node-5", &b_first, Some(&token));
        let log = expired.wait_log("activation refused", 2);
        assert!(log.contains("expired"), "{log}");
        assert!(!expired.certificate().exists());
    }
    // A gateway certificate from another CA: the TLS handshake fails, on both replicas.
    let foreign_ca = CertificateAuthority::create(DAY).unwrap();
    let foreign = foreign_ca
        .issue_gateway_certificate(&gateway_id("node-6"), DAY)
        .unwrap();
    {
        let data = dir.join("node-6");
        std::fs::create_dir_all(data.join("control")).unwrap();
        std::fs::write(data.join("control/cert.pem"), &foreign.certificate_pem).unwrap();
        std::fs::write(data.join("control/key.pem"), &foreign.key_pem).unwrap();
        let intruder = GatewayProcess::spawn_on(&dir, "node-6", data, &a_first, None);
        let log = intruder.wait_log("control channel down", 2);
        assert!(!log.contains("connected to the operator"), "{log}");
    }
    // The same from an in-process client, on the gateways' and the replicas' services.
    let client = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    client.block_on(async {
        let identity = (foreign.certificate_pem.as_str(), foreign.key_pem.as_str());
        for address in [address_a, address_b] {
            // TLS 1.3: the client may finish its side of the handshake before the server
            // checks its certificate, so the refusal shows on connect or on the first call.
            let channel = match tls_channel(address, ca.certificate_pem(), identity).await {
                Err(error) => {
                    eprintln!("foreign certificate: connect refused: {error:?}");
                    continue;
                }
                Ok(channel) => channel,
            };
            let connect = ControlClient::new(channel.clone())
                .connect(hello_stream(&gateway_id("node-6")))
                .await;
            let status = connect.expect_err("Connect with a foreign certificate");
            assert_refused_by_transport("foreign certificate, Connect", &status);
            let held = ControlPeerClient::new(channel).held(HeldRequest {}).await;
            let status = held.expect_err("Held with a foreign certificate");
            assert_refused_by_transport("foreign certificate, Held", &status);
        }
    });
    // Plaintext gRPC on the control port: nothing gets through, not even an activation
    // with a good token (which stays unused).
    let plaintext_token = generate_token();
    tokens.insert(&plaintext_token, STORAGE_GATEWAY, DAY);
    client.block_on(async {
        for address in [address_a, address_b] {
            let channel = Endpoint::from_shared(format!("http://{address}"))
                .unwrap()
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(10))
                .connect_lazy();
            let activated = ActivationClient::new(channel.clone())
                .activate(ActivateRequest {
                    token: plaintext_token.clone(),
                    storage_gateway: STORAGE_GATEWAY.into(),
                    node: "node-7".into(),
                    csr_pem: String::new(),
                    version: String::new(),
                })
                .await;
            let status = activated.expect_err("Activate over plaintext");
            assert_refused_by_transport("plaintext, Activate", &status);
            let connect = ControlClient::new(channel.clone())
                .connect(hello_stream(&gateway_id("node-7")))
                .await;
            let status = connect.expect_err("Connect over plaintext");
            assert_refused_by_transport("plaintext, Connect", &status);
            let held = ControlPeerClient::new(channel).held(HeldRequest {}).await;
            let status = held.expect_err("Held over plaintext");
            assert_refused_by_transport("plaintext, Held", &status);
        }
        assert!(
            tokens
                .check_and_consume(&plaintext_token, STORAGE_GATEWAY)
                .await
                .is_ok(),
            "a plaintext activation consumed its token"
        );
    });
    // No connection from any of them in either hub.
    let three: Vec<String> = gateways.iter().map(GatewayProcess::id).collect();
    let mut now_held = a.hub.held();
    now_held.extend(b.hub.held());
    now_held.sort();
    assert_eq!(now_held, three);
    let mut ever = a.ever_connected();
    ever.extend(b.ever_connected());
    ever.sort();
    ever.dedup();
    assert_eq!(ever, three);
    eprintln!("[{:?}] intruders refused", started.elapsed());

    // Replica A dies: its gateways reconnect to B with their saved certificates.
    a.kill();
    let held = holders(&[&b], &all);
    eprintln!("[{:?}] after the kill: {held:?}", started.elapsed());
    for (gateway, certificate) in gateways.iter().zip(&certificates) {
        let id = gateway.id();
        let log = gateway.log();
        assert_eq!(
            log.matches("activated with the operator").count(),
            1,
            "{id}: activated again\n{log}"
        );
        assert_eq!(&std::fs::read(gateway.certificate()).unwrap(), certificate);
        assert_eq!(b.hellos(&id).len(), 1, "{id}");
        assert_eq!(
            b.block_on(registry.holder(&id)).unwrap().as_deref(),
            Some(b.name)
        );
        // Commands reach it there.
        snapshot_through(&b, gateway, &format!("snap-after-{}", gateway.node));
        diagnostics_through(&b, gateway, &format!("diagnostics-after-{}", gateway.node));
    }
    for gateway in &gateways {
        assert!(
            !gateway
                .log()
                .contains(&gateway_tokens[gateway.node.as_str()]),
            "{}: the token was logged",
            gateway.node
        );
    }
    eprintln!("[{:?}] done", started.elapsed());
}
