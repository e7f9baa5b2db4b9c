//! One-time activation tokens kept in Secrets: the StorageGateway reconciler makes one per
//! Gateway (`<gateway>-activation`), the gateway pod mounts it, and the control server's
//! [`SecretTokenStore`] consumes it when the gateway activates.
//!
//! The plain token is only in the Secret's data (what the pod mounts); the store finds a
//! token by its SHA-256 digest, kept in an annotation. Consuming is an update checked
//! against the Secret's resourceVersion, so two replicas can never both consume one token.
//! Nothing here logs a token.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use blockgate_operator_api::Gateway;
use blockgate_operator_control::{
    ActivationGrant, TokenError, TokenStore, generate_token, token_digest,
};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, PostParams};
use kube::{Api, Client, ResourceExt};

/// Key of the token in the Secret's data; the file name the gateway reads.
pub const TOKEN_KEY: &str = "token";
/// Label (value `true`) on every activation Secret, for listing them.
pub const ACTIVATION_LABEL: &str = "blockgate.io/activation-token";
/// Annotation: the token's SHA-256 digest (hex).
pub const DIGEST_ANNOTATION: &str = "blockgate.io/token-sha256";
/// Annotation: the StorageGateway (`namespace/name`) the token activates a gateway of.
pub const STORAGE_GATEWAY_ANNOTATION: &str = "blockgate.io/storage-gateway";
/// Annotation: when the token stops being accepted (RFC 3339).
pub const EXPIRES_ANNOTATION: &str = "blockgate.io/expires-at";
/// Annotation: when the token was consumed (RFC 3339); absent while unused.
pub const USED_ANNOTATION: &str = "blockgate.io/used-at";
/// A day: long enough for an image pull on a slow node or a pod stuck on scheduling, short
/// enough that a leaked token is soon worthless. An expired unused token is replaced.
pub const TOKEN_VALIDITY: Duration = Duration::from_secs(24 * 3600);

/// Consuming retries this often when another writer changed the Secret in between.
const CONSUME_ATTEMPTS: usize = 3;

/// The name of a Gateway's activation Secret.
pub fn secret_name(gateway: &str) -> String {
    format!("{gateway}-activation")
}

fn annotation<'a>(secret: &'a Secret, key: &str) -> Option<&'a str> {
    secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|annotations| annotations.get(key))
        .map(String::as_str)
}

fn expires_at(secret: &Secret) -> Option<SystemTime> {
    let timestamp: Timestamp = annotation(secret, EXPIRES_ANNOTATION)?.parse().ok()?;
    Some(SystemTime::from(timestamp))
}

/// Whether the Secret's token can still activate a gateway.
fn usable(secret: &Secret, now: SystemTime) -> bool {
    annotation(secret, USED_ANNOTATION).is_none() && expires_at(secret).is_some_and(|at| now < at)
}

