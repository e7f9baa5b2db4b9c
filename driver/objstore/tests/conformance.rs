//! One behaviour for every store: the checks below take any `&dyn ObjectStore` and run
//! against the local-directory, in-memory, fault-injecting (with no fault on) and S3 (on a
//! real s3s-fs server) stores. A store that passes them can stand in for any other.

// The checks are helpers, not #[test] functions, so clippy's allow-unwrap-in-tests does not
// reach them; a panic is how they report a failure.
#![allow(clippy::unwrap_used)]

use std::any::Any;
use std::sync::Arc;

use blockgate_objstore::{
    FaultStore, ListedObject, LocalDirStore, MemoryStore, ObjectStore, ObjectStoreError, list_all,
};
use bytes::Bytes;
use futures::stream::{self, StreamExt, TryStreamExt};

/// A store and whatever must live as long as it (a temp directory, a server).
struct Fixture {
    store: Arc<dyn ObjectStore>,
    _keep_alive: Box<dyn Any>,
}

fn local() -> Fixture {
    let directory = tempfile::tempdir().unwrap();
    let store = LocalDirStore::new(directory.path().join("store")).unwrap();
    Fixture {
        store: Arc::new(store),
        _keep_alive: Box::new(directory),
    }
}

fn memory() -> Fixture {
    Fixture {
        store: Arc::new(MemoryStore::new()),
        _keep_alive: Box::new(()),
    }
}

fn fault_without_faults() -> Fixture {
    let (store, faults) = FaultStore::new(Arc::new(MemoryStore::new()));
    Fixture {
        store: Arc::new(store),
        _keep_alive: Box::new(faults),
    }
}

#[cfg(feature = "s3-test-server")]
async fn s3() -> Fixture {
    use blockgate_objstore::{S3Store, S3sFsServer};
    // Fails rather than skips when s3s-fs is missing: the project's test script installs it.
    let server = S3sFsServer::start().unwrap_or_else(|e| panic!("{e}"));
    let store = S3Store::new(server.config("conformance")).await.unwrap();
    Fixture {
        store: Arc::new(store),
        _keep_alive: Box::new(server),
    }
}

/// Deterministic bytes that differ from position to position, so a shifted or mixed-up read
/// cannot pass for the right one.
fn pattern(length: usize, seed: u8) -> Bytes {
    (0..length)
        .map(|i| u8::try_from(i % 251).unwrap() ^ seed)
        .collect::<Vec<u8>>()
        .into()
}

async fn put_then_get_returns_the_same_bytes(store: &dyn ObjectStore) {
    let data = pattern(4096, 1);
    store.put("objects/one", data.clone()).await.unwrap();
    assert_eq!(store.get("objects/one").await.unwrap(), data);

    store.put("objects/empty", Bytes::new()).await.unwrap();
    assert_eq!(store.get("objects/empty").await.unwrap(), Bytes::new());

    assert_eq!(
        list_all(store, "objects/").await.unwrap(),
        vec![
            ListedObject {
                key: "objects/empty".into(),
                size: 0
            },
            ListedObject {
                key: "objects/one".into(),
                size: 4096
            },
        ]
    );
}

async fn ranged_reads_return_exactly_the_bytes_asked_for(store: &dyn ObjectStore) {
    let data = pattern(10_000, 2);
    store.put("ranges/object", data.clone()).await.unwrap();
    for range in [0..1, 100..2_000, 9_990..10_000, 0..10_000] {
        let (start, end) = (
            usize::try_from(range.start).unwrap(),
            usize::try_from(range.end).unwrap(),
        );
        assert_eq!(
            store
                .get_range("ranges/object", range.clone())
                .await
                .unwrap(),
            data.slice(start..end),
            "{range:?}"
        );
    }
    assert_eq!(
        store.get_range("ranges/object", 500..500).await.unwrap(),
        Bytes::new()
    );
    assert_eq!(
        store
            .get_range("ranges/object", 10_000..10_000)
            .await
            .unwrap(),
        Bytes::new(),
        "an empty range at the very end"
    );
}

