//! Health analyzers (DESIGN.md §6): pure functions over a window of one gateway's status
//! reports, and over the Gateways of one StorageGateway. They decide; they never write.
//! What becomes of a finding (Gateway status, `Degraded`, Events, metrics, `RolloutPaused`)
//! is the report sink's and the StorageGateway reconciler's business.

use std::collections::BTreeMap;
use std::time::Duration;

use blockgate_operator_api::Gateway;
use blockgate_operator_api::gateway::Severity;
use blockgate_proto::control::v1::StatusReport;

/// Analyzer names, as they appear in `status.findings[].analyzer`, Event reasons and the
/// `analyzer` label of `blockgate_gateway_findings`.
pub const WRITE_LOG_NEARLY_FULL: &str = "WriteLogNearlyFull";
pub const BACKLOG_GROWING: &str = "BacklogGrowing";
pub const OBJECT_STORE_ERRORS: &str = "ObjectStoreErrors";
pub const CACHE_THRASHING: &str = "CacheThrashing";
pub const NO_RECENT_REPORT: &str = "NoRecentReport";

/// Write log use that earns a warning: a full log slows writes to the upload rate
/// (invariant 6), and at 85% a burst the size of the remaining 15% is enough to get there.
pub const WRITE_LOG_WARNING_PERCENT: u64 = 85;
/// Write log use that is critical: writes are about to be throttled.
pub const WRITE_LOG_CRITICAL_PERCENT: u64 = 95;

/// Reports a backlog trend needs: fewer is noise from one burst of writes.
pub const BACKLOG_MIN_REPORTS: usize = 6;
/// Growth over the window that counts: below this a backlog that never shrinks is a steady
/// trickle the uploads keep up with, not a problem.
pub const BACKLOG_MIN_GROWTH_BYTES: u64 = 256 << 20;

/// Object-store errors within the window that count: the gateway retries single failures
/// quietly; a handful per window means uploads are failing, not hiccuping.
pub const OBJECT_STORE_ERRORS_WARNING: u64 = 5;
/// Errors within the window that are critical: uploads are essentially stopped.
pub const OBJECT_STORE_ERRORS_CRITICAL: u64 = 50;

/// Cache use above which misses evict something useful (a cache with room is still warming).
pub const CACHE_FULL_PERCENT: u64 = 95;
/// Miss ratio over the window that means the working set does not fit the cache.
pub const CACHE_MISS_RATIO: f64 = 0.5;
/// Lookups within the window below which the ratio says nothing.
pub const CACHE_MIN_LOOKUPS: u64 = 1000;

/// Report intervals without a report, on an open stream, before the gateway looks stuck:
/// one late report is jitter, three are not.
pub const MISSED_REPORTS: u32 = 3;

/// Share of one version's gateways with the same finding that makes it a fleet finding
/// (percent): one bad node is that node's problem, a third of a version's gateways is the
/// version's.
pub const FLEET_PERCENT: usize = 30;
/// And at least this many gateways: with one or two gateways of a version, one finding is
/// 50% or 100% and proves nothing about the version.
pub const FLEET_MIN_GATEWAYS: usize = 2;

/// One analyzer's finding about one gateway.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub analyzer: &'static str,
    pub severity: Severity,
    pub message: String,
}

fn percent(used: u64, capacity: u64) -> Option<u64> {
    (capacity > 0)
        .then(|| u64::try_from(u128::from(used) * 100 / u128::from(capacity)).unwrap_or(u64::MAX))
}

/// Growth of a counter across the window; a counter that went down (the gateway restarted)
/// counts from zero at the reset.
fn counter_growth(window: &[StatusReport], counter: impl Fn(&StatusReport) -> u64) -> u64 {
    window
        .windows(2)
        .map(|pair| {
            let (before, after) = (counter(&pair[0]), counter(&pair[1]));
            if after >= before {
                after - before
            } else {
                after
            }
        })
        .sum()
}

