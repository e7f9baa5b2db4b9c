//! The CSI Identity service: who the plugin is, what it offers, and whether it is ready.
//!
//! Ready means the block-storage API answers; Probe never fails, it says `ready: false`.

use std::time::Duration;

use blockgate_proto::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse, identity_server,
    plugin_capability,
};
use tonic::{Request, Response, Status};

use crate::blockstore::BlockStore;

/// How long Probe waits for the block-storage API.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub struct Identity {
    driver_name: String,
    blockstore: BlockStore,
}

impl Identity {
    pub fn new(driver_name: String, blockstore: BlockStore) -> Identity {
        Identity {
            driver_name,
            blockstore,
        }
    }
}

fn service(kind: plugin_capability::service::Type) -> PluginCapability {
    PluginCapability {
        r#type: Some(plugin_capability::Type::Service(
            plugin_capability::Service {
                r#type: kind.into(),
            },
        )),
    }
}

#[tonic::async_trait]
impl identity_server::Identity for Identity {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: self.driver_name.clone(),
            vendor_version: env!("CARGO_PKG_VERSION").to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::service::Type;
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: vec![
                service(Type::ControllerService),
                service(Type::SnapshotMetadataService),
                PluginCapability {
                    r#type: Some(plugin_capability::Type::VolumeExpansion(
                        plugin_capability::VolumeExpansion {
                            r#type: plugin_capability::volume_expansion::Type::Online.into(),
                        },
                    )),
                },
            ],
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        let ready = match tokio::time::timeout(PROBE_TIMEOUT, self.blockstore.ping()).await {
            Ok(Ok(_)) => true,
            Ok(Err(status)) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "probe: the block-storage API does not answer");
                false
            }
            Err(_) => {
                tracing::warn!(timeout = ?PROBE_TIMEOUT, "probe: the block-storage API did not answer in time");
                false
            }
        };
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}