async fn ranges_past_the_end_are_errors_not_short_reads(store: &dyn ObjectStore) {
    store
        .put("ranges/object", pattern(10_000, 3))
        .await
        .unwrap();
    for range in [9_990..10_001, 10_000..10_010, 20_000..20_010] {
        match store.get_range("ranges/object", range.clone()).await {
            Err(ObjectStoreError::RangeOutOfBounds {
                key,
                start,
                end,
                size,
            }) => {
                assert_eq!(key, "ranges/object");
                assert_eq!((start, end), (range.start, range.end));
                assert_eq!(size, 10_000, "{range:?}");
            }
            other => panic!("{range:?}: expected RangeOutOfBounds, got {other:?}"),
        }
    }
    let error = store
        .get_range("ranges/object", 9_000..11_000)
        .await
        .unwrap_err();
    assert!(!error.is_transient(), "{error}");
}

async fn missing_objects_are_not_found(store: &dyn ObjectStore) {
    for result in [
        store.get("missing/object").await,
        store.get_range("missing/object", 0..10).await,
    ] {
        match result {
            Err(error @ ObjectStoreError::NotFound { .. }) => {
                assert!(!error.is_transient());
                assert!(error.to_string().contains("missing/object"), "{error}");
            }
            other => panic!("expected NotFound, got {other:?}"),
        }
    }
}

async fn delete_removes_the_object_and_is_idempotent(store: &dyn ObjectStore) {
    store
        .put("delete/victim", Bytes::from_static(b"gone soon"))
        .await
        .unwrap();
    store
        .put("delete/survivor", Bytes::from_static(b"stays"))
        .await
        .unwrap();
    store.delete("delete/victim").await.unwrap();
    assert!(matches!(
        store.get("delete/victim").await,
        Err(ObjectStoreError::NotFound { .. })
    ));
    store.delete("delete/victim").await.unwrap();
    store.delete("delete/never-existed").await.unwrap();
    store.delete("never/existed/at/all").await.unwrap();
    let keys: Vec<String> = list_all(store, "delete/")
        .await
        .unwrap()
        .into_iter()
        .map(|object| object.key)
        .collect();
    assert_eq!(keys, vec!["delete/survivor".to_owned()]);
}

async fn listings_page_in_key_order_and_filter_by_prefix(store: &dyn ObjectStore) {
    const COUNT: usize = 1_050;
    let mut inside: Vec<String> = (0..COUNT).map(|i| format!("list/a/{i:04}")).collect();
    // Each sorts differently from its place in a directory walk: '-' < '/' < 'b'.
    let neighbours = ["list/a-first", "list/ab", "list/b/0", "lisu"];
    inside.push("list/a/deep/er/key".to_owned());
    let all: Vec<&str> = inside
        .iter()
        .map(String::as_str)
        .chain(neighbours)
        .collect();
    stream::iter(all.iter().enumerate())
        .map(|(i, key)| store.put(key, Bytes::from(vec![0; i % 7])))
        .buffer_unordered(16)
        .try_collect::<()>()
        .await
        .unwrap();

    // Page by page under "list/a/": full pages, in order, nothing from the neighbours.
    let mut pages = Vec::new();
    let mut next = None;
    loop {
        let page = store.list("list/a/", next).await.unwrap();
        assert!(page.keys.len() <= 1000, "a page holds at most 1000 keys");
        pages.push(page.keys.len());
        next = page.next;
        if next.is_none() {
            break;
        }
        assert!(pages.len() < 10, "the listing does not end");
    }
    assert!(
        pages.len() >= 2,
        "{} keys fit in one page: {pages:?}",
        COUNT + 1
    );
    assert_eq!(pages.iter().sum::<usize>(), COUNT + 1);

    let listed = list_all(store, "list/a/").await.unwrap();
    let keys: Vec<&str> = listed.iter().map(|object| object.key.as_str()).collect();
    let mut expected: Vec<&str> = inside.iter().map(String::as_str).collect();
    expected.sort_unstable();
    assert_eq!(keys, expected);
    assert_eq!(listed[5].size, 5, "sizes are listed");

    // A prefix that ends inside a segment, across directory boundaries.
    let keys: Vec<String> = list_all(store, "list/a")
        .await
        .unwrap()
        .into_iter()
        .map(|object| object.key)
        .collect();
    assert_eq!(keys.len(), COUNT + 3);
    assert_eq!(keys.first().map(String::as_str), Some("list/a-first"));
    assert_eq!(keys[1], "list/a/0000");
    assert_eq!(keys.last().map(String::as_str), Some("list/ab"));
    assert!(keys.is_sorted());

    assert_eq!(
        list_all(store, "list/a/10").await.unwrap().len(),
        50,
        "list/a/1000 to list/a/1049"
    );
    // A continuation is a key: any key resumes the listing right after it.
    let resumed = store
        .list("list/a/", Some("list/a/0999".into()))
        .await
        .unwrap();
    let resumed: Vec<&str> = resumed.keys.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(resumed.first(), Some(&"list/a/1000"));
    assert_eq!(
        resumed.len(),
        51,
        "list/a/1000 to list/a/1049 and list/a/deep/er/key"
    );
    let resumed = store
        .list("list/a/", Some("list/a/0998x".into()))
        .await
        .unwrap();
    assert_eq!(
        resumed.keys[0].key, "list/a/0999",
        "a key that is not stored"
    );

    let empty = store.list("list/nothing/", None).await.unwrap();
    assert!(empty.keys.is_empty() && empty.next.is_none(), "{empty:?}");
}

