//! `blockgate-csi`: the blockgate CSI plugin (DESIGN.md §1, §8).
//!
//! One binary per role set: `--mode controller` serves the CSI Identity, Controller and
//! SnapshotMetadata services on a unix socket and maps them onto the block-storage API;
//! `--mode node` serves Identity and Node and attaches volumes through this node's gateway.

mod blockstore;
mod capability;
mod capacity;
mod controller;
mod errors;
#[cfg(test)]
mod fixtures;
mod gateway;
mod host;
mod identity;
mod mount;
mod naming;
mod node;
mod page_token;
mod parameters;
mod server;
mod snapshot_metadata;
mod staging;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};

/// The CSI driver name the plugin reports unless told otherwise.
const DEFAULT_DRIVER_NAME: &str = "blockgate.csi.io";
/// Where the node plugin records staged volumes unless told otherwise.
const DEFAULT_STATE_DIR: &str = "/var/lib/blockgate/csi";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// The CSI Controller service (beside csi-provisioner, csi-snapshotter, csi-resizer).
    Controller,
    /// The CSI Node service (a DaemonSet beside the node's gateway).
    Node,
}

#[derive(Debug, Parser)]
#[command(name = "blockgate-csi", version, about = "The blockgate CSI plugin")]
struct Args {
    /// Which CSI services to serve.
    #[arg(long, value_enum)]
    mode: Mode,
    /// The CSI endpoint, `unix:///path/to/csi.sock`.
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    /// The block-storage API, `unix:///path/to/api.sock`.
    #[arg(long, env = "BLOCKGATE_BLOCKSTORE_ENDPOINT")]
    blockstore: Option<String>,
    /// The CSI driver name (the CSIDriver object's name).
    #[arg(long, default_value = DEFAULT_DRIVER_NAME)]
    driver_name: String,
    /// Node mode: this node's id (the Kubernetes node name).
    #[arg(long, env = "NODE_ID")]
    node_id: Option<String>,
    /// Node mode: the gateway's node API, `unix:///path/to/node.sock`.
    #[arg(long, env = "BLOCKGATE_GATEWAY_ENDPOINT")]
    gateway: Option<String>,
    /// Node mode: where the plugin records staged volumes.
    #[arg(long, default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
    /// Node mode: NodeGetInfo's max_volumes_per_node; 0 means no limit (the gateway creates
    /// nbd devices as it needs them).
    #[arg(long, default_value_t = 0)]
    max_volumes_per_node: i64,
}

/// `unix:///path` → `/path`; anything else is refused.
fn unix_socket_path(endpoint: &str, flag: &str) -> anyhow::Result<PathBuf> {
    let Some(path) = endpoint.strip_prefix("unix://") else {
        bail!("{flag} {endpoint:?} is not a unix:///path endpoint");
    };
    if !path.starts_with('/') {
        bail!("{flag} {endpoint:?} must name an absolute path (unix:///path)");
    }
    Ok(PathBuf::from(path))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();

    let endpoint = unix_socket_path(&args.endpoint, "--endpoint")?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    if args.mode == Mode::Node {
        let node_id = args
            .node_id
            .filter(|id| !id.is_empty())
            .context("--mode node needs --node-id (or NODE_ID)")?;
        let gateway = args
            .gateway
            .as_deref()
            .context("--mode node needs --gateway unix:///path (or BLOCKGATE_GATEWAY_ENDPOINT)")?;
        if args.max_volumes_per_node < 0 {
            bail!("--max-volumes-per-node must not be negative");
        }
        return runtime.block_on(server::serve_node(server::NodeConfig {
            endpoint,
            gateway: unix_socket_path(gateway, "--gateway")?,
            node_id,
            state_dir: args.state_dir,
            max_volumes_per_node: args.max_volumes_per_node,
            driver_name: args.driver_name,
        }));
    }
    let blockstore = args.blockstore.as_deref().context(
        "--mode controller needs --blockstore unix:///path (or BLOCKGATE_BLOCKSTORE_ENDPOINT)",
    )?;
    let blockstore = unix_socket_path(blockstore, "--blockstore")?;
    runtime.block_on(server::serve_controller(server::ControllerConfig {
        endpoint,
        blockstore,
        driver_name: args.driver_name,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unix_endpoints_parse_and_others_are_refused() {
        assert_eq!(
            unix_socket_path("unix:///csi/csi.sock", "--endpoint").ok(),
            Some(PathBuf::from("/csi/csi.sock"))
        );
        assert!(unix_socket_path("tcp://127.0.0.1:10000", "--endpoint").is_err());
        assert!(unix_socket_path("unix://relative.sock", "--endpoint").is_err());
        assert!(unix_socket_path("/csi/csi.sock", "--endpoint").is_err());
    }
}
