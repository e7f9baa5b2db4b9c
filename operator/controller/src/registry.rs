//! Which replica holds which gateway's stream, on Kubernetes: a Lease per gateway
//! (`blockgate-gw-<gateway>` in the gateway's namespace, holderIdentity = the replica's pod
//! name), renewed while the stream lives; and the other replicas, from the operator's own
//! pods (listed by label; their IPs, with the Service name checked in their certificates).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use blockgate_operator_control::{Hub, Peer, Peers, Registry, RegistryError};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};

/// A holder Lease not renewed for this long is stale: its replica is gone. Three renewals
/// ([`HOLDER_RENEW_INTERVAL`]) may fail before a live holder looks stale.
pub const HOLDER_LEASE_DURATION: Duration = Duration::from_secs(90);
/// How often a replica renews the Leases of the streams it holds.
pub const HOLDER_RENEW_INTERVAL: Duration = Duration::from_secs(30);

/// The Lease name for a gateway id `namespace/storage-gateway/node`: the Gateway object's
/// name with a prefix, in the gateway's namespace.
fn lease_of(gateway: &str) -> Result<(String, String), RegistryError> {
    let mut parts = gateway.splitn(3, '/');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(namespace), Some(storage_gateway), Some(node)) => Ok((
            namespace.to_owned(),
            format!(
                "blockgate-gw-{}",
                crate::pod::gateway_name(storage_gateway, node)
            ),
        )),
        _ => Err(RegistryError(format!("{gateway:?} is not a gateway id"))),
    }
}

/// [`Registry`] on Leases.
#[derive(Clone)]
pub struct LeaseRegistry {
    client: Client,
}

impl std::fmt::Debug for LeaseRegistry {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LeaseRegistry")
            .finish_non_exhaustive()
    }
}

fn unavailable(error: kube::Error) -> RegistryError {
    RegistryError(error.to_string())
}

impl LeaseRegistry {
    pub fn new(client: Client) -> LeaseRegistry {
        LeaseRegistry { client }
    }

    /// Renews the Leases of the gateways `hub` holds, every [`HOLDER_RENEW_INTERVAL`],
    /// until the task is dropped.
    pub async fn renew_held(self, hub: Arc<Hub>) {
        loop {
            tokio::time::sleep(HOLDER_RENEW_INTERVAL).await;
            for gateway in hub.held() {
                if let Err(error) = self.record_holder(&gateway, hub.replica()).await {
                    tracing::warn!(gateway, %error, "cannot renew the gateway's holder Lease");
                }
            }
        }
    }
}

fn seconds(duration: Duration) -> i32 {
    i32::try_from(duration.as_secs()).unwrap_or(i32::MAX)
}

#[async_trait::async_trait]
impl Registry for LeaseRegistry {
    async fn record_holder(&self, gateway: &str, replica: &str) -> Result<(), RegistryError> {
        let (namespace, name) = lease_of(gateway)?;
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &namespace);
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    crate::FIELD_MANAGER.to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(replica.to_owned()),
                lease_duration_seconds: Some(seconds(HOLDER_LEASE_DURATION)),
                renew_time: Some(MicroTime(Timestamp::now())),
                ..LeaseSpec::default()
            }),
        };
        // Server-side apply: the last replica to say hello wins, which is what happened.
        api.patch(
            &name,
            &PatchParams::apply("blockgate-operator-registry").force(),
            &Patch::Apply(&lease),
        )
        .await
        .map_err(unavailable)?;
        Ok(())
    }

    async fn holder(&self, gateway: &str) -> Result<Option<String>, RegistryError> {
        let (namespace, name) = lease_of(gateway)?;
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &namespace);
        let Some(lease) = api.get_opt(&name).await.map_err(unavailable)? else {
            return Ok(None);
        };
        let spec = lease.spec.unwrap_or_default();
        let duration = spec
            .lease_duration_seconds
            .map_or(HOLDER_LEASE_DURATION, |s| {
                Duration::from_secs(u64::try_from(s).unwrap_or(0))
            });
        let fresh = spec.renew_time.is_some_and(|renewed| {
            SignedDuration::try_from(duration)
                .ok()
                .and_then(|duration| renewed.0.checked_add(duration).ok())
                .is_some_and(|expires| expires > Timestamp::now())
        });
        Ok(spec.holder_identity.filter(|_| fresh))
    }

    async fn release(&self, gateway: &str, replica: &str) -> Result<(), RegistryError> {
        let (namespace, name) = lease_of(gateway)?;
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &namespace);
        let Some(mut lease) = api.get_opt(&name).await.map_err(unavailable)? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(replica) {
            return Ok(());
        }
        spec.holder_identity = None;
        // Checked against the resourceVersion read: a replica that took the gateway over
        // meanwhile keeps it.
        match api.replace(&name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(error) => Err(unavailable(error)),
        }
    }
}