async fn nested_keys_round_trip(store: &dyn ObjectStore) {
    let keys = [
        "nested/1/2/3/4/leaf",
        "nested/1/other",
        "nested/top",
        "volumes/3f2a/segments/00000001-0000000000000042",
    ];
    for (i, key) in keys.iter().enumerate() {
        store.put(key, pattern(100 + i, 0)).await.unwrap();
    }
    for (i, key) in keys.iter().enumerate() {
        assert_eq!(store.get(key).await.unwrap(), pattern(100 + i, 0));
    }
    let listed: Vec<String> = list_all(store, "nested/")
        .await
        .unwrap()
        .into_iter()
        .map(|object| object.key)
        .collect();
    assert_eq!(listed, keys[..3]);
    let deep: Vec<String> = list_all(store, "nested/1/2")
        .await
        .unwrap()
        .into_iter()
        .map(|object| object.key)
        .collect();
    assert_eq!(deep, ["nested/1/2/3/4/leaf"]);
}

/// Larger than a single PUT may be on S3 (16 MiB), with a last part shorter than the others.
async fn large_objects_round_trip(store: &dyn ObjectStore) {
    const MIB: usize = 1024 * 1024;
    let data = pattern(20 * MIB + 12_345, 9);
    store.put("large/object", data.clone()).await.unwrap();
    assert!(store.get("large/object").await.unwrap() == data);
    // Across the boundary of the first two 8 MiB parts.
    let boundary = (8 * MIB) as u64;
    assert_eq!(
        store
            .get_range("large/object", boundary - 10..boundary + 10)
            .await
            .unwrap(),
        data.slice(8 * MIB - 10..8 * MIB + 10)
    );
    let listed = list_all(store, "large/").await.unwrap();
    assert_eq!(listed[0].size, data.len() as u64);
}

/// One test per check and store, so a failure names both.
macro_rules! conformance {
    ($store:ident, $fixture:expr) => {
        mod $store {
            use super::*;

            conformance!(@check $fixture, put_then_get_returns_the_same_bytes);
            conformance!(@check $fixture, ranged_reads_return_exactly_the_bytes_asked_for);
            conformance!(@check $fixture, ranges_past_the_end_are_errors_not_short_reads);
            conformance!(@check $fixture, missing_objects_are_not_found);
            conformance!(@check $fixture, delete_removes_the_object_and_is_idempotent);
            conformance!(@check $fixture, listings_page_in_key_order_and_filter_by_prefix);
            conformance!(@check $fixture, nested_keys_round_trip);
            conformance!(@check $fixture, large_objects_round_trip);
        }
    };
    (@check $fixture:expr, $check:ident) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $check() {
            let fixture = $fixture;
            super::$check(&*fixture.store).await;
        }
    };
}

conformance!(local_dir_store, local());
conformance!(memory_store, memory());
conformance!(fault_store, fault_without_faults());
#[cfg(feature = "s3-test-server")]
conformance!(s3_store, s3().await);
