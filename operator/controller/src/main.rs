//! `blockgate-operator`: runs the StorageGateway and Gateway reconcilers on the replica that
//! holds the leader Lease, and serves on every replica `/healthz` and `/metrics`, the gateway
//! control server (activation, the gateways' streams, forwarding between replicas) on one TLS
//! listener, and optionally one StorageGateway's block-storage API on a unix socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use blockgate_operator::context::{Context, ControlSettings};
use blockgate_operator::gateway::RefuseWhileAttached;
use blockgate_operator::hub_gateways::HubGateways;
use blockgate_operator::leader::{Elector, LeaseLock};
use blockgate_operator::metrics::Metrics;
use blockgate_operator::registry::{LeaseRegistry, PodPeers};
use blockgate_operator::reports::ReportWorker;
use blockgate_operator::{GATEWAY_POD_LABEL, gateway, storage_gateway};
use blockgate_operator::{activation, blockstore, control_ca};
use blockgate_operator_api::{Gateway, StorageGateway};
use blockgate_operator_control::{ActivationService, Hub, HubConfig, ServerTls};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{Controller, watcher};
use kube::{Api, Client};

/// Name of the leader Lease.
const LEASE_NAME: &str = "blockgate-operator-leader";

#[derive(Debug, Parser)]
#[command(
    name = "blockgate-operator",
    version,
    about = "Reconciles blockgate's StorageGateways into gateway pods"
)]
struct Cli {
    /// Namespace whose StorageGateways to reconcile; all namespaces when absent.
    #[arg(long, env = "BLOCKGATE_NAMESPACE")]
    namespace: Option<String>,
    /// Namespace of the leader Lease; default: this pod's namespace (`POD_NAMESPACE`), else
    /// the client configuration's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
    /// Run the reconcilers without a Lease (a single replica only).
    #[arg(long)]
    no_leader_election: bool,
    /// This replica's identity in the Lease; default: `POD_NAME`, else the host name.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How long a Lease stays valid without renewal.
    #[arg(long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Address of `/healthz` and `/metrics`.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_address: SocketAddr,
    /// Log format.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Address of the gateway control server (TLS: Activation, Control, ControlPeer).
    #[arg(long, default_value = "0.0.0.0:9443")]
    control_address: SocketAddr,
    /// The operator's Service: gateways dial `https://<service>.<namespace>.svc:<port>`, and
    /// the server certificate carries its names.
    #[arg(long, default_value = "blockgate-operator")]
    service_name: String,
    /// Labels of the operator's own pods, to find the other replicas.
    #[arg(long, default_value = "app.kubernetes.io/name=blockgate-operator")]
    peer_selector: String,
    /// How often gateways report their status.
    #[arg(long, default_value_t = 10)]
    report_interval_seconds: u64,
    /// How long a gateway's client certificate is valid.
    #[arg(long, default_value_t = 365)]
    gateway_certificate_days: u64,
    /// Serve the block-storage API on this unix socket (for the CSI controller's
    /// `--blockstore unix://PATH`), over the bucket of `--blockstore-storage-gateway`.
    #[arg(long, requires = "blockstore_storage_gateway")]
    blockstore_socket: Option<PathBuf>,
    /// The StorageGateway (`NAMESPACE/NAME`) whose bucket the block-storage API serves.
    #[arg(long, requires = "blockstore_socket")]
    blockstore_storage_gateway: Option<String>,
    /// The volumes' logical block size for the block-storage API.
    #[arg(long, default_value_t = 4096)]
    volume_block_size: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    if cli.log_format == "json" {
        tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }

    let client = Client::try_default()
        .await
        .context("build the Kubernetes client")?;
    let metrics = Arc::new(Metrics::default());
    let listener = tokio::net::TcpListener::bind(cli.http_address)
        .await
        .with_context(|| format!("listen on {}", cli.http_address))?;
    tracing::info!(address = %cli.http_address, "serving /healthz and /metrics");
    tokio::spawn(blockgate_operator::http::serve(listener, metrics.clone()));

    let own_namespace = cli
        .leader_election_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let identity = match cli.identity.clone() {
        Some(identity) => identity,
        None => hostname().context("no --identity, POD_NAME or host name")?,
    };

