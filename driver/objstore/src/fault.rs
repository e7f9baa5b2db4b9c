//! [`FaultStore`]: wraps any store and fails its requests on demand, for tests of the paths
//! that handle an unreachable or misconfigured object store.
//!
//! A failed request never reaches the inner store, as when the network drops it: a failed put
//! stores nothing. The [`Faults`] handle is how a test switches faults on and off and counts
//! what went through; it must never change the data itself.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{ListPage, ObjectStore, ObjectStoreError};

/// The error a [`FaultStore`] puts in place of the inner store's answer.
#[derive(Debug, thiserror::Error)]
enum InjectedFault {
    /// The store is switched to an outage.
    #[error("injected outage")]
    Outage,
    /// One of the next N puts or gets was asked to fail.
    #[error("injected failure of this request")]
    FailedRequest,
    /// The store is switched to refusing requests, like a bad credential.
    #[error("injected refusal (as with bad credentials)")]
    Refused,
}

#[derive(Debug, Default)]
struct FaultState {
    outage: AtomicBool,
    refused: AtomicBool,
    failing_puts: AtomicU64,
    failing_gets: AtomicU64,
    puts: AtomicU64,
    gets: AtomicU64,
    /// The prefix of every listing answered, in order.
    listed: std::sync::Mutex<Vec<String>>,
}

/// A store that passes requests to another store unless told to fail them.
#[derive(Debug)]
pub struct FaultStore {
    inner: Arc<dyn ObjectStore>,
    state: Arc<FaultState>,
}

/// The switches and counters of a [`FaultStore`]; clones control the same store.
#[derive(Debug, Clone)]
pub struct Faults {
    state: Arc<FaultState>,
}

impl FaultStore {
    /// Wraps `inner`, with no fault switched on.
    pub fn new(inner: Arc<dyn ObjectStore>) -> (FaultStore, Faults) {
        let state = Arc::new(FaultState::default());
        let faults = Faults {
            state: Arc::clone(&state),
        };
        (FaultStore { inner, state }, faults)
    }

    /// The fault to answer `operation` of `key` with, if any. An outage comes before a refusal
    /// (an unreachable store cannot refuse), and both before the counted failures, which are
    /// used up only by requests that would otherwise have reached the store.
    fn fault(
        &self,
        operation: &'static str,
        key: &str,
        counted: Option<&AtomicU64>,
    ) -> Result<(), ObjectStoreError> {
        let unavailable = |source| ObjectStoreError::Unavailable {
            operation,
            key: key.to_owned(),
            source: Box::new(source),
        };
        if self.state.outage.load(Ordering::SeqCst) {
            return Err(unavailable(InjectedFault::Outage));
        }
        if self.state.refused.load(Ordering::SeqCst) {
            return Err(ObjectStoreError::Refused {
                operation,
                key: key.to_owned(),
                source: Box::new(InjectedFault::Refused),
            });
        }
        if let Some(counter) = counted
            && take_one(counter)
        {
            return Err(unavailable(InjectedFault::FailedRequest));
        }
        Ok(())
    }
}

