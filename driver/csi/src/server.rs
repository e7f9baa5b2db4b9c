//! The plugin's unix-socket endpoint: binding it (replacing a stale socket, refusing one a
//! live process still listens on), serving the CSI services on it until SIGTERM or SIGINT,
//! and removing it on the way out.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use anyhow::Context;
use blockgate_proto::csi::v1::{
    controller_server::ControllerServer, identity_server::IdentityServer, node_server::NodeServer,
    snapshot_metadata_server::SnapshotMetadataServer,
};
use tokio::net::UnixListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::blockstore::BlockStore;
use crate::controller::Controller;
use crate::gateway::Gateway;
use crate::host::LinuxHost;
use crate::identity::{Identity, Role};
use crate::node::Node;
use crate::snapshot_metadata::SnapshotMetadata;
use crate::staging::StateDir;

#[derive(Debug)]
pub struct ControllerConfig {
    /// The CSI socket.
    pub endpoint: PathBuf,
    /// The block-storage API's socket.
    pub blockstore: PathBuf,
    pub driver_name: String,
}

/// Serves Identity, Controller and SnapshotMetadata until a shutdown signal.
pub async fn serve_controller(config: ControllerConfig) -> anyhow::Result<()> {
    let mut terminate =
        signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut interrupt =
        signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    let listener = bind(&config.endpoint)?;
    let blockstore = BlockStore::connect_lazy(config.blockstore.clone());
    tracing::info!(
        endpoint = %config.endpoint.display(),
        blockstore = %config.blockstore.display(),
        driver = %config.driver_name,
        version = env!("CARGO_PKG_VERSION"),
        "serving the CSI controller"
    );
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    let served = Server::builder()
        .add_service(IdentityServer::new(Identity::new(
            config.driver_name,
            Role::Controller(blockstore.clone()),
        )))
        .add_service(ControllerServer::new(Controller::new(blockstore.clone())))
        .add_service(SnapshotMetadataServer::new(SnapshotMetadata::new(
            blockstore,
        )))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    remove_socket(&config.endpoint);
    served.context("the CSI server failed")?;
    tracing::info!("stopped");
    Ok(())
}

#[derive(Debug)]
pub struct NodeConfig {
    /// The CSI socket.
    pub endpoint: PathBuf,
    /// The gateway's node API socket.
    pub gateway: PathBuf,
    pub node_id: String,
    pub state_dir: PathBuf,
    pub max_volumes_per_node: i64,
    pub driver_name: String,
}

/// Serves Identity and Node until a shutdown signal.
pub async fn serve_node(config: NodeConfig) -> anyhow::Result<()> {
    let mut terminate =
        signal(SignalKind::terminate()).context("cannot install the SIGTERM handler")?;
    let mut interrupt =
        signal(SignalKind::interrupt()).context("cannot install the SIGINT handler")?;
    std::fs::create_dir_all(&config.state_dir).with_context(|| {
        format!(
            "cannot create the state directory {}",
            config.state_dir.display()
        )
    })?;
    let listener = bind(&config.endpoint)?;
    let gateway = Gateway::connect_lazy(config.gateway.clone());
    tracing::info!(
        endpoint = %config.endpoint.display(),
        gateway = %config.gateway.display(),
        node = %config.node_id,
        state_dir = %config.state_dir.display(),
        driver = %config.driver_name,
        version = env!("CARGO_PKG_VERSION"),
        "serving the CSI node plugin"
    );
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = interrupt.recv() => tracing::info!("SIGINT: shutting down"),
        }
    };
    let served = Server::builder()
        .add_service(IdentityServer::new(Identity::new(
            config.driver_name,
            Role::Node(gateway.clone()),
        )))
        .add_service(NodeServer::new(Node::new(
            config.node_id,
            config.max_volumes_per_node,
            gateway,
            LinuxHost,
            StateDir::new(config.state_dir),
        )))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    remove_socket(&config.endpoint);
    served.context("the CSI server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Binds `path`, replacing a socket nobody listens on (never a live one or another file).
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    Ok(blockgate_proto::unix::bind(path)?)
}

fn remove_socket(path: &Path) {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(socket = %path.display(), %error, "cannot remove the socket"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stale_sockets_are_replaced_and_live_ones_refused() {
        let dir = std::env::temp_dir().join(format!("bg-csi-bind-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("csi.sock");
        let _ = std::fs::remove_file(&path);

        // A socket file left behind by a dead process.
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        let live = bind(&path).expect("a stale socket is replaced");

        let error = bind(&path).expect_err("a live socket is refused");
        assert!(error.to_string().contains("another process"), "{error}");
        drop(live);

        let file = dir.join("plain-file");
        std::fs::write(&file, b"data").expect("write");
        assert!(bind(&file).is_err(), "a regular file is never removed");
        assert!(file.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
