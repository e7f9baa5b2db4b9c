//! Status conditions: the standard `metav1.Condition` shape, kept as a list-map keyed by
//! `type` so server-side apply merges one condition at a time.
//!
//! The reconcilers own the values; this module owns the condition and reason names (so
//! dashboards and tests match on constants, not typos) and the update rule that keeps
//! `lastTransitionTime` meaningful: it moves only when the status changes.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

/// The object is doing its job: for a StorageGateway, every selected node's gateway is
/// ready; for a Gateway, it is activated, connected and not degraded.
pub const READY: &str = "Ready";
/// The gateway exchanged its activation token for a client certificate.
pub const ACTIVATED: &str = "Activated";
/// The gateway holds an open control stream to an operator replica.
pub const CONNECTED: &str = "Connected";
/// Something needs attention but service continues (a health finding, a missing Secret).
pub const DEGRADED: &str = "Degraded";
/// A rollout is stopped: by `spec.updatePolicy.paused`, or because the fleet analyzers saw
/// the same error on many gateways.
pub const ROLLOUT_PAUSED: &str = "RolloutPaused";
/// The spec refers to Secrets that exist and hold the expected keys. The schema cannot check
/// this; the reconciler sets it.
pub const SECRETS_RESOLVED: &str = "SecretsResolved";
/// The gateway runs the version its StorageGateway asks for.
pub const UP_TO_DATE: &str = "UpToDate";

/// `status` of a condition, as Kubernetes spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConditionStatus {
    /// The condition holds.
    True,
    /// The condition does not hold.
    False,
    /// The operator cannot tell (for example, the gateway has not reported yet).
    Unknown,
}

impl ConditionStatus {
    /// The wire spelling: `True`, `False` or `Unknown`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

/// What to set: everything of a condition except the transition time, which
/// [`set_condition`] decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConditionUpdate<'a> {
    /// One of the condition names of this module, e.g. [`READY`].
    pub type_: &'a str,
    /// The new status.
    pub status: ConditionStatus,
    /// A CamelCase reason, e.g. `WaitingForActivation`.
    pub reason: &'a str,
    /// A human-readable sentence; may be empty.
    pub message: &'a str,
    /// The `metadata.generation` this condition was computed from.
    pub observed_generation: Option<i64>,
}

/// Sets a condition in `conditions`, adding it when absent. `lastTransitionTime` becomes
/// `now` only when the condition is new or its status changes: a changed reason or message
/// alone is not a transition, so "how long has this been False" stays answerable. Returns
/// whether anything changed, so a reconciler can skip a status write that changes nothing.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    update: ConditionUpdate<'_>,
    now: Time,
) -> bool {
    let status = update.status.as_str();
    match conditions.iter_mut().find(|c| c.type_ == update.type_) {
        Some(existing) => {
            let before = existing.clone();
            if existing.status != status {
                existing.status = status.to_owned();
                existing.last_transition_time = now;
            }
            existing.reason = update.reason.to_owned();
            existing.message = update.message.to_owned();
            existing.observed_generation = update.observed_generation;
            *existing != before
        }
        None => {
            conditions.push(Condition {
                type_: update.type_.to_owned(),
                status: status.to_owned(),
                reason: update.reason.to_owned(),
                message: update.message.to_owned(),
                observed_generation: update.observed_generation,
                last_transition_time: now,
            });
            true
        }
    }
}

/// The condition of the given type, if present.
pub fn find_condition<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether the condition of the given type is present with status `True`.
pub fn is_condition_true(conditions: &[Condition], type_: &str) -> bool {
    find_condition(conditions, type_).is_some_and(|c| c.status == "True")
}

/// Removes the condition of the given type; returns whether it was there.
pub fn remove_condition(conditions: &mut Vec<Condition>, type_: &str) -> bool {
    let before = conditions.len();
    conditions.retain(|c| c.type_ != type_);
    conditions.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap())
    }

    fn update<'a>(
        status: ConditionStatus,
        reason: &'a str,
        message: &'a str,
    ) -> ConditionUpdate<'a> {
        ConditionUpdate {
            type_: READY,
            status,
            reason,
            message,
            observed_generation: Some(1),
        }
    }

    #[test]
    fn a_new_condition_is_added_with_now_as_its_transition_time() {
        let mut conditions = Vec::new();
        assert!(set_condition(
            &mut conditions,
            update(ConditionStatus::False, "Starting", "no gateway yet"),
            at(100)
        ));
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].type_, "Ready");
        assert_eq!(conditions[0].status, "False");
        assert_eq!(conditions[0].reason, "Starting");
        assert_eq!(conditions[0].last_transition_time, at(100));
    }

    #[test]
    fn the_transition_time_moves_only_when_the_status_changes() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            update(ConditionStatus::False, "Starting", ""),
            at(100),
        );
        // Same status, new reason and message: updated, but not a transition.
        assert!(set_condition(
            &mut conditions,
            update(ConditionStatus::False, "WaitingForActivation", "token sent"),
            at(200)
        ));
        assert_eq!(conditions[0].reason, "WaitingForActivation");
        assert_eq!(conditions[0].message, "token sent");
        assert_eq!(conditions[0].last_transition_time, at(100));
        // New status: a transition.
        assert!(set_condition(
            &mut conditions,
            update(ConditionStatus::True, "Serving", ""),
            at(300)
        ));
        assert_eq!(conditions[0].status, "True");
        assert_eq!(conditions[0].last_transition_time, at(300));
    }

    #[test]
    fn setting_the_same_condition_again_reports_no_change() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            update(ConditionStatus::True, "Serving", ""),
            at(100),
        );
        let before = conditions.clone();
        assert!(!set_condition(
            &mut conditions,
            update(ConditionStatus::True, "Serving", ""),
            at(500)
        ));
        assert_eq!(conditions, before);
    }

    #[test]
    fn a_new_observed_generation_is_a_change_but_not_a_transition() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            update(ConditionStatus::True, "Serving", ""),
            at(100),
        );
        let mut next = update(ConditionStatus::True, "Serving", "");
        next.observed_generation = Some(2);
        assert!(set_condition(&mut conditions, next, at(200)));
        assert_eq!(conditions[0].observed_generation, Some(2));
        assert_eq!(conditions[0].last_transition_time, at(100));
    }

    #[test]
    fn conditions_of_other_types_are_left_alone() {
        let mut conditions = Vec::new();
        set_condition(
            &mut conditions,
            update(ConditionStatus::True, "Serving", ""),
            at(100),
        );
        let mut connected = update(ConditionStatus::False, "StreamClosed", "");
        connected.type_ = CONNECTED;
        set_condition(&mut conditions, connected, at(200));
        assert_eq!(conditions.len(), 2);
        assert!(is_condition_true(&conditions, READY));
        assert!(!is_condition_true(&conditions, CONNECTED));
        assert!(!is_condition_true(&conditions, DEGRADED));
        assert_eq!(
            find_condition(&conditions, READY)
                .unwrap()
                .last_transition_time,
            at(100)
        );
        assert!(remove_condition(&mut conditions, CONNECTED));
        assert!(!remove_condition(&mut conditions, CONNECTED));
        assert_eq!(conditions.len(), 1);
    }

    #[test]
    fn status_spelling_matches_kubernetes() {
        assert_eq!(ConditionStatus::from(true).as_str(), "True");
        assert_eq!(ConditionStatus::from(false).as_str(), "False");
        assert_eq!(ConditionStatus::Unknown.as_str(), "Unknown");
    }
}
