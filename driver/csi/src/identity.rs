//! The CSI Identity service: who the plugin is, what it offers, and whether it is ready.
//!
//! The controller plugin is ready when the block-storage API answers, the node plugin when
//! its gateway's node API does; Probe never fails, it says `ready: false`. Each endpoint
//! advertises only the services it serves (a node-only endpoint has no CONTROLLER_SERVICE,
//! or a CO talking to it would call Controller RPCs it does not serve); both say ONLINE
//! expansion, which describes the plugin as a whole.

use std::time::Duration;

use blockgate_proto::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse, identity_server,
    plugin_capability,
};
use tonic::{Request, Response, Status};

use crate::blockstore::BlockStore;
use crate::gateway::Gateway;

/// How long Probe waits for the block-storage API or the gateway.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Which plugin this endpoint is, and what its readiness depends on.
#[derive(Debug)]
pub enum Role {
    Controller(BlockStore),
    Node(Gateway),
}

#[derive(Debug)]
pub struct Identity {
    driver_name: String,
    role: Role,
}

impl Identity {
    pub fn new(driver_name: String, role: Role) -> Identity {
        Identity { driver_name, role }
    }

    /// Whether what this plugin depends on answers now.
    async fn ready(&self) -> Result<(), (&'static str, tonic::Status)> {
        match &self.role {
            Role::Controller(blockstore) => blockstore
                .ping()
                .await
                .map(drop)
                .map_err(|status| ("the block-storage API", status)),
            Role::Node(gateway) => gateway
                .client()
                .list_attachments(blockgate_proto::gateway::v1::ListAttachmentsRequest {})
                .await
                .map(drop)
                .map_err(|status| ("the gateway's node API", status)),
        }
    }
}

fn capabilities(role: &Role) -> Vec<PluginCapability> {
    use plugin_capability::service::Type;
    let mut capabilities = match role {
        Role::Controller(_) => vec![
            service(Type::ControllerService),
            service(Type::SnapshotMetadataService),
        ],
        Role::Node(_) => Vec::new(),
    };
    capabilities.push(PluginCapability {
        r#type: Some(plugin_capability::Type::VolumeExpansion(
            plugin_capability::VolumeExpansion {
                r#type: plugin_capability::volume_expansion::Type::Online.into(),
            },
        )),
    });
    capabilities
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
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: capabilities(&self.role),
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        let ready = match tokio::time::timeout(PROBE_TIMEOUT, self.ready()).await {
            Ok(Ok(())) => true,
            Ok(Err((what, status))) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "probe: {what} does not answer");
                false
            }
            Err(_) => {
                tracing::warn!(timeout = ?PROBE_TIMEOUT, "probe: no answer in time");
                false
            }
        };
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_node_endpoint_offers_no_controller_and_is_not_ready_without_its_gateway() {
        use identity_server::Identity as _;
        let dir = tempfile::tempdir().expect("temp dir");
        let gateway = Gateway::connect_lazy(dir.path().join("node.sock"));
        let kinds: Vec<_> = capabilities(&Role::Node(gateway.clone()))
            .into_iter()
            .filter_map(|capability| capability.r#type)
            .collect();
        assert_eq!(kinds.len(), 1);
        assert!(matches!(
            kinds[0],
            plugin_capability::Type::VolumeExpansion(_)
        ));
        let identity = Identity::new("blockgate.csi.io".into(), Role::Node(gateway));
        let probe = identity
            .probe(Request::new(ProbeRequest {}))
            .await
            .expect("probe never fails")
            .into_inner();
        assert_eq!(probe.ready, Some(false));
    }
}