pub fn write_log_nearly_full(window: &[StatusReport]) -> Option<Finding> {
    let last = window.last()?;
    let used = percent(last.write_log_bytes, last.write_log_capacity_bytes)?;
    let severity = if used >= WRITE_LOG_CRITICAL_PERCENT {
        Severity::Critical
    } else if used >= WRITE_LOG_WARNING_PERCENT {
        Severity::Warning
    } else {
        return None;
    };
    Some(Finding {
        analyzer: WRITE_LOG_NEARLY_FULL,
        severity,
        message: format!(
            "the write log is {used}% full ({} of {} bytes); writes slow down when it is full",
            last.write_log_bytes, last.write_log_capacity_bytes
        ),
    })
}

pub fn backlog_growing(window: &[StatusReport]) -> Option<Finding> {
    if window.len() < BACKLOG_MIN_REPORTS {
        return None;
    }
    let recent = &window[window.len() - BACKLOG_MIN_REPORTS..];
    let never_shrinks = recent
        .windows(2)
        .all(|pair| pair[1].upload_backlog_bytes >= pair[0].upload_backlog_bytes);
    let first = recent.first()?.upload_backlog_bytes;
    let last = recent.last()?.upload_backlog_bytes;
    let growth = last.saturating_sub(first);
    (never_shrinks && growth >= BACKLOG_MIN_GROWTH_BYTES).then(|| Finding {
        analyzer: BACKLOG_GROWING,
        severity: Severity::Warning,
        message: format!(
            "the upload backlog grew by {growth} bytes to {last} over the last {BACKLOG_MIN_REPORTS} reports; uploads do not keep up with writes"
        ),
    })
}

/// Where an `ObjectStoreErrors` message names the last error: `…; last error on volume ID:
/// TEXT`. [`finding_cause`] reads the text back from a Gateway's status.
const LAST_ERROR_ON_VOLUME: &str = "; last error on volume ";

/// Longest cause a fleet finding names: enough for an S3 error code and its sentence.
const CAUSE_MAX_CHARS: usize = 240;

pub fn object_store_errors(window: &[StatusReport]) -> Option<Finding> {
    let errors = counter_growth(window, |report| report.object_store_errors_total);
    let severity = if errors >= OBJECT_STORE_ERRORS_CRITICAL {
        Severity::Critical
    } else if errors >= OBJECT_STORE_ERRORS_WARNING {
        Severity::Warning
    } else {
        return None;
    };
    let last_error = window
        .last()?
        .volumes
        .iter()
        .find(|volume| !volume.last_error.is_empty())
        .map(|volume| {
            format!(
                "{LAST_ERROR_ON_VOLUME}{}: {}",
                volume.volume_id, volume.last_error
            )
        })
        .unwrap_or_default();
    Some(Finding {
        analyzer: OBJECT_STORE_ERRORS,
        severity,
        message: format!(
            "{errors} object-store errors over the last {} reports{last_error}",
            window.len()
        ),
    })
}

pub fn cache_thrashing(window: &[StatusReport]) -> Option<Finding> {
    let last = window.last()?;
    let used = percent(last.cache_bytes, last.cache_capacity_bytes)?;
    if used < CACHE_FULL_PERCENT {
        return None;
    }
    let hits = counter_growth(window, |report| report.cache_hits_total);
    let misses = counter_growth(window, |report| report.cache_misses_total);
    let lookups = hits.saturating_add(misses);
    if lookups < CACHE_MIN_LOOKUPS {
        return None;
    }
    #[allow(clippy::cast_precision_loss, reason = "a ratio needs no exact counts")]
    let ratio = misses as f64 / lookups as f64;
    (ratio >= CACHE_MISS_RATIO).then(|| Finding {
        analyzer: CACHE_THRASHING,
        severity: Severity::Warning,
        message: format!(
            "the cache is {used}% full and {:.0}% of {lookups} recent reads missed it; the working set does not fit",
            ratio * 100.0
        ),
    })
}

