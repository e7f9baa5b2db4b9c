//! Where gateways' status reports go ([`ReportSink`] on Kubernetes): the Gateway's status
//! (server-side apply under [`crate::REPORTS_FIELD_MANAGER`], so the reconciler's
//! `observedGeneration` and `Ready` survive), the `blockgate_gateway_*` metrics, and the
//! health analyzers, whose findings become status entries, the `Degraded` condition and
//! Events on transitions.
//!
//! The hub calls the sink on a stream's task, which must not block: [`GatewayReports`] only
//! queues, and one [`ReportWorker`] task does the writing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blockgate_operator_api::Gateway;
use blockgate_operator_api::condition::{self, ConditionStatus, ConditionUpdate, set_condition};
use blockgate_operator_api::gateway::{
    ActivationState, AttachedVolume, ConnectionState, HealthFinding, Severity, SpaceUsage,
    UploadStatus, VolumeMode,
};
use blockgate_operator_control::{ConnectionEvent, ReportSink};
use blockgate_proto::control::v1::StatusReport;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::{Api, Client, Resource};
use serde_json::json;
use tokio::sync::mpsc;

use crate::analyzers::{self, Finding};
use crate::metrics::{GatewaySample, Metrics};

/// Reports kept per gateway for the analyzers: five minutes at the default 10 s interval,
/// long enough for a trend, short enough that an old problem ages out.
pub const REPORT_WINDOW: usize = 30;

/// A report that changes nothing but numbers (use, backlog, rate, time) is written at most
/// this often: every status write wakes the StorageGateway reconciler (it owns the
/// Gateways), and fresh-to-the-second numbers are what the metrics are for.
pub const STATUS_REFRESH: Duration = Duration::from_secs(60);

/// What the hub handed over.
#[derive(Debug)]
pub enum Delivery {
    Report(String, StatusReport),
    Event(String, ConnectionEvent),
}

/// The [`ReportSink`] the hub holds: it queues for the [`ReportWorker`].
#[derive(Debug, Clone)]
pub struct GatewayReports {
    sender: mpsc::UnboundedSender<Delivery>,
}

impl ReportSink for GatewayReports {
    fn report(&self, gateway: &str, report: StatusReport) {
        let _ = self
            .sender
            .send(Delivery::Report(gateway.to_owned(), report));
    }

    fn event(&self, gateway: &str, event: ConnectionEvent) {
        let _ = self.sender.send(Delivery::Event(gateway.to_owned(), event));
    }
}

/// The parts of a gateway id `namespace/storage-gateway/node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayName {
    pub namespace: String,
    pub storage_gateway: String,
    pub node: String,
    /// The Gateway object's name.
    pub object: String,
}

impl GatewayName {
    pub fn parse(id: &str) -> Option<GatewayName> {
        let mut parts = id.splitn(3, '/');
        let (namespace, storage_gateway, node) = (parts.next()?, parts.next()?, parts.next()?);
        Some(GatewayName {
            namespace: namespace.to_owned(),
            storage_gateway: storage_gateway.to_owned(),
            node: node.to_owned(),
            object: crate::pod::gateway_name(storage_gateway, node),
        })
    }
}