    // Everything the servers started here watch to stop.
    let (stop_servers, servers_stopped) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut receiver = servers_stopped.clone();
        async move {
            let _ = receiver.wait_for(|stopped| *stopped).await;
        }
    };

    // The control server: CA from its Secret, a fresh server certificate for the Service.
    blockgate_operator_control::install_crypto_provider();
    let ca = control_ca::load_or_create(&Api::<Secret>::namespaced(client.clone(), &own_namespace))
        .await
        .context("load or create the operator's CA")?;
    let server_certificate = control_ca::server_certificate(&ca, &cli.service_name, &own_namespace)
        .context("issue the operator's server certificate")?;
    let tls = ServerTls {
        ca_pem: ca.certificate_pem().to_owned(),
        certificate_pem: server_certificate.certificate_pem,
        key_pem: server_certificate.key_pem,
    };
    let service_host = format!("{}.{own_namespace}.svc", cli.service_name);
    let report_interval = Duration::from_secs(cli.report_interval_seconds.max(1));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "blockgate-operator".to_owned(),
            instance: Some(identity.clone()),
        },
    );
    let (sink, worker, deliveries) = ReportWorker::new(
        client.clone(),
        metrics.clone(),
        Some(recorder.clone()),
        identity.clone(),
        report_interval,
    );
    tokio::spawn(worker.run(deliveries));
    let registry = LeaseRegistry::new(client.clone());
    let hub = Hub::new(
        HubConfig {
            replica: identity.clone(),
            // Peers are dialled by pod IP; their certificates name the Service.
            peer_tls: Some(tls.peer_client_config(Some(&service_host))),
            report_interval,
        },
        Arc::new(registry.clone()),
        Arc::new(PodPeers::new(
            Api::namespaced(client.clone(), &own_namespace),
            cli.peer_selector.clone(),
            identity.clone(),
            cli.control_address.port(),
        )),
        Arc::new(sink),
    );
    tokio::spawn(registry.renew_held(hub.clone()));
    tokio::spawn(blockgate_operator::bandwidth::enforce(
        client.clone(),
        hub.clone(),
        Duration::from_secs(30),
    ));
    let control_listener = tokio::net::TcpListener::bind(cli.control_address)
        .await
        .with_context(|| format!("listen on {}", cli.control_address))?;
    tracing::info!(address = %cli.control_address, "serving the gateway control server");
    let activation_service = ActivationService::new(
        Arc::new(ca),
        Arc::new(activation::SecretTokenStore::new(client.clone())),
        Duration::from_secs(cli.gateway_certificate_days.max(1) * 86_400),
    );
    let control_server = tokio::spawn({
        let (hub, tls, stopped) = (hub.clone(), tls.clone(), stopped());
        async move {
            if let Err(error) = blockgate_operator_control::serve(
                control_listener,
                &tls,
                hub,
                activation_service,
                stopped,
            )
            .await
            {
                tracing::error!(error = %storage_gateway::ErrorChain(&error), "the control server failed");
            }
        }
    });

    let blockstore_server = match (&cli.blockstore_socket, &cli.blockstore_storage_gateway) {
        (Some(socket), Some(storage_gateway_name)) => Some(
            start_blockstore(
                &client,
                hub.clone(),
                socket,
                storage_gateway_name,
                cli.volume_block_size,
                stopped(),
            )
            .await?,
        ),
        _ => None,
    };

    let context = Arc::new(
        Context::new(
            client.clone(),
            metrics.clone(),
            Arc::new(RefuseWhileAttached),
        )
        .with_control(ControlSettings {
            endpoint: format!("https://{service_host}:{}", cli.control_address.port()),
            ca_pem: tls.ca_pem.clone(),
            token_validity: activation::TOKEN_VALIDITY,
        })
        .with_recorder(recorder)
        .with_hub(hub.clone()),
    );
    let shutdown = async {
        shutdown_signal().await;
        // Streams end so gateways redial another replica at once.
        hub.close_all().await;
        let _ = stop_servers.send(true);
        let _ = control_server.await;
        if let Some(server) = blockstore_server {
            let _ = server.await;
        }
    };
    tokio::pin!(shutdown);

    if cli.no_leader_election {
        metrics.set_leader(true);
        tokio::select! {
            () = run_controllers(client, cli.namespace.clone(), context) => {}
            () = &mut shutdown => {}
        }
        return Ok(());
    }

    let lease_namespace = own_namespace;
    let duration = Duration::from_secs(cli.lease_duration_seconds.max(3));
    let mut lock = LeaseLock::new(
        Api::<Lease>::namespaced(client.clone(), &lease_namespace),
        LEASE_NAME,
        Elector::new(identity.clone(), duration),
    );
    // client-go's proportions: retry and renew at a third of the duration, give up leading
    // when renewals have failed for two thirds of it (before anyone else may take over).
    let retry = duration / 3;
    let renew_deadline = duration * 2 / 3;
    tracing::info!(%identity, lease = %format!("{lease_namespace}/{LEASE_NAME}"), "leader election");

    loop {
        // Follower: try until the Lease is ours.
        loop {
            match lock.try_acquire_or_renew().await {
                Ok(true) => break,
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(error = %storage_gateway::ErrorChain(&error), "leader election")
                }
            }
            tokio::select! {
                () = tokio::time::sleep(retry) => {}
                () = &mut shutdown => return Ok(()),
            }
        }
        tracing::info!(%identity, "leading: starting the reconcilers");
        metrics.set_leader(true);
        let renewals = async {
            let mut last_renewal = Instant::now();
            loop {
                tokio::time::sleep(retry).await;
                match lock.try_acquire_or_renew().await {
                    Ok(true) => last_renewal = Instant::now(),
                    Ok(false) => return,
                    Err(error) => {
                        tracing::warn!(error = %storage_gateway::ErrorChain(&error), "renewing the leader lease");
                    }
                }
                if last_renewal.elapsed() >= renew_deadline {
                    return;
                }
            }
        };
        // Dropping the controllers' future cancels their reconciles: a replica that lost the
        // Lease stops writing at once.
        let stop = tokio::select! {
            () = run_controllers(client.clone(), cli.namespace.clone(), context.clone()) => true,
            () = renewals => false,
            () = &mut shutdown => true,
        };
        metrics.set_leader(false);
        if stop {
            if let Err(error) = lock.release().await {
                tracing::warn!(error = %storage_gateway::ErrorChain(&error), "releasing the leader lease");
            }
            return Ok(());
        }
        tracing::warn!(%identity, "lost the leader lease: reconcilers stopped");
    }
}

