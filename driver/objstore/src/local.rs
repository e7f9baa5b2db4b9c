//! [`LocalDirStore`]: objects as files under a root directory, the embedded default store.
//!
//! A key's `/`-separated segments become directories, so a listing is a walk of the tree in
//! key order. Objects are created atomically: the data goes to a temp file in the target's
//! directory, is fsynced, renamed over the final name, and the directory is fsynced. A crash at
//! any point leaves either no object or the whole object; a leftover temp file is never listed
//! or read, because no key may name it.
//!
//! Unlike S3, a key cannot be both an object and a directory of other objects (`a` and `a/b`):
//! the second put is refused. blockgate's layout never does that.
//!
//! This module must never let a key escape the root (`..`, absolute keys) and never expose a
//! partly written file under a key.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use crate::{ListPage, ListedObject, ObjectStore, ObjectStoreError};

/// Names starting with this are temp files of puts in flight (or of puts a crash interrupted).
/// Keys may not contain a segment starting with it, so a temp file never collides with an
/// object and a listing can skip them by name.
const TEMP_PREFIX: &str = ".tmp-";

/// Keys returned per listing page, as S3 does.
const PAGE_SIZE: usize = 1000;

/// How often a put retries creating its temp file when a concurrent delete removed the (then
/// empty) directory between the put's `create_dir` and its `open`, or a random name was taken.
const CREATE_TEMP_RETRIES: usize = 3;

/// A key this store cannot hold.
#[derive(Debug, thiserror::Error)]
#[error("invalid key {key:?}: {reason}")]
struct InvalidKey {
    key: String,
    reason: &'static str,
}

/// Why a blocking task of the store did not finish.
#[derive(Debug, thiserror::Error)]
#[error("local store task did not complete")]
struct TaskFailed(#[source] tokio::task::JoinError);

/// Objects stored as files under a root directory.
#[derive(Debug, Clone)]
pub struct LocalDirStore {
    root: Arc<PathBuf>,
}

impl LocalDirStore {
    /// Opens the store at `root`, creating the directory if needed.
    pub fn new(root: PathBuf) -> Result<Self, ObjectStoreError> {
        fs::create_dir_all(&root).map_err(|e| io_error("open", "", e))?;
        Ok(Self {
            root: Arc::new(root),
        })
    }

    /// The directory holding the objects.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Runs blocking file-system work on tokio's blocking pool.
    async fn blocking<T: Send + 'static>(
        &self,
        operation: &'static str,
        key: &str,
        work: impl FnOnce(&Path) -> Result<T, ObjectStoreError> + Send + 'static,
    ) -> Result<T, ObjectStoreError> {
        let root = Arc::clone(&self.root);
        tokio::task::spawn_blocking(move || work(&root))
            .await
            .map_err(|e| ObjectStoreError::Unavailable {
                operation,
                key: key.to_owned(),
                source: Box::new(TaskFailed(e)),
            })?
    }
}

