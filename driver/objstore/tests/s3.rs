//! What a user of the S3 store notices against a real server (s3s-fs): bad credentials are a
//! configuration problem, a server that is down is an outage that ends, and objects land
//! where the prefix says.
#![cfg(feature = "s3-test-server")]
// Helpers are not #[test] functions, so clippy's allow-unwrap-in-tests does not reach them.
#![allow(clippy::unwrap_used)]

use std::fs;

use blockgate_objstore::{
    ObjectStore, ObjectStoreError, S3Store, S3sFsServer, TEST_BUCKET, list_all,
};
use bytes::Bytes;

fn start() -> S3sFsServer {
    // Fails rather than skips when s3s-fs is missing: the project's test script installs it.
    S3sFsServer::start().unwrap_or_else(|e| panic!("{e}"))
}

fn keys(objects: Vec<blockgate_objstore::ListedObject>) -> Vec<String> {
    objects.into_iter().map(|object| object.key).collect()
}

#[tokio::test]
async fn a_wrong_secret_key_is_refused_not_unavailable() {
    let server = start();
    let mut config = server.config("creds");
    config.secret_key = Some("not-the-secret".into());
    let store = S3Store::new(config).await.unwrap();

    let errors = [
        store
            .put("k", Bytes::from_static(b"data"))
            .await
            .unwrap_err(),
        store.get("k").await.unwrap_err(),
        store.get_range("k", 0..2).await.unwrap_err(),
        store.list("", None).await.unwrap_err(),
    ];
    for error in errors {
        assert!(
            matches!(error, ObjectStoreError::Refused { .. }),
            "expected Refused, got {error:?}"
        );
        assert!(!error.is_transient());
    }
    let bucket = server.root().join(TEST_BUCKET);
    assert_eq!(fs::read_dir(bucket).unwrap().count(), 0, "nothing stored");
}

#[tokio::test]
async fn a_missing_bucket_is_refused() {
    let server = start();
    let mut config = server.config("");
    config.bucket = "no-such-bucket".into();
    let store = S3Store::new(config).await.unwrap();
    // Only the listing: s3s-fs creates a missing bucket's directory on PutObject and answers
    // GetObject there with NoSuchKey, where AWS says NoSuchBucket.
    let error = store.list("", None).await.unwrap_err();
    assert!(
        matches!(error, ObjectStoreError::Refused { .. }),
        "expected Refused, got {error:?}"
    );
    assert!(!error.is_transient());
}

#[tokio::test]
async fn a_stopped_server_is_unavailable_and_after_a_restart_serves_the_same_data() {
    let mut server = start();
    let mut config = server.config("outage");
    config.max_attempts = 2; // keep the backoff short
    let store = S3Store::new(config).await.unwrap();
    store
        .put("before", Bytes::from_static(b"written before the outage"))
        .await
        .unwrap();

    server.stop();
    let errors = [
        store
            .put("during", Bytes::from_static(b"lost"))
            .await
            .unwrap_err(),
        store.get("before").await.unwrap_err(),
        store.get_range("before", 0..7).await.unwrap_err(),
        store.list("", None).await.unwrap_err(),
        store.delete("before").await.unwrap_err(),
    ];
    for error in errors {
        assert!(
            matches!(error, ObjectStoreError::Unavailable { .. }),
            "expected Unavailable, got {error:?}"
        );
        assert!(error.is_transient());
    }

    server.restart().unwrap();
    assert_eq!(
        store.get("before").await.unwrap(),
        Bytes::from_static(b"written before the outage")
    );
    store
        .put("after", Bytes::from_static(b"written after"))
        .await
        .unwrap();
    assert_eq!(
        keys(list_all(&store, "").await.unwrap()),
        ["after", "before"]
    );
}

