//! The real gateway against an in-process operator control server on loopback: activation
//! with a one-time token, the hello, status reports, a snapshot and diagnostics through the
//! stream, and a reconnect with the saved certificate after the server restarts.

// Helpers here are not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how a test reports a failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use blockgate_e2e::TestDir;
use blockgate_e2e::binary::gateway_binary;
use blockgate_operator_control::{
    ActivationService, CertificateAuthority, ConnectionEvent, Hub, HubConfig, InMemoryRegistry,
    InMemoryReportSink, InMemoryTokenStore, ServerTls, StaticPeers, serve,
};
use blockgate_proto::control::v1::{
    CollectDiagnostics, Command as ControlCommand, CommandOutput, CreateSnapshot,
    SetBandwidthLimit, command, command_output, command_result,
};

const DAY: Duration = Duration::from_secs(86_400);
const WAIT: Duration = Duration::from_secs(60);
const GATEWAY_ID: &str = "ns/sg/node-1";

/// One run of the operator's control server.
struct ControlServer {
    hub: Arc<Hub>,
    sink: Arc<InMemoryReportSink>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ControlServer {
    async fn start(
        address: std::net::SocketAddr,
        ca: &Arc<CertificateAuthority>,
        tls: &ServerTls,
        tokens: &Arc<InMemoryTokenStore>,
    ) -> ControlServer {
        let listener = tokio::net::TcpListener::bind(address).await.unwrap();
        let sink = Arc::new(InMemoryReportSink::new());
        let hub = Hub::new(
            HubConfig {
                replica: "operator-0".into(),
                peer_tls: None,
                report_interval: Duration::from_secs(1),
            },
            Arc::new(InMemoryRegistry::new()),
            Arc::new(StaticPeers::new(Vec::new())),
            sink.clone(),
        );
        let activation = ActivationService::new(ca.clone(), tokens.clone(), DAY);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let tls = tls.clone();
        let served = hub.clone();
        let task = tokio::spawn(async move {
            serve(listener, &tls, served, activation, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        ControlServer {
            hub,
            sink,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        self.hub.close_all().await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the control server did not stop")
            .unwrap();
    }

    async fn wait_connected(&self, log: &Path) {
        let connected = self
            .sink
            .wait_for(WAIT, |recorded| {
                recorded.events.iter().any(|(id, event)| {
                    id == GATEWAY_ID && matches!(event, ConnectionEvent::Connected(_))
                })
            })
            .await;
        assert!(connected, "the gateway never said hello\n{}", read(log));
    }
}

/// The gateway process, killed when dropped.
struct GatewayProcess(Child);

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn snapshot_command(id: &str) -> ControlCommand {
    ControlCommand {
        id: id.into(),
        deadline_unix_ms: 0,
        kind: Some(command::Kind::CreateSnapshot(CreateSnapshot {
            volume_id: "vol".into(),
            snapshot_id: "snap-1".into(),
        })),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_activates_reports_runs_commands_and_reconnects() {
    let dir = TestDir::new("control");
    let ca = Arc::new(CertificateAuthority::create(DAY).unwrap());
    let issued = ca
        .issue_operator_certificate(&["127.0.0.1".into()], DAY)
        .unwrap();
    let tls = ServerTls {
        ca_pem: ca.certificate_pem().to_string(),
        certificate_pem: issued.certificate_pem,
        key_pem: issued.key_pem,
    };
    let token = blockgate_operator_control::generate_token();
    let tokens = Arc::new(InMemoryTokenStore::new());
    tokens.insert(&token, "ns/sg", DAY);
    std::fs::write(dir.join("ca.pem"), ca.certificate_pem()).unwrap();
    std::fs::write(dir.join("token"), format!("{token}\n")).unwrap();

    let address = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let server = ControlServer::start(address, &ca, &tls, &tokens).await;

    let data = dir.join("data");
    let log_path = dir.join("gateway.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let _gateway = GatewayProcess(
        Command::new(gateway_binary())
            .arg("serve")
            .arg("--data-dir")
            .arg(&data)
            .args(["--no-metrics", "--volume", "vol=8MiB"])
            .args(["--seal-interval-ms", "200", "--gc-interval-seconds", "0"])
            .args(["--control-endpoint", &format!("https://{address}")])
            .arg("--control-ca")
            .arg(dir.join("ca.pem"))
            .arg("--activation-token-file")
            .arg(dir.join("token"))
            .args(["--storage-gateway", "ns/sg", "--node-name", "node-1"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );

    server.wait_connected(&log_path).await;
    let certificate = data.join("control/cert.pem");
    let key = data.join("control/key.pem");
    assert!(certificate.exists() && key.exists());
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let saved = std::fs::read(&certificate).unwrap();

    let reported = server
        .sink
        .wait_for(WAIT, |recorded| {
            recorded.reports.iter().any(|(id, report)| {
                id == GATEWAY_ID
                    && report
                        .volumes
                        .iter()
                        .any(|volume| volume.volume_id == "vol" && volume.size_bytes == 8 << 20)
            })
        })
        .await;
    assert!(reported, "no report with the volume\n{}", read(&log_path));

    let result = server
        .hub
        .send(GATEWAY_ID, snapshot_command("snapshot-1"), WAIT)
        .await
        .unwrap();
    let snapshot = match result.outcome {
        Some(command_result::Outcome::Ok(CommandOutput {
            value: Some(command_output::Value::Snapshot(snapshot)),
        })) => snapshot,
        other => panic!("snapshot failed: {other:?}\n{}", read(&log_path)),
    };
    assert_eq!(
        (snapshot.snapshot_id.as_str(), snapshot.volume_id.as_str()),
        ("snap-1", "vol")
    );
    assert!(snapshot.ready, "{snapshot:?}");

    let result = server
        .hub
        .send(
            GATEWAY_ID,
            ControlCommand {
                id: "diagnostics-1".into(),
                deadline_unix_ms: 0,
                kind: Some(command::Kind::CollectDiagnostics(CollectDiagnostics {
                    log_lines: 50,
                })),
            },
            WAIT,
        )
        .await
        .unwrap();
    let diagnostics = match result.outcome {
        Some(command_result::Outcome::Ok(CommandOutput {
            value: Some(command_output::Value::Diagnostics(diagnostics)),
        })) => diagnostics,
        other => panic!("diagnostics failed: {other:?}"),
    };
    assert!(
        diagnostics
            .log_lines
            .iter()
            .any(|line| line.contains("snapshot cut")),
        "{:?}",
        diagnostics.log_lines
    );
    assert!(diagnostics.log_lines.len() <= 50);
    let state: serde_json::Value = serde_json::from_str(&diagnostics.state_json).unwrap();
    assert_eq!(state["gateway_id"], GATEWAY_ID);
    assert_eq!(state["volumes"][0]["id"], "vol");
    // The token is a secret.
    assert!(!diagnostics.state_json.contains(&token));
    assert!(
        !diagnostics
            .log_lines
            .iter()
            .any(|line| line.contains(&token))
    );

    // A bandwidth limit is applied and shows in the next reports.
    let result = server
        .hub
        .send(
            GATEWAY_ID,
            ControlCommand {
                id: "bandwidth-1".into(),
                deadline_unix_ms: 0,
                kind: Some(command::Kind::SetBandwidthLimit(SetBandwidthLimit {
                    upload_bytes_per_second: 4 << 20,
                })),
            },
            WAIT,
        )
        .await
        .unwrap();
    assert!(
        matches!(result.outcome, Some(command_result::Outcome::Ok(_))),
        "{result:?}"
    );
    let limited = server
        .sink
        .wait_for(WAIT, |recorded| {
            recorded.reports.iter().any(|(id, report)| {
                id == GATEWAY_ID && report.bandwidth_limit_bytes_per_second == 4 << 20
            })
        })
        .await;
    assert!(limited, "no report with the limit\n{}", read(&log_path));

    // The operator restarts: the gateway comes back with its saved certificate.
    server.stop().await;
    let server = ControlServer::start(address, &ca, &tls, &tokens).await;
    server.wait_connected(&log_path).await;
    let log = read(&log_path);
    assert_eq!(
        log.matches("activated with the operator").count(),
        1,
        "{log}"
    );
    assert_eq!(std::fs::read(&certificate).unwrap(), saved);
    assert!(!log.contains(&token), "the token was logged");

    // The same command id after the reconnect: the first run's result.
    let again = server
        .hub
        .send(GATEWAY_ID, snapshot_command("snapshot-1"), WAIT)
        .await
        .unwrap();
    assert!(matches!(
        again.outcome,
        Some(command_result::Outcome::Ok(_))
    ));
    server.stop().await;
}
