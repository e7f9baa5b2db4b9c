//! The Gateway reconciler: the `Ready` condition from the gateway pod, diagnostics on request
//! (the annotation `blockgate.io/diagnostics-request`, see [`crate::diagnostics`]), and the
//! `blockgate.io/detach` finalizer that stops a gateway only after its volumes are detached.
//!
//! Status ownership: this reconciler applies, as [`crate::FIELD_MANAGER`], exactly
//! `status.observedGeneration`, the `Ready` entry of `status.conditions` (a list-map keyed
//! by `type`, so entries are owned one by one) and `status.diagnostics`, always together (an
//! apply that left one out would remove it). Everything the gateways report (volumes,
//! write log and cache use, upload, activation, connection, their own conditions) is for the
//! control server to apply as [`crate::REPORTS_FIELD_MANAGER`]. Under server-side apply a
//! manager's apply removes only fields that manager owned and left out, so neither wipes the
//! other's fields.

use std::sync::Arc;
use std::time::Duration;

use blockgate_operator_api::Gateway;
use blockgate_operator_api::condition::{self, ConditionStatus, ConditionUpdate, set_condition};
use blockgate_operator_api::gateway::DiagnosticsStatus;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{self, Event};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::context::Context;
use crate::diagnostics;
use crate::metrics::Controller;
use crate::pod;
use crate::storage_gateway::ErrorChain;

/// The Gateway's finalizer: it stays until the gateway's volumes are detached and its pod is
/// gone.
pub const FINALIZER: &str = "blockgate.io/detach";

/// How often a healthy Gateway is reconciled without an event.
const RESYNC: Duration = Duration::from_secs(300);
/// How soon a blocked or pending detach is looked at again.
const DETACH_POLL: Duration = Duration::from_secs(10);

/// The result of asking for a gateway's volumes to be detached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DetachOutcome {
    /// Nothing is attached any more: the pod may stop.
    Detached,
    /// Volumes are still attached and were not (or could not be) detached; the sentence says
    /// why and what to do. The finalizer stays.
    Blocked(String),
}

/// A failure talking to the gateway while detaching.
#[derive(Debug, thiserror::Error)]
#[error("detach volumes of gateway {gateway}: {message}")]
pub struct DetachError {
    /// The Gateway.
    pub gateway: String,
    /// What failed.
    pub message: String,
}

/// Detaches every volume a gateway serves, before the gateway is stopped. The real
/// implementation sends detach commands down the gateway's control stream (not built yet);
/// until then [`RefuseWhileAttached`] keeps the finalizer whenever volumes are attached.
#[async_trait::async_trait]
pub trait VolumeDetacher: Send + Sync {
    /// Detaches the volumes of `gateway`, or says why it cannot.
    async fn detach_all(&self, gateway: &Gateway) -> Result<DetachOutcome, DetachError>;
}

/// The detacher used until the control channel exists: it detaches nothing, and blocks the
/// finalizer while the Gateway's status lists attached volumes, so deleting a StorageGateway
/// (or deselecting a node) never pulls a gateway out from under a mounted volume.
///
/// It can only be as right as the status: the status lists volumes once gateways report over
/// the control channel. The write log stays on the node's disk either way: nothing here
/// deletes host paths.
#[derive(Debug, Clone, Copy, Default)]
pub struct RefuseWhileAttached;

#[async_trait::async_trait]
impl VolumeDetacher for RefuseWhileAttached {
    async fn detach_all(&self, gateway: &Gateway) -> Result<DetachOutcome, DetachError> {
        let volumes: Vec<&str> = gateway
            .status
            .iter()
            .flat_map(|s| s.volumes.iter())
            .map(|v| v.volume_id.as_str())
            .collect();
        if volumes.is_empty() {
            return Ok(DetachOutcome::Detached);
        }
        Ok(DetachOutcome::Blocked(format!(
            "{} volume(s) still attached ({}); this operator cannot detach them yet (no control channel), so the gateway keeps running: unpublish the volumes (delete the pods using them) and the gateway is removed once none is attached",
            volumes.len(),
            volumes.join(", ")
        )))
    }
}

