//! What the StorageGateway reconciler creates on each node: the `Gateway` object and the
//! gateway pod. Pure functions of the StorageGateway and the node, so that every field of the
//! pod (privileges, host paths, credentials) is checked by unit tests without an API server.
//!
//! The pod runs `blockgate-gateway serve --attach-only`: the control plane, not the gateway,
//! decides which volumes it serves.

use std::collections::BTreeMap;

use blockgate_operator_api::storage_gateway::StorageGateway;
use blockgate_operator_api::{Gateway, GatewaySpec};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, EnvVarSource, ExecAction, HostPathVolumeSource, LocalObjectReference, Node,
    Pod, PodSpec, Probe, ResourceRequirements, SecretKeySelector, SecurityContext, Taint,
    Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use kube::ResourceExt;

/// Where the gateway's data directory (volume state and write logs) is mounted in the pod.
pub const DATA_DIR: &str = "/var/lib/blockgate/data";
/// Where the cache host path is mounted in the pod.
pub const CACHE_DIR: &str = "/var/lib/blockgate/cache";
/// The gateway binary inside the image.
pub const GATEWAY_BINARY: &str = "blockgate-gateway";
/// The ConfigMap (in each StorageGateway's namespace) holding the control server's CA
/// certificate under `ca.crt`.
pub const CONTROL_CA_CONFIG_MAP: &str = "blockgate-control-ca";
/// Where the gateway pod mounts the CA ConfigMap.
pub const CONTROL_CA_DIR: &str = "/etc/blockgate/ca";
/// Where the gateway pod mounts its activation Secret.
pub const ACTIVATION_DIR: &str = "/etc/blockgate/activation";
/// Longest object name Kubernetes accepts (a DNS subdomain).
const MAX_NAME_LENGTH: usize = 253;

/// The Gateway object's name for a node: `<storagegateway>-<node>`.
pub fn gateway_name(storage_gateway: &str, node: &str) -> String {
    format!("{storage_gateway}-{node}")
}

/// The gateway pod's name for a node: `<storagegateway>-gw-<node>`.
pub fn pod_name(storage_gateway: &str, node: &str) -> String {
    format!("{storage_gateway}-gw-{node}")
}

/// Whether the names derived for this node fit Kubernetes' limit; the pod's is the longer.
pub fn names_fit(storage_gateway: &str, node: &str) -> bool {
    pod_name(storage_gateway, node).len() <= MAX_NAME_LENGTH
}

/// An owner reference making `owner` the controller of what it is put on, so deleting the
/// owner garbage-collects it and the controller's watch maps changes back to the owner.
pub fn controller_reference<K: Resource<DynamicType = ()>>(owner: &K) -> Option<OwnerReference> {
    owner.controller_owner_ref(&())
}

/// Whether a node gets a gateway: its labels include every `nodeSelector` pair, and every
/// taint that keeps pods off (`NoSchedule`, `NoExecute`) is tolerated. `spec.unschedulable`
/// (a cordon) is deliberately ignored, as DaemonSets do: cordoning a node for maintenance must
/// not tear down the data path of the volumes still attached there.
pub fn node_matches(storage_gateway: &StorageGateway, node: &Node) -> bool {
    let labels = node.labels();
    let selected = storage_gateway
        .spec
        .node_selector
        .iter()
        .all(|(key, value)| labels.get(key) == Some(value));
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default();
    selected
        && taints
            .iter()
            .filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute")
            .all(|t| tolerated(t, &storage_gateway.spec.tolerations))
}

/// Kubernetes' toleration rule: an empty key with `Exists` tolerates everything; otherwise
/// keys must be equal, the value must match (`Equal`, the default) or be ignored (`Exists`),
/// and an empty effect matches every effect.
fn tolerated(taint: &Taint, tolerations: &[Toleration]) -> bool {
    tolerations.iter().any(|t| {
        let key = t.key.as_deref().unwrap_or("");
        let exists = t.operator.as_deref() == Some("Exists");
        let effect_ok = t
            .effect
            .as_deref()
            .is_none_or(|e| e.is_empty() || e == taint.effect);
        if !effect_ok {
            return false;
        }
        if key.is_empty() {
            return exists;
        }
        key == taint.key
            && (exists || t.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""))
    })
}

/// The Gateway object for a node, as the reconciler applies it. `version` is the one the
/// Gateway already has, if any: after creation only a rollout moves it (design §7), so a new
/// `spec.version` does not restart every gateway at once.
pub fn gateway_for_node(
    storage_gateway: &StorageGateway,
    node: &str,
    existing_version: Option<&str>,
) -> Gateway {
    let name = storage_gateway.name_any();
    let mut gateway = Gateway::new(
        &gateway_name(&name, node),
        GatewaySpec {
            storage_gateway: name,
            node_name: node.to_owned(),
            version: existing_version
                .unwrap_or(&storage_gateway.spec.version)
                .to_owned(),
        },
    );
    gateway.metadata.namespace = storage_gateway.namespace();
    gateway.metadata.owner_references = controller_reference(storage_gateway).map(|r| vec![r]);
    gateway
}

