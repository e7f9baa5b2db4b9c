//! blockgate's operator: the reconcilers that turn `StorageGateway` objects into one
//! `Gateway` object and one gateway pod per selected node, the leader election that lets only
//! one replica run them, and the `/healthz` and `/metrics` endpoints every replica serves.
//!
//! The CRD types come from `blockgate-operator-api`; this crate owns what is done with them.
//! It never deletes data: host paths are never removed, and a Gateway whose volumes are still
//! attached keeps its finalizer (see [`gateway::VolumeDetacher`]).
//!
//! The gateway control server itself (operator/control) is hosted here on Kubernetes: the CA
//! in a Secret ([`control_ca`]), activation tokens in Secrets ([`activation`]), the holder
//! registry on Leases and the peers from the operator's pods ([`registry`]), reports into
//! Gateway status, metrics and health findings ([`reports`], [`analyzers`]), and the
//! block-storage API's way to the gateways over the control channel ([`hub_gateways`]).
//!
//! Not here yet: rollouts.

pub mod activation;
pub mod analyzers;
pub mod bandwidth;
pub mod blockstore;
pub mod context;
pub mod control_ca;
pub mod diagnostics;
pub mod gateway;
pub mod http;
pub mod hub_gateways;
pub mod leader;
pub mod metrics;
pub mod pod;
pub mod registry;
pub mod reports;
pub mod storage_gateway;

#[cfg(test)]
mod fixtures;

/// The one field manager of the reconcilers' server-side applies: spec and status of
/// Gateways, gateway pods, StorageGateway status.
pub const FIELD_MANAGER: &str = "blockgate-operator";

/// The field manager the control server must use when it writes the status that gateways
/// report (volumes, write log and cache use, upload, activation, connection). Under
/// server-side apply a manager owns exactly the fields it applied last: the reconciler's
/// applies of the Gateway status carry only `observedGeneration` and the `Ready` condition, so
/// with a second manager for reports neither side ever wipes the other's fields.
pub const REPORTS_FIELD_MANAGER: &str = "blockgate-operator-reports";

/// Labels on every gateway pod, for `kubectl get pods -l` and for the pod watch.
pub const GATEWAY_POD_LABEL: (&str, &str) = ("app.kubernetes.io/name", "blockgate-gateway");
