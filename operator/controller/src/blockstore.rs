//! The block-storage API the operator hosts: one StorageGateway's bucket, opened with the
//! credentials of that StorageGateway's Secret, served on a unix socket for the CSI
//! controller (`--blockstore unix:///...`), with [`crate::hub_gateways::HubGateways`] as the
//! way to the gateways that hold volumes.
//!
//! One API per StorageGateway because the API has one bucket and the CSI controller one
//! endpoint; a cluster with several StorageGateways runs one CSI controller per fleet (or
//! one operator flag per fleet, later). The credentials go from the Secret into the S3
//! client's configuration only, never into logs or the environment.

use std::sync::Arc;

use blockgate_objstore::{ObjectStore, ObjectStoreError, S3Config, S3Store};
use blockgate_operator_api::StorageGateway;
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

#[derive(Debug, thiserror::Error)]
pub enum BlockStoreSetupError {
    #[error("{0:?} is not NAMESPACE/NAME")]
    Name(String),
    #[error("cannot read StorageGateway {name}")]
    ReadStorageGateway {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot read Secret {name}")]
    ReadSecret {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Secret {name} has no usable key {key}")]
    MissingKey { name: String, key: String },
    #[error("cannot configure the object store")]
    ObjectStore(#[source] ObjectStoreError),
}

/// `namespace/name`, split.
pub fn parse_name(text: &str) -> Result<(String, String), BlockStoreSetupError> {
    match text.split_once('/') {
        Some((namespace, name))
            if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
        {
            Ok((namespace.to_owned(), name.to_owned()))
        }
        _ => Err(BlockStoreSetupError::Name(text.to_owned())),
    }
}

/// The S3 configuration of a StorageGateway, credentials included (keep it out of logs:
/// its `Debug` redacts them).
pub async fn s3_config(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<S3Config, BlockStoreSetupError> {
    let storage_gateway = Api::<StorageGateway>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .map_err(|source| BlockStoreSetupError::ReadStorageGateway {
            name: format!("{namespace}/{name}"),
            source,
        })?;
    let store = &storage_gateway.spec.object_store;
    let reference = &store.credentials_secret;
    let secret_name = format!("{namespace}/{}", reference.name);
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(&reference.name)
        .await
        .map_err(|source| BlockStoreSetupError::ReadSecret {
            name: secret_name.clone(),
            source,
        })?;
    let data = secret.data.unwrap_or_default();
    let value = |key: &str| {
        data.get(key)
            .and_then(|bytes| String::from_utf8(bytes.0.clone()).ok())
            .map(|text| text.trim().to_owned())
            .filter(|text| !text.is_empty())
            .ok_or_else(|| BlockStoreSetupError::MissingKey {
                name: secret_name.clone(),
                key: key.to_owned(),
            })
    };
    let mut config = S3Config::new(store.bucket.clone());
    config.prefix = store
        .prefix
        .as_deref()
        .unwrap_or("")
        .trim_matches('/')
        .to_owned();
    config.endpoint = store.endpoint.clone();
    config.region = Some(store.region.clone());
    config.path_style = store.force_path_style;
    config.access_key = Some(value(&reference.access_key_id_key)?);
    config.secret_key = Some(value(&reference.secret_access_key_key)?);
    Ok(config)
}

/// The StorageGateway's bucket as an object store.
pub async fn open_store(
    client: &Client,
    namespace: &str,
    name: &str,
) -> Result<Arc<dyn ObjectStore>, BlockStoreSetupError> {
    let config = s3_config(client, namespace, name).await?;
    let store = S3Store::new(config)
        .await
        .map_err(BlockStoreSetupError::ObjectStore)?;
    Ok(Arc::new(store))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{
        FakeApi, SECRETS, STORAGE_GATEWAYS, credentials_secret, storage_gateway,
    };

    #[tokio::test]
    async fn the_bucket_and_credentials_come_from_the_storage_gateway_and_its_secret() {
        let (client, fake) = FakeApi::client();
        fake.insert(STORAGE_GATEWAYS, storage_gateway("fleet"));
        let config = s3_config(&client, "blockgate-system", "fleet").await;
        assert!(matches!(
            config,
            Err(BlockStoreSetupError::ReadSecret { .. })
        ));
        fake.insert(SECRETS, credentials_secret());
        let config = s3_config(&client, "blockgate-system", "fleet")
            .await
            .unwrap();
        assert_eq!(config.bucket, "blockgate-volumes");
        assert_eq!(config.prefix, "clusters/prod");
        assert_eq!(
            config.endpoint.as_deref(),
            Some("https://s3.example.com:9000")
        );
        assert!(config.path_style);
        assert_eq!(config.access_key.as_deref(), Some("AKIDEXAMPLE"));
        assert!(!format!("{config:?}").contains("wJalrXUtnFEMI"));
        assert!(parse_name("a/b").is_ok());
        assert!(parse_name("a").is_err());
        assert!(parse_name("a/b/c").is_err());
    }
}