/// Everything about a pod that cannot be computed without resolving sizes first.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// A size of the spec did not parse (`validate()` should have caught it).
    #[error("{field}")]
    Size {
        /// The field.
        field: &'static str,
        /// Why.
        #[source]
        source: blockgate_operator_api::quantity::QuantityError,
    },
}

/// The gateway pod for the node of `gateway`, owned by the Gateway.
///
/// Privileges: the container is privileged because attaching a volume creates a kernel NBD
/// device through netlink (`CAP_SYS_ADMIN`) and opens `/dev/nbdN`, which needs the device
/// cgroup to allow block major 43; Kubernetes has no way to grant a device-cgroup rule short
/// of `privileged`. Host `/dev` is mounted because NBD devices the kernel creates after the
/// container started do not appear in a container's own `/dev`. Nothing else of the host is
/// shared: no host network (the gateway dials out and listens only on loopback and unix
/// sockets), no host PID or IPC namespace, and the root filesystem is read-only.
///
/// There is no liveness probe on purpose: restarting a slow gateway under attached volumes
/// hurts more than it heals (the kernel holds I/O while the gateway is away, up to a timeout).
pub fn gateway_pod(storage_gateway: &StorageGateway, gateway: &Gateway) -> Result<Pod, PodError> {
    let spec = &storage_gateway.spec;
    let store = &spec.object_store;
    let log_bytes = spec.write_log_bytes().map_err(|source| PodError::Size {
        field: "spec.writeLog.size",
        source,
    })?;
    let cache_bytes = spec.cache_bytes().map_err(|source| PodError::Size {
        field: "spec.cache.size",
        source,
    })?;

    let prefix = store.prefix.as_deref().unwrap_or("").trim_matches('/');
    let location = if prefix.is_empty() {
        format!("s3://{}", store.bucket)
    } else {
        format!("s3://{}/{prefix}", store.bucket)
    };
    let mut args: Vec<String> = vec![
        "serve".into(),
        "--attach-only".into(),
        "--data-dir".into(),
        DATA_DIR.into(),
        "--store".into(),
        location,
    ];
    if let Some(endpoint) = &store.endpoint {
        args.extend(["--s3-endpoint".into(), endpoint.clone()]);
    }
    args.extend(["--s3-region".into(), store.region.clone()]);
    if store.force_path_style {
        args.push("--s3-path-style".into());
    }
    args.extend([
        "--log-capacity".into(),
        log_bytes.to_string(),
        "--cache-capacity".into(),
        cache_bytes.to_string(),
        "--log-format".into(),
        "json".into(),
    ]);

    let credentials = &store.credentials_secret;
    // The credentials stay in the Secret: the pod spec names the Secret and key only.
    let secret_env = |name: &str, key: &str| EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: credentials.name.clone(),
                key: key.into(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    };

    let host_path = |name: &str, path: &str, kind: &str| Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some(kind.into()),
        }),
        ..Volume::default()
    };
    let mount = |name: &str, path: &str| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        ..VolumeMount::default()
    };

    let sg_name = storage_gateway.name_any();
    let node = &gateway.spec.node_name;
    let mut labels = BTreeMap::from([
        (
            crate::GATEWAY_POD_LABEL.0.to_owned(),
            crate::GATEWAY_POD_LABEL.1.to_owned(),
        ),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            crate::FIELD_MANAGER.to_owned(),
        ),
    ]);
    // Label values are limited to 63 characters; the owner reference is the real link.
    if sg_name.len() <= 63 {
        labels.insert("blockgate.io/storage-gateway".into(), sg_name.clone());
    }

    Ok(Pod {
        metadata: ObjectMeta {
            name: Some(pod_name(&sg_name, node)),
            namespace: storage_gateway.namespace(),
            labels: Some(labels),
            owner_references: controller_reference(gateway).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            // Pinned: the gateway serves this node's kernel, and a scheduler decision could
            // only put it somewhere useless.
            node_name: Some(node.clone()),
            tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
            image_pull_secrets: (!spec.image_pull_secrets.is_empty()).then(|| {
                spec.image_pull_secrets
                    .iter()
                    .map(|s| LocalObjectReference {
                        name: s.name.clone(),
                    })
                    .collect()
            }),
            // The gateway needs no Kubernetes API access.
            automount_service_account_token: Some(false),
            containers: vec![Container {
                name: "gateway".into(),
                image: Some(format!("{}:{}", spec.image, gateway.spec.version)),
                command: Some(vec![GATEWAY_BINARY.into()]),
                args: Some(args),
                env: Some(vec![
                    secret_env("AWS_ACCESS_KEY_ID", &credentials.access_key_id_key),
                    secret_env("AWS_SECRET_ACCESS_KEY", &credentials.secret_access_key_key),
                ]),
                security_context: Some(SecurityContext {
                    privileged: Some(true),
                    read_only_root_filesystem: Some(true),
                    run_as_user: Some(0),
                    ..SecurityContext::default()
                }),
                resources: Some(ResourceRequirements {
                    // Requests only: a memory limit would let the OOM killer take the data
                    // path down under attached volumes.
                    requests: Some(BTreeMap::from([
                        ("cpu".to_owned(), Quantity("250m".into())),
                        ("memory".to_owned(), Quantity("256Mi".into())),
                    ])),
                    ..ResourceRequirements::default()
                }),
                readiness_probe: Some(Probe {
                    // Answers only once the admin socket serves, i.e. volumes can be attached.
                    exec: Some(ExecAction {
                        command: Some(vec![
                            GATEWAY_BINARY.into(),
                            "volume".into(),
                            "list".into(),
                            "--data-dir".into(),
                            DATA_DIR.into(),
                        ]),
                    }),
                    period_seconds: Some(10),
                    timeout_seconds: Some(5),
                    failure_threshold: Some(3),
                    ..Probe::default()
                }),
                volume_mounts: Some(vec![
                    mount("data", DATA_DIR),
                    mount("cache", CACHE_DIR),
                    mount("dev", "/dev"),
                ]),
                ..Container::default()
            }],
            volumes: Some(vec![
                // The write log path is the gateway's data directory: per-volume state and
                // write log live side by side there and must be equally durable.
                host_path("data", &spec.write_log.path, "DirectoryOrCreate"),
                host_path("cache", &spec.cache.path, "DirectoryOrCreate"),
                host_path("dev", "/dev", "Directory"),
            ]),
            ..PodSpec::default()
        }),
        status: None,
    })
}

