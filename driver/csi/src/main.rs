//! `blockgate-csi`: the blockgate CSI plugin (DESIGN.md §1, §8).
//!
//! One binary per role set: `--mode controller` serves the CSI Identity, Controller and
//! SnapshotMetadata services on a unix socket and maps them onto the block-storage API;
//! `--mode node` is not built yet and says so.

mod blockstore;
mod capability;
mod capacity;
mod controller;
mod errors;
mod identity;
mod naming;
mod page_token;
mod parameters;
mod server;
mod snapshot_metadata;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};

/// The CSI driver name the plugin reports unless told otherwise.
const DEFAULT_DRIVER_NAME: &str = "blockgate.csi.io";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// The CSI Controller service (beside csi-provisioner, csi-snapshotter, csi-resizer).
    Controller,
    /// The CSI Node service (a DaemonSet); not built yet.
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

    match args.mode {
        Mode::Node => bail!(
            "--mode node: the blockgate CSI node plugin is not built yet; \
             only --mode controller is available"
        ),
        Mode::Controller => {}
    }
    let endpoint = unix_socket_path(&args.endpoint, "--endpoint")?;
    let blockstore = args.blockstore.as_deref().context(
        "--mode controller needs --blockstore unix:///path (or BLOCKGATE_BLOCKSTORE_ENDPOINT)",
    )?;
    let blockstore = unix_socket_path(blockstore, "--blockstore")?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
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
