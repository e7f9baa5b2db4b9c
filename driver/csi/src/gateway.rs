//! The connection to this node's gateway (its node API, `gateway.proto`) over the unix
//! socket in the gateway's data directory.
//!
//! The channel is lazy and reconnects on its own, so the plugin starts before the gateway is
//! up (Probe then says `ready: false`). This module owns the transport and how a failed call
//! reads in a CSI answer; the node service decides what each failure means.

use std::path::{Path, PathBuf};

use blockgate_proto::gateway::v1::node_gateway_client::NodeGatewayClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A client of the gateway's node API, cheap to clone.
#[derive(Debug, Clone)]
pub struct Gateway {
    channel: Channel,
    socket: PathBuf,
}

impl Gateway {
    pub fn connect_lazy(socket: PathBuf) -> Gateway {
        let channel = blockgate_proto::unix::channel_lazy(&socket);
        Gateway { channel, socket }
    }

    pub fn client(&self) -> NodeGatewayClient<Channel> {
        NodeGatewayClient::new(self.channel.clone())
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn error(&self, call: &'static str, status: Status) -> GatewayError {
        GatewayError {
            call,
            socket: self.socket.clone(),
            status,
        }
    }
}

/// A failed call to the gateway's node API.
#[derive(Debug, thiserror::Error)]
#[error("the gateway's node API ({}) {call} failed{}", socket.display(), hint(status))]
pub struct GatewayError {
    pub call: &'static str,
    pub socket: PathBuf,
    #[source]
    pub status: Status,
}

fn hint(status: &Status) -> &'static str {
    match status.code() {
        Code::Unavailable => " (is blockgate-gateway running on this node?)",
        _ => "",
    }
}

impl GatewayError {
    /// The CSI code for a gateway failure the handler has no special meaning for. The
    /// gateway's codes mean what CSI's do (gateway.proto); a dead connection or an upload
    /// that ran out of time is UNAVAILABLE, so the CO retries.
    pub fn code(&self) -> Code {
        match self.status.code() {
            Code::NotFound => Code::NotFound,
            Code::AlreadyExists => Code::AlreadyExists,
            Code::InvalidArgument => Code::InvalidArgument,
            Code::FailedPrecondition => Code::FailedPrecondition,
            Code::OutOfRange => Code::OutOfRange,
            Code::ResourceExhausted => Code::ResourceExhausted,
            Code::Aborted => Code::Aborted,
            Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => Code::Unavailable,
            Code::Ok
            | Code::Unknown
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::Unimplemented
            | Code::Internal
            | Code::DataLoss => Code::Internal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::errors::chain;

    #[tokio::test]
    async fn a_missing_gateway_says_so() {
        let gateway = Gateway {
            channel: tonic::transport::Endpoint::from_static("http://[::]:1").connect_lazy(),
            socket: "/var/lib/blockgate/node.sock".into(),
        };
        let error = gateway.error("AttachVolume", Status::unavailable("connection refused"));
        assert_eq!(error.code(), Code::Unavailable);
        assert_eq!(
            chain(&error),
            "the gateway's node API (/var/lib/blockgate/node.sock) AttachVolume failed \
             (is blockgate-gateway running on this node?): Unavailable: connection refused"
        );
        assert_eq!(
            gateway
                .error("DetachVolume", Status::deadline_exceeded("upload"))
                .code(),
            Code::Unavailable
        );
        assert_eq!(
            gateway.error("X", Status::unimplemented("no")).code(),
            Code::Internal
        );
    }
}
