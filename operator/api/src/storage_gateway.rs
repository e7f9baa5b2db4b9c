//! `StorageGateway`: one fleet of gateways, its object store and its update policy.
//!
//! Namespaced, in the namespace the operator watches, because everything it refers to is
//! namespaced: the credentials and encryption key Secrets are read from the StorageGateway's
//! own namespace, so creating one never grants access to another namespace's Secrets, and the
//! Gateway objects it owns live beside it (an owner reference cannot cross namespaces).
//!
//! The schema rejects malformed objects; it cannot see other objects. Whether the referenced
//! Secrets exist and hold the named keys, and whether the time zone exists, are the
//! reconciler's checks, reported as the `SecretsResolved` and `Degraded` conditions.

#![allow(
    clippy::duplicated_attributes,
    reason = "kube's printcolumn(...) repeats the same keys for every column"
)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Toleration;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::quantity::{SIZE_MAX_LENGTH, parse_bytes};
use crate::rules::{self, Findings, InvalidSpec};

/// Smallest write log: room for a burst of writes while uploads catch up.
pub const MIN_WRITE_LOG_SIZE: &str = "1Gi";
/// Smallest cache: below this the cache thrashes and every read goes to the object store.
pub const MIN_CACHE_SIZE: &str = "1Gi";
/// Smallest bandwidth limit: a lower limit lets the write log fill faster than it drains,
/// which slows every write on the node.
pub const MIN_BANDWIDTH: &str = "1Mi";

/// Desired state of a fleet of gateways: which nodes, which version, where the data goes.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[kube(
    group = "blockgate.io",
    version = "v1alpha1",
    kind = "StorageGateway",
    namespaced,
    status = "StorageGatewayStatus",
    shortname = "sgw",
    category = "blockgate",
    derive = "PartialEq",
    doc = "A fleet of blockgate gateways: the nodes they run on, their version, local write-log and cache, object store, and update policy.",
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".spec.version",
        description = "Gateway version the fleet should run"
    ),
    printcolumn(
        name = "Desired",
        type_ = "integer",
        json_path = ".status.desiredGateways",
        description = "Nodes selected for a gateway"
    ),
    printcolumn(
        name = "Ready",
        type_ = "integer",
        json_path = ".status.readyGateways",
        description = "Gateways activated, connected and healthy"
    ),
    printcolumn(
        name = "Up-To-Date",
        type_ = "integer",
        json_path = ".status.updatedGateways",
        description = "Gateways running spec.version"
    ),
    printcolumn(
        name = "Rollout",
        type_ = "string",
        json_path = ".status.rollout.phase",
        description = "Phase of the current rollout"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why the fleet is or is not ready",
        priority = 1
    ),
    printcolumn(
        name = "Bucket",
        type_ = "string",
        json_path = ".spec.objectStore.bucket",
        description = "Object store bucket",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = rules::rule(
    "self.cache.path != self.writeLog.path && !self.cache.path.startsWith(self.writeLog.path + '/') && !self.writeLog.path.startsWith(self.cache.path + '/')",
    "cache.path and writeLog.path must be different directories, neither inside the other",
))]
#[serde(rename_all = "camelCase")]
pub struct StorageGatewaySpec {
    /// Gateway image repository, without tag or digest (the tag is `version`).
    #[schemars(length(max = 255))]
    #[x_kube(validation = rules::IMAGE_REPOSITORY.rule())]
    pub image: String,
    /// Gateway version to run, a semantic version that is also the image tag. Changing it
    /// starts a rollout under `updatePolicy`.
    #[schemars(length(max = 128))]
    #[x_kube(validation = rules::VERSION.rule())]
    pub version: String,
    /// Secrets to pull the gateway image with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub image_pull_secrets: Vec<LocalSecretReference>,
    /// Nodes that get a gateway: those whose labels include all of these. Empty selects
    /// every schedulable node.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations of the gateway pods, to reach tainted nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub tolerations: Vec<Toleration>,
    /// The durable write log on each node: writes are acknowledged once they are here.
    #[x_kube(validation = rules::size_field_at_least(MIN_WRITE_LOG_SIZE))]
    pub write_log: LocalStorage,
    /// The read cache on each node.
    #[x_kube(validation = rules::size_field_at_least(MIN_CACHE_SIZE))]
    pub cache: LocalStorage,
    /// Where volumes and snapshots live.
    pub object_store: ObjectStore,
    /// Secret holding the key that encrypts volume data before upload. Required by
    /// StorageClasses with `encrypted: "true"`; absent means volumes are stored unencrypted
    /// (the object store's own encryption still applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encryption_key_secret: Option<SecretKeyReference>,
    /// When and how fast the fleet moves to a new version.
    #[serde(default)]
    pub update_policy: UpdatePolicy,
    /// Upload and download rate limits, optionally by time of week.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<BandwidthLimits>,
}

