//! Serving the API on a unix socket, and connecting to one.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use blockgate_proto::blockstore::v1::block_data_server::BlockDataServer;
use blockgate_proto::blockstore::v1::block_store_server::BlockStoreServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::{BlockDataService, BlockStoreService, State};

/// Messages up to this size: a block (512 KiB) with room to spare.
pub const MAX_MESSAGE: usize = 4 << 20;

/// The path of a `unix:///path` endpoint (a bare path is accepted too).
pub fn unix_path(endpoint: &str) -> Result<PathBuf, String> {
    let path = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !path.starts_with('/') {
        return Err(format!(
            "endpoint {endpoint:?} must be unix:///absolute/path"
        ));
    }
    Ok(PathBuf::from(path))
}

/// Binds a unix socket, replacing a stale one whose process is gone.
pub async fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by a running process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    UnixListener::bind(path)
}

/// Serves both services on `listener` until `shutdown` completes; expired imports are
/// swept meanwhile.
pub async fn serve(
    listener: UnixListener,
    state: Arc<State>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let block_data = BlockDataService::new(state.clone());
    let sweeper = block_data.spawn_import_sweeper(Duration::from_secs(30));
    let result = tonic::transport::Server::builder()
        .add_service(
            BlockStoreServer::new(BlockStoreService::new(state))
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            BlockDataServer::new(block_data)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    sweeper.abort();
    result
}

/// A channel to an API served on a unix socket; it connects on first use and reconnects.
pub fn connect_unix(path: &Path) -> tonic::transport::Channel {
    let path = path.to_path_buf();
    // The URI is required by the API but unused: the connector dials the socket.
    tonic::transport::Endpoint::from_static("http://[::1]:50051").connect_with_connector_lazy(
        tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }),
    )
}