/// [`Peers`] from the operator's pods: every running pod with the operator's labels but
/// this one, at `https://<pod IP>:<port>`.
#[derive(Clone)]
pub struct PodPeers {
    pods: Api<Pod>,
    selector: String,
    replica: String,
    port: u16,
}

impl std::fmt::Debug for PodPeers {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PodPeers")
            .field("selector", &self.selector)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl PodPeers {
    /// Peers among `pods` matching the label `selector`, excluding `replica` (this pod).
    pub fn new(pods: Api<Pod>, selector: String, replica: String, port: u16) -> PodPeers {
        PodPeers {
            pods,
            selector,
            replica,
            port,
        }
    }
}

#[async_trait::async_trait]
impl Peers for PodPeers {
    async fn peers(&self) -> Vec<Peer> {
        let pods = match self
            .pods
            .list(&ListParams::default().labels(&self.selector))
            .await
        {
            Ok(pods) => pods.items,
            Err(error) => {
                tracing::warn!(%error, "cannot list the operator's pods to find its peers");
                return Vec::new();
            }
        };
        pods.into_iter()
            .filter(|pod| {
                pod.name_any() != self.replica && pod.metadata.deletion_timestamp.is_none()
            })
            .filter_map(|pod| {
                let ip = pod.status.as_ref()?.pod_ip.clone()?;
                let host = if ip.contains(':') {
                    format!("[{ip}]")
                } else {
                    ip
                };
                Some(Peer {
                    replica: pod.name_any(),
                    endpoint: format!("https://{host}:{}", self.port),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{FakeApi, LEASES, PODS};
    use serde_json::json;

    #[tokio::test]
    async fn a_holder_lease_names_the_replica_until_released_or_stale() {
        let (client, fake) = FakeApi::client();
        let registry = LeaseRegistry::new(client);
        let gateway = "blockgate-system/fleet/node-1";
        assert_eq!(registry.holder(gateway).await.unwrap(), None);
        registry.record_holder(gateway, "op-a").await.unwrap();
        assert_eq!(
            registry.holder(gateway).await.unwrap().as_deref(),
            Some("op-a")
        );
        assert!(
            fake.names(LEASES)
                .contains(&"blockgate-gw-fleet-node-1".to_owned())
        );
        registry.record_holder(gateway, "op-b").await.unwrap();
        registry.release(gateway, "op-a").await.unwrap();
        assert_eq!(
            registry.holder(gateway).await.unwrap().as_deref(),
            Some("op-b")
        );
        fake.edit(LEASES, "blockgate-gw-fleet-node-1", |lease| {
            lease["spec"]["renewTime"] = json!("2020-01-01T00:00:00.000000Z");
        });
        assert_eq!(registry.holder(gateway).await.unwrap(), None);
        registry.record_holder(gateway, "op-b").await.unwrap();
        registry.release(gateway, "op-b").await.unwrap();
        assert_eq!(registry.holder(gateway).await.unwrap(), None);
        assert!(registry.holder("not-an-id").await.is_err());
    }

    #[tokio::test]
    async fn peers_are_the_other_running_operator_pods() {
        let (client, fake) = FakeApi::client();
        for (name, ip) in [
            ("op-a", Some("10.0.0.1")),
            ("op-b", Some("10.0.0.2")),
            ("op-c", None),
        ] {
            let mut pod = json!({
                "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "blockgate-operator"}},
            });
            if let Some(ip) = ip {
                pod["status"] = json!({"podIP": ip});
            }
            fake.insert(PODS, pod);
        }
        fake.insert(PODS, json!({"metadata": {"name": "other", "labels": {"app": "x"}}, "status": {"podIP": "10.0.0.9"}}));
        let peers = PodPeers::new(
            Api::namespaced(client, "blockgate-system"),
            "app.kubernetes.io/name=blockgate-operator".to_owned(),
            "op-a".to_owned(),
            9443,
        );
        assert_eq!(
            peers.peers().await,
            vec![Peer {
                replica: "op-b".to_owned(),
                endpoint: "https://10.0.0.2:9443".to_owned(),
            }]
        );
    }
}