/// A directory on each node and how much of its disk blockgate may use.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LocalStorage {
    /// Absolute host path; created if missing. Use a local disk, not a network filesystem.
    #[schemars(length(max = 1024))]
    #[x_kube(validation = rules::NODE_PATH.rule())]
    #[x_kube(validation = rules::rule(rules::NODE_PATH_SEGMENTS_CEL, rules::NODE_PATH_SEGMENTS_MESSAGE))]
    pub path: String,
    /// Space to use, as a Kubernetes quantity (`100Gi`).
    #[schemars(length(max = 32))]
    #[x_kube(validation = rules::SIZE.rule())]
    pub size: String,
}

/// The S3-compatible object store holding the fleet's volumes and snapshots.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ObjectStore {
    /// Bucket name; it must exist. The bucket alone is enough to restore every volume.
    #[schemars(length(max = 63))]
    #[x_kube(validation = rules::BUCKET.rule())]
    #[x_kube(validation = rules::rule(rules::BUCKET_EXTRA_CEL, rules::BUCKET_EXTRA_MESSAGE))]
    pub bucket: String,
    /// Key prefix inside the bucket, so several fleets can share one bucket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = rules::KEY_PREFIX.rule())]
    pub prefix: Option<String>,
    /// Endpoint URL of an S3-compatible server; absent means AWS S3 for `region`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 512))]
    #[x_kube(validation = rules::ENDPOINT.rule())]
    #[x_kube(validation = rules::rule("isURL(self)", "must be a valid URL"))]
    pub endpoint: Option<String>,
    /// Region, exactly as the server names it (Garage calls its region `garage`).
    #[schemars(length(max = 64))]
    #[x_kube(validation = rules::REGION.rule())]
    pub region: String,
    /// Address buckets as `endpoint/bucket` instead of `bucket.endpoint`. Most
    /// S3-compatible servers (MinIO, Garage) need this.
    #[serde(default)]
    pub force_path_style: bool,
    /// Secret with the access key pair. Required: credentials come from Secrets, never
    /// from the spec itself.
    pub credentials_secret: S3CredentialsReference,
}

/// A Secret in the StorageGateway's namespace holding an S3 access key pair. The default
/// key names are the AWS environment variable names, so
/// `kubectl create secret generic s3 --from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=...`
/// is all it takes.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct S3CredentialsReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::SECRET_NAME.rule())]
    pub name: String,
    /// Key holding the access key id.
    #[serde(default = "default_access_key_id_key")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::SECRET_KEY.rule())]
    pub access_key_id_key: String,
    /// Key holding the secret access key.
    #[serde(default = "default_secret_access_key_key")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::SECRET_KEY.rule())]
    pub secret_access_key_key: String,
}

fn default_access_key_id_key() -> String {
    "AWS_ACCESS_KEY_ID".to_owned()
}

fn default_secret_access_key_key() -> String {
    "AWS_SECRET_ACCESS_KEY".to_owned()
}

/// One key of a Secret in the StorageGateway's namespace.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::SECRET_NAME.rule())]
    pub name: String,
    /// Key inside the Secret.
    #[serde(default = "default_encryption_key_key")]
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::SECRET_KEY.rule())]
    pub key: String,
}

fn default_encryption_key_key() -> String {
    "encryption-key".to_owned()
}

