//! The control server's gRPC services and their listener.
//!
//! One TLS listener serves all three services. It asks every client for a certificate but
//! does not require one: a gateway activating has none yet. A certificate that is presented
//! must verify against the CA, or the handshake fails. `Control` and `ControlPeer` then refuse
//! calls without a verified certificate of the right kind (a gateway id, or the operator's
//! name); `Activation` needs none. One port keeps the gateways' configuration to one endpoint
//! and the Service to one port; the price is that the authorisation of the mutual-TLS
//! services is in code here rather than in the TLS configuration, so each handler checks it
//! first.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockgate_proto::control::v1::activation_server::{Activation, ActivationServer};
use blockgate_proto::control::v1::control_peer_server::{ControlPeer, ControlPeerServer};
use blockgate_proto::control::v1::control_server::{Control, ControlServer};
use blockgate_proto::control::v1::{
    ActivateRequest, ActivateResponse, CommandResult, ForwardRequest, GatewayMessage, HeldRequest,
    HeldResponse, HelloAck, OperatorMessage, gateway_message, operator_message,
};
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use crate::ca::{self, CertificateAuthority, OPERATOR_COMMON_NAME};
use crate::hub::Hub;
use crate::token::{TokenError, TokenStore};

/// How long a new stream may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// Commands queued towards one gateway.
const OUTBOUND_QUEUE: usize = 64;

/// The subject common name of the verified client certificate of a call, if any.
fn peer_common_name<T>(request: &Request<T>) -> Option<String> {
    let certificates = request.peer_certs()?;
    ca::common_name(certificates.first()?)
}

/// `Activation`: a certificate for a gateway holding a valid token.
pub struct ActivationService {
    ca: Arc<CertificateAuthority>,
    tokens: Arc<dyn TokenStore>,
    certificate_validity: Duration,
}

impl std::fmt::Debug for ActivationService {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ActivationService")
            .field("certificate_validity", &self.certificate_validity)
            .finish_non_exhaustive()
    }
}

impl ActivationService {
    pub fn new(
        ca: Arc<CertificateAuthority>,
        tokens: Arc<dyn TokenStore>,
        certificate_validity: Duration,
    ) -> ActivationService {
        ActivationService {
            ca,
            tokens,
            certificate_validity,
        }
    }
}

fn token_status(error: &TokenError) -> Status {
    let message = error.to_string();
    match error {
        TokenError::Unknown | TokenError::Used | TokenError::Expired => {
            Status::unauthenticated(message)
        }
        TokenError::WrongStorageGateway => Status::permission_denied(message),
        TokenError::Unavailable(_) => Status::unavailable(message),
    }
}

#[tonic::async_trait]
impl Activation for ActivationService {
    async fn activate(
        &self,
        request: Request<ActivateRequest>,
    ) -> Result<Response<ActivateResponse>, Status> {
        let request = request.into_inner();
        let gateway_id = ca::gateway_id(&request.storage_gateway, &request.node)
            .map_err(|error| Status::invalid_argument(error.to_string()))?;
        // Signed before the token is consumed, so a bad request does not use the token up;
        // the certificate is handed out only if the token is good.
        let signed = self
            .ca
            .sign_gateway_request(&request.csr_pem, &gateway_id, self.certificate_validity)
            .map_err(|error| {
                tracing::warn!(gateway = %gateway_id, %error, "activation refused: bad certificate request");
                Status::invalid_argument(error.to_string())
            })?;
        if let Err(error) = self
            .tokens
            .check_and_consume(&request.token, &request.storage_gateway)
            .await
        {
            tracing::warn!(gateway = %gateway_id, %error, "activation refused");
            return Err(token_status(&error));
        }
        tracing::info!(gateway = %gateway_id, version = %request.version, "gateway activated");
        Ok(Response::new(ActivateResponse {
            gateway_id,
            certificate_pem: signed.certificate_pem,
            ca_certificate_pem: self.ca.certificate_pem().to_string(),
            not_after_unix: signed
                .not_after
                .duration_since(UNIX_EPOCH)
                .map(|since| since.as_secs())
                .unwrap_or(0),
        }))
    }
}

/// `Control`: the gateways' streams, into the [`Hub`].
#[derive(Debug)]
pub struct ControlService {
    hub: Arc<Hub>,
}

impl ControlService {
    pub fn new(hub: Arc<Hub>) -> ControlService {
        ControlService { hub }
    }
}

