//! The operator's Prometheus metrics, rendered as text on each scrape from plain atomics:
//! a handful of counters does not need a registry crate.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Which reconciler a sample belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Controller {
    /// The StorageGateway reconciler.
    StorageGateway,
    /// The Gateway reconciler.
    Gateway,
}

impl Controller {
    fn label(self) -> &'static str {
        match self {
            Self::StorageGateway => "storagegateway",
            Self::Gateway => "gateway",
        }
    }
}

/// The latest of one gateway's reports, as this replica saw it on the gateway's stream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GatewaySample {
    /// The Gateway object's name.
    pub gateway: String,
    pub node: String,
    /// `namespace/name`.
    pub storage_gateway: String,
    pub connected: bool,
    pub volumes: u64,
    pub write_log_bytes: u64,
    pub write_log_capacity_bytes: u64,
    pub upload_backlog_bytes: u64,
    pub upload_bytes_per_second: f64,
    /// Analyzers with a current finding.
    pub findings: Vec<String>,
}

/// Counters shared by the reconcilers, the leader election and the HTTP endpoint.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Gateways whose streams this replica holds (or held), by gateway id.
    gateways: Mutex<BTreeMap<String, GatewaySample>>,
    /// Reconciles by controller and result (`ok` or the error's kind).
    reconciles: Mutex<BTreeMap<(Controller, &'static str), u64>>,
    /// 1 while this replica holds the leader lease (and runs the reconcilers).
    leader: AtomicU64,
    /// Times this replica became the leader.
    leader_acquisitions: AtomicU64,
}

impl Metrics {
    /// Counts one finished reconcile; `result` is `ok` or a short error kind.
    pub fn reconciled(&self, controller: Controller, result: &'static str) {
        // A poisoned lock only means another thread panicked mid-increment; the counts are
        // still usable.
        let mut reconciles = self
            .reconciles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *reconciles.entry((controller, result)).or_default() += 1;
    }

    /// Records whether this replica leads now.
    pub fn set_leader(&self, leading: bool) {
        let before = self.leader.swap(u64::from(leading), Ordering::Relaxed);
        if leading && before == 0 {
            self.leader_acquisitions.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count of reconciles with this controller and result, for tests and logs.
    pub fn reconcile_count(&self, controller: Controller, result: &str) -> u64 {
        let reconciles = self
            .reconciles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        reconciles
            .iter()
            .filter(|((c, r), _)| *c == controller && *r == result)
            .map(|(_, count)| *count)
            .sum()
    }

    /// Records the latest state of gateway `id`.
    pub fn set_gateway(&self, id: &str, sample: GatewaySample) {
        self.gateways
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id.to_owned(), sample);
    }

    /// The recorded state of gateway `id`, for tests and the report sink.
    pub fn gateway(&self, id: &str) -> Option<GatewaySample> {
        self.gateways
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    fn render_gateways(&self, out: &mut String) {
        let gateways = self
            .gateways
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let labels = |sample: &GatewaySample| {
            format!(
                "gateway=\"{}\",node=\"{}\",storage_gateway=\"{}\"",
                sample.gateway, sample.node, sample.storage_gateway
            )
        };
        type Value = fn(&GatewaySample) -> String;
        let gauges: [(&str, &str, Value); 6] = [
            (
                "blockgate_gateway_connected",
                "1 while the gateway's control stream is open to this replica.",
                |s| u64::from(s.connected).to_string(),
            ),
            (
                "blockgate_gateway_volumes",
                "Volumes attached on the gateway.",
                |s| s.volumes.to_string(),
            ),
            (
                "blockgate_gateway_write_log_bytes",
                "Bytes in the gateway's write log.",
                |s| s.write_log_bytes.to_string(),
            ),
            (
                "blockgate_gateway_write_log_capacity_bytes",
                "Capacity of the gateway's write log.",
                |s| s.write_log_capacity_bytes.to_string(),
            ),
            (
                "blockgate_gateway_upload_backlog_bytes",
                "Bytes written but not yet uploaded.",
                |s| s.upload_backlog_bytes.to_string(),
            ),
            (
                "blockgate_gateway_upload_bytes_per_second",
                "Recent upload rate.",
                |s| s.upload_bytes_per_second.to_string(),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} gauge");
            for sample in gateways.values() {
                let _ = writeln!(out, "{name}{{{}}} {}", labels(sample), value(sample));
            }
        }
        let _ = writeln!(
            out,
            "# HELP blockgate_gateway_findings 1 for each current finding of a health analyzer."
        );
        let _ = writeln!(out, "# TYPE blockgate_gateway_findings gauge");
        for sample in gateways.values() {
            for analyzer in &sample.findings {
                let _ = writeln!(
                    out,
                    "blockgate_gateway_findings{{gateway=\"{}\",analyzer=\"{analyzer}\"}} 1",
                    sample.gateway
                );
            }
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.render_gateways(&mut out);
        let _ = writeln!(
            out,
            "# HELP blockgate_operator_reconcile_total Reconciles finished, by controller and result."
        );
        let _ = writeln!(out, "# TYPE blockgate_operator_reconcile_total counter");
        {
            let reconciles = self
                .reconciles
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for ((controller, result), count) in reconciles.iter() {
                let _ = writeln!(
                    out,
                    "blockgate_operator_reconcile_total{{controller=\"{}\",result=\"{result}\"}} {count}",
                    controller.label()
                );
            }
        }
        let _ = writeln!(
            out,
            "# HELP blockgate_operator_leader 1 while this replica holds the leader lease."
        );
        let _ = writeln!(out, "# TYPE blockgate_operator_leader gauge");
        let _ = writeln!(
            out,
            "blockgate_operator_leader {}",
            self.leader.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP blockgate_operator_leader_acquisitions_total Times this replica became the leader."
        );
        let _ = writeln!(
            out,
            "# TYPE blockgate_operator_leader_acquisitions_total counter"
        );
        let _ = writeln!(
            out,
            "blockgate_operator_leader_acquisitions_total {}",
            self.leader_acquisitions.load(Ordering::Relaxed)
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exposition_has_the_reconcile_counter_by_result_and_the_leader_gauge() {
        let metrics = Metrics::default();
        metrics.reconciled(Controller::StorageGateway, "ok");
        metrics.reconciled(Controller::StorageGateway, "ok");
        metrics.reconciled(Controller::Gateway, "detach_blocked");
        metrics.set_leader(true);
        metrics.set_leader(true);
        let text = metrics.render();
        assert!(text.contains(
            "blockgate_operator_reconcile_total{controller=\"storagegateway\",result=\"ok\"} 2"
        ));
        assert!(text.contains(
            "blockgate_operator_reconcile_total{controller=\"gateway\",result=\"detach_blocked\"} 1"
        ));
        assert!(text.contains("blockgate_operator_leader 1\n"));
        assert!(text.contains("blockgate_operator_leader_acquisitions_total 1\n"));
        metrics.set_leader(false);
        assert!(metrics.render().contains("blockgate_operator_leader 0\n"));
    }
}