/// A Secret in the same namespace, by name.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct LocalSecretReference {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    #[x_kube(validation = rules::SECRET_NAME.rule())]
    pub name: String,
}

/// How the fleet moves to a new `version`.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpdatePolicy {
    /// When updates may start; absent means at any time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance_window: Option<MaintenanceWindow>,
    /// Gateways updated at once: a count (at least 1) or a percentage of the fleet (1% to
    /// 100%, rounded up to at least one gateway).
    ///
    /// Optional in Rust because the schema marks int-or-string fields nullable: an explicit
    /// `null` reads as the default of 1 (see [`UpdatePolicy::max_unavailable`]).
    #[serde(
        default = "default_max_unavailable",
        skip_serializing_if = "Option::is_none"
    )]
    #[x_kube(validation = rules::rule(rules::MAX_UNAVAILABLE_CEL, rules::MAX_UNAVAILABLE_MESSAGE))]
    pub max_unavailable: Option<IntOrString>,
    /// Pause a rollout when the fleet analyzers see the same error on many gateways.
    #[serde(default = "default_true")]
    pub pause_on_fleet_errors: bool,
    /// Stop starting new updates; those in progress finish.
    #[serde(default)]
    pub paused: bool,
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        Self {
            maintenance_window: None,
            max_unavailable: default_max_unavailable(),
            pause_on_fleet_errors: true,
            paused: false,
        }
    }
}

fn default_max_unavailable() -> Option<IntOrString> {
    Some(IntOrString::Int(1))
}

impl UpdatePolicy {
    /// `maxUnavailable`, with its default of 1 when absent or null.
    pub fn max_unavailable(&self) -> IntOrString {
        self.max_unavailable.clone().unwrap_or(IntOrString::Int(1))
    }
}

fn default_true() -> bool {
    true
}

fn default_time_zone() -> String {
    "UTC".to_owned()
}

/// Days of the week, as schedules name them.
#[derive(
    JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord,
)]
pub enum Weekday {
    /// Monday.
    Mon,
    /// Tuesday.
    Tue,
    /// Wednesday.
    Wed,
    /// Thursday.
    Thu,
    /// Friday.
    Fri,
    /// Saturday.
    Sat,
    /// Sunday.
    Sun,
}

/// A weekly window in which updates may start; one that starts inside the window may
/// finish after it.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceWindow {
    /// Days on which the window opens.
    #[schemars(length(min = 1, max = 7))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub days: Vec<Weekday>,
    /// Opening time, `HH:MM` in `timeZone`.
    #[schemars(length(max = 5))]
    #[x_kube(validation = rules::TIME_OF_DAY.rule())]
    pub start_time: String,
    /// Length of the window, from 30m to 24h (`4h`, `90m`, `1h30m`).
    #[schemars(length(max = 16))]
    #[x_kube(validation = rules::WINDOW_DURATION.rule())]
    #[x_kube(validation = rules::rule(rules::WINDOW_DURATION_RANGE_CEL, rules::WINDOW_DURATION_RANGE_MESSAGE))]
    pub duration: String,
    /// IANA time zone of `startTime`. The schema checks its shape; the reconciler checks
    /// it exists.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = rules::TIME_ZONE.rule())]
    pub time_zone: String,
}

/// Rate limits on the traffic between gateways and the object store, per gateway.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BandwidthLimits {
    /// Upload limit in bytes per second (`100Mi`) outside the schedule; absent is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = rules::SIZE.rule())]
    #[x_kube(validation = rules::size_at_least(MIN_BANDWIDTH, "must be at least 1Mi (bytes per second)"))]
    pub upload_bytes_per_second: Option<String>,
    /// Download limit in bytes per second outside the schedule; absent is unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = rules::SIZE.rule())]
    #[x_kube(validation = rules::size_at_least(MIN_BANDWIDTH, "must be at least 1Mi (bytes per second)"))]
    pub download_bytes_per_second: Option<String>,
    /// Intervals of the week with other limits, for example more bandwidth at night.
    /// Intervals must not overlap.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    #[x_kube(validation = rules::rule(
        "self.all(a, self.all(b, a == b || !a.days.exists(d, d in b.days) || a.endTime <= b.startTime || b.endTime <= a.startTime))",
        "schedule intervals must not overlap",
    ))]
    pub schedule: Vec<BandwidthInterval>,
    /// IANA time zone of the schedule's times.
    #[serde(default = "default_time_zone")]
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = rules::TIME_ZONE.rule())]
    pub time_zone: String,
}

