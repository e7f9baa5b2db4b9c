//! Serving the API on a unix socket (bound with `blockgate_proto::unix::bind`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use blockgate_proto::blockstore::v1::block_data_server::BlockDataServer;
use blockgate_proto::blockstore::v1::block_store_server::BlockStoreServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

use crate::{BlockDataService, BlockStoreService, State};

/// Messages up to this size: a block (512 KiB) with room to spare.
pub const MAX_MESSAGE: usize = 4 << 20;

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
