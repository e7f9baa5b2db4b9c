//! `Gateway`: one node's gateway, created and owned by its StorageGateway.
//!
//! The operator writes both spec and status; users read it (`kubectl get gateways`) to see
//! each node's activation, connection, version, volumes and health. It lives in its
//! StorageGateway's namespace because an owner reference cannot cross namespaces; deleting
//! the StorageGateway garbage-collects its Gateways.

#![allow(
    clippy::duplicated_attributes,
    reason = "kube's printcolumn(...) repeats the same keys for every column"
)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::rules::{self, Findings, InvalidSpec};

/// What the operator wants on one node.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "blockgate.io",
    version = "v1alpha1",
    kind = "Gateway",
    namespaced,
    status = "GatewayStatus",
    shortname = "bgw",
    category = "blockgate",
    derive = "PartialEq",
    doc = "One node's blockgate gateway, owned by its StorageGateway: activation, connection, version, volumes and health.",
    selectable = ".spec.nodeName",
    selectable = ".spec.storageGateway",
    printcolumn(
        name = "Node",
        type_ = "string",
        json_path = ".spec.nodeName",
        description = "Node the gateway runs on"
    ),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.runningVersion",
        description = "Version the gateway runs"
    ),
    printcolumn(
        name = "Activation",
        type_ = "string",
        json_path = ".status.activation",
        description = "Activation state"
    ),
    printcolumn(
        name = "Connection",
        type_ = "string",
        json_path = ".status.connection",
        description = "Control stream state"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Ready condition"
    ),
    printcolumn(
        name = "Volumes",
        type_ = "integer",
        json_path = ".status.volumeCount",
        description = "Attached volumes"
    ),
    printcolumn(
        name = "Log-Used",
        type_ = "integer",
        json_path = ".status.writeLog.usedPercent",
        description = "Write log use, percent"
    ),
    printcolumn(
        name = "Backlog",
        type_ = "string",
        json_path = ".status.upload.backlog",
        description = "Data waiting for upload"
    ),
    printcolumn(
        name = "Fleet",
        type_ = "string",
        json_path = ".spec.storageGateway",
        description = "Owning StorageGateway",
        priority = 1
    ),
    printcolumn(
        name = "Desired",
        type_ = "string",
        json_path = ".spec.version",
        description = "Version the operator wants here",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Name of the owning StorageGateway (also in the owner reference; here for field
    /// selectors and printing).
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::rule("self == oldSelf", "storageGateway is immutable"))]
    pub storage_gateway: String,
    /// Node this gateway serves.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::rule("self == oldSelf", "nodeName is immutable"))]
    pub node_name: String,
    /// Version the operator wants on this node; the rollout moves it node by node.
    #[schemars(length(max = 128))]
    #[x_kube(validation = rules::VERSION.rule())]
    pub version: String,
}

impl GatewaySpec {
    /// The schema's rules in Rust, as for [`crate::StorageGatewaySpec::validate`].
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        let mut findings = Findings::default();
        if self.storage_gateway.is_empty() {
            findings.push("spec.storageGateway", "must not be empty");
        }
        if self.node_name.is_empty() {
            findings.push("spec.nodeName", "must not be empty");
        }
        rules::VERSION.check(&mut findings, "spec.version", &self.version);
        findings.into_result()
    }
}

/// Where activation stands (design §6: a one-time token exchanged for a client certificate).
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivationState {
    /// The gateway pod has its token but has not presented it yet.
    Pending,
    /// The gateway holds a client certificate signed by the operator's CA.
    Activated,
    /// The token was refused (expired, reused, or for another StorageGateway).
    Rejected,
    /// The certificate was revoked; the gateway must activate again.
    Revoked,
}

/// State of the gateway's control stream to the operator.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// A replica holds an open stream.
    Connected,
    /// No stream; the gateway keeps serving I/O and redials.
    Disconnected,
    /// No replica has heard from the gateway yet.
    Unknown,
}