/// What went wrong reconciling a Gateway.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the gateway pod failed.
    #[error("read pod {name}")]
    ReadPod {
        /// The pod.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Deleting the gateway pod failed.
    #[error("delete pod {name}")]
    DeletePod {
        /// The pod.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("apply status")]
    ApplyStatus(#[source] kube::Error),
    /// The detacher failed.
    #[error("detach")]
    Detach(#[source] DetachError),
    /// Volumes are still attached: the finalizer stays (the message is in the `Ready`
    /// condition).
    #[error("detach blocked: {0}")]
    DetachBlocked(String),
    /// The pod is stopping; the finalizer stays until it is gone.
    #[error("waiting for pod {0} to stop")]
    WaitingForPod(String),
    /// The finalizer machinery failed, or one of the above inside it.
    #[error("finalizer")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

impl Error {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ReadPod { .. } => "read_pod",
            Self::DeletePod { .. } => "delete_pod",
            Self::ApplyStatus(_) => "apply_status",
            Self::Detach(_) => "detach",
            Self::DetachBlocked(_) => "detach_blocked",
            Self::WaitingForPod(_) => "waiting_for_pod",
            Self::Finalizer(inner) => match &**inner {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.kind(),
                _ => "finalizer",
            },
        }
    }

    fn is_waiting(&self) -> bool {
        let inner = match self {
            Self::Finalizer(inner) => match &**inner {
                finalizer::Error::CleanupFailed(e) => e,
                _ => return false,
            },
            other => other,
        };
        matches!(inner, Self::DetachBlocked(_) | Self::WaitingForPod(_))
    }
}

fn key(gateway: &Gateway) -> String {
    format!(
        "Gateway/{}/{}",
        gateway.namespace().unwrap_or_default(),
        gateway.name_any()
    )
}

/// Reconciles one Gateway, inside its finalizer.
pub async fn reconcile(gateway: Arc<Gateway>, ctx: Arc<Context>) -> Result<Action, Error> {
    let api: Api<Gateway> =
        Api::namespaced(ctx.client.clone(), &gateway.namespace().unwrap_or_default());
    let key = key(&gateway);
    let result = finalizer::finalizer(&api, FINALIZER, gateway, |event| async {
        match event {
            Event::Apply(gateway) => apply(&gateway, &ctx).await,
            Event::Cleanup(gateway) => cleanup(&gateway, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    match &result {
        Ok(_) => {
            ctx.succeeded(&key);
            ctx.metrics.reconciled(Controller::Gateway, "ok");
        }
        Err(error) => ctx.metrics.reconciled(Controller::Gateway, error.kind()),
    }
    result
}

/// Retries a failed reconcile: polls a pending detach steadily, backs off on errors.
pub fn error_policy(gateway: Arc<Gateway>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_waiting() {
        tracing::info!(gateway = %key(&gateway), "{error}");
        return Action::requeue(DETACH_POLL);
    }
    tracing::warn!(gateway = %key(&gateway), error = %ErrorChain(error), "reconcile failed");
    Action::requeue(ctx.failed(&key(&gateway)))
}

fn pod_name(gateway: &Gateway) -> String {
    pod::pod_name(&gateway.spec.storage_gateway, &gateway.spec.node_name)
}

/// Applies `observedGeneration`, the `Ready` condition and `diagnostics` (`new`, else the
/// current one kept), and nothing else of the status.
async fn apply_ready(
    gateway: &Gateway,
    ctx: &Context,
    (status, reason, message): (ConditionStatus, &str, &str),
    new_diagnostics: Option<DiagnosticsStatus>,
) -> Result<(), Error> {
    let mut conditions = gateway
        .status
        .as_ref()
        .map(|s| s.conditions.clone())
        .unwrap_or_default();
    set_condition(
        &mut conditions,
        ConditionUpdate {
            type_: condition::READY,
            status,
            reason,
            message,
            observed_generation: gateway.metadata.generation,
        },
        Time(Timestamp::now()),
    );
    let ready: Vec<_> = conditions
        .into_iter()
        .filter(|c| c.type_ == condition::READY)
        .collect();
    let mut status = json!({
        "observedGeneration": gateway.metadata.generation,
        "conditions": ready,
    });
    // Re-applied every time: this manager owns it, and leaving it out would remove it.
    if let Some(diagnostics) = new_diagnostics.or_else(|| {
        gateway
            .status
            .as_ref()
            .and_then(|status| status.diagnostics.clone())
    }) {
        status["diagnostics"] = json!(diagnostics);
    }
    let patch = json!({
        "apiVersion": "blockgate.io/v1alpha1",
        "kind": "Gateway",
        "status": status,
    });
    let api: Api<Gateway> =
        Api::namespaced(ctx.client.clone(), &gateway.namespace().unwrap_or_default());
    api.patch_status(
        &gateway.name_any(),
        &PatchParams::apply(crate::FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await
    .map_err(Error::ApplyStatus)?;
    Ok(())
}

/// `Ready` from the pod: the pod runs and its readiness probe (the gateway's admin socket
/// answers) passes.
fn pod_readiness(pod: Option<&Pod>) -> (ConditionStatus, &'static str, String) {
    let Some(pod) = pod else {
        return (
            ConditionStatus::False,
            "PodMissing",
            "the gateway pod does not exist yet".into(),
        );
    };
    if pod.meta().deletion_timestamp.is_some() {
        return (
            ConditionStatus::False,
            "PodStopping",
            "the gateway pod is stopping".into(),
        );
    }
    let status = pod.status.clone().unwrap_or_default();
    // No phase yet: the kubelet has not picked the pod up, which is what Pending means.
    let phase = status.phase.unwrap_or_else(|| "Pending".into());
    let ready = status
        .conditions
        .unwrap_or_default()
        .into_iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    match (phase.as_str(), ready) {
        ("Running", true) => (ConditionStatus::True, "PodReady", String::new()),
        ("Running", false) => (
            ConditionStatus::False,
            "PodNotReady",
            "the gateway is running but not serving yet".into(),
        ),
        ("Pending", _) => (
            ConditionStatus::False,
            "PodPending",
            "the gateway pod is pending (image pull or start)".into(),
        ),
        ("Unknown", _) => (
            ConditionStatus::Unknown,
            "PodUnknown",
            "the node does not report the gateway pod".into(),
        ),
        (phase, _) => (
            ConditionStatus::False,
            "PodNotRunning",
            format!("the gateway pod is {phase}"),
        ),
    }
}

async fn apply(gateway: &Gateway, ctx: &Context) -> Result<Action, Error> {
    let name = pod_name(gateway);
    let pods: Api<Pod> =
        Api::namespaced(ctx.client.clone(), &gateway.namespace().unwrap_or_default());
    let pod = pods
        .get_opt(&name)
        .await
        .map_err(|source| Error::ReadPod { name, source })?;
    let (status, reason, message) = pod_readiness(pod.as_ref());
    // After the pod is read, so that only the status apply can fail after a collection.
    let new_diagnostics = match diagnostics::pending_request(gateway) {
        Some(request) => Some(diagnostics::collect(gateway, ctx, request).await),
        None => None,
    };
    apply_ready(gateway, ctx, (status, reason, &message), new_diagnostics).await?;
    Ok(Action::requeue(RESYNC))
}

/// Deletion: detach, then stop the pod, then let the finalizer go. Each step that is not done
/// yet keeps the finalizer by returning an error the error policy polls on.
async fn cleanup(gateway: &Gateway, ctx: &Context) -> Result<Action, Error> {
    match ctx
        .detacher
        .detach_all(gateway)
        .await
        .map_err(Error::Detach)?
    {
        DetachOutcome::Detached => {}
        DetachOutcome::Blocked(message) => {
            tracing::warn!(gateway = %key(gateway), %message, "not removing the gateway");
            apply_ready(
                gateway,
                ctx,
                (ConditionStatus::False, "DetachBlocked", &message),
                None,
            )
            .await?;
            return Err(Error::DetachBlocked(message));
        }
    }
    let name = pod_name(gateway);
    let pods: Api<Pod> =
        Api::namespaced(ctx.client.clone(), &gateway.namespace().unwrap_or_default());
    let pod = pods.get_opt(&name).await.map_err(|source| Error::ReadPod {
        name: name.clone(),
        source,
    })?;
    let Some(pod) = pod else {
        return Ok(Action::await_change());
    };
    if pod.meta().deletion_timestamp.is_none() {
        pods.delete(&name, &DeleteParams::default())
            .await
            .map_err(|source| Error::DeletePod {
                name: name.clone(),
                source,
            })?;
        apply_ready(
            gateway,
            ctx,
            (
                ConditionStatus::False,
                "PodStopping",
                "volumes detached; the gateway pod is stopping",
            ),
            None,
        )
        .await?;
    }
    // Checked again rather than trusted: a pod without finalizers and grace period may be
    // gone already.
    if pods
        .get_opt(&name)
        .await
        .map_err(|source| Error::ReadPod {
            name: name.clone(),
            source,
        })?
        .is_none()
    {
        return Ok(Action::await_change());
    }
    Err(Error::WaitingForPod(name))
}