/// Limits that apply on some days between two times.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = rules::rule("self.endTime > self.startTime", "endTime must be after startTime"))]
#[x_kube(validation = rules::rule(
    "has(self.uploadBytesPerSecond) || has(self.downloadBytesPerSecond)",
    "set uploadBytesPerSecond, downloadBytesPerSecond or both",
))]
pub struct BandwidthInterval {
    /// Days on which the interval applies.
    #[schemars(length(min = 1, max = 7))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub days: Vec<Weekday>,
    /// Start, `HH:MM`.
    #[schemars(length(max = 5))]
    #[x_kube(validation = rules::TIME_OF_DAY.rule())]
    pub start_time: String,
    /// End, `HH:MM` after `startTime`, or `24:00`.
    #[schemars(length(max = 5))]
    #[x_kube(validation = rules::END_OF_INTERVAL.rule())]
    pub end_time: String,
    /// Upload limit in bytes per second during the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = rules::SIZE.rule())]
    #[x_kube(validation = rules::size_at_least(MIN_BANDWIDTH, "must be at least 1Mi (bytes per second)"))]
    pub upload_bytes_per_second: Option<String>,
    /// Download limit in bytes per second during the interval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = rules::SIZE.rule())]
    #[x_kube(validation = rules::size_at_least(MIN_BANDWIDTH, "must be at least 1Mi (bytes per second)"))]
    pub download_bytes_per_second: Option<String>,
}

/// Observed state of the fleet, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StorageGatewayStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, `SecretsResolved`, `Degraded`, `RolloutPaused`, keyed by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
    /// Nodes selected for a gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desired_gateways: Option<i32>,
    /// Gateways activated, connected and healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_gateways: Option<i32>,
    /// Gateways running `spec.version`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated_gateways: Option<i32>,
    /// The rollout in progress or the last one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutStatus>,
}

/// Progress of moving the fleet to a version.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RolloutStatus {
    /// Version being rolled out.
    pub target_version: String,
    /// Where the rollout stands.
    pub phase: RolloutPhase,
    /// When it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,
    /// Gateways whose shutdown-for-update handshake failed; they kept running the old
    /// version.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_gateways: Vec<String>,
    /// Human-readable detail, e.g. why it is paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Phase of a rollout.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutPhase {
    /// Waiting for the maintenance window to open.
    WaitingForWindow,
    /// Updating gateways.
    Progressing,
    /// Stopped by `spec.updatePolicy.paused` or by fleet errors.
    Paused,
    /// A handshake failed; see `failedGateways`.
    Failed,
    /// Every gateway runs the target version.
    Complete,
}

impl StorageGatewaySpec {
    /// Applies the schema's rules in Rust and lists every broken one, with the field path the
    /// API server would print. The API server already enforces these for objects it stores;
    /// the operator calls this on what it reads so that an object stored under an older,
    /// looser schema is reported in a condition instead of acted upon.
    pub fn validate(&self) -> Result<(), InvalidSpec> {
        let mut findings = Findings::default();
        rules::IMAGE_REPOSITORY.check(&mut findings, "spec.image", &self.image);
        rules::VERSION.check(&mut findings, "spec.version", &self.version);
        for (i, secret) in self.image_pull_secrets.iter().enumerate() {
            rules::SECRET_NAME.check(
                &mut findings,
                &format!("spec.imagePullSecrets[{i}].name"),
                &secret.name,
            );
        }
        check_local_storage(
            &mut findings,
            "spec.writeLog",
            &self.write_log,
            MIN_WRITE_LOG_SIZE,
        );
        check_local_storage(&mut findings, "spec.cache", &self.cache, MIN_CACHE_SIZE);
        let (log, cache) = (&self.write_log.path, &self.cache.path);
        if log == cache
            || cache.starts_with(&format!("{log}/"))
            || log.starts_with(&format!("{cache}/"))
        {
            findings.push(
                "spec",
                "cache.path and writeLog.path must be different directories, neither inside the other",
            );
        }
        self.object_store.check(&mut findings);
        if let Some(key) = &self.encryption_key_secret {
            rules::SECRET_NAME.check(&mut findings, "spec.encryptionKeySecret.name", &key.name);
            rules::SECRET_KEY.check(&mut findings, "spec.encryptionKeySecret.key", &key.key);
        }
        self.update_policy.check(&mut findings);
        if let Some(bandwidth) = &self.bandwidth {
            bandwidth.check(&mut findings);
        }
        findings.into_result()
    }