#[tokio::test]
async fn objects_land_under_the_prefix_and_other_prefixes_do_not_see_them() {
    let server = start();
    let tenant_a = S3Store::new(server.config("tenant-a")).await.unwrap();
    let tenant_b = S3Store::new(server.config("/tenant-b/")).await.unwrap();
    let bucket_root = S3Store::new(server.config("")).await.unwrap();

    tenant_a
        .put("volumes/v1/volume.json", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    tenant_b
        .put("volumes/v2/volume.json", Bytes::from_static(b"[]"))
        .await
        .unwrap();

    assert_eq!(
        fs::read(
            server
                .root()
                .join(TEST_BUCKET)
                .join("tenant-a/volumes/v1/volume.json")
        )
        .unwrap(),
        b"{}"
    );
    assert_eq!(
        keys(list_all(&tenant_a, "").await.unwrap()),
        ["volumes/v1/volume.json"]
    );
    assert_eq!(
        keys(list_all(&tenant_b, "volumes/").await.unwrap()),
        ["volumes/v2/volume.json"]
    );
    assert_eq!(
        keys(list_all(&bucket_root, "").await.unwrap()),
        [
            "tenant-a/volumes/v1/volume.json",
            "tenant-b/volumes/v2/volume.json"
        ]
    );
    assert!(matches!(
        tenant_b.get("volumes/v1/volume.json").await,
        Err(ObjectStoreError::NotFound { .. })
    ));
    assert!(
        tenant_a
            .describe()
            .starts_with("s3://blockgate-test/tenant-a (")
    );
}

#[tokio::test]
async fn a_multipart_upload_leaves_one_whole_object_and_no_parts() {
    let server = start();
    let store = S3Store::new(server.config("multipart")).await.unwrap();
    let size = blockgate_objstore::SINGLE_PUT_LIMIT + blockgate_objstore::PART_SIZE / 2 + 1;
    let data: Bytes = (0..size)
        .map(|i| u8::try_from(i % 253).unwrap())
        .collect::<Vec<u8>>()
        .into();
    store.put("big", data.clone()).await.unwrap();

    let stored = server.root().join(TEST_BUCKET).join("multipart/big");
    assert_eq!(fs::read(stored).unwrap(), data);
    // s3s-fs keeps upload state and parts beside the buckets until the upload completes.
    let leftovers: Vec<String> = fs::read_dir(server.root())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.contains("upload"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[tokio::test]
async fn uploads_arrive_whole_with_and_without_payload_signing() {
    let server = start();
    let big: Bytes = (0..blockgate_objstore::SINGLE_PUT_LIMIT + blockgate_objstore::PART_SIZE + 3)
        .map(|i| u8::try_from(i % 251).unwrap())
        .collect::<Vec<u8>>()
        .into();
    let small = big.slice(1000..101_000);
    for sign_payload in [false, true] {
        let prefix = if sign_payload { "signed" } else { "unsigned" };
        let mut config = server.config(prefix);
        config.sign_payload = sign_payload;
        let store = S3Store::new(config).await.unwrap();
        store.put("small", small.clone()).await.unwrap();
        store.put("big", big.clone()).await.unwrap();
        let stored = server.root().join(TEST_BUCKET).join(prefix);
        assert_eq!(fs::read(stored.join("small")).unwrap(), small, "{prefix}");
        assert_eq!(fs::read(stored.join("big")).unwrap(), big, "{prefix}");
    }
}

/// Unsigned uploads rely on the server checking the CRC32C each one carries: a body that does
/// not match it is refused, so the uploader retries it.
#[tokio::test]
async fn the_server_refuses_an_unsigned_body_whose_crc32c_does_not_match() {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, RequestChecksumCalculation};
    let server = start();
    let config = server.config("");
    let client = aws_sdk_s3::Client::from_conf(
        aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(server.endpoint())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new(
                config.access_key.unwrap(),
                config.secret_key.unwrap(),
                None,
                None,
                "test",
            ))
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .build(),
    );
    let body = Bytes::from_static(b"the bytes that were sent");
    let checksum_of_other_bytes = blockgate_objstore::body_crc32c(b"the bytes that were meant");
    let refused = client
        .put_object()
        .bucket(TEST_BUCKET)
        .key("object")
        .checksum_crc32_c(checksum_of_other_bytes)
        .body(body.clone().into())
        .customize()
        .disable_payload_signing()
        .send()
        .await;
    assert!(refused.is_err(), "a mismatching body was accepted");
    // s3s-fs 0.14 moves the body into place before it compares the checksum, so the refused
    // bytes stay under the key (AWS stores nothing); the retry replaces them.

    let matching = blockgate_objstore::body_crc32c(&body);
    client
        .put_object()
        .bucket(TEST_BUCKET)
        .key("object")
        .checksum_crc32_c(matching)
        .body(body.clone().into())
        .customize()
        .disable_payload_signing()
        .send()
        .await
        .unwrap();
    assert_eq!(
        fs::read(server.root().join(TEST_BUCKET).join("object")).unwrap(),
        body
    );
}
