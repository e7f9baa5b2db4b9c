//! The StorageGateway reconciler: one `Gateway` object and one gateway pod per selected node,
//! removal of those for nodes no longer selected, and the fleet status rolled up from the
//! Gateways.
//!
//! It never acts on a spec it cannot trust: an invalid spec or a missing Secret is reported in
//! the status and changes nothing on the nodes. It never stops a gateway itself: removing a
//! node's gateway means deleting its Gateway, whose own finalizer (see [`crate::gateway`])
//! detaches the volumes first.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use blockgate_operator_api::condition::{self, ConditionStatus, ConditionUpdate, set_condition};
use blockgate_operator_api::{Gateway, StorageGateway, StorageGatewayStatus};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::runtime::finalizer::{self, Event};
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use crate::analyzers;
use crate::context::Context;
use crate::metrics::Controller;
use crate::pod::{self, PodError};

/// The StorageGateway's finalizer: it stays until every Gateway of the fleet has detached its
/// volumes and its pod is gone.
pub const FINALIZER: &str = "blockgate.io/cleanup";

/// How often a healthy StorageGateway is reconciled without any event: Secrets are not
/// watched, so this is also how soon a fixed Secret is noticed.
const RESYNC: Duration = Duration::from_secs(300);
/// How soon a StorageGateway waiting for its Secrets is looked at again.
const SECRETS_RETRY: Duration = Duration::from_secs(30);
/// How often a deletion waiting for gateways to detach is checked (Gateway changes also
/// trigger it).
const DELETION_POLL: Duration = Duration::from_secs(10);

