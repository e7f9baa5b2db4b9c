//! The operator's certificate authority, kept in a Secret (`blockgate-operator-ca` in the
//! operator's namespace) so every replica signs with the same CA and a restart keeps it.
//!
//! Replicas starting together race to create it: each creates the Secret only if it is
//! absent and, when another replica won, reads and uses the winner's. The key never leaves
//! the Secret except into memory, and is never logged.

use std::collections::BTreeMap;
use std::time::Duration;

use blockgate_operator_control::{CaError, CertificateAuthority, IssuedCertificate};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;

/// Name of the CA's Secret in the operator's namespace.
pub const CA_SECRET: &str = "blockgate-operator-ca";
/// Key of the CA certificate (PEM) in the Secret, and in the CA ConfigMaps gateways mount.
pub const CA_CERTIFICATE_KEY: &str = "ca.crt";
/// Key of the CA's private key (PEM) in the Secret.
pub const CA_KEY_KEY: &str = "ca.key";
/// Ten years: rotating the CA means re-activating every gateway, so it should outlive
/// the clusters it serves in practice.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86_400);
/// The operator's server certificate is issued at every start, so a year is plenty.
pub const SERVER_CERTIFICATE_VALIDITY: Duration = Duration::from_secs(365 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("cannot read Secret {name}")]
    Read {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot create Secret {name}")]
    Create {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {name} has no key {key}")]
    MissingKey { name: String, key: &'static str },
    #[error("Secret {name} does not hold a usable CA")]
    Parse {
        name: String,
        #[source]
        source: CaError,
    },
    #[error("cannot create a CA")]
    Generate(#[source] CaError),
    #[error("cannot issue the operator's server certificate")]
    Issue(#[source] CaError),
}

fn pem(secret: &Secret, key: &'static str) -> Result<String, CaSecretError> {
    let missing = || CaSecretError::MissingKey {
        name: CA_SECRET.to_owned(),
        key,
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .ok_or_else(missing)?;
    String::from_utf8(bytes.0.clone()).map_err(|_| missing())
}

fn parse(secret: &Secret) -> Result<CertificateAuthority, CaSecretError> {
    let certificate = pem(secret, CA_CERTIFICATE_KEY)?;
    let key = pem(secret, CA_KEY_KEY)?;
    CertificateAuthority::from_pem(&certificate, &key).map_err(|source| CaSecretError::Parse {
        name: CA_SECRET.to_owned(),
        source,
    })
}

/// The CA of the Secret in `api`'s namespace, created when there is none yet.
pub async fn load_or_create(api: &Api<Secret>) -> Result<CertificateAuthority, CaSecretError> {
    let read = |source| CaSecretError::Read {
        name: CA_SECRET.to_owned(),
        source,
    };
    if let Some(secret) = api.get_opt(CA_SECRET).await.map_err(read)? {
        return parse(&secret);
    }
    let ca = CertificateAuthority::create(CA_VALIDITY).map_err(CaSecretError::Generate)?;
    let (certificate, key) = ca.to_pem();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_owned(),
                crate::FIELD_MANAGER.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([
            (
                CA_CERTIFICATE_KEY.to_owned(),
                ByteString(certificate.into_bytes()),
            ),
            (CA_KEY_KEY.to_owned(), ByteString(key.into_bytes())),
        ])),
        ..Secret::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!(secret = CA_SECRET, "created the operator's CA");
            Ok(ca)
        }
        // Another replica created it first: use theirs, so all sign with one CA.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = api.get(CA_SECRET).await.map_err(read)?;
            parse(&secret)
        }
        Err(source) => Err(CaSecretError::Create {
            name: CA_SECRET.to_owned(),
            source,
        }),
    }
}

/// The DNS names of the operator's Service `service` in `namespace`, the names gateways and
/// peers check the server certificate against.
pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// Issues this replica's server certificate for the Service's names.
pub fn server_certificate(
    ca: &CertificateAuthority,
    service: &str,
    namespace: &str,
) -> Result<IssuedCertificate, CaSecretError> {
    ca.issue_operator_certificate(
        &service_names(service, namespace),
        SERVER_CERTIFICATE_VALIDITY,
    )
    .map_err(CaSecretError::Issue)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{FakeApi, SECRETS};

    #[tokio::test]
    async fn two_replicas_end_up_with_one_ca() {
        let (client, fake) = FakeApi::client();
        let api: Api<Secret> = Api::namespaced(client.clone(), "blockgate-system");
        let first = load_or_create(&api).await.unwrap();
        let second = load_or_create(&api).await.unwrap();
        assert_eq!(first.certificate_pem(), second.certificate_pem());
        assert_eq!(fake.names(SECRETS), vec![CA_SECRET.to_owned()]);
        let issued = server_certificate(&second, "blockgate-operator", "blockgate-system").unwrap();
        assert!(issued.certificate_pem.contains("BEGIN CERTIFICATE"));
    }

    #[tokio::test]
    async fn a_replica_that_loses_the_creation_race_uses_the_winners_ca() {
        let (client, fake) = FakeApi::client();
        let api: Api<Secret> = Api::namespaced(client, "blockgate-system");
        // The winner's Secret appears between the loser's read and its create: simulated by
        // racing two creates on a fresh store; whichever wins, both load the stored one.
        let (a, b) = tokio::join!(load_or_create(&api), load_or_create(&api));
        let (a, b) = (a.unwrap(), b.unwrap());
        let stored = fake.get(SECRETS, CA_SECRET).unwrap();
        let stored_pem = stored["data"][CA_CERTIFICATE_KEY]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(a.certificate_pem(), b.certificate_pem());
        assert!(!stored_pem.is_empty());
    }
}
