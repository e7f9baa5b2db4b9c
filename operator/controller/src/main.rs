//! `blockgate-operator`: runs the StorageGateway and Gateway reconcilers on the replica that
//! holds the leader Lease, and serves `/healthz` and `/metrics` on every replica.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use blockgate_operator::context::Context;
use blockgate_operator::gateway::RefuseWhileAttached;
use blockgate_operator::leader::{Elector, LeaseLock};
use blockgate_operator::metrics::Metrics;
use blockgate_operator::{GATEWAY_POD_LABEL, gateway, storage_gateway};
use blockgate_operator_api::{Gateway, StorageGateway};
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
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

    let context = Arc::new(Context::new(
        client.clone(),
        metrics.clone(),
        Arc::new(RefuseWhileAttached),
    ));
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    if cli.no_leader_election {
        metrics.set_leader(true);
        tokio::select! {
            () = run_controllers(client, cli.namespace.clone(), context) => {}
            () = &mut shutdown => {}
        }
        return Ok(());
    }

    let lease_namespace = cli
        .leader_election_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());
    let identity = match cli.identity.clone() {
        Some(identity) => identity,
        None => hostname().context("no --identity, POD_NAME or host name")?,
    };
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