/// Observed state of one gateway, from its status reports.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `Activated`, `Connected`, `UpToDate`, `Degraded`, keyed by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Activation state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation: Option<ActivationState>,
    /// When the current client certificate expires; the gateway renews it before then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_expires_at: Option<Time>,
    /// Control stream state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionState>,
    /// Operator replica (pod name) holding the stream: the registry other replicas use to
    /// forward commands for this gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connected_replica: Option<String>,
    /// Time of the last status report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_report_at: Option<Time>,
    /// Version the gateway process reports it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_version: Option<String>,
    /// Volumes attached on this node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["volumeId".into()]))]
    pub volumes: Vec<AttachedVolume>,
    /// Number of `volumes`, for `kubectl get`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_count: Option<i32>,
    /// Write log use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_log: Option<SpaceUsage>,
    /// Cache use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<SpaceUsage>,
    /// Upload progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upload: Option<UploadStatus>,
    /// Current findings of the health analyzers, keyed by analyzer. Each also shows up as
    /// the `Degraded` condition, an Event and a metric.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["analyzer".into()]))]
    pub findings: Vec<HealthFinding>,
    /// The last diagnostics request and its outcome. A request is made by setting (or
    /// changing) the annotation `blockgate.io/diagnostics-request` on the Gateway to any
    /// value, e.g. `kubectl annotate gateway NAME blockgate.io/diagnostics-request=$(date +%s)
    /// --overwrite`: the operator asks the gateway for its recent log lines and state over
    /// the control channel and writes them into the ConfigMap `<gateway>-diagnostics`
    /// (`logs.txt`, `state.json`), owned by the Gateway. A request that failed is not retried;
    /// a new annotation value asks again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnostics: Option<DiagnosticsStatus>,
}

/// The annotation a user sets (to any new value) on a Gateway to collect its diagnostics;
/// see [`GatewayStatus::diagnostics`].
pub const DIAGNOSTICS_REQUEST_ANNOTATION: &str = "blockgate.io/diagnostics-request";

/// The outcome of the last diagnostics request (annotation
/// `blockgate.io/diagnostics-request`).
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DiagnosticsStatus {
    /// The value of the `blockgate.io/diagnostics-request` annotation this outcome answers;
    /// a different annotation value is a new request.
    pub request: String,
    /// When the diagnostics were collected; absent when the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collected_at: Option<Time>,
    /// The ConfigMap (in the Gateway's namespace) holding `logs.txt` and `state.json`;
    /// absent when the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<String>,
    /// Why the request failed (gateway not connected, refused, deadline passed, ...); set a
    /// new annotation value to try again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How a volume is stored.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub enum VolumeMode {
    /// The object store holds the volume; the node caches recently used data.
    Cached,
    /// The node holds the whole volume; the object store holds its backups.
    Stored,
}

/// A volume attached on the node.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AttachedVolume {
    /// CSI volume id.
    pub volume_id: String,
    /// Storage mode.
    pub mode: VolumeMode,
    /// Block device on the node, e.g. `/dev/nbd3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Volume size in bytes.
    pub size_bytes: i64,
}

/// Use of a local space (write log or cache).
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SpaceUsage {
    /// Bytes available to blockgate.
    pub capacity_bytes: i64,
    /// Bytes in use.
    pub used_bytes: i64,
    /// `usedBytes` as a whole percentage of `capacityBytes`, for `kubectl get`.
    pub used_percent: i32,
}

/// Upload backlog and rate.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UploadStatus {
    /// Bytes written but not yet in the object store.
    pub backlog_bytes: i64,
    /// `backlogBytes` for people (`1.5Gi`), for `kubectl get`.
    pub backlog: String,
    /// Recent upload rate.
    pub bytes_per_second: i64,
}

/// How bad a finding is.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Service continues; look soon.
    Warning,
    /// Service is at risk (e.g. the write log is nearly full and writes slow down).
    Critical,
}

/// One health analyzer's current finding.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct HealthFinding {
    /// Analyzer name in CamelCase, e.g. `WriteLogNearlyFull`, `BacklogGrowing`,
    /// `ObjectStoreErrors`, `CacheThrashing`.
    pub analyzer: String,
    /// Severity.
    pub severity: Severity,
    /// What was seen, for people.
    pub message: String,
    /// When the analyzer first reported it.
    pub since: Time,
}

impl UploadStatus {
    /// Builds the status with the human-readable backlog filled in.
    pub fn new(backlog_bytes: u64, bytes_per_second: u64) -> Self {
        Self {
            backlog_bytes: i64::try_from(backlog_bytes).unwrap_or(i64::MAX),
            backlog: crate::quantity::format_bytes_approximately(backlog_bytes),
            bytes_per_second: i64::try_from(bytes_per_second).unwrap_or(i64::MAX),
        }
    }
}

impl SpaceUsage {
    /// Builds the usage with the percentage filled in (rounded down, 0 for no capacity).
    pub fn new(capacity_bytes: u64, used_bytes: u64) -> Self {
        let percent = if capacity_bytes == 0 {
            0
        } else {
            u128::from(used_bytes) * 100 / u128::from(capacity_bytes)
        };
        Self {
            capacity_bytes: i64::try_from(capacity_bytes).unwrap_or(i64::MAX),
            used_bytes: i64::try_from(used_bytes).unwrap_or(i64::MAX),
            used_percent: i32::try_from(percent).unwrap_or(i32::MAX),
        }
    }
}