/// `now_unix` and `interval`: the stream is open and reports are due every `interval`.
pub fn no_recent_report(
    window: &[StatusReport],
    connected_since_unix: u64,
    now_unix: u64,
    interval: Duration,
) -> Option<Finding> {
    let last = window.last().map_or(connected_since_unix, |report| {
        report.at_unix.max(connected_since_unix)
    });
    let silent = now_unix.saturating_sub(last);
    let allowed = interval
        .as_secs()
        .max(1)
        .saturating_mul(u64::from(MISSED_REPORTS));
    (silent > allowed).then(|| Finding {
        analyzer: NO_RECENT_REPORT,
        severity: Severity::Warning,
        message: format!(
            "no status report for {silent} s on an open stream (one is due every {} s)",
            interval.as_secs()
        ),
    })
}

/// Every per-gateway analyzer over `window` (oldest first).
pub fn analyze(
    window: &[StatusReport],
    connected_since_unix: u64,
    now_unix: u64,
    interval: Duration,
) -> Vec<Finding> {
    [
        write_log_nearly_full(window),
        backlog_growing(window),
        object_store_errors(window),
        cache_thrashing(window),
        no_recent_report(window, connected_since_unix, now_unix, interval),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// What a finding's message says went wrong, in a form that reads the same on every gateway
/// with the same problem: for `ObjectStoreErrors`, the last error with object keys and URLs
/// (anything with a `/`, which differs per volume and segment) left out, so an S3
/// authentication failure on ten gateways is one cause, not ten. `None` when the analyzer
/// has no cause to tell apart or the message names none.
pub fn finding_cause(analyzer: &str, message: &str) -> Option<String> {
    if analyzer != OBJECT_STORE_ERRORS {
        return None;
    }
    let (_, error) = message
        .split_once(LAST_ERROR_ON_VOLUME)?
        .1
        .split_once(": ")?;
    let words: Vec<String> = error
        .split_whitespace()
        .map(|word| {
            if word.contains('/') {
                let punctuation = word.trim_end_matches([':', ',', ';', '.', ')']);
                format!("…{}", &word[punctuation.len()..])
            } else {
                word.to_owned()
            }
        })
        .collect();
    let cause = words.join(" ");
    if cause.is_empty() {
        return None;
    }
    Some(match cause.char_indices().nth(CAUSE_MAX_CHARS) {
        Some((cut, _)) => format!("{}…", &cause[..cut]),
        None => cause,
    })
}

/// The same finding on many gateways of one version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetFinding {
    pub analyzer: String,
    /// The cause the affected gateways share ([`finding_cause`]), when enough of them share
    /// one; `None`: the analyzer has none, or the gateways' causes differ.
    pub cause: Option<String>,
    pub version: String,
    pub affected: usize,
    pub gateways: usize,
}

impl FleetFinding {
    pub fn message(&self) -> String {
        let mut message = format!(
            "{} of {} gateways running {} report {}",
            self.affected, self.gateways, self.version, self.analyzer
        );
        if let Some(cause) = &self.cause {
            message.push_str(": ");
            message.push_str(cause);
        }
        message
    }
}

fn is_fleet_wide(affected: usize, gateways: usize) -> bool {
    affected >= FLEET_MIN_GATEWAYS && affected * 100 >= gateways * FLEET_PERCENT
}

/// Fleet findings across `gateways` (one StorageGateway's), grouped by the version they
/// report running and by analyzer, and within an analyzer by cause ([`finding_cause`]): the
/// same cause on enough gateways is named in the fleet finding; an analyzer's findings with
/// causes that differ still make one fleet finding, without a cause, when together they are
/// enough. The most widespread first.
pub fn fleet(gateways: &[Gateway]) -> Vec<FleetFinding> {
    // version → (gateways, analyzer → cause → affected)
    type Causes = BTreeMap<Option<String>, usize>;
    let mut by_version: BTreeMap<&str, (usize, BTreeMap<&str, Causes>)> = BTreeMap::new();
    for gateway in gateways {
        let Some(status) = &gateway.status else {
            continue;
        };
        let Some(version) = status.running_version.as_deref() else {
            continue;
        };
        let entry = by_version.entry(version).or_default();
        entry.0 += 1;
        for finding in &status.findings {
            let cause = finding_cause(&finding.analyzer, &finding.message);
            *entry
                .1
                .entry(finding.analyzer.as_str())
                .or_default()
                .entry(cause)
                .or_default() += 1;
        }
    }
    let mut findings = Vec::new();
    for (version, (total, analyzers)) in by_version {
        for (analyzer, causes) in analyzers {
            let finding = |cause: Option<String>, affected: usize| FleetFinding {
                analyzer: analyzer.to_owned(),
                cause,
                version: version.to_owned(),
                affected,
                gateways: total,
            };
            let shared: Vec<FleetFinding> = causes
                .iter()
                .filter(|(cause, affected)| cause.is_some() && is_fleet_wide(**affected, total))
                .map(|(cause, affected)| finding(cause.clone(), *affected))
                .collect();
            let affected: usize = causes.values().sum();
            if !shared.is_empty() {
                findings.extend(shared);
            } else if is_fleet_wide(affected, total) {
                findings.push(finding(None, affected));
            }
        }
    }
    findings.sort_by(|a, b| {
        b.affected
            .cmp(&a.affected)
            .then(a.analyzer.cmp(&b.analyzer))
    });
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockgate_operator_api::GatewayStatus;
    use blockgate_operator_api::gateway::HealthFinding;
    use blockgate_proto::control::v1::VolumeReport;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    const GIB: u64 = 1 << 30;
    const INTERVAL: Duration = Duration::from_secs(10);

    /// A healthy report: log 10% used, cache warm with hits, no errors, small backlog.
    fn healthy(sequence: u64) -> StatusReport {
        StatusReport {
            sequence,
            at_unix: 1_000 + sequence * 10,
            version: "0.1.0".into(),
            write_log_bytes: 6 * GIB,
            write_log_capacity_bytes: 64 * GIB,
            cache_bytes: 250 * GIB,
            cache_capacity_bytes: 256 * GIB,
            upload_backlog_bytes: 100 << 20,
            upload_bytes_per_second: 50e6,
            object_store_errors_total: 2,
            cache_hits_total: 10_000 * sequence,
            cache_misses_total: 100 * sequence,
            ..StatusReport::default()
        }
    }

    fn sequence(change: impl Fn(u64, &mut StatusReport)) -> Vec<StatusReport> {
        (1..=10)
            .map(|n| {
                let mut report = healthy(n);
                change(n, &mut report);
                report
            })
            .collect()
    }

    fn analyzers_of(window: &[StatusReport]) -> Vec<&'static str> {
        let now = window.last().map_or(0, |r| r.at_unix);
        analyze(window, 0, now, INTERVAL)
            .into_iter()
            .map(|f| f.analyzer)
            .collect()
    }

    #[test]
    fn a_healthy_gateway_has_no_findings() {
        assert!(analyzers_of(&sequence(|_, _| {})).is_empty());
        assert!(analyzers_of(&[]).is_empty());
    }

    #[test]
    fn a_nearly_full_write_log_is_a_warning_then_critical() {
        let warning = sequence(|_, r| r.write_log_bytes = 56 * GIB);
        let findings = analyze(&warning, 0, 1_100, INTERVAL);
        assert_eq!(findings[0].analyzer, WRITE_LOG_NEARLY_FULL);
        assert_eq!(findings[0].severity, Severity::Warning);
        let critical = sequence(|_, r| r.write_log_bytes = 62 * GIB);
        assert_eq!(
            write_log_nearly_full(&critical).unwrap().severity,
            Severity::Critical
        );
    }

    #[test]
    fn a_backlog_that_only_grows_is_found_but_one_that_drains_is_not() {
        let growing = sequence(|n, r| r.upload_backlog_bytes = n * (100 << 20));
        assert_eq!(analyzers_of(&growing), [BACKLOG_GROWING]);
        let draining =
            sequence(|n, r| r.upload_backlog_bytes = if n == 8 { 0 } else { n * (100 << 20) });
        assert!(analyzers_of(&draining).is_empty());
        let short = &growing[..BACKLOG_MIN_REPORTS - 1];
        assert!(backlog_growing(short).is_none());
    }

    #[test]
    fn object_store_errors_count_within_the_window_across_restarts() {
        let failing = sequence(|n, r| {
            r.object_store_errors_total = 2 + n;
            r.volumes = vec![VolumeReport {
                volume_id: "pvc-1".into(),
                last_error: "503 SlowDown".into(),
                ..VolumeReport::default()
            }];
        });
        let finding = object_store_errors(&failing).unwrap();
        assert_eq!(finding.severity, Severity::Warning);
        assert!(
            finding.message.contains("503 SlowDown"),
            "{}",
            finding.message
        );
        // A restart resets the counter: the errors after it still count, the drop does not.
        let restarted =
            sequence(|n, r| r.object_store_errors_total = if n < 5 { 100 } else { (n - 4) * 20 });
        assert_eq!(
            object_store_errors(&restarted).unwrap().severity,
            Severity::Critical
        );
    }

    #[test]
    fn a_full_cache_that_mostly_misses_is_thrashing() {
        let thrashing = sequence(|n, r| {
            r.cache_hits_total = 100 * n;
            r.cache_misses_total = 900 * n;
        });
        assert_eq!(analyzers_of(&thrashing), [CACHE_THRASHING]);
        // Still warming up: misses are expected while the cache has room.
        let warming = sequence(|n, r| {
            r.cache_bytes = 10 * GIB;
            r.cache_hits_total = 100 * n;
            r.cache_misses_total = 900 * n;
        });
        assert!(analyzers_of(&warming).is_empty());
    }

    #[test]
    fn silence_on_an_open_stream_is_found_after_three_intervals() {
        let window = sequence(|_, _| {});
        let last = window.last().unwrap().at_unix;
        assert!(no_recent_report(&window, 0, last + 30, INTERVAL).is_none());
        assert_eq!(
            no_recent_report(&window, 0, last + 31, INTERVAL)
                .unwrap()
                .analyzer,
            NO_RECENT_REPORT
        );
        // Connected recently without a report yet: the clock starts at the hello.
        assert!(no_recent_report(&[], 5_000, 5_020, INTERVAL).is_none());
        assert!(no_recent_report(&[], 5_000, 5_031, INTERVAL).is_some());
    }

    fn gateway(name: &str, version: &str, analyzers: &[&str]) -> Gateway {
        let mut gateway = Gateway::new(
            name,
            blockgate_operator_api::GatewaySpec {
                storage_gateway: "fleet".into(),
                node_name: name.into(),
                version: version.into(),
            },
        );
        gateway.status = Some(GatewayStatus {
            running_version: Some(version.into()),
            findings: analyzers
                .iter()
                .map(|analyzer| HealthFinding {
                    analyzer: (*analyzer).into(),
                    severity: Severity::Warning,
                    message: String::new(),
                    since: Time(Timestamp::UNIX_EPOCH),
                })
                .collect(),
            ..GatewayStatus::default()
        });
        gateway
    }

    const DENIED: &str = "service error: InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our records.";

    /// An `ObjectStoreErrors` finding as a gateway writing `volume`'s `segment` would have it.
    fn upload_failing(volume: &str, segment: u64, error: &str) -> HealthFinding {
        let window = sequence(|n, r| {
            r.object_store_errors_total = 10 * n;
            r.volumes = vec![VolumeReport {
                volume_id: volume.into(),
                last_error: format!(
                    "object store refused put of clusters/prod/volumes/{volume}/segments/{segment:016x}: {error}"
                ),
                ..VolumeReport::default()
            }];
        });
        let finding = object_store_errors(&window).unwrap();
        HealthFinding {
            analyzer: finding.analyzer.into(),
            severity: finding.severity,
            message: finding.message,
            since: Time(Timestamp::UNIX_EPOCH),
        }
    }

    fn gateway_with(name: &str, findings: Vec<HealthFinding>) -> Gateway {
        let mut gateway = gateway(name, "0.1.0", &[]);
        if let Some(status) = gateway.status.as_mut() {
            status.findings = findings;
        }
        gateway
    }

    #[test]
    fn the_cause_of_object_store_errors_leaves_out_what_differs_per_volume() {
        let one = upload_failing("pvc-1", 42, DENIED);
        let other = upload_failing("pvc-9", 7, DENIED);
        assert!(
            one.message.contains("pvc-1") && one.message.contains(DENIED),
            "{}",
            one.message
        );
        let cause = finding_cause(&one.analyzer, &one.message).unwrap();
        assert_eq!(cause, format!("object store refused put of …: {DENIED}"));
        assert_eq!(finding_cause(&other.analyzer, &other.message), Some(cause));
        // No error text, or an analyzer without causes: nothing to group by.
        assert_eq!(
            finding_cause(
                OBJECT_STORE_ERRORS,
                "7 object-store errors over the last 3 reports"
            ),
            None
        );
        assert_eq!(finding_cause(BACKLOG_GROWING, &one.message), None);
        // A cause is kept short enough for a condition message.
        let long = upload_failing("pvc-1", 1, &"x".repeat(1000));
        let cause = finding_cause(&long.analyzer, &long.message).unwrap();
        assert!(
            cause.chars().count() <= CAUSE_MAX_CHARS + 1,
            "{}",
            cause.len()
        );
    }

    #[test]
    fn a_fleet_finding_names_the_error_its_gateways_share() {
        let slow = "service error: SlowDown: Please reduce your request rate.";
        let gateways = vec![
            gateway_with("a", vec![upload_failing("pvc-1", 1, DENIED)]),
            gateway_with("b", vec![upload_failing("pvc-2", 9, DENIED)]),
            gateway_with("c", vec![upload_failing("pvc-3", 4, slow)]),
            gateway_with("d", vec![]),
            gateway_with("e", vec![]),
        ];
        let found = fleet(&gateways);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].affected, 2);
        assert_eq!(
            found[0].message(),
            format!(
                "2 of 5 gateways running 0.1.0 report ObjectStoreErrors: object store refused put of …: {DENIED}"
            )
        );
        // One gateway per error: none is widespread, but object-store errors on three of
        // five gateways are, whatever each one's error.
        let mixed = vec![
            gateway_with("a", vec![upload_failing("pvc-1", 1, DENIED)]),
            gateway_with("b", vec![upload_failing("pvc-2", 1, slow)]),
            gateway_with("c", vec![upload_failing("pvc-3", 1, "timed out")]),
            gateway_with("d", vec![]),
            gateway_with("e", vec![]),
        ];
        let found = fleet(&mixed);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].affected, found[0].cause.as_deref()), (3, None));
        // One gateway with the error is that gateway's finding, not the fleet's.
        let single = vec![
            gateway_with("a", vec![upload_failing("pvc-1", 1, DENIED)]),
            gateway_with("b", vec![]),
            gateway_with("c", vec![]),
            gateway_with("d", vec![]),
        ];
        assert!(fleet(&single).is_empty());
    }

    #[test]
    fn the_same_finding_on_many_gateways_of_a_version_is_a_fleet_finding() {
        let mut gateways: Vec<Gateway> = (0..6)
            .map(|n| gateway(&format!("old-{n}"), "0.1.0", &[]))
            .collect();
        gateways.push(gateway("new-0", "0.2.0", &[OBJECT_STORE_ERRORS]));
        gateways.push(gateway(
            "new-1",
            "0.2.0",
            &[OBJECT_STORE_ERRORS, CACHE_THRASHING],
        ));
        gateways.push(gateway("new-2", "0.2.0", &[]));
        assert_eq!(
            fleet(&gateways),
            vec![FleetFinding {
                analyzer: OBJECT_STORE_ERRORS.into(),
                cause: None,
                version: "0.2.0".into(),
                affected: 2,
                gateways: 3,
            }]
        );
        // One gateway alone is that node's problem, even if it is all of its version.
        let lonely = vec![gateway("a", "0.3.0", &[CACHE_THRASHING])];
        assert!(fleet(&lonely).is_empty());
        // 2 of 10 of one version is under 30%.
        let mut spread: Vec<Gateway> = (0..8)
            .map(|n| gateway(&format!("g{n}"), "0.1.0", &[]))
            .collect();
        spread.push(gateway("b1", "0.1.0", &[BACKLOG_GROWING]));
        spread.push(gateway("b2", "0.1.0", &[BACKLOG_GROWING]));
        assert!(fleet(&spread).is_empty());
    }
}