/// What went wrong reconciling a StorageGateway.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a referenced Secret failed (not: it does not exist).
    #[error("read secret {name}")]
    ReadSecret {
        /// The Secret.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Listing the nodes failed.
    #[error("list nodes")]
    ListNodes(#[source] kube::Error),
    /// Listing the fleet's Gateways failed.
    #[error("list gateways")]
    ListGateways(#[source] kube::Error),
    /// Listing the fleet's pods failed.
    #[error("list gateway pods")]
    ListPods(#[source] kube::Error),
    /// Applying a Gateway failed.
    #[error("apply gateway {name}")]
    ApplyGateway {
        /// The Gateway.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Reading or applying a gateway pod failed.
    #[error("apply pod {name}")]
    ApplyPod {
        /// The pod.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// The pod could not be built from the spec.
    #[error("build pod for gateway {name}")]
    BuildPod {
        /// The Gateway.
        name: String,
        /// Why.
        #[source]
        source: PodError,
    },
    /// Deleting a Gateway failed.
    #[error("delete gateway {name}")]
    DeleteGateway {
        /// The Gateway.
        name: String,
        /// Why.
        #[source]
        source: kube::Error,
    },
    /// Writing the status failed.
    #[error("apply status")]
    ApplyStatus(#[source] kube::Error),

    #[error("apply the control CA ConfigMap")]
    ApplyCaConfigMap(#[source] kube::Error),

    #[error("activation secret")]
    ActivationSecret(#[source] crate::activation::ActivationSecretError),
    /// Deletion waits for these Gateways to detach their volumes and stop their pods. Not a
    /// failure, but it must keep the finalizer, which only an error does.
    #[error("waiting for gateways to detach and stop: {}", .0.join(", "))]
    WaitingForGateways(Vec<String>),
    /// The finalizer machinery failed (adding or removing the finalizer), or one of the
    /// above inside it.
    #[error("finalizer")]
    Finalizer(#[source] Box<finalizer::Error<Error>>),
}

impl Error {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::ReadSecret { .. } => "read_secret",
            Self::ListNodes(_) => "list_nodes",
            Self::ListGateways(_) => "list_gateways",
            Self::ListPods(_) => "list_pods",
            Self::ApplyGateway { .. } => "apply_gateway",
            Self::ApplyPod { .. } => "apply_pod",
            Self::BuildPod { .. } => "build_pod",
            Self::DeleteGateway { .. } => "delete_gateway",
            Self::ApplyStatus(_) => "apply_status",
            Self::ApplyCaConfigMap(_) => "apply_ca_config_map",
            Self::ActivationSecret(_) => "activation_secret",
            Self::WaitingForGateways(_) => "waiting_for_gateways",
            Self::Finalizer(inner) => match &**inner {
                finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e.kind(),
                _ => "finalizer",
            },
        }
    }

    fn is_waiting(&self) -> bool {
        match self {
            Self::WaitingForGateways(_) => true,
            Self::Finalizer(inner) => matches!(
                &**inner,
                finalizer::Error::CleanupFailed(Self::WaitingForGateways(_))
            ),
            _ => false,
        }
    }
}

fn key(storage_gateway: &StorageGateway) -> String {
    format!(
        "StorageGateway/{}/{}",
        storage_gateway.namespace().unwrap_or_default(),
        storage_gateway.name_any()
    )
}

/// Reconciles one StorageGateway, inside its finalizer.
pub async fn reconcile(sg: Arc<StorageGateway>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = sg.namespace().unwrap_or_default();
    let api: Api<StorageGateway> = Api::namespaced(ctx.client.clone(), &namespace);
    let key = key(&sg);
    let result = finalizer::finalizer(&api, FINALIZER, sg, |event| async {
        match event {
            Event::Apply(sg) => apply(&sg, &ctx).await,
            Event::Cleanup(sg) => cleanup(&sg, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)));
    match &result {
        Ok(_) => {
            ctx.succeeded(&key);
            ctx.metrics.reconciled(Controller::StorageGateway, "ok");
        }
        Err(error) => ctx
            .metrics
            .reconciled(Controller::StorageGateway, error.kind()),
    }
    result
}

/// Retries a failed reconcile: waits for gateways at a steady pace, backs off on errors.
pub fn error_policy(sg: Arc<StorageGateway>, error: &Error, ctx: Arc<Context>) -> Action {
    if error.is_waiting() {
        tracing::info!(storagegateway = %key(&sg), "{error}");
        return Action::requeue(DELETION_POLL);
    }
    tracing::warn!(storagegateway = %key(&sg), error = %ErrorChain(error), "reconcile failed");
    Action::requeue(ctx.failed(&key(&sg)))
}

/// Displays an error with its sources, `a: b: c`.
#[derive(Debug)]
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}

/// The status being built: the conditions as they are now, updated one by one.
struct StatusDraft {
    generation: Option<i64>,
    conditions: Vec<Condition>,
    now: Time,
    previous: StorageGatewayStatus,
}

impl StatusDraft {
    fn new(sg: &StorageGateway) -> Self {
        let previous = sg.status.clone().unwrap_or_default();
        Self {
            generation: sg.metadata.generation,
            conditions: previous.conditions.clone(),
            now: Time(Timestamp::now()),
            previous,
        }
    }

    fn set(&mut self, type_: &str, status: ConditionStatus, reason: &str, message: &str) {
        set_condition(
            &mut self.conditions,
            ConditionUpdate {
                type_,
                status,
                reason,
                message,
                observed_generation: self.generation,
            },
            self.now.clone(),
        );
    }

    /// The status to apply, with counts; `None` keeps the last counts (nothing was
    /// observed this time).
    fn finish(self, counts: Option<(i32, i32, i32)>) -> StorageGatewayStatus {
        let (desired, ready, updated) = counts.unwrap_or((
            self.previous.desired_gateways.unwrap_or(0),
            self.previous.ready_gateways.unwrap_or(0),
            self.previous.updated_gateways.unwrap_or(0),
        ));
        StorageGatewayStatus {
            observed_generation: self.generation,
            conditions: self.conditions,
            desired_gateways: Some(desired),
            ready_gateways: Some(ready),
            updated_gateways: Some(updated),
            // The rollout's progress belongs to the rollout controller; left out of this
            // apply so this manager never owns it.
            rollout: None,
        }
    }
}

async fn apply_status(
    sg: &StorageGateway,
    ctx: &Context,
    status: StorageGatewayStatus,
) -> Result<(), Error> {
    let api: Api<StorageGateway> =
        Api::namespaced(ctx.client.clone(), &sg.namespace().unwrap_or_default());
    let patch = json!({
        "apiVersion": "blockgate.io/v1alpha1",
        "kind": "StorageGateway",
        "status": status,
    });
    api.patch_status(
        &sg.name_any(),
        &PatchParams::apply(crate::FIELD_MANAGER).force(),
        &Patch::Apply(patch),
    )
    .await
    .map_err(Error::ApplyStatus)?;
    Ok(())
}

/// Problems with the referenced Secrets, one sentence each. Secret values are never read
/// into logs or conditions: only whether the keys are there.
async fn secret_problems(sg: &StorageGateway, ctx: &Context) -> Result<Vec<String>, Error> {
    let namespace = sg.namespace().unwrap_or_default();
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let spec = &sg.spec;
    let credentials = &spec.object_store.credentials_secret;
    let mut wanted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    wanted.entry(&credentials.name).or_default().extend([
        credentials.access_key_id_key.as_str(),
        credentials.secret_access_key_key.as_str(),
    ]);
    if let Some(key) = &spec.encryption_key_secret {
        wanted.entry(&key.name).or_default().push(&key.key);
    }
    for pull in &spec.image_pull_secrets {
        wanted.entry(&pull.name).or_default();
    }
    let mut problems = Vec::new();
    for (name, keys) in wanted {
        let secret = api
            .get_opt(name)
            .await
            .map_err(|source| Error::ReadSecret {
                name: name.to_owned(),
                source,
            })?;
        let Some(secret) = secret else {
            problems.push(format!("Secret {namespace}/{name} not found"));
            continue;
        };
        let data = secret.data.unwrap_or_default();
        for key in keys {
            if !data.contains_key(key) {
                problems.push(format!("Secret {namespace}/{name} has no key {key}"));
            }
        }
    }
    Ok(problems)
}

/// The Gateways that belong to this StorageGateway: named in `spec.storageGateway` (a
/// selectable field) and owned by this very object (not by an earlier one of the same name).
async fn owned_gateways(sg: &StorageGateway, ctx: &Context) -> Result<Vec<Gateway>, Error> {
    let api: Api<Gateway> =
        Api::namespaced(ctx.client.clone(), &sg.namespace().unwrap_or_default());
    let params = ListParams::default().fields(&format!("spec.storageGateway={}", sg.name_any()));
    let uid = sg.uid();
    Ok(api
        .list(&params)
        .await
        .map_err(Error::ListGateways)?
        .items
        .into_iter()
        .filter(|g| {
            g.owner_references()
                .iter()
                .any(|r| Some(&r.uid) == uid.as_ref())
        })
        .collect())
}

async fn apply(sg: &StorageGateway, ctx: &Context) -> Result<Action, Error> {
    let mut draft = StatusDraft::new(sg);

    if let Err(invalid) = sg.spec.validate() {
        let message = invalid.to_string();
        tracing::warn!(storagegateway = %key(sg), %message, "invalid spec; nothing changed on the nodes");
        draft.set(
            condition::READY,
            ConditionStatus::False,
            "InvalidSpec",
            &message,
        );
        draft.set(
            condition::DEGRADED,
            ConditionStatus::True,
            "InvalidSpec",
            &message,
        );
        apply_status(sg, ctx, draft.finish(None)).await?;
        // Only an edit can fix it, and an edit is an event.
        return Ok(Action::await_change());
    }

    let problems = secret_problems(sg, ctx).await?;
    if !problems.is_empty() {
        let message = format!(
            "{}; no gateway is started or changed until it is fixed",
            problems.join("; ")
        );
        draft.set(
            condition::SECRETS_RESOLVED,
            ConditionStatus::False,
            "SecretMissing",
            &message,
        );
        draft.set(
            condition::READY,
            ConditionStatus::False,
            "SecretMissing",
            &message,
        );
        draft.set(
            condition::DEGRADED,
            ConditionStatus::True,
            "SecretMissing",
            &message,
        );
        apply_status(sg, ctx, draft.finish(None)).await?;
        return Ok(Action::requeue(SECRETS_RETRY));
    }
    draft.set(
        condition::SECRETS_RESOLVED,
        ConditionStatus::True,
        "SecretsFound",
        "",
    );

    let name = sg.name_any();
    let nodes_api: Api<Node> = Api::all(ctx.client.clone());
    let selector = sg
        .spec
        .node_selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let nodes = nodes_api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(Error::ListNodes)?
        .items;
    let mut too_long = Vec::new();
    let matching: BTreeSet<String> = nodes
        .iter()
        .filter(|n| pod::node_matches(sg, n))
        .map(ResourceExt::name_any)
        .filter(|node| {
            let fits = pod::names_fit(&name, node);
            if !fits {
                too_long.push(node.clone());
            }
            fits
        })
        .collect();

    let gateways = owned_gateways(sg, ctx).await?;
    let by_node: BTreeMap<&str, &Gateway> = gateways
        .iter()
        .map(|g| (g.spec.node_name.as_str(), g))
        .collect();

    let namespace = sg.namespace().unwrap_or_default();
    let gateway_api: Api<Gateway> = Api::namespaced(ctx.client.clone(), &namespace);
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
    let apply_params = PatchParams::apply(crate::FIELD_MANAGER).force();
    let secrets_api: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    if let Some(control) = &ctx.control {
        apply_ca_config_map(ctx, &namespace, control).await?;
    }
    let mut current = Vec::new();
    for node in &matching {
        let existing = by_node.get(node.as_str());
        if existing.is_some_and(|g| g.meta().deletion_timestamp.is_some()) {
            // Still detaching from an earlier removal: let that finish before starting anew.
            continue;
        }
        let desired = pod::gateway_for_node(sg, node, existing.map(|g| g.spec.version.as_str()));
        let gateway_name = desired.name_any();
        let gateway = gateway_api
            .patch(&gateway_name, &apply_params, &Patch::Apply(&desired))
            .await
            .map_err(|source| Error::ApplyGateway {
                name: gateway_name.clone(),
                source,
            })?;
        if let Some(control) = &ctx.control {
            crate::activation::ensure_activation_secret(
                &secrets_api,
                &gateway,
                control.token_validity,
            )
            .await
            .map_err(Error::ActivationSecret)?;
        }
        let pod_name = pod::pod_name(&name, node);
        // Created when missing, never changed in place: most of a pod's spec is immutable,
        // and replacing a running gateway would interrupt its volumes. Changing a running
        // gateway is the rollout's job (shutdown-for-update handshake).
        let pod = pod_api
            .get_opt(&pod_name)
            .await
            .map_err(|source| Error::ApplyPod {
                name: pod_name.clone(),
                source,
            })?;
        if pod.is_none() {
            let mut desired_pod =
                pod::gateway_pod(sg, &gateway).map_err(|source| Error::BuildPod {
                    name: gateway_name.clone(),
                    source,
                })?;
            if let Some(control) = &ctx.control {
                pod::add_control(&mut desired_pod, control, sg, &gateway);
            }
            pod_api
                .patch(&pod_name, &apply_params, &Patch::Apply(&desired_pod))
                .await
                .map_err(|source| Error::ApplyPod {
                    name: pod_name.clone(),
                    source,
                })?;
            tracing::info!(storagegateway = %key(sg), node = %node, pod = %pod_name, "started a gateway");
        }
        current.push(gateway);
    }

    for gateway in &gateways {
        if matching.contains(&gateway.spec.node_name) || gateway.meta().deletion_timestamp.is_some()
        {
            continue;
        }
        let gateway_name = gateway.name_any();
        tracing::info!(storagegateway = %key(sg), node = %gateway.spec.node_name, gateway = %gateway_name, "node no longer selected; removing its gateway");
        gateway_api
            .delete(&gateway_name, &DeleteParams::default())
            .await
            .map_err(|source| Error::DeleteGateway {
                name: gateway_name.clone(),
                source,
            })?;
    }

    let desired = count(matching.len());
    let ready = count(current.iter().filter(|g| gateway_ready(g)).count());
    let updated = count(
        current
            .iter()
            .filter(|g| runs_version(g, &sg.spec.version))
            .count(),
    );
    let (status, reason, message) = if desired == 0 {
        (
            ConditionStatus::False,
            "NoMatchingNodes",
            "no node matches spec.nodeSelector and tolerates its taints".to_owned(),
        )
    } else if ready == desired {
        (
            ConditionStatus::True,
            "AllGatewaysReady",
            format!("{ready} of {desired} gateways ready"),
        )
    } else {
        (
            ConditionStatus::False,
            "GatewaysNotReady",
            format!("{ready} of {desired} gateways ready"),
        )
    };
    draft.set(condition::READY, status, reason, &message);
    if too_long.is_empty() {
        draft.set(
            condition::DEGRADED,
            ConditionStatus::False,
            "AsExpected",
            "",
        );
    } else {
        let message = format!(
            "no gateway on nodes {}: the pod name <storagegateway>-gw-<node> would exceed 253 characters; use a shorter StorageGateway name",
            too_long.join(", ")
        );
        draft.set(
            condition::DEGRADED,
            ConditionStatus::True,
            "NameTooLong",
            &message,
        );
    }
    let was_paused = draft
        .conditions
        .iter()
        .find(|c| c.type_ == condition::ROLLOUT_PAUSED)
        .map(|c| c.status == "True" && c.reason == FLEET_FINDING);
    let fleet = if sg.spec.update_policy.pause_on_fleet_errors {
        analyzers::fleet(&current)
    } else {
        Vec::new()
    };
    match fleet.first() {
        Some(finding) => {
            let message = finding.message();
            draft.set(
                condition::ROLLOUT_PAUSED,
                ConditionStatus::True,
                FLEET_FINDING,
                &message,
            );
            if was_paused != Some(true) {
                tracing::warn!(storagegateway = %key(sg), %message, "fleet finding: rollout paused");
                publish(ctx, sg, EventType::Warning, "RolloutPaused", &message).await;
            }
        }
        None if sg.spec.update_policy.paused => draft.set(
            condition::ROLLOUT_PAUSED,
            ConditionStatus::True,
            "PausedBySpec",
            "spec.updatePolicy.paused is set",
        ),
        None => {
            draft.set(
                condition::ROLLOUT_PAUSED,
                ConditionStatus::False,
                "NoFleetFinding",
                "",
            );
            if was_paused == Some(true) {
                tracing::info!(storagegateway = %key(sg), "fleet finding gone: rollout resumes");
                publish(
                    ctx,
                    sg,
                    EventType::Normal,
                    "RolloutResumed",
                    "no finding is shared by many gateways of one version any more",
                )
                .await;
            }
        }
    }
    apply_status(sg, ctx, draft.finish(Some((desired, ready, updated)))).await?;
    Ok(Action::requeue(RESYNC))
}

/// The `RolloutPaused` reason of a pause by the fleet analyzer.
pub const FLEET_FINDING: &str = "FleetFinding";

async fn publish(ctx: &Context, sg: &StorageGateway, type_: EventType, reason: &str, note: &str) {
    let Some(recorder) = &ctx.recorder else {
        return;
    };
    let event = KubeEvent {
        type_,
        reason: reason.to_owned(),
        note: Some(note.to_owned()),
        action: "AnalyzeFleet".to_owned(),
        secondary: None,
    };
    if let Err(error) = recorder.publish(&event, &sg.object_ref(&())).await {
        tracing::warn!(storagegateway = %key(sg), %error, "cannot publish an Event");
    }
}

/// Publishes the control server's CA certificate in `namespace`, for the gateway pods.
async fn apply_ca_config_map(
    ctx: &Context,
    namespace: &str,
    control: &crate::context::ControlSettings,
) -> Result<(), Error> {
    let api: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), namespace);
    let config_map = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": pod::CONTROL_CA_CONFIG_MAP,
            "labels": {"app.kubernetes.io/managed-by": crate::FIELD_MANAGER},
        },
        "data": {crate::control_ca::CA_CERTIFICATE_KEY: control.ca_pem},
    });
    api.patch(
        pod::CONTROL_CA_CONFIG_MAP,
        &PatchParams::apply(crate::FIELD_MANAGER).force(),
        &Patch::Apply(config_map),
    )
    .await
    .map_err(Error::ApplyCaConfigMap)?;
    Ok(())
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn gateway_ready(gateway: &Gateway) -> bool {
    gateway
        .status
        .as_ref()
        .is_some_and(|s| condition::is_condition_true(&s.conditions, condition::READY))
}

/// Whether the gateway runs `version`: as its reports say, or, before the control channel
/// reports anything, when it is ready with a pod of that version.
fn runs_version(gateway: &Gateway, version: &str) -> bool {
    match gateway
        .status
        .as_ref()
        .and_then(|s| s.running_version.as_deref())
    {
        Some(running) => running == version,
        None => gateway.spec.version == version && gateway_ready(gateway),
    }
}

/// Deletion: delete every Gateway of the fleet and keep the finalizer until they, and so
/// their pods, are gone. The Gateways' own finalizers refuse to go while volumes are attached.
async fn cleanup(sg: &StorageGateway, ctx: &Context) -> Result<Action, Error> {
    let namespace = sg.namespace().unwrap_or_default();
    let gateway_api: Api<Gateway> = Api::namespaced(ctx.client.clone(), &namespace);
    let gateways = owned_gateways(sg, ctx).await?;
    for gateway in &gateways {
        if gateway.meta().deletion_timestamp.is_none() {
            let gateway_name = gateway.name_any();
            gateway_api
                .delete(&gateway_name, &DeleteParams::default())
                .await
                .map_err(|source| Error::DeleteGateway {
                    name: gateway_name,
                    source,
                })?;
        }
    }
    let mut waiting: Vec<String> = gateways
        .iter()
        .map(|g| format!("gateway {}", g.name_any()))
        .collect();
    // Pods outlive their Gateway only briefly (garbage collection); wait for those too, so
    // nothing of the fleet runs once the StorageGateway is gone.
    let name = sg.name_any();
    if name.len() <= 63 {
        let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &namespace);
        let selector = format!(
            "{}={},blockgate.io/storage-gateway={name}",
            crate::GATEWAY_POD_LABEL.0,
            crate::GATEWAY_POD_LABEL.1
        );
        let pods = pod_api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(Error::ListPods)?;
        waiting.extend(pods.items.iter().map(|p| format!("pod {}", p.name_any())));
    }
    if waiting.is_empty() {
        tracing::info!(storagegateway = %key(sg), "every gateway detached and stopped");
        return Ok(Action::await_change());
    }
    let mut draft = StatusDraft::new(sg);
    let message = format!("deleting; waiting for {}", waiting.join(", "));
    draft.set(
        condition::READY,
        ConditionStatus::False,
        "Deleting",
        &message,
    );
    apply_status(sg, ctx, draft.finish(None)).await?;
    Err(Error::WaitingForGateways(waiting))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;
    use crate::gateway::RefuseWhileAttached;
    use serde_json::Value;

    struct Cluster {
        fake: FakeApi,
        ctx: Arc<Context>,
    }

    impl Cluster {
        /// A cluster with the fixture StorageGateway `fleet`, its Secret, two matching nodes,
        /// one unlabelled node and one with an untolerated taint.
        fn new() -> Self {
            let (client, fake) = FakeApi::client();
            let ctx = Arc::new(Context::new(
                client,
                Arc::default(),
                Arc::new(RefuseWhileAttached),
            ));
            let labels = &[("blockgate.io/gateway", "true")];
            fake.insert(NODES, node("node-a", labels, &[]));
            fake.insert(
                NODES,
                node("node-b", labels, &[("storage", "dedicated", "NoSchedule")]),
            );
            fake.insert(NODES, node("node-c", &[], &[]));
            fake.insert(NODES, node("node-d", labels, &[("gpu", "", "NoSchedule")]));
            fake.insert(SECRETS, credentials_secret());
            let mut sg = storage_gateway("fleet");
            sg.metadata.uid = None;
            fake.insert(STORAGE_GATEWAYS, sg);
            Self { fake, ctx }
        }

        fn storage_gateway(&self) -> Option<StorageGateway> {
            self.fake
                .get(STORAGE_GATEWAYS, "fleet")
                .map(|v| serde_json::from_value(v).unwrap())
        }

        async fn reconcile(&self) -> Result<Action, Error> {
            let sg = self.storage_gateway().expect("the StorageGateway exists");
            reconcile(Arc::new(sg), self.ctx.clone()).await
        }

        /// Reconciles twice: the first pass only adds the finalizer.
        async fn settle(&self) -> Result<Action, Error> {
            self.reconcile().await?;
            self.reconcile().await
        }

        async fn reconcile_gateway(&self, name: &str) -> Result<Action, crate::gateway::Error> {
            let gateway: Gateway =
                serde_json::from_value(self.fake.get(GATEWAYS, name).unwrap()).unwrap();
            crate::gateway::reconcile(Arc::new(gateway), self.ctx.clone()).await
        }

        fn status(&self) -> StorageGatewayStatus {
            self.storage_gateway().unwrap().status.unwrap()
        }

        fn condition(&self, type_: &str) -> Condition {
            condition::find_condition(&self.status().conditions, type_)
                .cloned()
                .unwrap_or_else(|| panic!("no {type_} condition"))
        }

        fn set_pod_ready(&self, pod: &str) {
            self.fake.edit(PODS, pod, |p| {
                p["status"] = json!({"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]});
            });
        }
    }

    #[tokio::test]
    async fn two_matching_nodes_get_a_gateway_and_a_pod_each() {
        let cluster = Cluster::new();
        cluster.settle().await.unwrap();
        let fake = &cluster.fake;

        assert_eq!(fake.names(GATEWAYS), ["fleet-node-a", "fleet-node-b"]);
        assert_eq!(fake.names(PODS), ["fleet-gw-node-a", "fleet-gw-node-b"]);
        for node in ["node-a", "node-b"] {
            let gateway = fake.get(GATEWAYS, &format!("fleet-{node}")).unwrap();
            assert_eq!(gateway["spec"]["nodeName"], node);
            assert_eq!(gateway["spec"]["storageGateway"], "fleet");
            assert_eq!(gateway["spec"]["version"], "0.1.0");
            let owner = &gateway["metadata"]["ownerReferences"][0];
            assert_eq!(owner["kind"], "StorageGateway");
            assert_eq!(owner["uid"], "uid-fleet");
            assert_eq!(owner["controller"], true);

            let pod = fake.get(PODS, &format!("fleet-gw-{node}")).unwrap();
            let owner = &pod["metadata"]["ownerReferences"][0];
            assert_eq!(owner["kind"], "Gateway");
            assert_eq!(owner["uid"], format!("uid-fleet-{node}"));
            assert_eq!(pod["spec"]["nodeName"], node);
            assert!(pod["spec"].get("hostNetwork").is_none());
            assert!(pod["spec"].get("hostPID").is_none());
            let container = &pod["spec"]["containers"][0];
            assert_eq!(container["image"], "ghcr.io/blockgate/gateway:0.1.0");
            assert_eq!(container["securityContext"]["privileged"], true);
            let args: Vec<&str> = container["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            assert_eq!(&args[..2], ["serve", "--attach-only"]);
            assert!(
                args.windows(2)
                    .any(|w| w == ["--store", "s3://blockgate-volumes/clusters/prod"])
            );
            let env = &container["env"];
            assert_eq!(env[0]["name"], "AWS_ACCESS_KEY_ID");
            assert_eq!(
                env[0]["valueFrom"]["secretKeyRef"]["name"],
                "s3-credentials"
            );
            assert_eq!(
                env[1]["valueFrom"]["secretKeyRef"]["key"],
                "AWS_SECRET_ACCESS_KEY"
            );
            let host_paths: Vec<&str> = pod["spec"]["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v["hostPath"]["path"].as_str().unwrap())
                .collect();
            assert_eq!(
                host_paths,
                [
                    "/var/lib/blockgate/write-log",
                    "/var/lib/blockgate/cache",
                    "/dev"
                ]
            );
            // The credentials never leave the Secret (base64 or not).
            let text = pod.to_string();
            assert!(!text.contains("AKIDEXAMPLE") && !text.contains("QUtJREVYQU1QTEU"));
        }
        // Every server-side apply is under the one field manager.
        let applies: Vec<_> = fake
            .served()
            .into_iter()
            .filter(|s| s.content_type.as_deref() == Some("application/apply-patch+yaml"))
            .collect();
        assert!(!applies.is_empty());
        assert!(
            applies
                .iter()
                .all(|s| s.field_manager.as_deref() == Some(crate::FIELD_MANAGER))
        );

        let sg = cluster.storage_gateway().unwrap();
        assert_eq!(sg.metadata.finalizers, Some(vec![FINALIZER.to_owned()]));
        let status = cluster.status();
        assert_eq!(status.observed_generation, Some(1));
        assert_eq!(status.desired_gateways, Some(2));
        assert_eq!(status.ready_gateways, Some(0));
        assert_eq!(
            cluster.condition(condition::SECRETS_RESOLVED).status,
            "True"
        );
        assert_eq!(
            cluster.condition(condition::READY).reason,
            "GatewaysNotReady"
        );
        assert_eq!(cluster.condition(condition::DEGRADED).status, "False");
    }

    #[tokio::test]
    async fn the_status_counts_ready_gateways_and_turns_ready_when_all_are() {
        let cluster = Cluster::new();
        cluster.settle().await.unwrap();
        cluster.set_pod_ready("fleet-gw-node-a");
        for gateway in ["fleet-node-a", "fleet-node-b"] {
            // First pass adds the Gateway's finalizer, the second sets its status.
            cluster.reconcile_gateway(gateway).await.unwrap();
            cluster.reconcile_gateway(gateway).await.unwrap();
        }
        let gateway = cluster.fake.get(GATEWAYS, "fleet-node-b").unwrap();
        assert_eq!(gateway["status"]["conditions"][0]["reason"], "PodPending");
        assert_eq!(gateway["status"]["conditions"][0]["status"], "False");

        cluster.reconcile().await.unwrap();
        let status = cluster.status();
        assert_eq!(
            (
                status.desired_gateways,
                status.ready_gateways,
                status.updated_gateways
            ),
            (Some(2), Some(1), Some(1))
        );
        assert_eq!(
            cluster.condition(condition::READY).message,
            "1 of 2 gateways ready"
        );

        cluster.set_pod_ready("fleet-gw-node-b");
        cluster.reconcile_gateway("fleet-node-b").await.unwrap();
        cluster.reconcile().await.unwrap();
        let ready = cluster.condition(condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "AllGatewaysReady")
        );
        assert_eq!(cluster.status().ready_gateways, Some(2));
    }

    #[tokio::test]
    async fn a_node_that_stops_matching_loses_its_gateway_and_pod() {
        let cluster = Cluster::new();
        cluster.settle().await.unwrap();
        cluster.reconcile_gateway("fleet-node-b").await.unwrap();
        cluster.fake.edit(NODES, "node-b", |n| {
            n["metadata"]["labels"] = json!({});
        });
        cluster.reconcile().await.unwrap();
        // The Gateway waits on its detach finalizer; the Gateway reconciler stops the pod.
        let gateway = cluster.fake.get(GATEWAYS, "fleet-node-b").unwrap();
        assert!(gateway["metadata"].get("deletionTimestamp").is_some());
        cluster.reconcile_gateway("fleet-node-b").await.unwrap();
        assert_eq!(cluster.fake.names(GATEWAYS), ["fleet-node-a"]);
        assert_eq!(cluster.fake.names(PODS), ["fleet-gw-node-a"]);
        cluster.reconcile().await.unwrap();
        assert_eq!(cluster.status().desired_gateways, Some(1));
    }

    /// The pods as they are, by name: `(resourceVersion, image, args)`.
    fn pods(fake: &FakeApi) -> BTreeMap<String, (Value, Value, Value)> {
        fake.names(PODS)
            .into_iter()
            .map(|name| {
                let pod = fake.get(PODS, &name).unwrap();
                let container = &pod["spec"]["containers"][0];
                let seen = (
                    pod["metadata"]["resourceVersion"].clone(),
                    container["image"].clone(),
                    container["args"].clone(),
                );
                (name, seen)
            })
            .collect()
    }

    fn arg_after<'a>(args: &'a Value, flag: &str) -> &'a str {
        let args = args.as_array().unwrap();
        let at = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("no {flag} in {args:?}"));
        args[at + 1].as_str().unwrap()
    }

    /// A user's edit of the StorageGateway's spec (the API server bumps the generation).
    fn edit_spec(fake: &FakeApi, change: impl FnOnce(&mut Value)) {
        fake.edit(STORAGE_GATEWAYS, "fleet", |sg| {
            change(&mut sg["spec"]);
            let generation = sg["metadata"]["generation"].as_i64().unwrap();
            sg["metadata"]["generation"] = json!(generation + 1);
        });
    }

    #[tokio::test]
    async fn a_node_added_later_gets_its_gateway_and_pod_and_the_others_are_left_alone() {
        let cluster = Cluster::new();
        cluster.settle().await.unwrap();
        let before = pods(&cluster.fake);
        cluster.fake.insert(
            NODES,
            node("node-e", &[("blockgate.io/gateway", "true")], &[]),
        );
        cluster.reconcile().await.unwrap();

        assert_eq!(
            cluster.fake.names(GATEWAYS),
            ["fleet-node-a", "fleet-node-b", "fleet-node-e"]
        );
        let after = pods(&cluster.fake);
        assert_eq!(
            after.keys().collect::<Vec<_>>(),
            ["fleet-gw-node-a", "fleet-gw-node-b", "fleet-gw-node-e"]
        );
        let pod = cluster.fake.get(PODS, "fleet-gw-node-e").unwrap();
        assert_eq!(pod["spec"]["nodeName"], "node-e");
        assert_eq!(
            pod["spec"]["containers"][0]["image"],
            "ghcr.io/blockgate/gateway:0.1.0"
        );
        // The running gateways' pods were not touched.
        for (name, seen) in &before {
            assert_eq!(&after[name], seen, "{name} changed");
        }
        let status = cluster.status();
        assert_eq!(status.desired_gateways, Some(3));
        assert_eq!(
            cluster.condition(condition::READY).message,
            "0 of 3 gateways ready"
        );
    }

    #[tokio::test]
    async fn a_spec_update_reaches_new_gateways_and_leaves_running_pods_to_the_rollout() {
        let cluster = Cluster::new();
        cluster.settle().await.unwrap();
        for pod in ["fleet-gw-node-a", "fleet-gw-node-b"] {
            cluster.set_pod_ready(pod);
        }
        for gateway in ["fleet-node-a", "fleet-node-b"] {
            cluster.reconcile_gateway(gateway).await.unwrap();
            cluster.reconcile_gateway(gateway).await.unwrap();
        }
        let before = pods(&cluster.fake);
        assert_eq!(
            arg_after(&before["fleet-gw-node-a"].2, "--log-capacity"),
            (64u64 << 30).to_string()
        );

        edit_spec(&cluster.fake, |spec| {
            spec["version"] = json!("0.2.0");
            spec["writeLog"]["size"] = json!("128Gi");
        });
        cluster.reconcile().await.unwrap();

        // Pods are never changed in place (most of a pod spec is immutable, and replacing a
        // gateway interrupts its volumes); the Gateways keep the version they run until a
        // rollout moves them.
        assert_eq!(pods(&cluster.fake), before);
        for gateway in ["fleet-node-a", "fleet-node-b"] {
            let gateway = cluster.fake.get(GATEWAYS, gateway).unwrap();
            assert_eq!(gateway["spec"]["version"], "0.1.0");
        }
        // The status says the new spec is seen and no gateway runs it yet.
        let status = cluster.status();
        assert_eq!(status.observed_generation, Some(2));
        assert_eq!(
            (
                status.desired_gateways,
                status.ready_gateways,
                status.updated_gateways
            ),
            (Some(2), Some(2), Some(0))
        );
        assert_eq!(
            cluster.condition(condition::READY).observed_generation,
            Some(2)
        );

        // A gateway started after the update gets the new spec.
        cluster.fake.insert(
            NODES,
            node("node-e", &[("blockgate.io/gateway", "true")], &[]),
        );
        cluster.reconcile().await.unwrap();
        let gateway = cluster.fake.get(GATEWAYS, "fleet-node-e").unwrap();
        assert_eq!(gateway["spec"]["version"], "0.2.0");
        let (_, image, args) = &pods(&cluster.fake)["fleet-gw-node-e"];
        assert_eq!(image, "ghcr.io/blockgate/gateway:0.2.0");
        assert_eq!(
            arg_after(args, "--log-capacity"),
            (128u64 << 30).to_string()
        );
        assert_eq!(
            pods(&cluster.fake)["fleet-gw-node-a"],
            before["fleet-gw-node-a"]
        );
        cluster.set_pod_ready("fleet-gw-node-e");
        cluster.reconcile_gateway("fleet-node-e").await.unwrap();
        cluster.reconcile_gateway("fleet-node-e").await.unwrap();
        cluster.reconcile().await.unwrap();
        let status = cluster.status();
        assert_eq!(
            (
                status.desired_gateways,
                status.ready_gateways,
                status.updated_gateways
            ),
            (Some(3), Some(3), Some(1))
        );
        assert_eq!(
            cluster.condition(condition::READY).reason,
            "AllGatewaysReady"
        );
    }

    #[tokio::test]
    async fn a_changed_toleration_or_node_selector_moves_the_fleet_to_the_nodes_it_now_selects() {
        let cluster = Cluster::new();
        cluster.settle().await.unwrap();
        for gateway in ["fleet-node-a", "fleet-node-b"] {
            cluster.reconcile_gateway(gateway).await.unwrap();
        }

        // Without the toleration, node-b's taint keeps the fleet off it.
        edit_spec(&cluster.fake, |spec| {
            spec["tolerations"] = json!([]);
        });
        cluster.reconcile().await.unwrap();
        let leaving = cluster.fake.get(GATEWAYS, "fleet-node-b").unwrap();
        assert!(leaving["metadata"].get("deletionTimestamp").is_some());
        // Its pod stops once the Gateway's detach finalizer has run.
        assert!(cluster.fake.get(PODS, "fleet-gw-node-b").is_some());
        cluster.reconcile_gateway("fleet-node-b").await.unwrap();
        assert_eq!(cluster.fake.names(GATEWAYS), ["fleet-node-a"]);
        assert_eq!(cluster.fake.names(PODS), ["fleet-gw-node-a"]);
        assert_eq!(cluster.status().desired_gateways, Some(1));

        // A new node selector: node-c is labelled for it, node-a is not.
        cluster.fake.edit(NODES, "node-c", |n| {
            n["metadata"]["labels"] = json!({"pool": "storage"});
        });
        edit_spec(&cluster.fake, |spec| {
            spec["nodeSelector"] = json!({"pool": "storage"});
        });
        cluster.reconcile().await.unwrap();
        cluster.reconcile_gateway("fleet-node-a").await.unwrap();
        assert_eq!(cluster.fake.names(GATEWAYS), ["fleet-node-c"]);
        assert_eq!(cluster.fake.names(PODS), ["fleet-gw-node-c"]);
        cluster.reconcile().await.unwrap();
        let status = cluster.status();
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.desired_gateways, Some(1));
        assert_eq!(
            cluster.condition(condition::READY).message,
            "0 of 1 gateways ready"
        );

        // A selector no node matches: nothing runs, and the status says why.
        cluster.reconcile_gateway("fleet-node-c").await.unwrap();
        edit_spec(&cluster.fake, |spec| {
            spec["nodeSelector"] = json!({"pool": "nowhere"});
        });
        cluster.reconcile().await.unwrap();
        cluster.reconcile_gateway("fleet-node-c").await.unwrap();
        assert!(cluster.fake.names(PODS).is_empty());
        let ready = cluster.condition(condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "NoMatchingNodes")
        );
        assert_eq!(cluster.status().desired_gateways, Some(0));
    }

    #[tokio::test]
    async fn deleting_a_fleet_with_nothing_attached_removes_everything_then_the_finalizer() {
        let cluster = Cluster::new();
        cluster.settle().await.unwrap();
        for gateway in ["fleet-node-a", "fleet-node-b"] {
            cluster.reconcile_gateway(gateway).await.unwrap();
        }
        let sgs: Api<StorageGateway> =
            Api::namespaced(cluster.ctx.client.clone(), "blockgate-system");
        sgs.delete("fleet", &DeleteParams::default()).await.unwrap();
        // The finalizer holds the object while its Gateways detach and stop.
        let sg = cluster.storage_gateway().unwrap();
        assert!(sg.metadata.deletion_timestamp.is_some());
        let waiting = cluster.reconcile().await.unwrap_err();
        assert!(waiting.is_waiting(), "{waiting}");
        assert!(
            cluster
                .condition(condition::READY)
                .message
                .contains("gateway fleet-node-a"),
        );
        for gateway in ["fleet-node-a", "fleet-node-b"] {
            cluster.reconcile_gateway(gateway).await.unwrap();
        }
        assert!(cluster.fake.names(GATEWAYS).is_empty());
        assert!(cluster.fake.names(PODS).is_empty());
        cluster.reconcile().await.unwrap();
        assert!(cluster.storage_gateway().is_none());
        // Nothing was started anew while deleting.
        assert!(cluster.fake.names(GATEWAYS).is_empty());
    }

    #[tokio::test]
    async fn a_missing_secret_is_reported_and_starts_nothing() {
        let cluster = Cluster::new();
        cluster.fake.remove(SECRETS, "s3-credentials");
        cluster.settle().await.unwrap();
        assert!(cluster.fake.names(PODS).is_empty());
        assert!(cluster.fake.names(GATEWAYS).is_empty());
        let resolved = cluster.condition(condition::SECRETS_RESOLVED);
        assert_eq!(resolved.status, "False");
        assert!(
            resolved
                .message
                .contains("Secret blockgate-system/s3-credentials not found"),
            "{}",
            resolved.message
        );
        assert_eq!(cluster.condition(condition::READY).status, "False");
        assert_eq!(cluster.condition(condition::DEGRADED).status, "True");
    }

    #[tokio::test]
    async fn a_secret_without_the_named_key_is_reported() {
        let cluster = Cluster::new();
        cluster.fake.edit(SECRETS, "s3-credentials", |s| {
            s["data"]
                .as_object_mut()
                .unwrap()
                .remove("AWS_SECRET_ACCESS_KEY");
        });
        cluster.settle().await.unwrap();
        assert!(cluster.fake.names(PODS).is_empty());
        assert!(
            cluster
                .condition(condition::SECRETS_RESOLVED)
                .message
                .contains("has no key AWS_SECRET_ACCESS_KEY")
        );
    }

    #[tokio::test]
    async fn an_invalid_spec_is_reported_with_the_field_and_starts_nothing() {
        let cluster = Cluster::new();
        cluster.fake.edit(STORAGE_GATEWAYS, "fleet", |sg| {
            sg["spec"]["writeLog"]["size"] = json!("1Mi");
        });
        cluster.settle().await.unwrap();
        assert!(cluster.fake.names(PODS).is_empty());
        let ready = cluster.condition(condition::READY);
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert!(
            ready
                .message
                .contains("spec.writeLog.size: must be at least 1Gi"),
            "{}",
            ready.message
        );
        assert_eq!(cluster.condition(condition::DEGRADED).reason, "InvalidSpec");
    }

    #[tokio::test]
    async fn deletion_waits_while_a_gateway_reports_attached_volumes() {
        let cluster = Cluster::new();
        cluster.settle().await.unwrap();
        for gateway in ["fleet-node-a", "fleet-node-b"] {
            cluster.reconcile_gateway(gateway).await.unwrap();
        }
        cluster.fake.edit(GATEWAYS, "fleet-node-a", |g| {
            g["status"]["volumes"] =
                json!([{"volumeId": "pvc-1", "mode": "cached", "sizeBytes": 1}]);
        });
        let sgs: Api<StorageGateway> =
            Api::namespaced(cluster.ctx.client.clone(), "blockgate-system");
        sgs.delete("fleet", &DeleteParams::default()).await.unwrap();

        let waiting = cluster.reconcile().await.unwrap_err();
        assert!(waiting.is_waiting(), "{waiting}");
        assert_eq!(cluster.condition(condition::READY).reason, "Deleting");

        // node-a's gateway keeps its finalizer and its pod, and says why.
        let blocked = cluster.reconcile_gateway("fleet-node-a").await.unwrap_err();
        assert_eq!(blocked.kind(), "detach_blocked");
        let gateway = cluster.fake.get(GATEWAYS, "fleet-node-a").unwrap();
        let ready = &gateway["status"]["conditions"][0];
        assert_eq!(ready["reason"], "DetachBlocked");
        assert!(ready["message"].as_str().unwrap().contains("pvc-1"));
        // The reports' fields are left alone by the reconciler's status apply.
        assert_eq!(gateway["status"]["volumes"][0]["volumeId"], "pvc-1");
        assert!(cluster.fake.get(PODS, "fleet-gw-node-a").is_some());
        // node-b had nothing attached: gone, pod first.
        cluster.reconcile_gateway("fleet-node-b").await.unwrap();
        assert_eq!(cluster.fake.names(GATEWAYS), ["fleet-node-a"]);
        assert_eq!(cluster.fake.names(PODS), ["fleet-gw-node-a"]);
        assert!(cluster.reconcile().await.is_err());
        assert!(cluster.storage_gateway().is_some());

        // The volume is detached (as a report would say): everything goes.
        cluster.fake.edit(GATEWAYS, "fleet-node-a", |g| {
            g["status"]["volumes"] = json!([]);
        });
        cluster.reconcile_gateway("fleet-node-a").await.unwrap();
        assert!(cluster.fake.names(PODS).is_empty());
        assert!(cluster.fake.names(GATEWAYS).is_empty());
        cluster.reconcile().await.unwrap();
        assert!(cluster.storage_gateway().is_none());
        assert_eq!(
            cluster
                .ctx
                .metrics
                .reconcile_count(Controller::Gateway, "detach_blocked"),
            1
        );
    }

    fn with_control(cluster: Cluster) -> Cluster {
        let client = kube::Client::new(cluster.fake.clone(), "default");
        let ctx = Context::new(client, Arc::default(), Arc::new(RefuseWhileAttached)).with_control(
            crate::context::ControlSettings {
                endpoint: "https://blockgate-operator.blockgate-system.svc:9443".into(),
                ca_pem: "-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n".into(),
                token_validity: crate::activation::TOKEN_VALIDITY,
            },
        );
        Cluster {
            fake: cluster.fake,
            ctx: Arc::new(ctx),
        }
    }

    #[tokio::test]
    async fn with_a_control_server_each_gateway_gets_a_token_the_ca_and_the_flags() {
        let cluster = with_control(Cluster::new());
        cluster.settle().await.unwrap();
        let fake = &cluster.fake;
        let config_map = fake
            .get(
                "/api/v1/namespaces/blockgate-system/configmaps",
                pod::CONTROL_CA_CONFIG_MAP,
            )
            .unwrap();
        assert!(
            config_map["data"]["ca.crt"]
                .as_str()
                .unwrap()
                .contains("BEGIN CERTIFICATE")
        );
        let secrets = fake.names(SECRETS);
        for node in ["node-a", "node-b"] {
            assert!(
                secrets.contains(&format!("fleet-{node}-activation")),
                "{secrets:?}"
            );
            let pod = fake.get(PODS, &format!("fleet-gw-{node}")).unwrap();
            let container = &pod["spec"]["containers"][0];
            let args: Vec<&str> = container["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            for (flag, value) in [
                (
                    "--control-endpoint",
                    "https://blockgate-operator.blockgate-system.svc:9443",
                ),
                ("--control-ca", "/etc/blockgate/ca/ca.crt"),
                ("--activation-token-file", "/etc/blockgate/activation/token"),
                ("--storage-gateway", "blockgate-system/fleet"),
                ("--node-name", "$(NODE_NAME)"),
            ] {
                let at = args
                    .iter()
                    .position(|a| *a == flag)
                    .unwrap_or_else(|| panic!("no {flag}"));
                assert_eq!(args[at + 1], value);
            }
            assert_eq!(
                container["env"][2]["valueFrom"]["fieldRef"]["fieldPath"],
                "spec.nodeName"
            );
            let volumes = pod["spec"]["volumes"].to_string();
            assert!(
                volumes.contains(&format!("fleet-{node}-activation")),
                "{volumes}"
            );
            assert!(volumes.contains(pod::CONTROL_CA_CONFIG_MAP));
            // The token itself is never in the pod spec.
            let secret = fake
                .get(SECRETS, &format!("fleet-{node}-activation"))
                .unwrap();
            let token = secret["data"]["token"].as_str().unwrap();
            assert!(!pod.to_string().contains(token));
        }
    }

    fn report_status(fake: &FakeApi, gateway: &str, version: &str, analyzers: &[&str]) {
        let findings: Vec<_> = analyzers
            .iter()
            .map(|a| json!({"analyzer": a, "severity": "Warning", "message": "seen", "since": "2026-01-01T00:00:00Z"}))
            .collect();
        fake.edit(GATEWAYS, gateway, |g| {
            g["status"]["runningVersion"] = json!(version);
            g["status"]["findings"] = json!(findings);
        });
    }

    #[tokio::test]
    async fn the_same_finding_on_most_gateways_of_a_version_pauses_the_rollout_until_it_clears() {
        let cluster = Cluster::new();
        cluster.settle().await.unwrap();
        let paused = cluster.condition(condition::ROLLOUT_PAUSED);
        assert_eq!(
            (paused.status.as_str(), paused.reason.as_str()),
            ("False", "NoFleetFinding")
        );

        report_status(
            &cluster.fake,
            "fleet-node-a",
            "0.2.0",
            &["ObjectStoreErrors"],
        );
        report_status(
            &cluster.fake,
            "fleet-node-b",
            "0.2.0",
            &["ObjectStoreErrors", "CacheThrashing"],
        );
        cluster.reconcile().await.unwrap();
        let paused = cluster.condition(condition::ROLLOUT_PAUSED);
        assert_eq!(
            (paused.status.as_str(), paused.reason.as_str()),
            ("True", FLEET_FINDING)
        );
        assert_eq!(
            paused.message,
            "2 of 2 gateways running 0.2.0 report ObjectStoreErrors"
        );

        // One gateway alone is not a fleet pattern.
        report_status(&cluster.fake, "fleet-node-b", "0.2.0", &[]);
        cluster.reconcile().await.unwrap();
        let paused = cluster.condition(condition::ROLLOUT_PAUSED);
        assert_eq!(
            (paused.status.as_str(), paused.reason.as_str()),
            ("False", "NoFleetFinding")
        );
    }

    fn recorder(client: &kube::Client) -> kube::runtime::events::Recorder {
        kube::runtime::events::Recorder::new(
            client.clone(),
            kube::runtime::events::Reporter {
                controller: crate::FIELD_MANAGER.into(),
                instance: Some("op-a".into()),
            },
        )
    }

    /// The Events recorded so far: `(kind/name regarded, type, reason, note)`.
    fn events(fake: &FakeApi) -> Vec<(String, String, String, String)> {
        let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
        fake.names(EVENTS)
            .iter()
            .filter_map(|name| fake.get(EVENTS, name))
            .map(|event| {
                let regarding = &event["regarding"];
                (
                    format!("{}/{}", text(&regarding["kind"]), text(&regarding["name"])),
                    text(&event["type"]),
                    text(&event["reason"]),
                    text(&event["note"]),
                )
            })
            .collect()
    }

    fn events_with_reason(fake: &FakeApi, reason: &str) -> Vec<(String, String, String, String)> {
        events(fake)
            .into_iter()
            .filter(|event| event.2 == reason)
            .collect()
    }

    /// What an S3 server answers to a wrong access key, as the gateway's uploader records it
    /// (the object key differs per gateway, volume and segment).
    const AUTH_ERROR: &str = "service error: InvalidAccessKeyId: The AWS Access Key Id you provided does not exist in our records.";

    /// The gateways' side of the control channel: each node's gateway reports through the
    /// [`crate::reports::GatewayReports`] sink, as the control hub hands reports over, and the
    /// report worker writes them into the Gateways.
    struct Gateways {
        sink: crate::reports::GatewayReports,
        worker: crate::reports::ReportWorker,
        deliveries: tokio::sync::mpsc::UnboundedReceiver<crate::reports::Delivery>,
        /// Per node: reports sent, object-store errors so far.
        counters: BTreeMap<String, (u64, u64)>,
    }

    impl Gateways {
        fn new(client: &kube::Client) -> Self {
            let (sink, worker, deliveries) = crate::reports::ReportWorker::new(
                client.clone(),
                Arc::default(),
                Some(recorder(client)),
                "op-a".into(),
                Duration::from_secs(10),
            );
            Self {
                sink,
                worker,
                deliveries,
                counters: BTreeMap::new(),
            }
        }

        fn id(node: &str) -> String {
            format!("blockgate-system/fleet/{node}")
        }

        fn connect(&mut self, node: &str) {
            use blockgate_operator_control::ReportSink;
            let hello = blockgate_proto::control::v1::Hello {
                gateway_id: Self::id(node),
                node: node.into(),
                version: "0.1.0".into(),
                ..Default::default()
            };
            self.sink.event(
                &Self::id(node),
                blockgate_operator_control::ConnectionEvent::Connected(hello),
            );
            self.counters.insert(node.to_owned(), (0, 0));
        }

        /// One report from `node`'s gateway; `new_errors` object-store errors since its last
        /// report, all of them `error` (an upload of a segment of volume `pvc-<node>`).
        fn report(&mut self, node: &str, new_errors: u64, error: Option<&str>) {
            use blockgate_operator_control::ReportSink;
            let (sequence, errors) = self.counters.entry(node.to_owned()).or_default();
            *sequence += 1;
            *errors += new_errors;
            let volume = format!("pvc-{node}");
            let last_error = error
                .map(|error| {
                    format!(
                        "object store refused put of clusters/prod/volumes/{volume}/segments/{:016x}: {error}",
                        *sequence
                    )
                })
                .unwrap_or_default();
            let at_unix = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs();
            let report = blockgate_proto::control::v1::StatusReport {
                sequence: *sequence,
                at_unix,
                version: "0.1.0".into(),
                volumes: vec![blockgate_proto::control::v1::VolumeReport {
                    volume_id: volume,
                    size_bytes: 10 << 30,
                    device_path: "/dev/nbd0".into(),
                    last_error,
                    ..Default::default()
                }],
                write_log_bytes: 1 << 30,
                write_log_capacity_bytes: 64 << 30,
                cache_bytes: 1 << 30,
                cache_capacity_bytes: 256 << 30,
                object_store_errors_total: *errors,
                ..Default::default()
            };
            self.sink.report(&Self::id(node), report);
        }

        /// The worker writes what the sink queued, as its run loop does.
        async fn deliver(&mut self) {
            while let Ok(delivery) = self.deliveries.try_recv() {
                self.worker.handle(delivery).await.unwrap();
            }
        }
    }

    fn gateway_status(fake: &FakeApi, node: &str) -> blockgate_operator_api::GatewayStatus {
        let gateway: Gateway =
            serde_json::from_value(fake.get(GATEWAYS, &format!("fleet-{node}")).unwrap()).unwrap();
        gateway.status.unwrap_or_default()
    }

    #[tokio::test]
    async fn the_same_s3_authentication_error_on_many_gateways_pauses_the_rollout_until_it_stops() {
        // Five gateways of one version: node-a and node-b of the fixture and three more.
        let cluster = Cluster::new();
        let labels = &[("blockgate.io/gateway", "true")];
        for node_name in ["node-e", "node-f", "node-g"] {
            cluster.fake.insert(NODES, node(node_name, labels, &[]));
        }
        let client = kube::Client::new(cluster.fake.clone(), "default");
        let cluster = Cluster {
            ctx: Arc::new(
                Context::new(
                    client.clone(),
                    Arc::default(),
                    Arc::new(RefuseWhileAttached),
                )
                .with_recorder(recorder(&client)),
            ),
            fake: cluster.fake,
        };
        cluster.settle().await.unwrap();
        let nodes = ["node-a", "node-b", "node-e", "node-f", "node-g"];
        assert_eq!(cluster.fake.names(GATEWAYS).len(), nodes.len());

        let mut gateways = Gateways::new(&client);
        for node in nodes {
            gateways.connect(node);
            gateways.report(node, 0, None);
        }
        gateways.deliver().await;
        cluster.reconcile().await.unwrap();
        let paused = cluster.condition(condition::ROLLOUT_PAUSED);
        assert_eq!(
            (paused.status.as_str(), paused.reason.as_str()),
            ("False", "NoFleetFinding")
        );

        // One gateway's uploads are refused: that gateway's finding, not the fleet's.
        for _ in 0..2 {
            gateways.report("node-a", 6, Some(AUTH_ERROR));
            for node in &nodes[1..] {
                gateways.report(node, 0, None);
            }
        }
        gateways.deliver().await;
        let status = gateway_status(&cluster.fake, "node-a");
        assert_eq!(status.findings.len(), 1, "{:?}", status.findings);
        assert_eq!(status.findings[0].analyzer, analyzers::OBJECT_STORE_ERRORS);
        assert!(
            status.findings[0].message.contains("InvalidAccessKeyId"),
            "{}",
            status.findings[0].message
        );
        let degraded = condition::find_condition(&status.conditions, condition::DEGRADED).unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", analyzers::OBJECT_STORE_ERRORS)
        );
        for node in &nodes[1..] {
            assert!(gateway_status(&cluster.fake, node).findings.is_empty());
        }
        let found = events_with_reason(&cluster.fake, analyzers::OBJECT_STORE_ERRORS);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].0.as_str(), found[0].1.as_str()),
            ("Gateway/fleet-node-a", "Warning")
        );
        cluster.reconcile().await.unwrap();
        let paused = cluster.condition(condition::ROLLOUT_PAUSED);
        assert_eq!(
            (paused.status.as_str(), paused.reason.as_str()),
            ("False", "NoFleetFinding")
        );
        assert!(events_with_reason(&cluster.fake, "RolloutPaused").is_empty());

        // Three more gateways get the same answer (on other volumes and segments): a fleet
        // finding, which pauses the rollout.
        for _ in 0..2 {
            for node in &nodes[..4] {
                gateways.report(node, 6, Some(AUTH_ERROR));
            }
            gateways.report("node-g", 0, None);
        }
        gateways.deliver().await;
        for node in &nodes[..4] {
            let findings = gateway_status(&cluster.fake, node).findings;
            assert_eq!(findings.len(), 1, "{node}: {findings:?}");
        }
        assert!(gateway_status(&cluster.fake, "node-g").findings.is_empty());
        cluster.reconcile().await.unwrap();
        let paused = cluster.condition(condition::ROLLOUT_PAUSED);
        assert_eq!(
            (paused.status.as_str(), paused.reason.as_str()),
            ("True", FLEET_FINDING)
        );
        let expected = format!(
            "4 of 5 gateways running 0.1.0 report ObjectStoreErrors: object store refused put of …: {AUTH_ERROR}"
        );
        assert_eq!(paused.message, expected);
        let pause_events = events_with_reason(&cluster.fake, "RolloutPaused");
        assert_eq!(pause_events.len(), 1, "{pause_events:?}");
        assert_eq!(
            pause_events[0],
            (
                "StorageGateway/fleet".to_owned(),
                "Warning".to_owned(),
                "RolloutPaused".to_owned(),
                expected
            )
        );
        // Each affected gateway has its own Event too, and a later reconcile repeats nothing.
        assert_eq!(
            events_with_reason(&cluster.fake, analyzers::OBJECT_STORE_ERRORS).len(),
            4
        );
        cluster.reconcile().await.unwrap();
        assert_eq!(events_with_reason(&cluster.fake, "RolloutPaused").len(), 1);

        // The credentials are fixed: no new errors. Once the errors have aged out of the
        // analyzers' window, the findings clear, and with them the pause.
        for _ in 0..crate::reports::REPORT_WINDOW {
            for node in nodes {
                gateways.report(node, 0, None);
            }
        }
        gateways.deliver().await;
        for node in nodes {
            let status = gateway_status(&cluster.fake, node);
            assert!(status.findings.is_empty(), "{node}: {:?}", status.findings);
            let degraded =
                condition::find_condition(&status.conditions, condition::DEGRADED).unwrap();
            assert_eq!(degraded.status, "False", "{node}");
        }
        assert_eq!(
            events_with_reason(&cluster.fake, "ObjectStoreErrorsResolved").len(),
            4
        );
        cluster.reconcile().await.unwrap();
        let paused = cluster.condition(condition::ROLLOUT_PAUSED);
        assert_eq!(
            (paused.status.as_str(), paused.reason.as_str()),
            ("False", "NoFleetFinding")
        );
        let resumed = events_with_reason(&cluster.fake, "RolloutResumed");
        assert_eq!(resumed.len(), 1, "{resumed:?}");
        assert_eq!(
            (resumed[0].0.as_str(), resumed[0].1.as_str()),
            ("StorageGateway/fleet", "Normal")
        );
    }
}