/// Adds the control channel to a gateway pod: the flags of `blockgate-gateway serve`
/// (endpoint, CA, token file, StorageGateway, node name from the downward API), the CA
/// ConfigMap and the activation Secret as read-only volumes.
pub fn add_control(
    pod: &mut Pod,
    control: &crate::context::ControlSettings,
    storage_gateway: &StorageGateway,
    gateway: &Gateway,
) {
    let Some(spec) = pod.spec.as_mut() else {
        return;
    };
    let Some(container) = spec.containers.first_mut() else {
        return;
    };
    container.args.get_or_insert_with(Vec::new).extend([
        "--control-endpoint".to_owned(),
        control.endpoint.clone(),
        "--control-ca".to_owned(),
        format!("{CONTROL_CA_DIR}/{}", crate::control_ca::CA_CERTIFICATE_KEY),
        "--activation-token-file".to_owned(),
        format!("{ACTIVATION_DIR}/{}", crate::activation::TOKEN_KEY),
        "--storage-gateway".to_owned(),
        format!(
            "{}/{}",
            storage_gateway.namespace().unwrap_or_default(),
            storage_gateway.name_any()
        ),
        "--node-name".to_owned(),
        "$(NODE_NAME)".to_owned(),
    ]);
    container.env.get_or_insert_with(Vec::new).push(EnvVar {
        name: "NODE_NAME".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(k8s_openapi::api::core::v1::ObjectFieldSelector {
                field_path: "spec.nodeName".into(),
                ..Default::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    });
    let mounts = container.volume_mounts.get_or_insert_with(Vec::new);
    for (name, path) in [
        ("control-ca", CONTROL_CA_DIR),
        ("activation", ACTIVATION_DIR),
    ] {
        mounts.push(VolumeMount {
            name: name.into(),
            mount_path: path.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    }
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    volumes.push(Volume {
        name: "control-ca".into(),
        config_map: Some(k8s_openapi::api::core::v1::ConfigMapVolumeSource {
            name: CONTROL_CA_CONFIG_MAP.into(),
            ..Default::default()
        }),
        ..Volume::default()
    });
    volumes.push(Volume {
        name: "activation".into(),
        secret: Some(k8s_openapi::api::core::v1::SecretVolumeSource {
            secret_name: Some(crate::activation::secret_name(&gateway.name_any())),
            // Owner-only: the token is a secret.
            default_mode: Some(0o400),
            ..Default::default()
        }),
        ..Volume::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{node, storage_gateway};

    #[test]
    fn nodes_match_on_every_selector_label_and_tolerated_taints() {
        let sg = storage_gateway("fleet");
        assert!(node_matches(
            &sg,
            &node("a", &[("blockgate.io/gateway", "true")], &[])
        ));
        assert!(!node_matches(
            &sg,
            &node("b", &[("blockgate.io/gateway", "no")], &[])
        ));
        assert!(!node_matches(&sg, &node("c", &[], &[])));
        // The fixture tolerates storage=dedicated:NoSchedule.
        let labels = &[("blockgate.io/gateway", "true")];
        assert!(node_matches(
            &sg,
            &node("d", labels, &[("storage", "dedicated", "NoSchedule")])
        ));
        assert!(!node_matches(
            &sg,
            &node("e", labels, &[("storage", "other", "NoSchedule")])
        ));
        assert!(!node_matches(
            &sg,
            &node("f", labels, &[("gpu", "", "NoExecute")])
        ));
        // PreferNoSchedule keeps nothing off.
        assert!(node_matches(
            &sg,
            &node("g", labels, &[("gpu", "", "PreferNoSchedule")])
        ));
    }

    #[test]
    fn an_exists_toleration_without_key_tolerates_every_taint() {
        let mut sg = storage_gateway("fleet");
        sg.spec.tolerations = vec![Toleration {
            operator: Some("Exists".into()),
            ..Toleration::default()
        }];
        let labels = &[("blockgate.io/gateway", "true")];
        assert!(node_matches(
            &sg,
            &node("a", labels, &[("x", "y", "NoExecute")])
        ));
    }

    #[test]
    fn the_pod_is_pinned_privileged_only_as_needed_and_reads_credentials_from_the_secret() {
        let sg = storage_gateway("fleet");
        let gateway = gateway_for_node(&sg, "node-a", None);
        let pod = gateway_pod(&sg, &gateway).unwrap();
        assert_eq!(pod.metadata.name.as_deref(), Some("fleet-gw-node-a"));
        let spec = pod.spec.unwrap();
        assert_eq!(spec.node_name.as_deref(), Some("node-a"));
        assert_eq!(spec.host_network, None);
        assert_eq!(spec.host_pid, None);
        assert_eq!(spec.host_ipc, None);
        let container = &spec.containers[0];
        assert_eq!(
            container.image.as_deref(),
            Some("ghcr.io/blockgate/gateway:0.1.0")
        );
        let security = container.security_context.as_ref().unwrap();
        assert_eq!(security.privileged, Some(true));
        assert_eq!(security.read_only_root_filesystem, Some(true));
        let env = container.env.as_ref().unwrap();
        for (name, key) in [
            ("AWS_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
            ("AWS_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
        ] {
            let var = env.iter().find(|v| v.name == name).unwrap();
            assert_eq!(var.value, None, "{name} must not be a literal");
            let reference = var
                .value_from
                .as_ref()
                .unwrap()
                .secret_key_ref
                .as_ref()
                .unwrap();
            assert_eq!(reference.name, "s3-credentials");
            assert_eq!(reference.key, key);
        }
        let paths: Vec<_> = spec
            .volumes
            .unwrap()
            .into_iter()
            .map(|v| v.host_path.unwrap().path)
            .collect();
        assert_eq!(
            paths,
            [
                "/var/lib/blockgate/write-log",
                "/var/lib/blockgate/cache",
                "/dev"
            ]
        );
    }

    #[test]
    fn the_arguments_name_the_store_its_settings_and_the_capacities_in_bytes() {
        let mut sg = storage_gateway("fleet");
        let gateway = gateway_for_node(&sg, "n", None);
        let args = gateway_pod(&sg, &gateway).unwrap().spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap();
        assert_eq!(
            args.join(" "),
            "serve --attach-only --data-dir /var/lib/blockgate/data \
             --store s3://blockgate-volumes/clusters/prod \
             --s3-endpoint https://s3.example.com:9000 --s3-region us-east-1 --s3-path-style \
             --log-capacity 68719476736 --cache-capacity 274877906944 --log-format json"
        );
        sg.spec.object_store.prefix = None;
        sg.spec.object_store.endpoint = None;
        sg.spec.object_store.force_path_style = false;
        let args = gateway_pod(&sg, &gateway).unwrap().spec.unwrap().containers[0]
            .args
            .clone()
            .unwrap()
            .join(" ");
        assert!(args.contains("--store s3://blockgate-volumes --s3-region us-east-1 --log"));
        assert!(!args.contains("--s3-endpoint"));
        assert!(!args.contains("--s3-path-style"));
    }

    #[test]
    fn an_existing_gateway_keeps_its_version_until_a_rollout_moves_it() {
        let mut sg = storage_gateway("fleet");
        sg.spec.version = "0.2.0".into();
        assert_eq!(gateway_for_node(&sg, "n", None).spec.version, "0.2.0");
        assert_eq!(
            gateway_for_node(&sg, "n", Some("0.1.0")).spec.version,
            "0.1.0"
        );
    }
}
