//! [`S3Store`]: any S3-compatible server (AWS, Garage, MinIO, s3s-fs) through aws-sdk-s3.
//!
//! Owns the translation between the [`ObjectStore`] contract and S3: the key prefix, single or
//! multipart uploads, ranged reads that are checked to return exactly the bytes asked for, and
//! the mapping of S3's answers to [`ObjectStoreError`] so that callers can tell "retry later"
//! (Unavailable) from "fix the configuration" (Refused). It must never log credentials and
//! never return a short read as data.
//!
//! Settings that keep it working with servers other than AWS: requests carry checksums only
//! when an operation requires them and uploads never name a checksum algorithm (Garage rejects
//! both over plain HTTP); multipart uploads are completed with ETags and part numbers only.
//!
//! Upload bodies are not hashed into the signature by default (`UNSIGNED-PAYLOAD`): each PUT
//! and part carries its CRC32C in `x-amz-checksum-crc32c` (a signed header), which the server
//! checks before it stores anything, so a body damaged on the way is refused and retried. The
//! SHA-256 that payload signing computes on both ends costs more CPU than everything else
//! the gateway does to an uploaded byte; [`S3Config::sign_payload`] turns it back on.

use std::error::Error as StdError;
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::Bytes;

use crate::{ListPage, ListedObject, ObjectStore, ObjectStoreError};

/// Objects up to this size are uploaded with one PutObject; larger ones in parts.
pub const SINGLE_PUT_LIMIT: usize = 16 * 1024 * 1024;

/// The size of each part of a multipart upload but the last.
pub const PART_SIZE: usize = 8 * 1024 * 1024;

/// Keys per listing page (S3's maximum).
const PAGE_SIZE: i32 = 1000;

/// How long to wait for a TCP connection before the attempt counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The longest one attempt of a request may take, including sending the body: a part of
/// [`SINGLE_PUT_LIMIT`] bytes still goes through at about 140 KiB/s. Without it, a server that
/// accepts a connection and never answers would hang the caller forever. Downloads are guarded
/// by the SDK's stalled-stream protection instead.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(120);

/// The region used when neither the configuration nor the environment names one; servers
/// other than AWS usually accept it.
const FALLBACK_REGION: &str = "us-east-1";

