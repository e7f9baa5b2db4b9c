//! Fixtures for blockgate's whole-system tests: they start the real `blockgate-gateway` binary
//! on a temporary data directory, drive it with real NBD clients (qemu-io, nbdsh, nbdinfo,
//! nbdcopy, python's libnbd, and a small independent client of our own), kill it with
//! SIGKILL, and look at what a user would see: bytes read back, exit codes, error messages,
//! metrics.
//!
//! This crate must never reach into the gateway's internals: everything goes through the
//! binary's command line, its sockets, and the bucket's files (the corruption test flips a byte
//! the way a bad disk would). It never sleeps to synchronise; [`poll::wait_until`] waits on a
//! condition with a deadline.

pub mod binary;
pub mod content;
pub mod gateway;
pub mod guest;
pub mod nbd_client;
pub mod poll;
pub mod tools;

pub use content::{Fill, VolumeModel};
pub use gateway::{AdminError, Gateway, GatewayOptions};
pub use nbd_client::{NbdClient, NbdError};
pub use poll::{wait_until, wait_until_every};

/// A fresh directory for one test; removed when dropped unless the test panicked, so a failure
/// leaves the gateway's logs and data behind for inspection.
#[derive(Debug)]
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new(name: &str) -> TestDir {
        let dir = tempfile::Builder::new()
            .prefix(&format!("bg-e2e-{name}-"))
            .tempdir()
            .expect("cannot create a temp directory for the test");
        TestDir { dir: Some(dir) }
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir
            .as_ref()
            .map(tempfile::TempDir::path)
            .expect("test directory is present until drop")
    }

    /// A path inside the directory (not created).
    pub fn join(&self, name: &str) -> std::path::PathBuf {
        self.path().join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            let kept = dir.keep();
            eprintln!("test failed; its files are kept in {}", kept.display());
        }
    }
}