/// Decrements `counter` unless it is zero; true when it did.
fn take_one(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

impl Faults {
    /// While on, every request fails with [`ObjectStoreError::Unavailable`].
    pub fn set_outage(&self, on: bool) {
        self.state.outage.store(on, Ordering::SeqCst);
    }

    /// While on, every request fails with [`ObjectStoreError::Refused`], as with bad
    /// credentials.
    pub fn set_refused(&self, on: bool) {
        self.state.refused.store(on, Ordering::SeqCst);
    }

    /// The next `n` puts fail with [`ObjectStoreError::Unavailable`] (replacing any count
    /// still pending).
    pub fn fail_next_puts(&self, n: u64) {
        self.state.failing_puts.store(n, Ordering::SeqCst);
    }

    /// The next `n` reads (`get` or `get_range`) fail with [`ObjectStoreError::Unavailable`]
    /// (replacing any count still pending).
    pub fn fail_next_gets(&self, n: u64) {
        self.state.failing_gets.store(n, Ordering::SeqCst);
    }

    /// The prefixes of the listings answered so far (a page each), oldest first.
    pub fn listed_prefixes(&self) -> Vec<String> {
        self.state
            .listed
            .lock()
            .map(|listed| listed.clone())
            .unwrap_or_default()
    }

    /// How many puts have succeeded.
    pub fn puts(&self) -> u64 {
        self.state.puts.load(Ordering::SeqCst)
    }

    /// How many reads (`get` and `get_range`) have succeeded.
    pub fn gets(&self) -> u64 {
        self.state.gets.load(Ordering::SeqCst)
    }
}

/// Counts `result` in `counter` when it is a success.
fn count<T>(
    counter: &AtomicU64,
    result: Result<T, ObjectStoreError>,
) -> Result<T, ObjectStoreError> {
    if result.is_ok() {
        counter.fetch_add(1, Ordering::SeqCst);
    }
    result
}

#[async_trait]
impl ObjectStore for FaultStore {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), ObjectStoreError> {
        self.fault("put", key, Some(&self.state.failing_puts))?;
        count(&self.state.puts, self.inner.put(key, data).await)
    }

    async fn get(&self, key: &str) -> Result<Bytes, ObjectStoreError> {
        self.fault("get", key, Some(&self.state.failing_gets))?;
        count(&self.state.gets, self.inner.get(key).await)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, ObjectStoreError> {
        self.fault("get_range", key, Some(&self.state.failing_gets))?;
        count(&self.state.gets, self.inner.get_range(key, range).await)
    }

    async fn list(
        &self,
        prefix: &str,
        continuation: Option<String>,
    ) -> Result<ListPage, ObjectStoreError> {
        self.fault("list", prefix, None)?;
        let page = self.inner.list(prefix, continuation).await?;
        if let Ok(mut listed) = self.state.listed.lock() {
            listed.push(prefix.to_owned());
        }
        Ok(page)
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError> {
        self.fault("delete", key, None)?;
        self.inner.delete(key).await
    }

    fn describe(&self) -> String {
        format!("faults({})", self.inner.describe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    fn stores() -> (Arc<MemoryStore>, FaultStore, Faults) {
        let inner = Arc::new(MemoryStore::new());
        let (store, faults) = FaultStore::new(Arc::clone(&inner) as Arc<dyn ObjectStore>);
        (inner, store, faults)
    }

    #[tokio::test]
    async fn an_outage_fails_every_operation_transiently_until_it_ends() {
        let (inner, store, faults) = stores();
        store.put("a", Bytes::from_static(b"1")).await.unwrap();

        faults.set_outage(true);
        let errors = [
            store.put("b", Bytes::from_static(b"2")).await.unwrap_err(),
            store.get("a").await.unwrap_err(),
            store.get_range("a", 0..1).await.unwrap_err(),
            store.list("", None).await.unwrap_err(),
            store.delete("a").await.unwrap_err(),
        ];
        for error in &errors {
            assert!(
                matches!(error, ObjectStoreError::Unavailable { .. }),
                "{error}"
            );
            assert!(error.is_transient());
        }
        assert_eq!(
            inner.keys(),
            vec!["a".to_owned()],
            "nothing reached the store"
        );

        faults.set_outage(false);
        assert_eq!(store.get("a").await.unwrap(), Bytes::from_static(b"1"));
        store.put("b", Bytes::from_static(b"2")).await.unwrap();
        assert_eq!(inner.object_count(), 2);
    }

    #[tokio::test]
    async fn refusal_is_not_transient() {
        let (_inner, store, faults) = stores();
        faults.set_refused(true);
        let error = store.put("a", Bytes::from_static(b"1")).await.unwrap_err();
        assert!(matches!(error, ObjectStoreError::Refused { .. }), "{error}");
        assert!(!error.is_transient());
        assert!(matches!(
            store.list("", None).await,
            Err(ObjectStoreError::Refused { .. })
        ));
        faults.set_refused(false);
        store.put("a", Bytes::from_static(b"1")).await.unwrap();
    }

    #[tokio::test]
    async fn the_next_n_puts_and_gets_fail_then_requests_go_through_and_are_counted() {
        let (inner, store, faults) = stores();
        faults.fail_next_puts(2);
        for _ in 0..2 {
            let error = store.put("a", Bytes::from_static(b"1")).await.unwrap_err();
            assert!(error.is_transient(), "{error}");
        }
        assert_eq!(inner.object_count(), 0, "a failed put stores nothing");
        assert_eq!(faults.puts(), 0);
        store.put("a", Bytes::from_static(b"1")).await.unwrap();
        assert_eq!(faults.puts(), 1);

        faults.fail_next_gets(2);
        assert!(store.get("a").await.unwrap_err().is_transient());
        assert!(store.get_range("a", 0..1).await.unwrap_err().is_transient());
        assert_eq!(faults.gets(), 0);
        store.get("a").await.unwrap();
        store.get_range("a", 0..1).await.unwrap();
        assert_eq!(faults.gets(), 2);

        // Errors of the inner store are not counted as successes.
        assert!(matches!(
            store.get("missing").await,
            Err(ObjectStoreError::NotFound { .. })
        ));
        assert_eq!(faults.gets(), 2);
        // Lists and deletes use up no read or write failures.
        faults.fail_next_gets(1);
        store.list("", None).await.unwrap();
        store.delete("a").await.unwrap();
        assert!(store.get("a").await.unwrap_err().is_transient());
    }

    #[tokio::test]
    async fn cloned_handles_control_the_same_store() {
        let (_inner, store, faults) = stores();
        let other = faults.clone();
        other.set_outage(true);
        assert!(store.get("a").await.unwrap_err().is_transient());
        faults.set_outage(false);
        assert!(matches!(
            store.get("a").await,
            Err(ObjectStoreError::NotFound { .. })
        ));
    }
}
