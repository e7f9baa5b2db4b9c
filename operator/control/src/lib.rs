//! The operator's gateway control server (DESIGN.md §6): activation of new gateways, the
//! `Connect` streams they keep open, and forwarding of commands between operator replicas.
//!
//! This crate knows no Kubernetes: tokens, the holder registry, the replica list and the
//! destination of status reports are traits ([`TokenStore`], [`Registry`], [`Peers`],
//! [`ReportSink`]) that the operator implements on Secrets, Leases, endpoints and Gateway
//! status; the in-memory implementations here are real ones for tests and single replicas.
//! It must never log a token or a private key.

pub mod ca;
pub mod hub;
pub mod registry;
pub mod server;
pub mod token;

pub use ca::{CaError, CertificateAuthority, IssuedCertificate, OPERATOR_COMMON_NAME};
pub use hub::{
    ConnectionEvent, Hub, HubConfig, InMemoryReportSink, Recorded, ReportSink, SendError,
};
pub use registry::{InMemoryRegistry, Peer, Peers, Registry, RegistryError, StaticPeers};
pub use server::{
    ActivationService, ControlPeerService, ControlService, ServeError, ServerTls, serve,
};
pub use token::{
    ActivationGrant, InMemoryTokenStore, TokenError, TokenStore, generate_token, token_digest,
};

/// Makes aws-lc-rs the process's TLS crypto provider unless one is set already. The server
/// side of tonic's TLS uses the process default, and a process that links both of rustls'
/// providers (through other dependencies) has none by itself.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
