//! The connection to the block-storage API over its unix socket.
//!
//! The channel is lazy and reconnects on its own, so the plugin starts (and answers Probe
//! with `ready: false`) before the API is up. This module owns the transport only; it never
//! interprets the API's answers.

use std::path::PathBuf;
use std::sync::Arc;

use blockgate_proto::blockstore::v1::{
    GetServiceInfoRequest, ServiceInfo, block_data_client::BlockDataClient,
    block_store_client::BlockStoreClient,
};
use tokio::sync::OnceCell;
use tonic::transport::Channel;

/// Clients of the block-storage API, cheap to clone (they share one channel).
#[derive(Debug, Clone)]
pub struct BlockStore {
    channel: Channel,
    service_info: Arc<OnceCell<ServiceInfo>>,
}

impl BlockStore {
    /// A lazily connecting channel to the API listening on `socket`.
    pub fn connect_lazy(socket: PathBuf) -> BlockStore {
        let channel = blockgate_proto::unix::channel_lazy(&socket);
        BlockStore {
            channel,
            service_info: Arc::new(OnceCell::new()),
        }
    }

    pub fn store(&self) -> BlockStoreClient<Channel> {
        BlockStoreClient::new(self.channel.clone())
    }

    pub fn data(&self) -> BlockDataClient<Channel> {
        BlockDataClient::new(self.channel.clone())
    }

    /// The API's ServiceInfo: asked once, then remembered (its sizes never change while it runs).
    pub async fn service_info(&self) -> Result<ServiceInfo, tonic::Status> {
        self.service_info
            .get_or_try_init(|| async {
                let info = self
                    .store()
                    .get_service_info(GetServiceInfoRequest {})
                    .await?
                    .into_inner();
                Ok(info)
            })
            .await
            .cloned()
    }

    /// Asks the API for its ServiceInfo now, bypassing the remembered answer: Probe's check
    /// that the API is reachable.
    pub async fn ping(&self) -> Result<ServiceInfo, tonic::Status> {
        let info = self
            .store()
            .get_service_info(GetServiceInfoRequest {})
            .await?
            .into_inner();
        let _ = self.service_info.set(info.clone());
        Ok(info)
    }
}