type OperatorStream = Pin<Box<dyn Stream<Item = Result<OperatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlService {
    type ConnectStream = OperatorStream;

    async fn connect(
        &self,
        request: Request<Streaming<GatewayMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let identity = peer_common_name(&request).ok_or_else(|| {
            Status::unauthenticated("Connect needs a gateway client certificate (activate first)")
        })?;
        if !ca::is_gateway_id(&identity) {
            return Err(Status::permission_denied(
                "the client certificate is not a gateway's",
            ));
        }
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello"))??;
        let Some(GatewayMessage {
            kind: Some(gateway_message::Kind::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message of a stream must be a hello",
            ));
        };
        if hello.gateway_id != identity {
            tracing::warn!(certificate = %identity, hello = %hello.gateway_id, "hello refused: its gateway id is not the certificate's");
            return Err(Status::permission_denied(format!(
                "hello names gateway {:?} but the certificate is {identity:?}",
                hello.gateway_id
            )));
        }
        let (outbound, receiver) = tokio::sync::mpsc::channel(OUTBOUND_QUEUE);
        let ack = OperatorMessage {
            kind: Some(operator_message::Kind::HelloAck(HelloAck {
                report_interval_seconds: u32::try_from(self.hub.report_interval().as_secs())
                    .unwrap_or(u32::MAX)
                    .max(1),
            })),
        };
        outbound
            .send(Ok(ack))
            .await
            .map_err(|_| Status::unavailable("stream closed"))?;
        let hub = self.hub.clone();
        let connection = hub.connected(&identity, hello, outbound).await;
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(GatewayMessage { kind: Some(kind) })) => match kind {
                        gateway_message::Kind::Report(report) => hub.report(&identity, report),
                        gateway_message::Kind::Result(result) => hub.complete(&identity, result),
                        gateway_message::Kind::Hello(_) => {
                            tracing::debug!(gateway = %identity, "ignoring a second hello");
                        }
                    },
                    Ok(Some(GatewayMessage { kind: None })) => {}
                    Ok(None) => break,
                    Err(status) => {
                        tracing::debug!(gateway = %identity, %status, "gateway stream failed");
                        break;
                    }
                }
            }
            hub.disconnected(&identity, connection).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receiver))))
    }
}

/// `ControlPeer`: commands forwarded by the other replicas.
#[derive(Debug)]
pub struct ControlPeerService {
    hub: Arc<Hub>,
}

impl ControlPeerService {
    pub fn new(hub: Arc<Hub>) -> ControlPeerService {
        ControlPeerService { hub }
    }
}

fn require_operator<T>(request: &Request<T>) -> Result<(), Status> {
    match peer_common_name(request) {
        Some(name) if name == OPERATOR_COMMON_NAME => Ok(()),
        Some(_) => Err(Status::permission_denied(
            "ControlPeer is for operator replicas",
        )),
        None => Err(Status::unauthenticated(
            "ControlPeer needs the operator's client certificate",
        )),
    }
}

#[tonic::async_trait]
impl ControlPeer for ControlPeerService {
    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<CommandResult>, Status> {
        require_operator(&request)?;
        let request = request.into_inner();
        let command = request
            .command
            .ok_or_else(|| Status::invalid_argument("no command"))?;
        let now = crate::hub::unix_ms(SystemTime::now());
        let timeout = Duration::from_millis(command.deadline_unix_ms.saturating_sub(now));
        // Only this replica's streams: a forwarded command is never forwarded again.
        self.hub
            .send_local(&request.gateway_id, command, timeout)
            .await
            .map(Response::new)
            .map_err(|error| error.to_status())
    }

    async fn held(&self, request: Request<HeldRequest>) -> Result<Response<HeldResponse>, Status> {
        require_operator(&request)?;
        Ok(Response::new(HeldResponse {
            gateway_ids: self.hub.held(),
        }))
    }
}

/// The server's TLS material: the CA (to verify clients) and the operator's certificate.
#[derive(Clone)]
pub struct ServerTls {
    pub ca_pem: String,
    pub certificate_pem: String,
    /// Secret: never log it.
    pub key_pem: String,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    /// TLS for calls to the other replicas (`ControlPeer`) with the same certificate.
    /// `domain` overrides the name checked in the peer's certificate (default: the host of
    /// the peer's endpoint).
    pub fn peer_client_config(&self, domain: Option<&str>) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.certificate_pem, &self.key_pem));
        match domain {
            Some(domain) => config.domain_name(domain),
            None => config,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("invalid TLS configuration")]
    Tls(#[source] tonic::transport::Error),
    #[error("the control server failed")]
    Serve(#[source] tonic::transport::Error),
}

/// Serves `Activation`, `Control` and `ControlPeer` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: &ServerTls,
    hub: Arc<Hub>,
    activation: ActivationService,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    crate::install_crypto_provider();
    let config = ServerTlsConfig::new()
        .identity(Identity::from_pem(&tls.certificate_pem, &tls.key_pem))
        .client_ca_root(Certificate::from_pem(&tls.ca_pem))
        .client_auth_optional(true)
        .timeout(Duration::from_secs(10));
    Server::builder()
        .tls_config(config)
        .map_err(ServeError::Tls)?
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(ActivationServer::new(activation))
        .add_service(ControlServer::new(ControlService::new(hub.clone())))
        .add_service(ControlPeerServer::new(ControlPeerService::new(hub)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown)
        .await
        .map_err(ServeError::Serve)
}
