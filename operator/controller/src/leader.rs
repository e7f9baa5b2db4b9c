//! Leader election over a `coordination.k8s.io/v1` Lease, so that of several operator
//! replicas exactly one runs the reconcilers (two would fight over the same objects) while
//! all of them keep serving `/healthz`, `/metrics` and, later, the control endpoints.
//!
//! kube-runtime has no leader election, so this is the client-go algorithm in small: the
//! [`Elector`] state machine decides from the Lease it read what to write, and [`LeaseLock`]
//! writes it with a `resourceVersion`-checked replace, so of two replicas racing for the same
//! Lease only one write lands and the other sees a conflict.
//!
//! Expiry is judged by this replica's own monotonic clock, never by comparing the holder's
//! `renewTime` with the local wall clock: a Lease counts as expired only after it has been
//! seen unchanged for a whole `leaseDurationSeconds`, so clock skew between nodes cannot make
//! two replicas lead at once.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;

/// What the elector saw of a Lease: the part of it that says who leads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// `spec.holderIdentity`; `None` or empty means free (released).
    pub holder: Option<String>,
    /// `spec.renewTime`, as written by the holder. Only compared for change.
    pub renew_time: Option<Timestamp>,
    /// `spec.leaseDurationSeconds`, if set and positive.
    pub lease_duration: Option<Duration>,
}

impl LeaseRecord {
    /// The record of a Lease object's spec.
    pub fn of(spec: Option<&LeaseSpec>) -> Self {
        let spec = spec.cloned().unwrap_or_default();
        Self {
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.map(|t| t.0),
            lease_duration: spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .filter(|s| *s > 0)
                .map(Duration::from_secs),
        }
    }
}

/// What to do about the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// There is no Lease: create it, holding it.
    Create,
    /// The Lease is free (never held or released): take it.
    Acquire,
    /// This replica holds it: renew.
    Renew,
    /// Another replica held it but has not renewed for a whole lease duration: take it.
    TakeOver {
        /// The holder that stopped renewing.
        previous: String,
    },
    /// Another replica holds a lease that has not expired: stay a follower.
    Wait {
        /// Who leads.
        holder: String,
        /// How long until the lease expires if the holder stops renewing now.
        expires_in: Duration,
    },
}

/// The leader-election state machine of one replica. Pure: it is given the Lease and the
/// time, and remembers only when it last saw another holder's record change.
#[derive(Debug, Clone)]
pub struct Elector {
    identity: String,
    lease_duration: Duration,
    observed: Option<(LeaseRecord, Instant)>,
}

impl Elector {
    /// An elector for the replica named `identity` (its pod name), asking for leases of
    /// `lease_duration`.
    pub fn new(identity: impl Into<String>, lease_duration: Duration) -> Self {
        Self {
            identity: identity.into(),
            lease_duration,
            observed: None,
        }
    }

    /// This replica's identity.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Decides what to do given the Lease as just read (`None`: it does not exist).
    pub fn decide(&mut self, lease: Option<&LeaseRecord>, now: Instant) -> Decision {
        let Some(lease) = lease else {
            self.observed = None;
            return Decision::Create;
        };
        let holder = match &lease.holder {
            None => return Decision::Acquire,
            Some(holder) if *holder == self.identity => return Decision::Renew,
            Some(holder) => holder.clone(),
        };
        // The clock starts when the record changes (a renewal or a new holder), as seen here.
        let seen_at = match &self.observed {
            Some((record, seen_at)) if record == lease => *seen_at,
            _ => {
                self.observed = Some((lease.clone(), now));
                now
            }
        };
        let duration = lease.lease_duration.unwrap_or(self.lease_duration);
        let expires_at = seen_at + duration;
        if now >= expires_at {
            Decision::TakeOver { previous: holder }
        } else {
            Decision::Wait {
                holder,
                expires_in: expires_at - now,
            }
        }
    }

