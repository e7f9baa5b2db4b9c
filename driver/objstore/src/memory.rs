//! [`MemoryStore`]: objects in a map in memory, for tests.
//!
//! It behaves like the other stores (ordering, pages, errors) so tests written against it hold
//! for them, and it can corrupt its own objects so readers' checksum paths can be tested. It
//! must never be used to hold data that has to survive the process.

use std::collections::BTreeMap;
use std::ops::{Bound, Range};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;

use crate::{ListPage, ListedObject, ObjectStore, ObjectStoreError};

/// Keys returned per listing page, as S3 does.
const PAGE_SIZE: usize = 1000;

/// An object store in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    objects: Mutex<BTreeMap<String, Bytes>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Every key, in order.
    pub fn keys(&self) -> Vec<String> {
        self.objects().keys().cloned().collect()
    }

    /// How many objects the store holds.
    pub fn object_count(&self) -> usize {
        self.objects().len()
    }

    /// Corrupts the byte at `position` of `key` (inverts all its bits), as a disk or a network
    /// might. Returns false when there is no such object or byte.
    pub fn flip_byte(&self, key: &str, position: u64) -> bool {
        let mut objects = self.objects();
        let Some(data) = objects.get_mut(key) else {
            return false;
        };
        let Some(index) = usize::try_from(position).ok().filter(|&i| i < data.len()) else {
            return false;
        };
        let mut corrupted = data.to_vec();
        corrupted[index] ^= 0xff;
        *data = Bytes::from(corrupted);
        true
    }

    /// The map. A panic while holding the lock cannot leave it half-updated (every update is a
    /// single map operation), so a poisoned lock is still good to use.
    fn objects(&self) -> MutexGuard<'_, BTreeMap<String, Bytes>> {
        self.objects.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl ObjectStore for MemoryStore {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), ObjectStoreError> {
        self.objects().insert(key.to_owned(), data);
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, ObjectStoreError> {
        self.objects()
            .get(key)
            .cloned()
            .ok_or_else(|| ObjectStoreError::NotFound {
                key: key.to_owned(),
            })
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, ObjectStoreError> {
        let data = self.get(key).await?;
        let out_of_bounds = || ObjectStoreError::RangeOutOfBounds {
            key: key.to_owned(),
            start: range.start,
            end: range.end,
            size: data.len() as u64,
        };
        let start = usize::try_from(range.start).map_err(|_| out_of_bounds())?;
        let end = usize::try_from(range.end).map_err(|_| out_of_bounds())?;
        if start > end || end > data.len() {
            return Err(out_of_bounds());
        }
        Ok(data.slice(start..end))
    }

    async fn list(
        &self,
        prefix: &str,
        continuation: Option<String>,
    ) -> Result<ListPage, ObjectStoreError> {
        let objects = self.objects();
        let lower = match &continuation {
            Some(after) if after.as_str() >= prefix => Bound::Excluded(after.as_str()),
            _ => Bound::Included(prefix),
        };
        let mut keys: Vec<ListedObject> = objects
            .range::<str, _>((lower, Bound::Unbounded))
            .take_while(|(key, _)| key.starts_with(prefix))
            .take(PAGE_SIZE + 1)
            .map(|(key, data)| ListedObject {
                key: key.clone(),
                size: data.len() as u64,
            })
            .collect();
        let next = if keys.len() > PAGE_SIZE {
            keys.truncate(PAGE_SIZE);
            keys.last().map(|object| object.key.clone())
        } else {
            None
        };
        Ok(ListPage { keys, next })
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError> {
        self.objects().remove(key);
        Ok(())
    }

    fn describe(&self) -> String {
        "memory".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn flip_byte_corrupts_exactly_one_byte_of_an_existing_object() {
        let store = MemoryStore::new();
        store
            .put("a", Bytes::from_static(&[1, 2, 3]))
            .await
            .unwrap();
        assert!(store.flip_byte("a", 1));
        assert_eq!(
            store.get("a").await.unwrap(),
            Bytes::from_static(&[1, 0xfd, 3])
        );
        assert!(!store.flip_byte("a", 3), "past the end");
        assert!(!store.flip_byte("missing", 0));
        assert_eq!(store.keys(), vec!["a".to_owned()]);
        assert_eq!(store.object_count(), 1);
    }

    #[tokio::test]
    async fn a_corrupted_object_does_not_change_slices_read_before() {
        let store = MemoryStore::new();
        store
            .put("a", Bytes::from_static(&[1, 2, 3]))
            .await
            .unwrap();
        let before = store.get_range("a", 0..2).await.unwrap();
        assert!(store.flip_byte("a", 0));
        assert_eq!(before, Bytes::from_static(&[1, 2]));
        assert_eq!(
            store.get_range("a", 0..2).await.unwrap(),
            Bytes::from_static(&[0xfe, 2])
        );
    }
}