/// A new activation Secret for `gateway` with a fresh token valid for `validity`.
pub fn activation_secret(gateway: &Gateway, validity: Duration) -> Secret {
    let token = generate_token();
    let namespace = gateway.namespace().unwrap_or_default();
    let expires = Timestamp::now()
        .checked_add(validity)
        .unwrap_or(Timestamp::MAX);
    let storage_gateway = &gateway.spec.storage_gateway;
    let labels = BTreeMap::from([
        (
            "app.kubernetes.io/managed-by".to_owned(),
            crate::FIELD_MANAGER.to_owned(),
        ),
        (ACTIVATION_LABEL.to_owned(), "true".to_owned()),
    ]);
    Secret {
        metadata: ObjectMeta {
            name: Some(secret_name(&gateway.name_any())),
            namespace: Some(namespace.clone()),
            labels: Some(labels),
            annotations: Some(BTreeMap::from([
                (DIGEST_ANNOTATION.to_owned(), token_digest(&token)),
                (
                    STORAGE_GATEWAY_ANNOTATION.to_owned(),
                    format!("{namespace}/{storage_gateway}"),
                ),
                (EXPIRES_ANNOTATION.to_owned(), expires.to_string()),
            ])),
            owner_references: crate::pod::controller_reference(gateway).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            TOKEN_KEY.to_owned(),
            ByteString(token.into_bytes()),
        )])),
        ..Secret::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ActivationSecretError {
    #[error("cannot read Secret {name}")]
    Read {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot write Secret {name}")]
    Write {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Makes sure `gateway` has an activation Secret: creates it when missing, and replaces the
/// token when it expired unused (the pod's mounted file follows the Secret). A used token's
/// Secret is left alone: that gateway holds its certificate.
pub async fn ensure_activation_secret(
    api: &Api<Secret>,
    gateway: &Gateway,
    validity: Duration,
) -> Result<(), ActivationSecretError> {
    let name = secret_name(&gateway.name_any());
    let existing = api
        .get_opt(&name)
        .await
        .map_err(|source| ActivationSecretError::Read {
            name: name.clone(),
            source,
        })?;
    let write = |source| ActivationSecretError::Write {
        name: name.clone(),
        source,
    };
    match existing {
        None => match api
            .create(
                &PostParams::default(),
                &activation_secret(gateway, validity),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(gateway = %gateway.name_any(), secret = %name, "created an activation token");
                Ok(())
            }
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
            Err(source) => Err(write(source)),
        },
        Some(secret)
            if annotation(&secret, USED_ANNOTATION).is_none()
                && !usable(&secret, SystemTime::now()) =>
        {
            let mut fresh = activation_secret(gateway, validity);
            fresh.metadata.resource_version = secret.metadata.resource_version.clone();
            match api.replace(&name, &PostParams::default(), &fresh).await {
                Ok(_) => {
                    tracing::info!(gateway = %gateway.name_any(), secret = %name, "replaced an expired activation token");
                    Ok(())
                }
                // Changed meanwhile (consumed, or replaced by another reconcile): next time.
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
                Err(source) => Err(write(source)),
            }
        }
        Some(_) => Ok(()),
    }
}

/// [`TokenStore`] over the activation Secrets.
#[derive(Clone)]
pub struct SecretTokenStore {
    client: Client,
}

impl std::fmt::Debug for SecretTokenStore {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SecretTokenStore")
            .finish_non_exhaustive()
    }
}

impl SecretTokenStore {
    pub fn new(client: Client) -> SecretTokenStore {
        SecretTokenStore { client }
    }

    /// The activation Secret holding the token with `digest`, among the namespace's
    /// activation Secrets (one per gateway: a short list).
    async fn find(&self, api: &Api<Secret>, digest: &str) -> Result<Option<Secret>, TokenError> {
        let secrets = api
            .list(&ListParams::default().labels(&format!("{ACTIVATION_LABEL}=true")))
            .await
            .map_err(|error| TokenError::Unavailable(error.to_string()))?;
        Ok(secrets
            .items
            .into_iter()
            .find(|secret| annotation(secret, DIGEST_ANNOTATION) == Some(digest)))
    }
}

#[async_trait::async_trait]
impl TokenStore for SecretTokenStore {
    async fn check_and_consume(
        &self,
        token: &str,
        storage_gateway: &str,
    ) -> Result<ActivationGrant, TokenError> {
        let Some((namespace, _)) = storage_gateway.split_once('/') else {
            return Err(TokenError::WrongStorageGateway);
        };
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let digest = token_digest(token);
        for _ in 0..CONSUME_ATTEMPTS {
            let Some(mut secret) = self.find(&api, &digest).await? else {
                return Err(TokenError::Unknown);
            };
            if annotation(&secret, USED_ANNOTATION).is_some() {
                return Err(TokenError::Used);
            }
            if expires_at(&secret).is_none_or(|at| SystemTime::now() >= at) {
                return Err(TokenError::Expired);
            }
            if annotation(&secret, STORAGE_GATEWAY_ANNOTATION) != Some(storage_gateway) {
                return Err(TokenError::WrongStorageGateway);
            }
            secret
                .metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(USED_ANNOTATION.to_owned(), Timestamp::now().to_string());
            let secret_name = secret.name_any();
            // The update carries the resourceVersion read above: a replica that consumed the
            // token meanwhile makes this a conflict, and the re-read sees it used.
            match api
                .replace(&secret_name, &PostParams::default(), &secret)
                .await
            {
                Ok(_) => {
                    tracing::info!(secret = %secret_name, "activation token consumed");
                    return Ok(ActivationGrant {
                        storage_gateway: storage_gateway.to_owned(),
                    });
                }
                Err(kube::Error::Api(status)) if status.code == 409 => continue,
                Err(error) => return Err(TokenError::Unavailable(error.to_string())),
            }
        }
        Err(TokenError::Unavailable(
            "the activation Secret kept changing while being consumed".to_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{FakeApi, SECRETS};

    fn gateway() -> Gateway {
        let storage_gateway = crate::fixtures::storage_gateway("fleet");
        crate::pod::gateway_for_node(&storage_gateway, "node-1", None)
    }

    fn token_of(fake: &FakeApi) -> String {
        let secret = fake.get(SECRETS, "fleet-node-1-activation").unwrap();
        let secret: Secret = serde_json::from_value(secret).unwrap();
        String::from_utf8(secret.data.unwrap()[TOKEN_KEY].0.clone()).unwrap()
    }

    #[tokio::test]
    async fn a_token_activates_once_and_is_stored_hashed() {
        let (client, fake) = FakeApi::client();
        let api: Api<Secret> = Api::namespaced(client.clone(), "blockgate-system");
        ensure_activation_secret(&api, &gateway(), TOKEN_VALIDITY)
            .await
            .unwrap();
        let token = token_of(&fake);
        let stored = fake.get(SECRETS, "fleet-node-1-activation").unwrap();
        assert_eq!(
            stored["metadata"]["annotations"][DIGEST_ANNOTATION],
            token_digest(&token)
        );
        assert!(
            !stored["metadata"]["annotations"]
                .to_string()
                .contains(&token)
        );

        let store = SecretTokenStore::new(client.clone());
        assert_eq!(
            store
                .check_and_consume(&token, "blockgate-system/other")
                .await,
            Err(TokenError::WrongStorageGateway)
        );
        assert_eq!(
            store
                .check_and_consume(&token, "blockgate-system/fleet")
                .await
                .unwrap()
                .storage_gateway,
            "blockgate-system/fleet"
        );
        assert_eq!(
            store
                .check_and_consume(&token, "blockgate-system/fleet")
                .await,
            Err(TokenError::Used)
        );
        assert_eq!(
            store
                .check_and_consume("not-a-token", "blockgate-system/fleet")
                .await,
            Err(TokenError::Unknown)
        );
        // A used token is not replaced: that gateway holds its certificate.
        ensure_activation_secret(&api, &gateway(), TOKEN_VALIDITY)
            .await
            .unwrap();
        assert_eq!(token_of(&fake), token);
    }

    #[tokio::test]
    async fn two_replicas_consuming_at_once_activate_one_gateway() {
        let (client, fake) = FakeApi::client();
        let api: Api<Secret> = Api::namespaced(client.clone(), "blockgate-system");
        ensure_activation_secret(&api, &gateway(), TOKEN_VALIDITY)
            .await
            .unwrap();
        let token = token_of(&fake);
        let one = SecretTokenStore::new(client.clone());
        let two = SecretTokenStore::new(client);
        let (a, b) = tokio::join!(
            one.check_and_consume(&token, "blockgate-system/fleet"),
            two.check_and_consume(&token, "blockgate-system/fleet")
        );
        assert_eq!(
            [a.is_ok(), b.is_ok()].iter().filter(|ok| **ok).count(),
            1,
            "{a:?} {b:?}"
        );
        assert!(a == Err(TokenError::Used) || b == Err(TokenError::Used));
    }

    #[tokio::test]
    async fn an_expired_token_is_refused_and_then_replaced() {
        let (client, fake) = FakeApi::client();
        let api: Api<Secret> = Api::namespaced(client.clone(), "blockgate-system");
        ensure_activation_secret(&api, &gateway(), TOKEN_VALIDITY)
            .await
            .unwrap();
        let token = token_of(&fake);
        fake.edit(SECRETS, "fleet-node-1-activation", |secret| {
            secret["metadata"]["annotations"][EXPIRES_ANNOTATION] =
                serde_json::json!("2020-01-01T00:00:00Z");
        });
        let store = SecretTokenStore::new(client);
        assert_eq!(
            store
                .check_and_consume(&token, "blockgate-system/fleet")
                .await,
            Err(TokenError::Expired)
        );
        ensure_activation_secret(&api, &gateway(), TOKEN_VALIDITY)
            .await
            .unwrap();
        let fresh = token_of(&fake);
        assert_ne!(fresh, token);
        assert!(
            store
                .check_and_consume(&fresh, "blockgate-system/fleet")
                .await
                .is_ok()
        );
    }
}