    /// The write log size in bytes. Call after [`Self::validate`]; errors name the field.
    pub fn write_log_bytes(&self) -> Result<u64, crate::quantity::QuantityError> {
        parse_bytes(&self.write_log.size)
    }

    /// The cache size in bytes. Call after [`Self::validate`].
    pub fn cache_bytes(&self) -> Result<u64, crate::quantity::QuantityError> {
        parse_bytes(&self.cache.size)
    }
}

fn check_size_at_least(
    findings: &mut Findings,
    field: &str,
    size: &str,
    minimum: &str,
    message: &str,
) {
    if size.len() > SIZE_MAX_LENGTH as usize {
        findings.push(
            field,
            format!("must be at most {SIZE_MAX_LENGTH} characters"),
        );
        return;
    }
    if !rules::SIZE.check(findings, field, size) {
        return;
    }
    match (parse_bytes(size), parse_bytes(minimum)) {
        (Ok(bytes), Ok(min)) if bytes < min => findings.push(field, message),
        (Err(error), _) => findings.push(field, error.to_string()),
        _ => {}
    }
}

fn check_local_storage(
    findings: &mut Findings,
    field: &str,
    storage: &LocalStorage,
    minimum: &str,
) {
    let path_field = format!("{field}.path");
    if storage.path.len() > rules::NODE_PATH_MAX_LENGTH as usize {
        findings.push(
            &path_field,
            format!("must be at most {} characters", rules::NODE_PATH_MAX_LENGTH),
        );
    } else if rules::NODE_PATH.check(findings, &path_field, &storage.path)
        && !rules::node_path_segments_ok(&storage.path)
    {
        findings.push(&path_field, rules::NODE_PATH_SEGMENTS_MESSAGE);
    }
    check_size_at_least(
        findings,
        &format!("{field}.size"),
        &storage.size,
        minimum,
        &format!("must be at least {minimum}"),
    );
}

impl ObjectStore {
    fn check(&self, findings: &mut Findings) {
        if rules::BUCKET.check(findings, "spec.objectStore.bucket", &self.bucket)
            && !rules::bucket_extra_ok(&self.bucket)
        {
            findings.push("spec.objectStore.bucket", rules::BUCKET_EXTRA_MESSAGE);
        }
        if let Some(prefix) = &self.prefix {
            rules::KEY_PREFIX.check(findings, "spec.objectStore.prefix", prefix);
        }
        if let Some(endpoint) = &self.endpoint {
            rules::ENDPOINT.check(findings, "spec.objectStore.endpoint", endpoint);
        }
        rules::REGION.check(findings, "spec.objectStore.region", &self.region);
        let secret = &self.credentials_secret;
        let field = "spec.objectStore.credentialsSecret";
        rules::SECRET_NAME.check(findings, &format!("{field}.name"), &secret.name);
        rules::SECRET_KEY.check(
            findings,
            &format!("{field}.accessKeyIdKey"),
            &secret.access_key_id_key,
        );
        rules::SECRET_KEY.check(
            findings,
            &format!("{field}.secretAccessKeyKey"),
            &secret.secret_access_key_key,
        );
    }
}