/// Runs both reconcilers until their watches end.
async fn run_controllers(client: Client, namespace: Option<String>, context: Arc<Context>) {
    let (storage_gateways, gateways, pods): (Api<StorageGateway>, Api<Gateway>, Api<Pod>) =
        match &namespace {
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
        };
    let gateway_pods = watcher::Config::default()
        .labels(&format!("{}={}", GATEWAY_POD_LABEL.0, GATEWAY_POD_LABEL.1));

    let fleet = Controller::new(storage_gateways, watcher::Config::default())
        .owns(gateways.clone(), watcher::Config::default());
    let store = fleet.store();
    // Any node change may change which StorageGateways select it: reconcile them all.
    let fleet = fleet
        .watches(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            move |_node| {
                store
                    .state()
                    .iter()
                    .map(|sg| ObjectRef::from_obj(&**sg))
                    .collect::<Vec<_>>()
            },
        )
        .run(
            storage_gateway::reconcile,
            storage_gateway::error_policy,
            context.clone(),
        )
        .for_each(|_| async {});
    let per_node = Controller::new(gateways, watcher::Config::default())
        .owns(pods, gateway_pods)
        .run(gateway::reconcile, gateway::error_policy, context)
        .for_each(|_| async {});
    futures::join!(fleet, per_node);
}

/// Serves the block-storage API of one StorageGateway's bucket on a unix socket.
async fn start_blockstore(
    client: &Client,
    hub: Arc<Hub>,
    socket: &std::path::Path,
    storage_gateway_name: &str,
    block_size: u32,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let (namespace, name) = blockstore::parse_name(storage_gateway_name)?;
    let store = blockstore::open_store(client, &namespace, &name)
        .await
        .with_context(|| format!("open the bucket of StorageGateway {namespace}/{name}"))?;
    let gateways = Arc::new(HubGateways::new(hub, &namespace, &name));
    tokio::spawn(gateways.clone().keep_nodes_fresh(
        Api::<Gateway>::namespaced(client.clone(), &namespace),
        Duration::from_secs(30),
    ));
    let state = blockgate_blockstore_api::State::new(
        blockgate_engine::catalog::Catalog::new(store, block_size),
        gateways,
    );
    let listener = blockgate_proto::unix::bind(socket)
        .with_context(|| format!("listen on {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), storagegateway = %format!("{namespace}/{name}"), "serving the block-storage API");
    let socket = socket.to_path_buf();
    Ok(tokio::spawn(async move {
        if let Err(error) = blockgate_blockstore_api::server::serve(listener, state, stopped).await
        {
            tracing::error!(error = %storage_gateway::ErrorChain(&error), "the block-storage API failed");
        }
        std::fs::remove_file(&socket).ok();
    }))
}

fn hostname() -> Option<String> {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}
