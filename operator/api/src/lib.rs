//! blockgate's custom resources, group `blockgate.io`, version `v1alpha1`: `StorageGateway`
//! (a fleet) and `Gateway` (one node's gateway, owned by its StorageGateway), their
//! validation and the CRD manifests generated from them.
//!
//! This crate owns the CRD schema (STYLE.md: one owner per schema). It is types only: no
//! Kubernetes client, no HTTP or TLS stack, so the CSI driver and tools can depend on it
//! cheaply. `crds/*.yaml` is generated from it by `cargo run -p blockgate-operator-api --bin
//! crdgen`; CI runs the generator with `--check` and fails when the files are stale.

pub mod condition;
pub mod crd;
pub mod gateway;
pub mod quantity;
pub mod rules;
pub mod storage_gateway;

pub use condition::{Condition, ConditionStatus, ConditionUpdate, set_condition};
pub use gateway::{Gateway, GatewaySpec, GatewayStatus};
pub use rules::{FieldError, InvalidSpec};
pub use storage_gateway::{StorageGateway, StorageGatewaySpec, StorageGatewayStatus};