impl UpdatePolicy {
    fn check(&self, findings: &mut Findings) {
        let field = "spec.updatePolicy.maxUnavailable";
        match &self.max_unavailable() {
            IntOrString::Int(count) if !(1..=999_999).contains(count) => {
                findings.push(field, rules::MAX_UNAVAILABLE_MESSAGE);
            }
            IntOrString::Int(_) => {}
            IntOrString::String(text) => {
                if !rules::COUNT.matches(text) {
                    rules::PERCENTAGE.check(findings, field, text);
                }
            }
        }
        if let Some(window) = &self.maintenance_window {
            let field = "spec.updatePolicy.maintenanceWindow";
            check_days(findings, &format!("{field}.days"), &window.days);
            rules::TIME_OF_DAY.check(findings, &format!("{field}.startTime"), &window.start_time);
            let duration_field = format!("{field}.duration");
            if rules::WINDOW_DURATION.check(findings, &duration_field, &window.duration)
                && !rules::window_minutes(&window.duration)
                    .is_some_and(|m| rules::WINDOW_MINUTES.contains(&m))
            {
                findings.push(&duration_field, rules::WINDOW_DURATION_RANGE_MESSAGE);
            }
            rules::TIME_ZONE.check(findings, &format!("{field}.timeZone"), &window.time_zone);
        }
    }
}

fn check_days(findings: &mut Findings, field: &str, days: &[Weekday]) {
    if days.is_empty() {
        findings.push(field, "must name at least one day");
    }
    let mut sorted = days.to_vec();
    sorted.sort();
    sorted.dedup();
    if sorted.len() != days.len() {
        findings.push(field, "must not repeat a day");
    }
}

impl BandwidthLimits {
    fn check(&self, findings: &mut Findings) {
        let field = "spec.bandwidth";
        let rate_message = "must be at least 1Mi (bytes per second)";
        if let Some(rate) = &self.upload_bytes_per_second {
            check_size_at_least(
                findings,
                &format!("{field}.uploadBytesPerSecond"),
                rate,
                MIN_BANDWIDTH,
                rate_message,
            );
        }
        if let Some(rate) = &self.download_bytes_per_second {
            check_size_at_least(
                findings,
                &format!("{field}.downloadBytesPerSecond"),
                rate,
                MIN_BANDWIDTH,
                rate_message,
            );
        }
        rules::TIME_ZONE.check(findings, &format!("{field}.timeZone"), &self.time_zone);
        for (i, interval) in self.schedule.iter().enumerate() {
            let field = format!("{field}.schedule[{i}]");
            check_days(findings, &format!("{field}.days"), &interval.days);
            let start_ok = rules::TIME_OF_DAY.check(
                findings,
                &format!("{field}.startTime"),
                &interval.start_time,
            );
            let end_ok = rules::END_OF_INTERVAL.check(
                findings,
                &format!("{field}.endTime"),
                &interval.end_time,
            );
            if start_ok && end_ok && interval.end_time <= interval.start_time {
                findings.push(&field, "endTime must be after startTime");
            }
            if interval.upload_bytes_per_second.is_none()
                && interval.download_bytes_per_second.is_none()
            {
                findings.push(
                    &field,
                    "set uploadBytesPerSecond, downloadBytesPerSecond or both",
                );
            }
            if let Some(rate) = &interval.upload_bytes_per_second {
                check_size_at_least(
                    findings,
                    &format!("{field}.uploadBytesPerSecond"),
                    rate,
                    MIN_BANDWIDTH,
                    rate_message,
                );
            }
            if let Some(rate) = &interval.download_bytes_per_second {
                check_size_at_least(
                    findings,
                    &format!("{field}.downloadBytesPerSecond"),
                    rate,
                    MIN_BANDWIDTH,
                    rate_message,
                );
            }
        }
        // Same overlap rule as the CEL one: intervals sharing a day must not intersect.
        let overlapping = self.schedule.iter().enumerate().any(|(i, a)| {
            self.schedule.iter().enumerate().any(|(j, b)| {
                i != j
                    && a != b
                    && a.days.iter().any(|d| b.days.contains(d))
                    && a.end_time > b.start_time
                    && b.end_time > a.start_time
            })
        });
        if overlapping {
            findings.push(
                format!("{field}.schedule"),
                "schedule intervals must not overlap",
            );
        }
    }
}