/// Where and how to reach the bucket.
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Prepended to every key with a `/` (leading and trailing slashes are ignored); empty
    /// means the bucket's root.
    pub prefix: String,
    /// The server's URL (`http://127.0.0.1:3900`); `None` means AWS.
    pub endpoint: Option<String>,
    /// `None` takes the region from the environment (`AWS_REGION`, the profile) or falls back
    /// to `us-east-1`.
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket` instead of `bucket.endpoint`; most servers other
    /// than AWS need it.
    pub path_style: bool,
    /// Static credentials; both or neither. Without them the SDK's standard chain is used
    /// (environment, profile, web identity, container and instance metadata).
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    /// Attempts per request, the first included, with exponential backoff between them.
    pub max_attempts: u32,
    /// Include the SHA-256 of every upload body in its signature, for servers that refuse
    /// `UNSIGNED-PAYLOAD`. Off: bodies are unsigned and carry a CRC32C the server verifies.
    pub sign_payload: bool,
}

impl S3Config {
    /// A configuration for `bucket` on AWS with the credential chain and 3 attempts per
    /// request; set the other fields as needed.
    pub fn new(bucket: impl Into<String>) -> Self {
        Self {
            bucket: bucket.into(),
            prefix: String::new(),
            endpoint: None,
            region: None,
            path_style: false,
            access_key: None,
            secret_key: None,
            max_attempts: 3,
            sign_payload: false,
        }
    }
}

/// Keeps the keys out of logs.
impl fmt::Debug for S3Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |key: &Option<String>| key.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("path_style", &self.path_style)
            .field("access_key", &redacted(&self.access_key))
            .field("secret_key", &redacted(&self.secret_key))
            .field("max_attempts", &self.max_attempts)
            .field("sign_payload", &self.sign_payload)
            .finish()
    }
}

/// A configuration [`S3Store::new`] cannot use.
#[derive(Debug, thiserror::Error)]
pub enum S3ConfigError {
    #[error("the bucket name is empty")]
    EmptyBucket,
    #[error("an access key and a secret key must be given together")]
    PartialCredentials,
}

/// An answer from the server that breaks the S3 protocol's promises.
#[derive(Debug, thiserror::Error)]
enum BadResponse {
    #[error("the response carried {received} bytes instead of {expected}")]
    WrongLength { expected: u64, received: u64 },
    #[error("CreateMultipartUpload returned no upload id")]
    MissingUploadId,
    #[error("UploadPart returned no ETag for part {0}")]
    MissingETag(i32),
    #[error("an object of {0} bytes needs more parts than S3 allows")]
    TooManyParts(usize),
    #[error("ListObjectsV2 said the listing is truncated but returned no key to continue after")]
    EmptyTruncatedPage,
}

/// Objects in an S3 bucket, under an optional prefix.
#[derive(Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// Empty, or the configured prefix with exactly one trailing `/`.
    key_prefix: String,
    description: String,
    sign_payload: bool,
}

/// Shows where the store points, never the client's credentials.
impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("location", &self.description)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Builds a client for `config`. Sends no request: a wrong bucket or bad credentials show
    /// up as [`ObjectStoreError::Refused`] on the first operation.
    pub async fn new(config: S3Config) -> Result<Self, ObjectStoreError> {
        let refused = |source: S3ConfigError| ObjectStoreError::Refused {
            operation: "configure",
            key: String::new(),
            source: Box::new(source),
        };
        if config.bucket.is_empty() {
            return Err(refused(S3ConfigError::EmptyBucket));
        }

        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(RetryConfig::standard().with_max_attempts(config.max_attempts.max(1)))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(CONNECT_TIMEOUT)
                    .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                    .build(),
            );
        match (&config.access_key, &config.secret_key) {
            (Some(access_key), Some(secret_key)) => {
                loader = loader.credentials_provider(Credentials::new(
                    access_key,
                    secret_key,
                    None,
                    None,
                    "blockgate-config",
                ));
            }
            (None, None) => {}
            _ => return Err(refused(S3ConfigError::PartialCredentials)),
        }
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let shared = loader.load().await;

        let mut s3 = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(config.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired);
        if shared.region().is_none() {
            s3 = s3.region(Region::from_static(FALLBACK_REGION));
        }

        let prefix = config.prefix.trim_matches('/');
        let key_prefix = if prefix.is_empty() {
            String::new()
        } else {
            format!("{prefix}/")
        };
        let description = format!(
            "s3://{}/{} ({})",
            config.bucket,
            prefix,
            config.endpoint.as_deref().unwrap_or("AWS")
        );
        tracing::debug!(store = %description, "configured S3 object store");
        Ok(Self {
            client: Client::from_conf(s3.build()),
            bucket: config.bucket,
            key_prefix,
            description,
            sign_payload: config.sign_payload,
        })
    }

    fn full_key(&self, key: &str) -> String {
        format!("{}{key}", self.key_prefix)
    }

    async fn put_single(&self, key: &str, data: Bytes) -> Result<(), ObjectStoreError> {
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.full_key(key));
        let sent = if self.sign_payload {
            request.body(ByteStream::from(data)).send().await
        } else {
            request
                .checksum_crc32_c(body_crc32c(&data))
                .body(ByteStream::from(data))
                .customize()
                .disable_payload_signing()
                .send()
                .await
        };
        sent.map_err(|e| to_error("put", key, e))?;
        Ok(())
    }

    /// Uploads `data` in [`PART_SIZE`] parts. If anything fails the upload is aborted so its
    /// parts do not linger (and cost) in the bucket; if the caller is cancelled midway they do
    /// until the bucket's lifecycle rule for incomplete uploads removes them.
    async fn put_multipart(&self, key: &str, data: Bytes) -> Result<(), ObjectStoreError> {
        let full_key = self.full_key(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(&full_key)
            .send()
            .await
            .map_err(|e| to_error("put", key, e))?;
        let Some(upload_id) = created.upload_id() else {
            return Err(unavailable("put", key, BadResponse::MissingUploadId));
        };

        let uploaded = self.upload_parts(key, &full_key, upload_id, &data).await;
        if uploaded.is_err() {
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(&full_key)
                .upload_id(upload_id)
                .send()
                .await;
            if let Err(error) = aborted {
                tracing::warn!(
                    store = %self.description,
                    key,
                    error = %DisplayErrorContext(&error),
                    "could not abort a failed multipart upload; its parts stay in the bucket"
                );
            }
        }
        uploaded
    }

    async fn upload_parts(
        &self,
        key: &str,
        full_key: &str,
        upload_id: &str,
        data: &Bytes,
    ) -> Result<(), ObjectStoreError> {
        // A 404 here means the upload vanished (aborted by someone else, or a lifecycle rule),
        // not that the key is missing: the whole put may be retried.
        let part_error = |e| match to_error("put", key, e) {
            ObjectStoreError::NotFound { key } => ObjectStoreError::Unavailable {
                operation: "put",
                key: key.clone(),
                source: Box::new(ObjectStoreError::NotFound { key }),
            },
            other => other,
        };
        let mut parts = Vec::new();
        for (index, start) in (0..data.len()).step_by(PART_SIZE).enumerate() {
            let part_number = i32::try_from(index + 1)
                .map_err(|_| unavailable("put", key, BadResponse::TooManyParts(data.len())))?;
            let end = data.len().min(start + PART_SIZE);
            let part = data.slice(start..end);
            let request = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(full_key)
                .upload_id(upload_id)
                .part_number(part_number);
            let sent = if self.sign_payload {
                request.body(ByteStream::from(part)).send().await
            } else {
                request
                    .checksum_crc32_c(body_crc32c(&part))
                    .body(ByteStream::from(part))
                    .customize()
                    .disable_payload_signing()
                    .send()
                    .await
            };
            let output = sent.map_err(part_error)?;
            let Some(e_tag) = output.e_tag() else {
                return Err(unavailable(
                    "put",
                    key,
                    BadResponse::MissingETag(part_number),
                ));
            };
            parts.push(
                CompletedPart::builder()
                    .e_tag(e_tag)
                    .part_number(part_number)
                    .build(),
            );
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(full_key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map_err(|e| to_error("put", key, e))?;
        Ok(())
    }

    /// The error for a range that does not fit in `key`: uses `size` when the server told it,
    /// else asks for the object's size (which also tells a missing object from a short one).
    async fn out_of_bounds(
        &self,
        key: &str,
        range: Range<u64>,
        size: Option<u64>,
    ) -> ObjectStoreError {
        let size = match size {
            Some(size) => size,
            None => {
                let head = self
                    .client
                    .head_object()
                    .bucket(&self.bucket)
                    .key(self.full_key(key))
                    .send()
                    .await;
                match head {
                    Ok(output) => output
                        .content_length()
                        .and_then(|length| u64::try_from(length).ok())
                        .unwrap_or(0),
                    Err(e) => return to_error("get_range", key, e),
                }
            }
        };
        ObjectStoreError::RangeOutOfBounds {
            key: key.to_owned(),
            start: range.start,
            end: range.end,
            size,
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), ObjectStoreError> {
        if data.len() <= SINGLE_PUT_LIMIT {
            self.put_single(key, data).await
        } else {
            self.put_multipart(key, data).await
        }
    }

    async fn get(&self, key: &str) -> Result<Bytes, ObjectStoreError> {
        let output = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| to_error("get", key, e))?;
        let expected = output.content_length().and_then(|n| u64::try_from(n).ok());
        let data = output
            .body
            .collect()
            .await
            .map_err(|e| unavailable("get", key, e))?
            .into_bytes();
        if let Some(expected) = expected
            && expected != data.len() as u64
        {
            return Err(unavailable(
                "get",
                key,
                BadResponse::WrongLength {
                    expected,
                    received: data.len() as u64,
                },
            ));
        }
        Ok(data)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, ObjectStoreError> {
        if range.start == range.end {
            return Ok(Bytes::new());
        }
        if range.start > range.end {
            return Err(self.out_of_bounds(key, range, None).await);
        }
        let response = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .send()
            .await;
        let output = match response {
            Ok(output) => output,
            Err(e) if classify(&e) == Class::RangeNotSatisfiable => {
                let size = e
                    .raw_response()
                    .and_then(|raw| raw.headers().get("content-range"))
                    .and_then(object_size);
                return Err(self.out_of_bounds(key, range, size).await);
            }
            Err(e) => return Err(to_error("get_range", key, e)),
        };
        let size = output.content_range().and_then(object_size);
        let ranged = output.content_range().is_some();
        let data = output
            .body
            .collect()
            .await
            .map_err(|e| unavailable("get_range", key, e))?
            .into_bytes();

        if !ranged {
            // The server ignored the Range header and sent the whole object.
            let size = data.len() as u64;
            if range.end > size {
                return Err(self.out_of_bounds(key, range, Some(size)).await);
            }
            let (Ok(start), Ok(end)) = (usize::try_from(range.start), usize::try_from(range.end))
            else {
                return Err(self.out_of_bounds(key, range, Some(size)).await);
            };
            return Ok(data.slice(start..end));
        }
        // S3 answers a range that starts inside the object but ends past it with the bytes
        // up to the end; the caller asked for all of them or an error.
        if let Some(size) = size
            && range.end > size
        {
            return Err(self.out_of_bounds(key, range, Some(size)).await);
        }
        let expected = range.end - range.start;
        if data.len() as u64 != expected {
            return Err(unavailable(
                "get_range",
                key,
                BadResponse::WrongLength {
                    expected,
                    received: data.len() as u64,
                },
            ));
        }
        Ok(data)
    }

    async fn list(
        &self,
        prefix: &str,
        continuation: Option<String>,
    ) -> Result<ListPage, ObjectStoreError> {
        // StartAfter rather than S3's opaque continuation token: the trait's continuation is a
        // key, so a caller can also resume from a key it remembers.
        let output = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(self.full_key(prefix))
            .max_keys(PAGE_SIZE)
            .set_start_after(continuation.map(|key| self.full_key(&key)))
            .send()
            .await
            .map_err(|e| to_error("list", prefix, e))?;
        let keys: Vec<ListedObject> = output
            .contents()
            .iter()
            .filter_map(|object| {
                let key = object.key()?.strip_prefix(&self.key_prefix)?;
                Some(ListedObject {
                    key: key.to_owned(),
                    size: object
                        .size()
                        .and_then(|size| u64::try_from(size).ok())
                        .unwrap_or(0),
                })
            })
            .collect();
        let next = if output.is_truncated() == Some(true) {
            let Some(last) = keys.last() else {
                return Err(unavailable("list", prefix, BadResponse::EmptyTruncatedPage));
            };
            Some(last.key.clone())
        } else {
            None
        };
        Ok(ListPage { keys, next })
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError> {
        let deleted = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(self.full_key(key))
            .send()
            .await;
        match deleted {
            Ok(_) => Ok(()),
            Err(e) => match to_error("delete", key, e) {
                ObjectStoreError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// The total size from a `Content-Range` header (`bytes 0-9/1234` or `bytes */1234`).
/// The `x-amz-checksum-crc32c` value of an upload body: its CRC32C, big-endian, in base64.
pub fn body_crc32c(body: &[u8]) -> String {
    aws_smithy_types::base64::encode(crc32c::crc32c(body).to_be_bytes())
}

fn object_size(content_range: &str) -> Option<u64> {
    content_range.rsplit_once('/')?.1.trim().parse().ok()
}

/// What an S3 failure means for the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    NotFound,
    RangeNotSatisfiable,
    /// Retrying cannot help until the configuration (credentials, bucket, region) is fixed.
    Refused,
    /// The server may answer later: network, timeouts, throttling, server errors.
    Unavailable,
}

fn classify<E>(error: &SdkError<E, HttpResponse>) -> Class
where
    E: ProvideErrorMetadata + StdError + 'static,
{
    match error {
        // The request could not even be built: a bad endpoint URL or input.
        SdkError::ConstructionFailure(_) => Class::Refused,
        SdkError::DispatchFailure(_) if credentials_missing(error) => Class::Refused,
        SdkError::ServiceError(service) => {
            classify_response(service.raw().status().as_u16(), error.code())
        }
        _ => Class::Unavailable,
    }
}

/// Classifies an error response by its S3 error code, else by its HTTP status.
fn classify_response(status: u16, code: Option<&str>) -> Class {
    match code {
        Some("NoSuchKey" | "NotFound") => return Class::NotFound,
        Some("InvalidRange") => return Class::RangeNotSatisfiable,
        Some(
            "AccessDenied"
            | "AccountProblem"
            | "AllAccessDisabled"
            | "AuthorizationHeaderMalformed"
            | "InvalidAccessKeyId"
            | "InvalidBucketName"
            | "NoSuchBucket"
            | "PermanentRedirect"
            | "SignatureDoesNotMatch",
        ) => return Class::Refused,
        Some(
            "InternalError"
            | "RequestTimeout"
            | "ServiceUnavailable"
            | "SlowDown"
            | "Throttling"
            | "ThrottlingException",
        ) => return Class::Unavailable,
        _ => {}
    }
    match status {
        404 => Class::NotFound,
        416 => Class::RangeNotSatisfiable,
        408 | 429 => Class::Unavailable,
        // Redirects (a bucket in another region) and other client errors: the same request
        // will get the same answer.
        300..=499 => Class::Refused,
        _ => Class::Unavailable,
    }
}

/// True when the request failed because no credentials are configured (or their
/// configuration is broken), as opposed to a credential source being briefly unreachable.
fn credentials_missing(error: &(dyn StdError + 'static)) -> bool {
    let mut cause = Some(error);
    while let Some(current) = cause {
        if let Some(credentials) = current.downcast_ref::<CredentialsError>() {
            return matches!(
                credentials,
                CredentialsError::CredentialsNotLoaded(_)
                    | CredentialsError::InvalidConfiguration(_)
            );
        }
        cause = current.source();
    }
    false
}

fn to_error<E>(
    operation: &'static str,
    key: &str,
    error: SdkError<E, HttpResponse>,
) -> ObjectStoreError
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    let key = key.to_owned();
    match classify(&error) {
        Class::NotFound => ObjectStoreError::NotFound { key },
        Class::Unavailable => ObjectStoreError::Unavailable {
            operation,
            key,
            source: Box::new(error),
        },
        // A 416 outside get_range (which handles it itself) is as unexpected as any other 4xx.
        Class::Refused | Class::RangeNotSatisfiable => ObjectStoreError::Refused {
            operation,
            key,
            source: Box::new(error),
        },
    }
}

fn unavailable(
    operation: &'static str,
    key: &str,
    source: impl StdError + Send + Sync + 'static,
) -> ObjectStoreError {
    ObjectStoreError::Unavailable {
        operation,
        key: key.to_owned(),
        source: Box::new(source),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_s3::error::ConnectorError;
    use aws_sdk_s3::operation::get_object::GetObjectError;

    #[test]
    fn error_codes_and_statuses_map_to_what_the_caller_should_do() {
        assert_eq!(classify_response(404, Some("NoSuchKey")), Class::NotFound);
        assert_eq!(classify_response(404, None), Class::NotFound);
        assert_eq!(classify_response(404, Some("NoSuchBucket")), Class::Refused);
        assert_eq!(
            classify_response(416, Some("InvalidRange")),
            Class::RangeNotSatisfiable
        );
        assert_eq!(
            classify_response(403, Some("SignatureDoesNotMatch")),
            Class::Refused
        );
        assert_eq!(classify_response(403, None), Class::Refused);
        assert_eq!(
            classify_response(400, Some("InvalidAccessKeyId")),
            Class::Refused
        );
        assert_eq!(
            classify_response(301, Some("PermanentRedirect")),
            Class::Refused
        );
        assert_eq!(classify_response(503, Some("SlowDown")), Class::Unavailable);
        assert_eq!(classify_response(500, None), Class::Unavailable);
        assert_eq!(classify_response(429, None), Class::Unavailable);
        assert_eq!(
            classify_response(400, Some("RequestTimeout")),
            Class::Unavailable
        );
    }

    #[test]
    fn missing_credentials_are_refused_but_a_slow_credential_source_is_unavailable() {
        let failure = |error: CredentialsError| {
            SdkError::<GetObjectError, HttpResponse>::dispatch_failure(ConnectorError::other(
                Box::new(error),
                None,
            ))
        };
        let missing = failure(CredentialsError::not_loaded("no provider had credentials"));
        assert_eq!(classify(&missing), Class::Refused);
        let slow = failure(CredentialsError::provider_timed_out(Duration::from_secs(5)));
        assert_eq!(classify(&slow), Class::Unavailable);
        let connection = SdkError::<GetObjectError, HttpResponse>::dispatch_failure(
            ConnectorError::io("connection refused".into()),
        );
        assert_eq!(classify(&connection), Class::Unavailable);
        assert_eq!(
            classify(&SdkError::<GetObjectError, HttpResponse>::timeout_error(
                "attempt timed out"
            )),
            Class::Unavailable
        );
    }

    #[test]
    fn upload_checksums_are_the_big_endian_crc32c_in_base64() {
        // CRC32C("123456789") is 0xE3069283, the standard check value.
        assert_eq!(body_crc32c(b"123456789"), "4waSgw==");
        assert_eq!(body_crc32c(b""), "AAAAAA==");
    }

    #[test]
    fn content_range_gives_the_object_size() {
        assert_eq!(object_size("bytes 0-9/1234"), Some(1234));
        assert_eq!(object_size("bytes */77"), Some(77));
        assert_eq!(object_size("bytes 0-9/*"), None);
    }

    #[test]
    fn debug_output_never_shows_credentials() {
        let config = S3Config {
            access_key: Some("AKIDEXAMPLE".into()),
            secret_key: Some("wJalrXUtnFEMI".into()),
            ..S3Config::new("bucket")
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("AKIDEXAMPLE"), "{shown}");
        assert!(!shown.contains("wJalrXUtnFEMI"), "{shown}");
        assert!(shown.contains("bucket"));
    }

    #[tokio::test]
    async fn the_prefix_is_joined_with_exactly_one_slash() {
        for (prefix, key_prefix, description) in [
            ("", "", "s3://b/ (http://127.0.0.1:1)"),
            ("p", "p/", "s3://b/p (http://127.0.0.1:1)"),
            ("/p/q/", "p/q/", "s3://b/p/q (http://127.0.0.1:1)"),
        ] {
            let store = S3Store::new(S3Config {
                prefix: prefix.into(),
                endpoint: Some("http://127.0.0.1:1".into()),
                region: Some("us-east-1".into()),
                access_key: Some("k".into()),
                secret_key: Some("s".into()),
                ..S3Config::new("b")
            })
            .await
            .unwrap();
            assert_eq!(store.key_prefix, key_prefix);
            assert_eq!(store.full_key("a/b"), format!("{key_prefix}a/b"));
            assert_eq!(store.describe(), description);
        }
    }

    #[tokio::test]
    async fn half_given_credentials_or_no_bucket_are_refused_at_once() {
        let half = S3Config {
            access_key: Some("k".into()),
            region: Some("us-east-1".into()),
            ..S3Config::new("b")
        };
        assert!(matches!(
            S3Store::new(half).await,
            Err(ObjectStoreError::Refused { .. })
        ));
        assert!(matches!(
            S3Store::new(S3Config::new("")).await,
            Err(ObjectStoreError::Refused { .. })
        ));
    }
}
