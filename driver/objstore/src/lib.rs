//! Object stores: the one trait the volume engine and the block-storage layout write through,
//! and its implementations.
//!
//! - [`LocalDirStore`]: a directory on local disk, the embedded default; creates objects
//!   atomically (temp file, fsync, rename, fsync of the directory).
//! - [`S3Store`] (feature `s3`): any S3-compatible server through aws-sdk-s3.
//! - [`MemoryStore`] and [`FaultStore`]: for tests; the first can corrupt its objects, the
//!   second wraps any store and injects outages and errors on demand.
//! - `S3sFsServer` (feature `s3-test-server`): a real S3-compatible server for tests.
//!
//! Keys are relative (`volumes/<id>/segments/...`); a store may add its own prefix. Objects are
//! never overwritten by blockgate, so no store needs conditional writes.

use std::fmt::Debug;
use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;

mod fault;
mod local;
mod memory;
#[cfg(feature = "s3")]
mod s3;
#[cfg(feature = "s3-test-server")]
mod s3_server;

pub use fault::{FaultStore, Faults};
pub use local::LocalDirStore;
pub use memory::MemoryStore;
#[cfg(feature = "s3")]
pub use s3::{PART_SIZE, S3Config, S3ConfigError, S3Store, SINGLE_PUT_LIMIT, body_crc32c};
#[cfg(feature = "s3-test-server")]
pub use s3_server::{S3sFsServer, TEST_BUCKET};

/// One page of a listing: keys (relative to the store's prefix) in lexicographic order, and
/// the token for the next page when there is one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    pub keys: Vec<ListedObject>,
    pub next: Option<String>,
}

/// An object seen in a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedObject {
    pub key: String,
    pub size: u64,
}

/// What went wrong talking to the object store.
#[derive(Debug, thiserror::Error)]
pub enum ObjectStoreError {
    /// The object does not exist.
    #[error("object {key} not found")]
    NotFound { key: String },
    /// A ranged read asked for bytes past the end of the object.
    #[error("range {start}..{end} is outside object {key} of {size} bytes")]
    RangeOutOfBounds {
        key: String,
        start: u64,
        end: u64,
        size: u64,
    },
    /// The store could not be reached or answered with a transient error; the caller may
    /// retry later.
    #[error("object store unavailable during {operation} of {key}")]
    Unavailable {
        operation: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The store refused the request (credentials, permissions, a missing bucket): retrying
    /// will not help until someone fixes the configuration.
    #[error("object store refused {operation} of {key}")]
    Refused {
        operation: &'static str,
        key: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl ObjectStoreError {
    /// True when retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, ObjectStoreError::Unavailable { .. })
    }
}

/// An object store. Implementations are cheap to share behind an `Arc`.
#[async_trait]
pub trait ObjectStore: Debug + Send + Sync + 'static {
    /// Stores `data` under `key`. When this returns Ok the object is durable and complete; a
    /// reader never sees a partial object.
    async fn put(&self, key: &str, data: Bytes) -> Result<(), ObjectStoreError>;

    /// Reads a whole object.
    async fn get(&self, key: &str) -> Result<Bytes, ObjectStoreError>;

    /// Reads `range` of an object. A range reaching past the end is an error, never a short
    /// read.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, ObjectStoreError>;

    /// Lists keys starting with `prefix`, one page at a time, in lexicographic order.
    /// The listing starts strictly after the key `continuation` (S3's `StartAfter`): pass
    /// the previous page's `next` (its last key) to page on, or any key to skip ahead to.
    async fn list(
        &self,
        prefix: &str,
        continuation: Option<String>,
    ) -> Result<ListPage, ObjectStoreError>;

    /// Deletes an object. Deleting a missing object succeeds.
    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError>;

    /// A short description for logs (`local:/var/lib/...`, `s3://bucket/prefix`).
    fn describe(&self) -> String;
}

/// Lists every key under `prefix`, following continuation tokens.
///
/// Only for prefixes known to be small (one volume's checkpoints, a test); large listings page
/// through [`ObjectStore::list`] instead.
pub async fn list_all(
    store: &dyn ObjectStore,
    prefix: &str,
) -> Result<Vec<ListedObject>, ObjectStoreError> {
    let mut all = Vec::new();
    let mut next = None;
    loop {
        let page = store.list(prefix, next).await?;
        all.extend(page.keys);
        match page.next {
            Some(token) => next = Some(token),
            None => return Ok(all),
        }
    }
}

/// Where a process's bucket is, as its command line gives it: `s3://bucket/prefix` with
/// the S3 settings, or a local directory (`file://` optional).
#[cfg(feature = "s3")]
#[derive(Debug, Clone, Default)]
pub struct StoreLocation {
    pub location: String,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_path_style: bool,
    /// Attempts per S3 request; `None` keeps the store's default.
    pub s3_max_attempts: Option<u32>,
    /// Sign upload bodies with SHA-256 instead of sending them unsigned with a CRC32C
    /// ([`S3Config::sign_payload`]).
    pub s3_sign_payload: bool,
}

#[cfg(feature = "s3")]
impl StoreLocation {
    /// Opens the store the location names.
    pub async fn open(&self) -> Result<std::sync::Arc<dyn ObjectStore>, ObjectStoreError> {
        if let Some(rest) = self.location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let mut config = S3Config::new(bucket);
            config.prefix = prefix.trim_end_matches('/').to_string();
            config.endpoint = self.s3_endpoint.clone();
            config.region = self.s3_region.clone();
            config.path_style = self.s3_path_style;
            config.sign_payload = self.s3_sign_payload;
            if let Some(attempts) = self.s3_max_attempts {
                config.max_attempts = attempts;
            }
            return Ok(std::sync::Arc::new(S3Store::new(config).await?));
        }
        let path = self
            .location
            .strip_prefix("file://")
            .unwrap_or(&self.location);
        Ok(std::sync::Arc::new(LocalDirStore::new(
            std::path::PathBuf::from(path),
        )?))
    }
}