#[async_trait]
impl ObjectStore for LocalDirStore {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), ObjectStoreError> {
        let relative = validate_key("put", key)?;
        let owned_key = key.to_owned();
        self.blocking("put", key, move |root| {
            write_atomically(root, &relative, |file| file.write_all(&data))
                .map_err(|e| io_error("put", &owned_key, e))
        })
        .await
    }

    async fn get(&self, key: &str) -> Result<Bytes, ObjectStoreError> {
        let relative = validate_key("get", key)?;
        let owned_key = key.to_owned();
        self.blocking("get", key, move |root| {
            let (mut file, size) = open_object("get", &owned_key, &root.join(relative))?;
            let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            file.read_to_end(&mut data)
                .map_err(|e| io_error("get", &owned_key, e))?;
            Ok(Bytes::from(data))
        })
        .await
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, ObjectStoreError> {
        let relative = validate_key("get_range", key)?;
        let owned_key = key.to_owned();
        self.blocking("get_range", key, move |root| {
            let (file, size) = open_object("get_range", &owned_key, &root.join(relative))?;
            let out_of_bounds = || ObjectStoreError::RangeOutOfBounds {
                key: owned_key.clone(),
                start: range.start,
                end: range.end,
                size,
            };
            if range.start > range.end || range.end > size {
                return Err(out_of_bounds());
            }
            let length = usize::try_from(range.end - range.start).map_err(|_| out_of_bounds())?;
            let mut data = vec![0; length];
            file.read_exact_at(&mut data, range.start)
                .map_err(|e| io_error("get_range", &owned_key, e))?;
            Ok(Bytes::from(data))
        })
        .await
    }

    async fn list(
        &self,
        prefix: &str,
        continuation: Option<String>,
    ) -> Result<ListPage, ObjectStoreError> {
        let owned_prefix = prefix.to_owned();
        self.blocking("list", prefix, move |root| {
            list_page(root, &owned_prefix, continuation.as_deref())
                .map_err(|e| io_error("list", &owned_prefix, e))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), ObjectStoreError> {
        let relative = validate_key("delete", key)?;
        let owned_key = key.to_owned();
        self.blocking("delete", key, move |root| {
            let path = root.join(&relative);
            match fs::remove_file(&path) {
                Ok(()) => {}
                // Nothing is stored under this key (a directory or a file in the way of the
                // key's directories is some other key's business).
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::NotFound
                            | io::ErrorKind::NotADirectory
                            | io::ErrorKind::IsADirectory
                    ) =>
                {
                    return Ok(());
                }
                Err(e) => return Err(io_error("delete", &owned_key, e)),
            }
            remove_empty_parents(root, &path);
            Ok(())
        })
        .await
    }

    fn describe(&self) -> String {
        format!("local:{}", self.root.display())
    }
}

/// Checks that `key` names a file strictly inside the root and returns its relative path.
fn validate_key(operation: &'static str, key: &str) -> Result<PathBuf, ObjectStoreError> {
    check_segments(key).map_err(|reason| ObjectStoreError::Refused {
        operation,
        key: key.to_owned(),
        source: Box::new(InvalidKey {
            key: key.to_owned(),
            reason,
        }),
    })?;
    Ok(PathBuf::from(key))
}

/// The rules for a key (and for the directory part of a listing prefix).
fn check_segments(key: &str) -> Result<(), &'static str> {
    if key.is_empty() {
        return Err("the key is empty");
    }
    if key.starts_with('/') {
        return Err("the key starts with '/'");
    }
    if key.contains('\0') {
        return Err("the key contains a NUL byte");
    }
    for segment in key.split('/') {
        match segment {
            "" => return Err("the key has an empty segment"),
            "." | ".." => return Err("the key has a '.' or '..' segment"),
            s if s.starts_with(TEMP_PREFIX) => {
                return Err("a key segment starts with the store's temp-file prefix");
            }
            _ => {}
        }
    }
    Ok(())
}

/// Creates the file `root/relative` with the content `write` produces, atomically and durably:
/// either the whole file appears under its name or nothing does.
fn write_atomically(
    root: &Path,
    relative: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let target = root.join(relative);
    let directory = target.parent().unwrap_or(root).to_path_buf();

    let (temp_path, mut file) = create_temp_file(root, &directory)?;
    let written = write(&mut file)
        .and_then(|()| file.sync_all())
        .and_then(|()| {
            drop(file);
            fs::rename(&temp_path, &target)
        });
    if let Err(e) = written {
        // Best effort: a leftover temp file is invisible anyway.
        let _ = fs::remove_file(&temp_path);
        return Err(e);
    }
    // The rename is durable only once the directory entry is.
    sync_directory(&directory)
}

