//! Diagnostics on request: a user sets (or changes) the annotation
//! `blockgate.io/diagnostics-request` on a Gateway, to any value:
//!
//! ```text
//! kubectl annotate gateway NAME blockgate.io/diagnostics-request=$(date +%s) --overwrite
//! ```
//!
//! The Gateway reconciler sees a value different from `status.diagnostics.request` and sends
//! `CollectDiagnostics` down the gateway's control stream ([`Hub::send`] forwards to the
//! replica holding it). The gateway answers with its recent log lines and its state JSON; the
//! reconciler applies them as the ConfigMap `<gateway>-diagnostics` (`logs.txt`,
//! `state.json`) in the Gateway's namespace, owned by the Gateway so it goes with it, and
//! records `status.diagnostics` (`request`, `collectedAt`, `configMap`). A failed request
//! (no control channel, gateway not connected, refused, deadline passed, ConfigMap not
//! written) is recorded as `status.diagnostics.error` and not retried: a new annotation value
//! asks again.
//!
//! `status.diagnostics` is written by the Gateway reconciler's status apply (see
//! [`crate::gateway`]), in the same apply as `observedGeneration` and `Ready`: under
//! server-side apply one manager's apply that left the other fields out would remove them.

use std::collections::BTreeMap;
use std::time::Duration;

use blockgate_operator_api::Gateway;
use blockgate_operator_api::gateway::{DIAGNOSTICS_REQUEST_ANNOTATION, DiagnosticsStatus};
use blockgate_operator_control::Hub;
use blockgate_proto::control::v1::{
    CollectDiagnostics, Command, command, command_output, command_result,
};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};

use crate::context::Context;

/// The annotation that requests diagnostics (any new value is a new request).
pub const REQUEST_ANNOTATION: &str = DIAGNOSTICS_REQUEST_ANNOTATION;
/// The ConfigMap's annotation with the time of collection (RFC 3339).
pub const COLLECTED_AT_ANNOTATION: &str = "blockgate.io/diagnostics-collected-at";
/// How many recent log lines are asked for.
pub const LOG_LINES: u32 = 1000;
/// How long the gateway has to answer.
pub const TIMEOUT: Duration = Duration::from_secs(60);
/// The ConfigMap's data keys.
pub const LOGS_KEY: &str = "logs.txt";
/// See [`LOGS_KEY`].
pub const STATE_KEY: &str = "state.json";
/// What the ConfigMap's data may take: a ConfigMap is at most 1 MiB, metadata included.
const MAX_DATA_BYTES: usize = 960 * 1024;
/// The message when the reconcilers run without a control channel.
pub const NOT_CONFIGURED: &str = "the control channel is not configured";

/// The ConfigMap holding a Gateway's diagnostics.
pub fn config_map_name(gateway: &Gateway) -> String {
    format!("{}-diagnostics", gateway.name_any())
}

/// The gateway's id on the control channel: `<namespace>/<storage-gateway>/<node>`.
pub fn gateway_id(gateway: &Gateway) -> String {
    format!(
        "{}/{}/{}",
        gateway.namespace().unwrap_or_default(),
        gateway.spec.storage_gateway,
        gateway.spec.node_name
    )
}

/// The request annotation's value when it has not been answered yet (differs from
/// `status.diagnostics.request`).
pub fn pending_request(gateway: &Gateway) -> Option<&str> {
    let request = gateway.annotations().get(REQUEST_ANNOTATION)?;
    let answered = gateway
        .status
        .as_ref()
        .and_then(|status| status.diagnostics.as_ref())
        .is_some_and(|diagnostics| diagnostics.request == *request);
    (!answered).then_some(request.as_str())
}

/// Answers `request`: collects the gateway's diagnostics into its ConfigMap. Never fails: a
/// failure is the returned status's `error`.
pub async fn collect(gateway: &Gateway, ctx: &Context, request: &str) -> DiagnosticsStatus {
    let id = gateway_id(gateway);
    match try_collect(gateway, ctx, request).await {
        Ok((config_map, collected_at)) => {
            tracing::info!(gateway = %id, %request, %config_map, "diagnostics collected");
            DiagnosticsStatus {
                request: request.to_owned(),
                collected_at: Some(Time(collected_at)),
                config_map: Some(config_map),
                error: None,
            }
        }
        Err(error) => {
            tracing::warn!(gateway = %id, %request, %error, "diagnostics not collected");
            DiagnosticsStatus {
                request: request.to_owned(),
                error: Some(error),
                ..DiagnosticsStatus::default()
            }
        }
    }
}

/// The gateway's answer.
struct Collected {
    log_lines: Vec<String>,
    state_json: String,
}

