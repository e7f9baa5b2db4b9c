//! What every reconcile gets besides its object: the client, the metrics, the volume
//! detacher, the control channel's hub, and the retry backoff of failed reconciles.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use blockgate_operator_control::Hub;
use kube::Client;
use kube::runtime::events::Recorder;

use crate::gateway::VolumeDetacher;
use crate::metrics::Metrics;

/// Shared state of the reconcilers.
pub struct Context {
    /// The Kubernetes client.
    pub client: Client,
    /// Counters for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Detaches a deleted Gateway's volumes before its finalizer goes.
    pub detacher: Arc<dyn VolumeDetacher>,
    /// How gateway pods reach the control server; `None`: pods without a control channel
    /// (and no activation Secrets).
    pub control: Option<ControlSettings>,
    /// Where Events go (the fleet analyzer's pause and resume); `None` in most tests.
    pub recorder: Option<Recorder>,
    /// The gateways' control streams, for commands the reconcilers send (diagnostics);
    /// `None`: no control channel, and such requests fail with a message in the status.
    pub hub: Option<Arc<Hub>>,
    /// Consecutive failures per object (`kind/namespace/name`), for the retry backoff.
    failures: Mutex<HashMap<String, u32>>,
}

/// What a gateway pod needs to dial the control server and activate.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// `https://<service>.<namespace>.svc:<port>`.
    pub endpoint: String,
    /// The CA certificate (PEM), published in a ConfigMap per StorageGateway namespace.
    pub ca_pem: String,
    /// How long a new activation token is good for.
    pub token_validity: Duration,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").finish_non_exhaustive()
    }
}

/// First retry delay after a failed reconcile.
const FIRST_RETRY: Duration = Duration::from_secs(5);
/// Longest retry delay: failures keep being retried at least this often.
const LONGEST_RETRY: Duration = Duration::from_secs(300);

impl Context {
    /// A context with no failures recorded.
    pub fn new(client: Client, metrics: Arc<Metrics>, detacher: Arc<dyn VolumeDetacher>) -> Self {
        Self {
            client,
            metrics,
            detacher,
            control: None,
            recorder: None,
            hub: None,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Gateway pods get the control channel's flags, CA and activation token.
    pub fn with_control(mut self, control: ControlSettings) -> Self {
        self.control = Some(control);
        self
    }

    /// Events are published through `recorder`.
    pub fn with_recorder(mut self, recorder: Recorder) -> Self {
        self.recorder = Some(recorder);
        self
    }

    /// Commands to gateways (diagnostics) go through `hub`.
    pub fn with_hub(mut self, hub: Arc<Hub>) -> Self {
        self.hub = Some(hub);
        self
    }

    /// Records a failure of `key` and returns how long to wait before the next attempt:
    /// 5 s, doubling per consecutive failure, at most 5 minutes.
    pub fn failed(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let count = failures.entry(key.to_owned()).or_default();
        let delay = FIRST_RETRY.saturating_mul(1u32 << (*count).min(16));
        *count = count.saturating_add(1);
        delay.min(LONGEST_RETRY)
    }

    /// Forgets the failures of `key` after a successful reconcile.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_retry_delay_doubles_up_to_a_cap_and_resets_on_success() {
        let (client, _) = crate::fixtures::FakeApi::client();
        let context = Context::new(
            client,
            Arc::default(),
            Arc::new(crate::gateway::RefuseWhileAttached),
        );
        let delays: Vec<_> = (0..8)
            .map(|_| context.failed("sg/ns/a").as_secs())
            .collect();
        assert_eq!(delays, [5, 10, 20, 40, 80, 160, 300, 300]);
        assert_eq!(context.failed("sg/ns/b").as_secs(), 5);
        context.succeeded("sg/ns/a");
        assert_eq!(context.failed("sg/ns/a").as_secs(), 5);
    }
}