/// Creates a temp file with a fresh random name in `directory`, creating the directory (and
/// making its creation durable) first.
fn create_temp_file(root: &Path, directory: &Path) -> io::Result<(PathBuf, File)> {
    let mut attempts = 0;
    loop {
        let temp_path = directory.join(format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>()));
        let created = create_directories(root, directory).and_then(|()| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp_path)
        });
        match created {
            Ok(file) => return Ok((temp_path, file)),
            // A delete removed a directory on the way after emptying it: make it again. Or a
            // random name was taken: try another.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::AlreadyExists
                ) && attempts < CREATE_TEMP_RETRIES =>
            {
                attempts += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Creates every missing directory from `root` down to `directory`, fsyncing the parent of each
/// one created so that a crash cannot lose it (and the object later renamed into it).
fn create_directories(root: &Path, directory: &Path) -> io::Result<()> {
    let Ok(relative) = directory.strip_prefix(root) else {
        return Ok(());
    };
    let mut current = root.to_path_buf();
    for component in relative.components() {
        let parent = current.clone();
        current.push(component);
        match fs::create_dir(&current) {
            Ok(()) => sync_directory(&parent)?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn sync_directory(directory: &Path) -> io::Result<()> {
    File::open(directory)?.sync_all()
}

/// Removes the now empty directories above a deleted object, stopping at the first one that
/// still holds something. A put racing with this recreates its directory (see
/// [`create_temp_file`]).
fn remove_empty_parents(root: &Path, deleted: &Path) {
    let mut directory = deleted.parent();
    while let Some(current) = directory {
        if current == root || !current.starts_with(root) || fs::remove_dir(current).is_err() {
            return;
        }
        directory = current.parent();
    }
}

/// Opens an object for reading and returns it with its size; a missing file (or a directory
/// where the key's file would be) is [`ObjectStoreError::NotFound`].
fn open_object(
    operation: &'static str,
    key: &str,
    path: &Path,
) -> Result<(File, u64), ObjectStoreError> {
    let not_found = || ObjectStoreError::NotFound {
        key: key.to_owned(),
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Err(not_found());
        }
        Err(e) => return Err(io_error(operation, key, e)),
    };
    let metadata = file.metadata().map_err(|e| io_error(operation, key, e))?;
    if !metadata.is_file() {
        return Err(not_found());
    }
    Ok((file, metadata.len()))
}

/// Maps an I/O error: permission problems need an operator (Refused), anything else — a full
/// disk, an I/O error, a busy device — may go away (Unavailable).
fn io_error(operation: &'static str, key: &str, error: io::Error) -> ObjectStoreError {
    let key = key.to_owned();
    match error.kind() {
        io::ErrorKind::PermissionDenied
        | io::ErrorKind::ReadOnlyFilesystem
        // A file where the key needs a directory or the reverse: another key is in the way, and
        // retrying cannot change that.
        | io::ErrorKind::NotADirectory
        | io::ErrorKind::IsADirectory => ObjectStoreError::Refused {
            operation,
            key,
            source: Box::new(error),
        },
        _ => ObjectStoreError::Unavailable {
            operation,
            key,
            source: Box::new(error),
        },
    }
}

/// One page of keys under `prefix` that sort after `after`.
fn list_page(root: &Path, prefix: &str, after: Option<&str>) -> io::Result<ListPage> {
    // Every key under the prefix lives below the directory named by the prefix's complete
    // segments; start the walk there. If those segments cannot be a key's, nothing matches.
    let (start_directory, start_key_prefix) = match prefix.rfind('/') {
        Some(end) => {
            if check_segments(&prefix[..end]).is_err() {
                return Ok(ListPage::default());
            }
            (root.join(&prefix[..end]), &prefix[..=end])
        }
        None => (root.to_path_buf(), ""),
    };
    let mut walk = Walk {
        prefix,
        after,
        // One more than a page tells whether another page follows.
        limit: PAGE_SIZE + 1,
        found: Vec::new(),
    };
    walk.directory(&start_directory, start_key_prefix)?;

    let mut keys = walk.found;
    let next = if keys.len() > PAGE_SIZE {
        keys.truncate(PAGE_SIZE);
        keys.last().map(|object| object.key.clone())
    } else {
        None
    };
    Ok(ListPage { keys, next })
}

/// A depth-first walk that visits keys in lexicographic order and stops after `limit` keys.
///
/// Within one directory, ordering entries by their key text (a directory's with a trailing
/// `/`, as its keys have) orders their keys too: every key below directory `d` starts with
/// `d/`, and `/` cannot occur inside a single name. So a page costs the directories on its way,
/// not the whole tree.
struct Walk<'a> {
    prefix: &'a str,
    after: Option<&'a str>,
    limit: usize,
    found: Vec<ListedObject>,
}

impl Walk<'_> {
    /// Walks `directory`, whose entries' keys start with `key_prefix`. Returns once `limit`
    /// keys are found.
    fn directory(&mut self, directory: &Path, key_prefix: &str) -> io::Result<()> {
        let entries = match fs::read_dir(directory) {
            Ok(entries) => entries,
            // Deleted while walking, or never created: no keys there.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
                ) =>
            {
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let mut children = Vec::new();
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else {
                continue; // no key produces a non-UTF-8 name
            };
            if name.starts_with(TEMP_PREFIX) {
                continue;
            }
            let file_type = entry.file_type()?;
            if file_type.is_dir() {
                children.push((format!("{key_prefix}{name}/"), true));
            } else if file_type.is_file() {
                children.push((format!("{key_prefix}{name}"), false));
            }
        }
        children.sort_unstable();

        for (key, is_directory) in children {
            if is_directory {
                if !self.may_hold_matches(&key) {
                    continue;
                }
                let name = key[key_prefix.len()..key.len() - 1].to_owned();
                self.directory(&directory.join(OsStr::new(&name)), &key)?;
            } else {
                if !key.starts_with(self.prefix)
                    || self.after.is_some_and(|after| key.as_str() <= after)
                {
                    continue;
                }
                let size = match fs::metadata(directory.join(&key[key_prefix.len()..])) {
                    Ok(metadata) => metadata.len(),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // just deleted
                    Err(e) => return Err(e),
                };
                self.found.push(ListedObject { key, size });
            }
            if self.found.len() >= self.limit {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Whether the directory whose keys all start with `directory_key` can hold a key of this
    /// page: one matching the prefix and sorting after the continuation token.
    fn may_hold_matches(&self, directory_key: &str) -> bool {
        let prefix_overlaps =
            directory_key.starts_with(self.prefix) || self.prefix.starts_with(directory_key);
        // If `after` sorts above `directory_key` without starting with it, it sorts above every
        // key that starts with `directory_key`.
        let after_the_token = match self.after {
            Some(after) => after < directory_key || after.starts_with(directory_key),
            None => true,
        };
        prefix_overlaps && after_the_token
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, LocalDirStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalDirStore::new(dir.path().join("objects")).unwrap();
        (dir, store)
    }

    fn files_in(directory: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(directory)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn keys_that_escape_the_root_or_are_malformed_are_refused() {
        let (dir, store) = store();
        for key in [
            "",
            "/etc/passwd",
            "../outside",
            "a/../../outside",
            "a/./b",
            "a//b",
            "a/",
            "a/.tmp-1234",
            "nul\0byte",
        ] {
            let error = store
                .put(key, Bytes::from_static(b"x"))
                .await
                .expect_err(key);
            assert!(
                matches!(error, ObjectStoreError::Refused { .. }),
                "{key:?}: {error}"
            );
            assert!(!error.is_transient());
            assert!(matches!(
                store.get(key).await,
                Err(ObjectStoreError::Refused { .. })
            ));
            assert!(matches!(
                store.delete(key).await,
                Err(ObjectStoreError::Refused { .. })
            ));
        }
        assert!(!dir.path().join("outside").exists());
        assert!(files_in(store.root()).is_empty());
    }

    #[tokio::test]
    async fn a_put_that_fails_midway_leaves_no_object_and_no_temp_file() {
        let (_dir, store) = store();
        let root = store.root().to_path_buf();
        let error = write_atomically(&root, Path::new("volumes/v1/segment"), |file| {
            file.write_all(b"the first half")?;
            Err(io::Error::other("the disk went away"))
        })
        .expect_err("the write failed");
        assert_eq!(error.to_string(), "the disk went away");

        assert!(matches!(
            store.get("volumes/v1/segment").await,
            Err(ObjectStoreError::NotFound { .. })
        ));
        assert!(crate::list_all(&store, "").await.unwrap().is_empty());
        assert!(files_in(&root.join("volumes/v1")).is_empty());
    }

    #[tokio::test]
    async fn temp_files_left_by_a_crash_are_never_listed_or_read() {
        let (_dir, store) = store();
        store
            .put("volumes/v1/a", Bytes::from_static(b"complete"))
            .await
            .unwrap();
        // What a crash between writing and renaming leaves behind.
        let directory = store.root().join("volumes/v1");
        fs::write(directory.join(".tmp-00000000deadbeef"), b"torn").unwrap();
        fs::create_dir(store.root().join(".tmp-dir")).unwrap();
        fs::write(store.root().join(".tmp-dir/b"), b"torn").unwrap();

        let listed = crate::list_all(&store, "").await.unwrap();
        assert_eq!(
            listed,
            vec![ListedObject {
                key: "volumes/v1/a".into(),
                size: 8
            }]
        );
        assert!(matches!(
            store.get("volumes/v1/.tmp-00000000deadbeef").await,
            Err(ObjectStoreError::Refused { .. })
        ));
        // A later put of the same directory is unaffected by the leftover.
        store
            .put("volumes/v1/b", Bytes::from_static(b"next"))
            .await
            .unwrap();
        assert_eq!(
            store.get("volumes/v1/b").await.unwrap(),
            Bytes::from_static(b"next")
        );
    }

    #[tokio::test]
    async fn a_successful_put_leaves_only_the_object() {
        let (_dir, store) = store();
        store
            .put("a/b/c", Bytes::from_static(b"data"))
            .await
            .unwrap();
        assert_eq!(files_in(&store.root().join("a/b")), vec!["c".to_owned()]);
        assert_eq!(
            fs::read(store.root().join("a/b/c")).unwrap(),
            b"data".to_vec()
        );
    }

    #[tokio::test]
    async fn deleting_the_last_object_removes_its_empty_directories() {
        let (_dir, store) = store();
        store.put("a/b/c", Bytes::from_static(b"1")).await.unwrap();
        store.put("a/d", Bytes::from_static(b"2")).await.unwrap();
        store.delete("a/b/c").await.unwrap();
        assert_eq!(files_in(store.root()), vec!["a".to_owned()]);
        assert_eq!(files_in(&store.root().join("a")), vec!["d".to_owned()]);
        // And a put into the removed directory recreates it.
        store.put("a/b/e", Bytes::from_static(b"3")).await.unwrap();
        assert_eq!(store.get("a/b/e").await.unwrap(), Bytes::from_static(b"3"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn puts_succeed_while_deletes_empty_and_remove_their_directory() {
        let (_dir, store) = store();
        let store = Arc::new(store);
        for round in 0..200 {
            store
                .put("race/dir/old", Bytes::from_static(b"old"))
                .await
                .unwrap();
            let deleter = {
                let store = Arc::clone(&store);
                tokio::spawn(async move { store.delete("race/dir/old").await })
            };
            let key = format!("race/dir/new-{round}");
            store.put(&key, Bytes::from_static(b"new")).await.unwrap();
            deleter.await.unwrap().unwrap();
            assert_eq!(store.get(&key).await.unwrap(), Bytes::from_static(b"new"));
            store.delete(&key).await.unwrap();
        }
        assert!(crate::list_all(&*store, "").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_key_under_an_existing_object_is_refused_not_unavailable() {
        let (_dir, store) = store();
        store.put("a", Bytes::from_static(b"1")).await.unwrap();
        let error = store
            .put("a/b", Bytes::from_static(b"2"))
            .await
            .unwrap_err();
        assert!(matches!(error, ObjectStoreError::Refused { .. }), "{error}");
        // A key whose path runs through a file is simply missing.
        assert!(matches!(
            store.get("a/b").await,
            Err(ObjectStoreError::NotFound { .. })
        ));
        store.delete("a/b").await.unwrap();
    }

    #[test]
    fn the_walk_prunes_directories_outside_the_page() {
        let walk = Walk {
            prefix: "v/",
            after: Some("v/b/5"),
            limit: 10,
            found: Vec::new(),
        };
        assert!(!walk.may_hold_matches("w/"));
        assert!(!walk.may_hold_matches("v/a/"));
        assert!(walk.may_hold_matches("v/b/"));
        assert!(walk.may_hold_matches("v/c/"));
        assert!(walk.may_hold_matches("v/"));
        // "v/b-x/" sorts before "v/b/5" ('-' < '/'), so everything in it was listed already.
        assert!(!walk.may_hold_matches("v/b-x/"));
    }
}
