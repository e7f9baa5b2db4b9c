//! The upload bandwidth limit a StorageGateway's spec puts in force at a given moment: the
//! limit of the schedule interval covering that moment in the spec's time zone, else the
//! default. Pure functions; the operator sends the result to each gateway
//! (`SetBandwidthLimit`) when it connects and whenever the limit in force changes.
//!
//! Download limits are in the CRD but not enforced: gateways have no read limiter yet, and
//! `SetBandwidthLimit` carries the upload limit only.

use blockgate_operator_api::quantity::{QuantityError, parse_bytes};
use blockgate_operator_api::storage_gateway::{BandwidthLimits, Weekday};
use jiff::Timestamp;
use jiff::civil::Weekday as CivilWeekday;
use jiff::tz::TimeZone;

#[derive(Debug, thiserror::Error)]
pub enum BandwidthError {
    #[error("unknown time zone {zone:?}")]
    TimeZone {
        zone: String,
        #[source]
        source: jiff::Error,
    },
    #[error("bad time {text:?}: expected HH:MM")]
    Time { text: String },
    #[error("bad bandwidth")]
    Quantity(#[from] QuantityError),
}

fn weekday(day: Weekday) -> CivilWeekday {
    match day {
        Weekday::Mon => CivilWeekday::Monday,
        Weekday::Tue => CivilWeekday::Tuesday,
        Weekday::Wed => CivilWeekday::Wednesday,
        Weekday::Thu => CivilWeekday::Thursday,
        Weekday::Fri => CivilWeekday::Friday,
        Weekday::Sat => CivilWeekday::Saturday,
        Weekday::Sun => CivilWeekday::Sunday,
    }
}

/// Minutes since midnight of `HH:MM` (`24:00` is 1440).
fn minutes(text: &str) -> Result<u32, BandwidthError> {
    let bad = || BandwidthError::Time {
        text: text.to_owned(),
    };
    let (hours, mins) = text.split_once(':').ok_or_else(bad)?;
    let hours: u32 = hours.parse().map_err(|_| bad())?;
    let mins: u32 = mins.parse().map_err(|_| bad())?;
    if mins >= 60 || hours > 24 || (hours == 24 && mins != 0) {
        return Err(bad());
    }
    Ok(hours * 60 + mins)
}

fn rate(text: Option<&String>) -> Result<u64, BandwidthError> {
    Ok(match text {
        Some(text) => parse_bytes(text)?,
        None => 0,
    })
}

/// The upload limit in bytes per second in force at `at`; 0 means unlimited.
pub fn upload_limit_at(limits: &BandwidthLimits, at: Timestamp) -> Result<u64, BandwidthError> {
    let zone = TimeZone::get(&limits.time_zone).map_err(|source| BandwidthError::TimeZone {
        zone: limits.time_zone.clone(),
        source,
    })?;
    let local = at.to_zoned(zone);
    let day = local.weekday();
    let now =
        u32::try_from(local.hour()).unwrap_or(0) * 60 + u32::try_from(local.minute()).unwrap_or(0);
    for interval in &limits.schedule {
        if !interval.days.iter().any(|d| weekday(*d) == day) {
            continue;
        }
        let (start, end) = (minutes(&interval.start_time)?, minutes(&interval.end_time)?);
        if start <= now && now < end {
            return rate(interval.upload_bytes_per_second.as_ref());
        }
    }
    rate(limits.upload_bytes_per_second.as_ref())
}

/// Applies the bandwidth limits of every StorageGateway to the gateways whose streams this
/// replica holds, every `interval`: a gateway gets `SetBandwidthLimit` when it has not been
/// told the limit in force yet (it just connected here) or when the limit changed (a schedule
/// boundary passed, or the spec changed). Runs until the task is dropped.
pub async fn enforce(
    client: kube::Client,
    hub: std::sync::Arc<blockgate_operator_control::Hub>,
    interval: std::time::Duration,
) {
    use std::collections::HashMap;

    use blockgate_operator_api::StorageGateway;
    use blockgate_proto::control::v1::{Command, SetBandwidthLimit, command, command_result};
    use kube::Api;
    use kube::api::ListParams;

    let api: Api<StorageGateway> = Api::all(client);
    // Gateway id -> the limit it was told last.
    let mut told: HashMap<String, u64> = HashMap::new();
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let held = hub.held();
        told.retain(|gateway, _| held.contains(gateway));
        if held.is_empty() {
            continue;
        }
        let fleets = match api.list(&ListParams::default()).await {
            Ok(list) => list.items,
            Err(error) => {
                tracing::warn!(%error, "cannot list StorageGateways to apply bandwidth limits");
                continue;
            }
        };
        let now = Timestamp::now();
        for gateway in held {
            // Gateway ids are `<namespace>/<storage-gateway>/<node>`.
            let mut parts = gateway.splitn(3, '/');
            let (Some(namespace), Some(name)) = (parts.next(), parts.next()) else {
                continue;
            };
            let Some(fleet) = fleets.iter().find(|f| {
                f.metadata.namespace.as_deref() == Some(namespace)
                    && f.metadata.name.as_deref() == Some(name)
            }) else {
                continue;
            };
            let limit = match fleet
                .spec
                .bandwidth
                .as_ref()
                .map(|b| upload_limit_at(b, now))
            {
                None => 0,
                Some(Ok(limit)) => limit,
                Some(Err(error)) => {
                    tracing::warn!(storage_gateway = %format!("{namespace}/{name}"), %error, "bandwidth limits cannot be evaluated");
                    continue;
                }
            };
            if told.get(&gateway) == Some(&limit) {
                continue;
            }
            let command = Command {
                id: format!("bandwidth-{}-{limit}", now.as_second()),
                deadline_unix_ms: 0,
                kind: Some(command::Kind::SetBandwidthLimit(SetBandwidthLimit {
                    upload_bytes_per_second: limit,
                })),
            };
            match hub.send(&gateway, command, interval).await {
                Ok(result) => match result.outcome {
                    Some(command_result::Outcome::Ok(_)) => {
                        tracing::info!(%gateway, upload_bytes_per_second = limit, "bandwidth limit applied");
                        told.insert(gateway, limit);
                    }
                    Some(command_result::Outcome::Failure(failure)) => {
                        tracing::warn!(%gateway, code = failure.code, message = %failure.message, "the gateway refused the bandwidth limit");
                        // Not retried every tick: a gateway that cannot limit says so once.
                        told.insert(gateway, limit);
                    }
                    None => {}
                },
                Err(error) => {
                    tracing::warn!(%gateway, %error, "cannot send the bandwidth limit");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use blockgate_operator_api::storage_gateway::BandwidthInterval;

    use super::*;

    fn limits(zone: &str) -> BandwidthLimits {
        BandwidthLimits {
            upload_bytes_per_second: Some("10Mi".into()),
            download_bytes_per_second: None,
            schedule: vec![
                BandwidthInterval {
                    days: vec![Weekday::Mon, Weekday::Tue],
                    start_time: "22:00".into(),
                    end_time: "24:00".into(),
                    upload_bytes_per_second: Some("100Mi".into()),
                    download_bytes_per_second: None,
                },
                BandwidthInterval {
                    days: vec![Weekday::Sat],
                    start_time: "00:00".into(),
                    end_time: "06:00".into(),
                    upload_bytes_per_second: None,
                    download_bytes_per_second: None,
                },
            ],
            time_zone: zone.into(),
        }
    }

    fn at(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    #[test]
    fn the_interval_covering_the_moment_wins_else_the_default() {
        let limits = limits("UTC");
        // 2026-11-23 is a Monday.
        assert_eq!(
            upload_limit_at(&limits, at("2026-11-23T21:59:00Z")).unwrap(),
            10 << 20
        );
        assert_eq!(
            upload_limit_at(&limits, at("2026-11-23T22:00:00Z")).unwrap(),
            100 << 20
        );
        assert_eq!(
            upload_limit_at(&limits, at("2026-11-23T23:59:59Z")).unwrap(),
            100 << 20
        );
        assert_eq!(
            upload_limit_at(&limits, at("2026-11-25T22:30:00Z")).unwrap(),
            10 << 20,
            "Wednesday"
        );
        assert_eq!(
            upload_limit_at(&limits, at("2026-11-28T03:00:00Z")).unwrap(),
            0,
            "Saturday night: unlimited"
        );
    }

    #[test]
    fn times_are_read_in_the_schedule_time_zone() {
        let limits = limits("Europe/Berlin");
        // 21:30 UTC on a Monday in November is 22:30 in Berlin.
        assert_eq!(
            upload_limit_at(&limits, at("2026-11-23T21:30:00Z")).unwrap(),
            100 << 20
        );
        assert!(
            upload_limit_at(&self::limits("Mars/Olympus"), at("2026-11-23T21:30:00Z")).is_err()
        );
    }
}