    /// The Lease spec to write for a decision that writes (`None` for [`Decision::Wait`]).
    pub fn next_spec(
        &self,
        decision: &Decision,
        current: Option<&LeaseSpec>,
        now: Timestamp,
    ) -> Option<LeaseSpec> {
        let seconds = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let mut spec = current.cloned().unwrap_or_default();
        match decision {
            Decision::Wait { .. } => return None,
            Decision::Renew => {}
            Decision::Create => {
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(0);
            }
            Decision::Acquire | Decision::TakeOver { .. } => {
                spec.acquire_time = Some(MicroTime(now));
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(seconds);
        spec.renew_time = Some(MicroTime(now));
        Some(spec)
    }
}

/// A failed Lease request (not a lost race: a conflict just means another replica wrote
/// first, and is reported as "not leading").
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// Reading the Lease failed.
    #[error("read lease {name}")]
    Read {
        /// The Lease.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Creating or replacing the Lease failed for another reason than a conflict.
    #[error("write lease {name}")]
    Write {
        /// The Lease.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
}

/// One replica's handle on the Lease: reads it, lets the [`Elector`] decide, writes.
#[derive(Debug)]
pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    elector: Elector,
}

impl LeaseLock {
    /// A lock on the Lease `name` reached through `api` (namespaced).
    pub fn new(api: Api<Lease>, name: impl Into<String>, elector: Elector) -> Self {
        Self {
            api,
            name: name.into(),
            elector,
        }
    }

    /// Acquires or renews the Lease; `Ok(true)` when this replica holds it afterwards.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, LeaseError> {
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|source| LeaseError::Read {
                name: self.name.clone(),
                source,
            })?;
        let record = current.as_ref().map(|l| LeaseRecord::of(l.spec.as_ref()));
        let decision = self.elector.decide(record.as_ref(), Instant::now());
        let Some(spec) = self.elector.next_spec(
            &decision,
            current.as_ref().and_then(|l| l.spec.as_ref()),
            Timestamp::now(),
        ) else {
            return Ok(false);
        };
        if let Decision::TakeOver { previous } = &decision {
            tracing::info!(lease = %self.name, %previous, "taking over an expired leader lease");
        }
        let result = match current {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            Some(mut lease) => {
                // `lease.metadata.resourceVersion` is the one just read: the replace fails
                // with a conflict if anyone wrote in between.
                lease.spec = Some(spec);
                self.api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
            }
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(source) => Err(LeaseError::Write {
                name: self.name.clone(),
                source,
            }),
        }
    }