async fn ask(hub: &Hub, gateway: &str) -> Result<Collected, String> {
    let command = Command {
        // Unique: the hub caches results by id, and the same annotation value may come back.
        id: format!("diagnostics-{:016x}", rand::random::<u64>()),
        deadline_unix_ms: 0,
        kind: Some(command::Kind::CollectDiagnostics(CollectDiagnostics {
            log_lines: LOG_LINES,
        })),
    };
    let result = hub
        .send(gateway, command, TIMEOUT)
        .await
        .map_err(|error| format!("cannot collect diagnostics: {error}"))?;
    match result.outcome {
        Some(command_result::Outcome::Ok(output)) => match output.value {
            Some(command_output::Value::Diagnostics(diagnostics)) => Ok(Collected {
                log_lines: diagnostics.log_lines,
                state_json: diagnostics.state_json,
            }),
            _ => Err("the gateway answered without diagnostics".to_owned()),
        },
        Some(command_result::Outcome::Failure(failure)) => Err(format!(
            "the gateway refused to collect diagnostics ({:?}): {}",
            tonic::Code::from_i32(failure.code),
            failure.message
        )),
        None => Err("the gateway's result has no outcome".to_owned()),
    }
}

/// `logs.txt`: the most recent lines, one per line, as many as fit beside `state_bytes`.
fn logs_text(lines: &[String], state_bytes: usize) -> String {
    let budget = MAX_DATA_BYTES.saturating_sub(state_bytes);
    let mut used = 0;
    let kept = lines
        .iter()
        .rev()
        .take_while(|line| {
            used += line.len() + 1;
            used <= budget
        })
        .count();
    let dropped = lines.len() - kept;
    let mut text = String::with_capacity(used.min(budget) + 100);
    if dropped > 0 {
        text.push_str(&format!(
            "[{dropped} older line(s) left out: a ConfigMap holds at most 1 MiB]\n"
        ));
    }
    for line in &lines[dropped..] {
        text.push_str(line);
        text.push('\n');
    }
    text
}