#[derive(Debug, Default)]
struct Tracked {
    connected: bool,
    connected_since_unix: u64,
    window: VecDeque<StatusReport>,
    /// Current findings with the time each was first seen.
    findings: BTreeMap<&'static str, (Finding, Time)>,
    /// The last status written from a report: its non-numeric part, and when.
    last_write: Option<(serde_json::Value, tokio::time::Instant)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0:?} is not a gateway id")]
    GatewayId(String),
    #[error("cannot apply the status of Gateway {name}")]
    ApplyStatus {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot read Gateway {name}")]
    ReadGateway {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Writes what the hub reported; see the module doc.
pub struct ReportWorker {
    client: Client,
    metrics: std::sync::Arc<Metrics>,
    recorder: Option<Recorder>,
    replica: String,
    interval: Duration,
    tracked: HashMap<String, Tracked>,
}

impl std::fmt::Debug for ReportWorker {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ReportWorker")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

fn time_of_unix(seconds: u64) -> Time {
    Time(
        i64::try_from(seconds)
            .ok()
            .and_then(|seconds| Timestamp::from_second(seconds).ok())
            .unwrap_or_else(Timestamp::now),
    )
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl ReportWorker {
    /// A sink and the worker that drains it. `recorder`: where Events go (none in tests that
    /// do not look at them); `interval`: how often gateways report.
    pub fn new(
        client: Client,
        metrics: std::sync::Arc<Metrics>,
        recorder: Option<Recorder>,
        replica: String,
        interval: Duration,
    ) -> (
        GatewayReports,
        ReportWorker,
        mpsc::UnboundedReceiver<Delivery>,
    ) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (
            GatewayReports { sender },
            ReportWorker {
                client,
                metrics,
                recorder,
                replica,
                interval,
                tracked: HashMap::new(),
            },
            receiver,
        )
    }

    /// Handles deliveries, and looks for silent gateways every interval, until the sink is
    /// dropped.
    pub async fn run(mut self, mut receiver: mpsc::UnboundedReceiver<Delivery>) {
        let mut tick = tokio::time::interval(self.interval.max(Duration::from_secs(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                delivery = receiver.recv() => {
                    let Some(delivery) = delivery else { return };
                    if let Err(error) = self.handle(delivery).await {
                        tracing::warn!(error = %crate::storage_gateway::ErrorChain(&error), "cannot record a gateway report");
                    }
                }
                _ = tick.tick() => self.check_silence(unix_now()).await,
            }
        }
    }

    /// Records one delivery.
    pub async fn handle(&mut self, delivery: Delivery) -> Result<(), ReportError> {
        match delivery {
            Delivery::Report(id, report) => self.report(&id, report, unix_now()).await,
            Delivery::Event(id, ConnectionEvent::Connected(hello)) => {
                let name =
                    GatewayName::parse(&id).ok_or_else(|| ReportError::GatewayId(id.clone()))?;
                let tracked = self.tracked.entry(id.clone()).or_default();
                tracked.connected = true;
                tracked.connected_since_unix = unix_now();
                tracked.window.clear();
                tracked.last_write = None;
                let mut sample = self.metrics.gateway(&id).unwrap_or_default();
                sample.gateway = name.object.clone();
                sample.node = name.node.clone();
                sample.storage_gateway = format!("{}/{}", name.namespace, name.storage_gateway);
                sample.connected = true;
                self.metrics.set_gateway(&id, sample);
                let mut conditions = Vec::new();
                let now = Time(Timestamp::now());
                set(
                    &mut conditions,
                    condition::CONNECTED,
                    ConditionStatus::True,
                    "StreamOpen",
                    &format!("connected to operator replica {}", self.replica),
                    now.clone(),
                );
                // A stream needs a certificate from the CA: the gateway is activated.
                set(
                    &mut conditions,
                    condition::ACTIVATED,
                    ConditionStatus::True,
                    "CertificateIssued",
                    "",
                    now,
                );
                self.apply(
                    &name,
                    json!({
                        "conditions": conditions,
                        "activation": ActivationState::Activated,
                        "connection": ConnectionState::Connected,
                        "connectedReplica": self.replica,
                        "runningVersion": hello.version,
                    }),
                )
                .await
                .map(|_| ())
            }
            Delivery::Event(id, ConnectionEvent::Disconnected) => {
                let name =
                    GatewayName::parse(&id).ok_or_else(|| ReportError::GatewayId(id.clone()))?;
                if let Some(tracked) = self.tracked.get_mut(&id) {
                    tracked.connected = false;
                }
                if let Some(mut sample) = self.metrics.gateway(&id) {
                    sample.connected = false;
                    self.metrics.set_gateway(&id, sample);
                }
                // The gateway may have reconnected to another replica before this one saw
                // its old stream end: only the recorded holder says "disconnected".
                let api: Api<Gateway> = Api::namespaced(self.client.clone(), &name.namespace);
                let current =
                    api.get_opt(&name.object)
                        .await
                        .map_err(|source| ReportError::ReadGateway {
                            name: name.object.clone(),
                            source,
                        })?;
                let holder = current
                    .as_ref()
                    .and_then(|g| g.status.as_ref())
                    .and_then(|s| s.connected_replica.clone());
                if current.is_none()
                    || holder
                        .as_deref()
                        .is_some_and(|holder| holder != self.replica)
                {
                    return Ok(());
                }
                let mut conditions = Vec::new();
                set(
                    &mut conditions,
                    condition::CONNECTED,
                    ConditionStatus::False,
                    "StreamClosed",
                    "the gateway's control stream closed; it keeps serving I/O and redials",
                    Time(Timestamp::now()),
                );
                self.apply(
                    &name,
                    json!({
                        "conditions": conditions,
                        "connection": ConnectionState::Disconnected,
                    }),
                )
                .await
                .map(|_| ())
            }
        }
    }

    async fn report(
        &mut self,
        id: &str,
        report: StatusReport,
        now_unix: u64,
    ) -> Result<(), ReportError> {
        let name = GatewayName::parse(id).ok_or_else(|| ReportError::GatewayId(id.to_owned()))?;
        let interval = self.interval;
        let tracked = self.tracked.entry(id.to_owned()).or_default();
        if !tracked.connected {
            tracked.connected = true;
            tracked.connected_since_unix = now_unix;
        }
        tracked.window.push_back(report.clone());
        while tracked.window.len() > REPORT_WINDOW {
            tracked.window.pop_front();
        }
        let window: Vec<StatusReport> = tracked.window.iter().cloned().collect();
        let findings =
            analyzers::analyze(&window, tracked.connected_since_unix, now_unix, interval);
        let transitions = update_findings(tracked, findings);
        let findings_status = findings_status(tracked);

        self.metrics.set_gateway(
            id,
            GatewaySample {
                gateway: name.object.clone(),
                node: name.node.clone(),
                storage_gateway: format!("{}/{}", name.namespace, name.storage_gateway),
                connected: true,
                volumes: u64::try_from(report.volumes.len()).unwrap_or(u64::MAX),
                write_log_bytes: report.write_log_bytes,
                write_log_capacity_bytes: report.write_log_capacity_bytes,
                upload_backlog_bytes: report.upload_backlog_bytes,
                upload_bytes_per_second: report.upload_bytes_per_second,
                findings: tracked.findings.keys().map(|a| (*a).to_owned()).collect(),
            },
        );

        let volumes: Vec<AttachedVolume> = report
            .volumes
            .iter()
            .map(|volume| AttachedVolume {
                volume_id: volume.volume_id.clone(),
                // Reports do not carry the mode; every volume a gateway serves today is
                // cached (the object store is its home).
                mode: VolumeMode::Cached,
                device: (!volume.device_path.is_empty()).then(|| volume.device_path.clone()),
                size_bytes: to_i64(volume.size_bytes),
            })
            .collect();
        let mut conditions = Vec::new();
        let now = Time(Timestamp::now());
        set(
            &mut conditions,
            condition::CONNECTED,
            ConditionStatus::True,
            "StreamOpen",
            &format!("connected to operator replica {}", self.replica),
            now.clone(),
        );
        degraded(&mut conditions, &findings_status, now);
        let status = json!({
            "conditions": conditions,
            "connection": ConnectionState::Connected,
            "connectedReplica": self.replica,
            "lastReportAt": if report.at_unix > 0 { time_of_unix(report.at_unix) } else { Time(Timestamp::now()) },
            "runningVersion": report.version,
            "volumes": volumes,
            "volumeCount": i32::try_from(volumes.len()).unwrap_or(i32::MAX),
            "writeLog": SpaceUsage::new(report.write_log_capacity_bytes, report.write_log_bytes),
            "cache": SpaceUsage::new(report.cache_capacity_bytes, report.cache_bytes),
            "upload": UploadStatus::new(
                report.upload_backlog_bytes,
                // Whole bytes per second are plenty for a status line.
                float_to_u64(report.upload_bytes_per_second),
            ),
            "findings": findings_status,
        });
        let significant = json!([
            status["runningVersion"],
            status["volumes"],
            tracked_findings_key(&findings_status),
        ]);
        let now = tokio::time::Instant::now();
        if let Some(tracked) = self.tracked.get_mut(id) {
            let fresh = tracked.last_write.as_ref().is_some_and(|(written, at)| {
                *written == significant && now.duration_since(*at) < STATUS_REFRESH
            });
            if fresh && transitions.is_empty() {
                return Ok(());
            }
            tracked.last_write = Some((significant, now));
        }
        let gateway = self.apply(&name, status).await?;
        self.publish(&gateway, &transitions).await;
        Ok(())
    }

    /// Runs the analyzers for connected gateways that have not reported, so silence is a
    /// finding too; writes only when the findings changed.
    pub async fn check_silence(&mut self, now_unix: u64) {
        let interval = self.interval;
        let mut changed = Vec::new();
        for (id, tracked) in &mut self.tracked {
            if !tracked.connected {
                continue;
            }
            let window: Vec<StatusReport> = tracked.window.iter().cloned().collect();
            let findings =
                analyzers::analyze(&window, tracked.connected_since_unix, now_unix, interval);
            let transitions = update_findings(tracked, findings);
            if !transitions.is_empty() {
                changed.push((id.clone(), findings_status(tracked), transitions));
            }
        }
        for (id, findings, transitions) in changed {
            let Some(name) = GatewayName::parse(&id) else {
                continue;
            };
            if let Some(mut sample) = self.metrics.gateway(&id) {
                sample.findings = findings.iter().map(|f| f.analyzer.clone()).collect();
                self.metrics.set_gateway(&id, sample);
            }
            let mut conditions = Vec::new();
            degraded(&mut conditions, &findings, Time(Timestamp::now()));
            match self
                .apply(
                    &name,
                    json!({"conditions": conditions, "findings": findings}),
                )
                .await
            {
                Ok(gateway) => self.publish(&gateway, &transitions).await,
                Err(error) => {
                    tracing::warn!(gateway = %id, error = %crate::storage_gateway::ErrorChain(&error), "cannot record the gateway's findings")
                }
            }
        }
    }

    async fn apply(
        &self,
        name: &GatewayName,
        status: serde_json::Value,
    ) -> Result<Gateway, ReportError> {
        let api: Api<Gateway> = Api::namespaced(self.client.clone(), &name.namespace);
        let patch = json!({
            "apiVersion": "blockgate.io/v1alpha1",
            "kind": "Gateway",
            "status": status,
        });
        api.patch_status(
            &name.object,
            &PatchParams::apply(crate::REPORTS_FIELD_MANAGER).force(),
            &Patch::Apply(patch),
        )
        .await
        .map_err(|source| ReportError::ApplyStatus {
            name: name.object.clone(),
            source,
        })
    }

    async fn publish(&self, gateway: &Gateway, transitions: &[Transition]) {
        let Some(recorder) = &self.recorder else {
            return;
        };
        let reference = gateway.object_ref(&());
        for transition in transitions {
            let event = match transition {
                Transition::Found(finding) => Event {
                    type_: EventType::Warning,
                    reason: finding.analyzer.to_owned(),
                    note: Some(finding.message.clone()),
                    action: "Analyze".to_owned(),
                    secondary: None,
                },
                Transition::Resolved(analyzer) => Event {
                    type_: EventType::Normal,
                    reason: format!("{analyzer}Resolved"),
                    note: Some(format!("{analyzer} no longer applies")),
                    action: "Analyze".to_owned(),
                    secondary: None,
                },
            };
            if let Err(error) = recorder.publish(&event, &reference).await {
                tracing::warn!(%error, "cannot publish a health Event");
            }
        }
    }
}

fn float_to_u64(value: f64) -> u64 {
    if value.is_finite() && value > 0.0 {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "clamped to u64's range above"
        )]
        let whole = value.min(u64::MAX as f64) as u64;
        whole
    } else {
        0
    }
}

fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: ConditionStatus,
    reason: &str,
    message: &str,
    now: Time,
) {
    set_condition(
        conditions,
        ConditionUpdate {
            type_,
            status,
            reason,
            message,
            observed_generation: None,
        },
        now,
    );
}

/// `Degraded` from the findings: True with the analyzers' names as the reason while any.
fn degraded(conditions: &mut Vec<Condition>, findings: &[HealthFinding], now: Time) {
    if findings.is_empty() {
        set(
            conditions,
            condition::DEGRADED,
            ConditionStatus::False,
            "NoFindings",
            "",
            now,
        );
        return;
    }
    let critical = findings.iter().any(|f| f.severity == Severity::Critical);
    let message = findings
        .iter()
        .map(|f| format!("{}: {}", f.analyzer, f.message))
        .collect::<Vec<_>>()
        .join("; ");
    let reason = if findings.len() == 1 {
        findings[0].analyzer.as_str()
    } else if critical {
        "CriticalFindings"
    } else {
        "Findings"
    };
    set(
        conditions,
        condition::DEGRADED,
        ConditionStatus::True,
        reason,
        &message,
        now,
    );
}

/// A change in a gateway's findings, for Events.
#[derive(Debug, Clone, PartialEq)]
enum Transition {
    Found(Finding),
    Resolved(&'static str),
}

/// Replaces the tracked findings with `findings`, keeping each one's first-seen time and
/// saying which appeared and which went away. A change of severity or message alone is not
/// a transition (no Event), but the status shows the new text.
fn update_findings(tracked: &mut Tracked, findings: Vec<Finding>) -> Vec<Transition> {
    let mut transitions = Vec::new();
    let mut next = BTreeMap::new();
    for finding in findings {
        let since = match tracked.findings.remove(finding.analyzer) {
            Some((_, since)) => since,
            None => {
                transitions.push(Transition::Found(finding.clone()));
                Time(Timestamp::now())
            }
        };
        next.insert(finding.analyzer, (finding, since));
    }
    for analyzer in tracked.findings.keys() {
        transitions.push(Transition::Resolved(analyzer));
    }
    tracked.findings = next;
    transitions
}

/// What of the findings makes a status write worth it: which, and how bad (messages carry
/// numbers that change with every report).
fn tracked_findings_key(findings: &[HealthFinding]) -> Vec<(String, Severity)> {
    findings
        .iter()
        .map(|finding| (finding.analyzer.clone(), finding.severity))
        .collect()
}

fn findings_status(tracked: &Tracked) -> Vec<HealthFinding> {
    tracked
        .findings
        .values()
        .map(|(finding, since)| HealthFinding {
            analyzer: finding.analyzer.to_owned(),
            severity: finding.severity,
            message: finding.message.clone(),
            since: since.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{EVENTS, FakeApi, GATEWAYS, storage_gateway};
    use blockgate_proto::control::v1::{Hello, VolumeReport};
    use kube::runtime::events::Reporter;
    use std::sync::Arc;

    const ID: &str = "blockgate-system/fleet/node-1";
    const GIB: u64 = 1 << 30;

    fn report(sequence: u64, write_log_bytes: u64) -> StatusReport {
        StatusReport {
            sequence,
            at_unix: unix_now(),
            version: "0.2.0".into(),
            volumes: vec![VolumeReport {
                volume_id: "pvc-1".into(),
                size_bytes: 10 * GIB,
                device_path: "/dev/nbd0".into(),
                ..VolumeReport::default()
            }],
            write_log_bytes,
            write_log_capacity_bytes: 64 * GIB,
            cache_bytes: GIB,
            cache_capacity_bytes: 256 * GIB,
            upload_backlog_bytes: 3 * GIB / 2,
            upload_bytes_per_second: 52_428_800.4,
            ..StatusReport::default()
        }
    }

    /// A Gateway as the reconcilers leave it: spec, `observedGeneration` and `Ready`.
    fn cluster() -> (Client, FakeApi) {
        let (client, fake) = FakeApi::client();
        let gateway = crate::pod::gateway_for_node(&storage_gateway("fleet"), "node-1", None);
        fake.insert(GATEWAYS, gateway);
        fake.edit(GATEWAYS, "fleet-node-1", |g| {
            g["status"] = json!({"observedGeneration": 1, "conditions": [{
                "type": "Ready", "status": "True", "reason": "PodReady", "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        });
        (client, fake)
    }

    fn worker(client: &Client, metrics: &Arc<Metrics>, replica: &str) -> ReportWorker {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "blockgate-operator".into(),
                instance: Some(replica.into()),
            },
        );
        ReportWorker::new(
            client.clone(),
            metrics.clone(),
            Some(recorder),
            replica.into(),
            Duration::from_secs(10),
        )
        .1
    }

    fn gateway_status(fake: &FakeApi) -> blockgate_operator_api::GatewayStatus {
        let gateway: Gateway =
            serde_json::from_value(fake.get(GATEWAYS, "fleet-node-1").unwrap()).unwrap();
        gateway.status.unwrap()
    }

    fn condition_of(
        status: &blockgate_operator_api::GatewayStatus,
        type_: &str,
    ) -> (String, String) {
        let found = condition::find_condition(&status.conditions, type_)
            .unwrap_or_else(|| panic!("no {type_}"));
        (found.status.clone(), found.reason.clone())
    }

    fn event_reasons(fake: &FakeApi) -> Vec<String> {
        fake.names(EVENTS)
            .iter()
            .map(|name| {
                fake.get(EVENTS, name).unwrap()["reason"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    async fn connect(worker: &mut ReportWorker) {
        let hello = Hello {
            gateway_id: ID.into(),
            node: "node-1".into(),
            version: "0.2.0".into(),
            ..Hello::default()
        };
        worker
            .handle(Delivery::Event(
                ID.into(),
                ConnectionEvent::Connected(hello),
            ))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_report_fills_the_gateway_status_beside_the_reconcilers_fields() {
        let (client, fake) = cluster();
        let metrics = Arc::new(Metrics::default());
        let mut worker = worker(&client, &metrics, "op-a");
        connect(&mut worker).await;
        worker
            .handle(Delivery::Report(ID.into(), report(1, 6 * GIB)))
            .await
            .unwrap();

        let status = gateway_status(&fake);
        assert_eq!(status.connection, Some(ConnectionState::Connected));
        assert_eq!(status.activation, Some(ActivationState::Activated));
        assert_eq!(status.connected_replica.as_deref(), Some("op-a"));
        assert_eq!(status.running_version.as_deref(), Some("0.2.0"));
        assert_eq!(status.volume_count, Some(1));
        assert_eq!(status.volumes[0].device.as_deref(), Some("/dev/nbd0"));
        assert_eq!(status.write_log, Some(SpaceUsage::new(64 * GIB, 6 * GIB)));
        assert_eq!(status.upload.as_ref().unwrap().backlog, "1.5Gi");
        assert_eq!(status.upload.as_ref().unwrap().bytes_per_second, 52_428_800);
        assert!(status.last_report_at.is_some());
        assert!(status.findings.is_empty());
        assert_eq!(condition_of(&status, condition::CONNECTED).0, "True");
        assert_eq!(
            condition_of(&status, condition::DEGRADED),
            ("False".into(), "NoFindings".into())
        );
        // The reconciler's fields are still there.
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(
            condition_of(&status, condition::READY),
            ("True".into(), "PodReady".into())
        );
        // Every status write of the reports was under their own field manager.
        let status_writes: Vec<_> = fake
            .served()
            .into_iter()
            .filter(|served| served.method == "PATCH" && served.path.ends_with("/status"))
            .collect();
        assert!(!status_writes.is_empty());
        assert!(status_writes
            .iter()
            .all(|served| served.field_manager.as_deref() == Some(crate::REPORTS_FIELD_MANAGER)));

        let text = metrics.render();
        let labels =
            r#"gateway="fleet-node-1",node="node-1",storage_gateway="blockgate-system/fleet""#;
        for line in [
            format!("blockgate_gateway_connected{{{labels}}} 1"),
            format!("blockgate_gateway_volumes{{{labels}}} 1"),
            format!("blockgate_gateway_write_log_bytes{{{labels}}} {}", 6 * GIB),
            format!(
                "blockgate_gateway_upload_backlog_bytes{{{labels}}} {}",
                3 * GIB / 2
            ),
        ] {
            assert!(text.contains(&line), "{line} missing from\n{text}");
        }
    }

    #[tokio::test]
    async fn a_finding_degrades_the_gateway_with_an_event_and_a_metric_until_it_clears() {
        let (client, fake) = cluster();
        let metrics = Arc::new(Metrics::default());
        let mut worker = worker(&client, &metrics, "op-a");
        connect(&mut worker).await;
        worker
            .handle(Delivery::Report(ID.into(), report(1, 62 * GIB)))
            .await
            .unwrap();
        worker
            .handle(Delivery::Report(ID.into(), report(2, 63 * GIB)))
            .await
            .unwrap();
        let status = gateway_status(&fake);
        assert_eq!(status.findings.len(), 1);
        assert_eq!(
            status.findings[0].analyzer,
            analyzers::WRITE_LOG_NEARLY_FULL
        );
        assert_eq!(status.findings[0].severity, Severity::Critical);
        assert_eq!(
            condition_of(&status, condition::DEGRADED),
            ("True".into(), analyzers::WRITE_LOG_NEARLY_FULL.into())
        );
        // One Event for the transition, not one per report.
        assert_eq!(event_reasons(&fake), [analyzers::WRITE_LOG_NEARLY_FULL]);
        assert!(metrics.render().contains(
            r#"blockgate_gateway_findings{gateway="fleet-node-1",analyzer="WriteLogNearlyFull"} 1"#
        ));

        worker
            .handle(Delivery::Report(ID.into(), report(3, 6 * GIB)))
            .await
            .unwrap();
        let status = gateway_status(&fake);
        assert!(status.findings.is_empty());
        assert_eq!(condition_of(&status, condition::DEGRADED).0, "False");
        let mut reasons = event_reasons(&fake);
        reasons.sort();
        assert_eq!(
            reasons,
            ["WriteLogNearlyFull", "WriteLogNearlyFullResolved"]
        );
        assert!(!metrics.render().contains("blockgate_gateway_findings{"));
    }

    #[tokio::test]
    async fn a_silent_gateway_is_found_by_the_periodic_check() {
        let (client, fake) = cluster();
        let metrics = Arc::new(Metrics::default());
        let mut worker = worker(&client, &metrics, "op-a");
        connect(&mut worker).await;
        worker
            .handle(Delivery::Report(ID.into(), report(1, 6 * GIB)))
            .await
            .unwrap();
        worker.check_silence(unix_now() + 10).await;
        assert!(gateway_status(&fake).findings.is_empty());
        worker.check_silence(unix_now() + 120).await;
        let status = gateway_status(&fake);
        assert_eq!(status.findings[0].analyzer, analyzers::NO_RECENT_REPORT);
        assert_eq!(condition_of(&status, condition::DEGRADED).0, "True");
    }

    #[tokio::test]
    async fn only_the_replica_holding_the_stream_marks_it_disconnected() {
        let (client, fake) = cluster();
        let metrics = Arc::new(Metrics::default());
        let mut old_holder = worker(&client, &metrics, "op-a");
        let mut new_holder = worker(&client, &metrics, "op-b");
        connect(&mut old_holder).await;
        // The gateway redialled op-b before op-a noticed its old stream had ended.
        connect(&mut new_holder).await;
        old_holder
            .handle(Delivery::Event(ID.into(), ConnectionEvent::Disconnected))
            .await
            .unwrap();
        let status_now = gateway_status(&fake);
        assert_eq!(status_now.connection, Some(ConnectionState::Connected));
        assert_eq!(status_now.connected_replica.as_deref(), Some("op-b"));
        new_holder
            .handle(Delivery::Event(ID.into(), ConnectionEvent::Disconnected))
            .await
            .unwrap();
        let status_now = gateway_status(&fake);
        assert_eq!(status_now.connection, Some(ConnectionState::Disconnected));
        assert_eq!(
            condition_of(&status_now, condition::CONNECTED),
            ("False".into(), "StreamClosed".into())
        );
    }

    #[tokio::test]
    async fn reports_that_change_only_numbers_are_written_at_most_once_a_minute() {
        let (client, fake) = cluster();
        let metrics = Arc::new(Metrics::default());
        let mut worker = worker(&client, &metrics, "op-a");
        connect(&mut worker).await;
        let writes = |fake: &FakeApi| {
            fake.served()
                .iter()
                .filter(|served| served.method == "PATCH" && served.path.ends_with("/status"))
                .count()
        };
        worker
            .handle(Delivery::Report(ID.into(), report(1, 6 * GIB)))
            .await
            .unwrap();
        let after_first = writes(&fake);
        worker
            .handle(Delivery::Report(ID.into(), report(2, 7 * GIB)))
            .await
            .unwrap();
        assert_eq!(writes(&fake), after_first);
        // The metrics have the newest numbers all the same.
        assert_eq!(metrics.gateway(ID).unwrap().write_log_bytes, 7 * GIB);
        // A new volume is worth a write at once.
        let mut attached = report(3, 7 * GIB);
        attached.volumes.push(VolumeReport {
            volume_id: "pvc-2".into(),
            ..VolumeReport::default()
        });
        worker
            .handle(Delivery::Report(ID.into(), attached))
            .await
            .unwrap();
        assert_eq!(writes(&fake), after_first + 1);
        assert_eq!(gateway_status(&fake).volume_count, Some(2));
    }
}