    /// Gives the Lease up if this replica holds it, so a successor need not wait for it to
    /// expire.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let Some(mut lease) =
            self.api
                .get_opt(&self.name)
                .await
                .map_err(|source| LeaseError::Read {
                    name: self.name.clone(),
                    source,
                })?
        else {
            return Ok(());
        };
        let record = LeaseRecord::of(lease.spec.as_ref());
        if record.holder.as_deref() != Some(self.elector.identity()) {
            return Ok(());
        }
        let mut spec = lease.spec.take().unwrap_or_default();
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(source) => Err(LeaseError::Write {
                name: self.name.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DURATION: Duration = Duration::from_secs(15);

    fn held_by(holder: &str, renewed_at_second: i64) -> LeaseRecord {
        LeaseRecord {
            holder: Some(holder.into()),
            renew_time: Some(Timestamp::from_second(renewed_at_second).unwrap()),
            lease_duration: Some(DURATION),
        }
    }

    #[test]
    fn a_missing_lease_is_created_and_a_free_one_acquired() {
        let mut elector = Elector::new("a", DURATION);
        let now = Instant::now();
        assert_eq!(elector.decide(None, now), Decision::Create);
        let free = LeaseRecord {
            holder: Some(String::new()),
            ..held_by("x", 1)
        };
        // An empty holder is how a released Lease reads.
        assert_eq!(
            elector.decide(
                Some(&LeaseRecord::of(Some(&LeaseSpec {
                    holder_identity: free.holder.clone(),
                    ..LeaseSpec::default()
                }))),
                now
            ),
            Decision::Acquire
        );
    }

    #[test]
    fn the_holder_renews_its_own_lease_even_when_it_looks_expired() {
        let mut elector = Elector::new("a", DURATION);
        let now = Instant::now();
        assert_eq!(elector.decide(Some(&held_by("a", 1)), now), Decision::Renew);
        assert_eq!(
            elector.decide(Some(&held_by("a", 1)), now + DURATION * 10),
            Decision::Renew
        );
    }

    #[test]
    fn another_holders_unexpired_lease_is_waited_on() {
        let mut elector = Elector::new("a", DURATION);
        let start = Instant::now();
        let decision = elector.decide(Some(&held_by("b", 1)), start);
        assert_eq!(
            decision,
            Decision::Wait {
                holder: "b".into(),
                expires_in: DURATION
            }
        );
        // The holder renews: the clock starts again from when the change was seen.
        let later = start + Duration::from_secs(10);
        assert!(matches!(
            elector.decide(Some(&held_by("b", 11)), later),
            Decision::Wait { expires_in, .. } if expires_in == DURATION
        ));
        assert!(matches!(
            elector.decide(Some(&held_by("b", 11)), later + Duration::from_secs(14)),
            Decision::Wait { .. }
        ));
    }

    #[test]
    fn an_expired_lease_is_taken_over_only_after_a_full_duration_seen_here() {
        let mut elector = Elector::new("a", DURATION);
        let start = Instant::now();
        // The renew time is ancient, but this replica has only just seen the record:
        // wall-clock skew must not let it take over at once.
        assert!(matches!(
            elector.decide(Some(&held_by("b", 1)), start),
            Decision::Wait { .. }
        ));
        assert_eq!(
            elector.decide(Some(&held_by("b", 1)), start + DURATION),
            Decision::TakeOver {
                previous: "b".into()
            }
        );
    }

    #[test]
    fn the_written_spec_names_the_holder_and_counts_transitions() {
        let elector = Elector::new("a", DURATION);
        let now = Timestamp::from_second(1_000).unwrap();
        let created = elector.next_spec(&Decision::Create, None, now).unwrap();
        assert_eq!(created.holder_identity.as_deref(), Some("a"));
        assert_eq!(created.lease_duration_seconds, Some(15));
        assert_eq!(created.lease_transitions, Some(0));
        assert_eq!(created.renew_time, Some(MicroTime(now)));

        let later = Timestamp::from_second(1_005).unwrap();
        let renewed = elector
            .next_spec(&Decision::Renew, Some(&created), later)
            .unwrap();
        assert_eq!(renewed.acquire_time, created.acquire_time);
        assert_eq!(renewed.renew_time, Some(MicroTime(later)));
        assert_eq!(renewed.lease_transitions, Some(0));

        let theirs = LeaseSpec {
            holder_identity: Some("b".into()),
            lease_transitions: Some(4),
            ..LeaseSpec::default()
        };
        let taken = elector
            .next_spec(
                &Decision::TakeOver {
                    previous: "b".into(),
                },
                Some(&theirs),
                later,
            )
            .unwrap();
        assert_eq!(taken.holder_identity.as_deref(), Some("a"));
        assert_eq!(taken.lease_transitions, Some(5));
        assert_eq!(taken.acquire_time, Some(MicroTime(later)));
        assert!(
            elector
                .next_spec(
                    &Decision::Wait {
                        holder: "b".into(),
                        expires_in: DURATION
                    },
                    Some(&theirs),
                    later
                )
                .is_none()
        );
    }
}

#[cfg(test)]
mod lock_tests {
    use super::*;
    use crate::fixtures::{FakeApi, LEASES};

    fn lock(client: &kube::Client, identity: &str) -> LeaseLock {
        LeaseLock::new(
            Api::namespaced(client.clone(), "blockgate-system"),
            "blockgate-operator-leader",
            Elector::new(identity, Duration::from_secs(15)),
        )
    }

    #[tokio::test]
    async fn one_replica_leads_and_hands_over_on_release() {
        let (client, fake) = FakeApi::client();
        let mut a = lock(&client, "a");
        let mut b = lock(&client, "b");
        assert!(a.try_acquire_or_renew().await.unwrap());
        assert!(!b.try_acquire_or_renew().await.unwrap());
        assert!(a.try_acquire_or_renew().await.unwrap());
        assert!(!b.try_acquire_or_renew().await.unwrap());
        let lease = fake.get(LEASES, "blockgate-operator-leader").unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "a");
        b.release().await.unwrap();
        assert_eq!(
            fake.get(LEASES, "blockgate-operator-leader").unwrap()["spec"]["holderIdentity"],
            "a",
            "releasing a lease one does not hold changes nothing"
        );
        a.release().await.unwrap();
        assert!(b.try_acquire_or_renew().await.unwrap());
        let lease = fake.get(LEASES, "blockgate-operator-leader").unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
    }

    #[tokio::test]
    async fn a_write_that_lost_the_race_is_not_leadership() {
        let (client, fake) = FakeApi::client();
        let mut a = lock(&client, "a");
        assert!(a.try_acquire_or_renew().await.unwrap());
        a.release().await.unwrap();
        // Someone else writes between b's read and b's replace: simulated by a stale
        // resourceVersion in a replace.
        let api: Api<Lease> = Api::namespaced(client.clone(), "blockgate-system");
        let mut stale = api.get("blockgate-operator-leader").await.unwrap();
        let mut c = lock(&client, "c");
        assert!(c.try_acquire_or_renew().await.unwrap());
        stale.spec.as_mut().unwrap().holder_identity = Some("b".into());
        let error = api
            .replace("blockgate-operator-leader", &PostParams::default(), &stale)
            .await
            .unwrap_err();
        assert!(matches!(error, kube::Error::Api(s) if s.code == 409));
        assert_eq!(
            fake.get(LEASES, "blockgate-operator-leader").unwrap()["spec"]["holderIdentity"],
            "c"
        );
    }
}