async fn try_collect(
    gateway: &Gateway,
    ctx: &Context,
    request: &str,
) -> Result<(String, Timestamp), String> {
    let hub = ctx.hub.as_ref().ok_or_else(|| NOT_CONFIGURED.to_owned())?;
    let name = config_map_name(gateway);
    if name.len() > 253 {
        return Err(format!(
            "the ConfigMap name {name} is longer than 253 characters"
        ));
    }
    let owner = gateway
        .controller_owner_ref(&())
        .ok_or_else(|| "the Gateway has no uid to own the ConfigMap".to_owned())?;
    let collected = ask(hub, &gateway_id(gateway)).await?;
    if collected.state_json.len() > MAX_DATA_BYTES {
        return Err(format!(
            "the gateway's state ({} bytes) does not fit a ConfigMap",
            collected.state_json.len()
        ));
    }
    let collected_at = Timestamp::now();

    let mut labels = BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "blockgate-diagnostics".to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            crate::FIELD_MANAGER.to_owned(),
        ),
    ]);
    // Label values are limited to 63 characters; the owner reference is the real link.
    for (key, value) in [
        ("blockgate.io/gateway", gateway.name_any()),
        (
            "blockgate.io/storage-gateway",
            gateway.spec.storage_gateway.clone(),
        ),
        ("blockgate.io/node", gateway.spec.node_name.clone()),
    ] {
        if value.len() <= 63 {
            labels.insert(key.to_owned(), value);
        }
    }
    let config_map = ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: gateway.namespace(),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([
                (REQUEST_ANNOTATION.to_owned(), request.to_owned()),
                (COLLECTED_AT_ANNOTATION.to_owned(), collected_at.to_string()),
            ])),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([
            (
                LOGS_KEY.to_owned(),
                logs_text(&collected.log_lines, collected.state_json.len()),
            ),
            (STATE_KEY.to_owned(), collected.state_json),
        ])),
        ..ConfigMap::default()
    };
    let api: Api<ConfigMap> =
        Api::namespaced(ctx.client.clone(), &gateway.namespace().unwrap_or_default());
    api.patch(
        &name,
        &PatchParams::apply(crate::FIELD_MANAGER).force(),
        &Patch::Apply(&config_map),
    )
    .await
    .map_err(|error| format!("cannot write ConfigMap {name}: {error}"))?;
    Ok((name, collected_at))
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::fixtures::{FakeApi, GATEWAYS};
    use crate::gateway::{FINALIZER, RefuseWhileAttached};
    use blockgate_operator_api::GatewaySpec;
    use blockgate_operator_control::{
        HubConfig, InMemoryRegistry, InMemoryReportSink, StaticPeers,
    };
    use blockgate_proto::control::v1::{
        CommandOutput, CommandResult, Diagnostics, Hello, OperatorMessage, operator_message,
    };
    use serde_json::{Value, json};
    use tokio::sync::mpsc;

    const CONFIG_MAPS: &str = "/api/v1/namespaces/blockgate-system/configmaps";
    const GATEWAY_ID: &str = "blockgate-system/fleet/node-1";

    fn hub() -> Arc<Hub> {
        Hub::new(
            HubConfig {
                replica: "op-a".into(),
                peer_tls: None,
                report_interval: Duration::from_secs(10),
            },
            Arc::new(InMemoryRegistry::new()),
            Arc::new(StaticPeers::new(Vec::new())),
            Arc::new(InMemoryReportSink::new()),
        )
    }

    /// The gateway of node-1 on an in-process hub, answering `CollectDiagnostics` with two
    /// log lines and its state. Returns the hub and the commands it received.
    async fn connected_gateway() -> (Arc<Hub>, Arc<Mutex<Vec<Command>>>) {
        let hub = hub();
        let (outbound, mut commands) = mpsc::channel(16);
        let hello = Hello {
            gateway_id: GATEWAY_ID.into(),
            node: "node-1".into(),
            version: "0.1.0".into(),
            ..Hello::default()
        };
        hub.connected(GATEWAY_ID, hello, outbound).await;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (gateway_hub, gateway_log) = (hub.clone(), log.clone());
        tokio::spawn(async move {
            while let Some(Ok(OperatorMessage {
                kind: Some(operator_message::Kind::Command(command)),
            })) = commands.recv().await
            {
                gateway_log.lock().unwrap().push(command.clone());
                let value = match command.kind {
                    Some(command::Kind::CollectDiagnostics(_)) => {
                        Some(command_output::Value::Diagnostics(Diagnostics {
                            log_lines: vec!["starting".into(), "volume pvc-1 attached".into()],
                            state_json: r#"{"volumes":["pvc-1"]}"#.into(),
                        }))
                    }
                    _ => None,
                };
                gateway_hub.complete(
                    GATEWAY_ID,
                    CommandResult {
                        id: command.id,
                        outcome: Some(command_result::Outcome::Ok(CommandOutput { value })),
                    },
                );
            }
        });
        (hub, log)
    }

    /// The Gateway of node-1 (finalizer already added), with a diagnostics request.
    fn insert_gateway(fake: &FakeApi, request: &str) {
        let mut gateway = Gateway::new(
            "fleet-node-1",
            GatewaySpec {
                storage_gateway: "fleet".into(),
                node_name: "node-1".into(),
                version: "0.1.0".into(),
            },
        );
        gateway.metadata.finalizers = Some(vec![FINALIZER.into()]);
        gateway.metadata.annotations = Some(BTreeMap::from([(
            REQUEST_ANNOTATION.to_owned(),
            request.to_owned(),
        )]));
        fake.insert(GATEWAYS, gateway);
    }

    fn annotate(fake: &FakeApi, request: &str) {
        fake.edit(GATEWAYS, "fleet-node-1", |g| {
            g["metadata"]["annotations"][REQUEST_ANNOTATION] = json!(request);
        });
    }

    async fn reconcile(fake: &FakeApi, ctx: &Arc<Context>) {
        let gateway: Gateway =
            serde_json::from_value(fake.get(GATEWAYS, "fleet-node-1").unwrap()).unwrap();
        crate::gateway::reconcile(Arc::new(gateway), ctx.clone())
            .await
            .unwrap();
    }

    fn status_of(fake: &FakeApi) -> Value {
        fake.get(GATEWAYS, "fleet-node-1").unwrap()["status"].clone()
    }

    fn context(client: kube::Client) -> Context {
        Context::new(client, Arc::default(), Arc::new(RefuseWhileAttached))
    }

    #[tokio::test]
    async fn a_request_collects_logs_and_state_into_a_config_map_owned_by_the_gateway() {
        let (hub, commands) = connected_gateway().await;
        let (client, fake) = FakeApi::client();
        let ctx = Arc::new(context(client).with_hub(hub));
        insert_gateway(&fake, "1");

        reconcile(&fake, &ctx).await;
        {
            let commands = commands.lock().unwrap();
            assert_eq!(commands.len(), 1);
            assert!(
                commands[0].deadline_unix_ms > 0,
                "the command has a deadline"
            );
            assert_eq!(
                commands[0].kind,
                Some(command::Kind::CollectDiagnostics(CollectDiagnostics {
                    log_lines: 1000
                }))
            );
        }
        let config_map = fake
            .get(CONFIG_MAPS, "fleet-node-1-diagnostics")
            .expect("the diagnostics ConfigMap");
        assert_eq!(
            config_map["data"][LOGS_KEY],
            "starting\nvolume pvc-1 attached\n"
        );
        assert_eq!(config_map["data"][STATE_KEY], r#"{"volumes":["pvc-1"]}"#);
        let owner = &config_map["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Gateway");
        assert_eq!(owner["name"], "fleet-node-1");
        assert_eq!(owner["uid"], "uid-fleet-node-1");
        let labels = &config_map["metadata"]["labels"];
        assert_eq!(labels["blockgate.io/gateway"], "fleet-node-1");
        assert_eq!(labels["blockgate.io/storage-gateway"], "fleet");
        assert_eq!(labels["blockgate.io/node"], "node-1");
        let annotations = &config_map["metadata"]["annotations"];
        assert_eq!(annotations[REQUEST_ANNOTATION], "1");
        assert!(annotations[COLLECTED_AT_ANNOTATION].is_string());

        let status = status_of(&fake);
        assert_eq!(status["diagnostics"]["request"], "1");
        assert_eq!(
            status["diagnostics"]["configMap"],
            "fleet-node-1-diagnostics"
        );
        assert!(status["diagnostics"]["collectedAt"].is_string());
        assert!(status["diagnostics"].get("error").is_none());
        // One status apply, by the reconciler, still carrying Ready.
        assert_eq!(status["conditions"][0]["type"], "Ready");
        let status_writes: Vec<_> = fake
            .served()
            .into_iter()
            .filter(|s| s.path.ends_with("/gateways/fleet-node-1/status"))
            .collect();
        assert_eq!(status_writes.len(), 1);
        assert_eq!(
            status_writes[0].field_manager.as_deref(),
            Some(crate::FIELD_MANAGER)
        );

        // The same value again: answered already, no second command.
        reconcile(&fake, &ctx).await;
        assert_eq!(commands.lock().unwrap().len(), 1);
        assert_eq!(status_of(&fake)["diagnostics"]["request"], "1");

        // A new value: collected again.
        annotate(&fake, "2");
        reconcile(&fake, &ctx).await;
        assert_eq!(commands.lock().unwrap().len(), 2);
        assert_eq!(status_of(&fake)["diagnostics"]["request"], "2");
        let config_map = fake.get(CONFIG_MAPS, "fleet-node-1-diagnostics").unwrap();
        assert_eq!(
            config_map["metadata"]["annotations"][REQUEST_ANNOTATION],
            "2"
        );
    }

    #[tokio::test]
    async fn a_gateway_that_is_not_connected_gets_an_error_and_no_config_map() {
        let (client, fake) = FakeApi::client();
        let ctx = Arc::new(context(client).with_hub(hub()));
        insert_gateway(&fake, "1");

        reconcile(&fake, &ctx).await;
        let status = status_of(&fake);
        assert_eq!(status["diagnostics"]["request"], "1");
        let error = status["diagnostics"]["error"].as_str().unwrap();
        assert!(error.contains("not connected"), "{error}");
        assert!(status["diagnostics"].get("configMap").is_none());
        assert!(fake.names(CONFIG_MAPS).is_empty());

        // Not retried for the same value: no second status write.
        let writes = |fake: &FakeApi| {
            fake.served()
                .iter()
                .filter(|s| s.path.ends_with("/status"))
                .count()
        };
        let before = writes(&fake);
        reconcile(&fake, &ctx).await;
        assert_eq!(status_of(&fake)["diagnostics"]["error"], error);
        assert_eq!(writes(&fake), before + 1, "only the Ready apply");
    }

    #[tokio::test]
    async fn without_a_control_channel_a_request_says_so() {
        let (client, fake) = FakeApi::client();
        let ctx = Arc::new(context(client));
        insert_gateway(&fake, "now");
        reconcile(&fake, &ctx).await;
        assert_eq!(status_of(&fake)["diagnostics"]["error"], NOT_CONFIGURED);
        assert!(fake.names(CONFIG_MAPS).is_empty());
    }

    #[test]
    fn logs_keep_the_most_recent_lines_that_fit() {
        let lines: Vec<String> = (0..3).map(|i| format!("line {i}")).collect();
        assert_eq!(logs_text(&lines, 0), "line 0\nline 1\nline 2\n");
        let text = logs_text(&lines, MAX_DATA_BYTES - 14);
        assert_eq!(
            text,
            "[1 older line(s) left out: a ConfigMap holds at most 1 MiB]\nline 1\nline 2\n"
        );
    }
}
