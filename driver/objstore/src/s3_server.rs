//! [`S3sFsServer`]: a real S3-compatible server (the `s3s-fs` binary) on a loopback port, for
//! tests of [`S3Store`](crate::S3Store) and of the crates above it.
//!
//! The server keeps its data in a temp directory that lives as long as the fixture; `stop` and
//! `restart` keep the port and the data so tests can play an outage. The child process is
//! killed when the fixture is dropped. This module must never be used outside tests: it trusts
//! a binary found on PATH.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::S3Config;

/// The bucket every fixture creates.
pub const TEST_BUCKET: &str = "blockgate-test";

const BINARY: &str = "s3s-fs";
const ACCESS_KEY: &str = "blockgate-test-access-key";
const SECRET_KEY: &str = "blockgate-test-secret-key";
/// How long the server may take to start answering (it usually takes milliseconds; a loaded
/// CI machine may be slow).
const START_DEADLINE: Duration = Duration::from_secs(30);
/// How often to check whether the server answers yet.
const POLL_INTERVAL: Duration = Duration::from_millis(10);
/// Attempts at finding a free port: another process may take the one picked between our
/// probe and the server's bind.
const PORT_ATTEMPTS: usize = 3;

/// A running `s3s-fs` with a bucket named [`TEST_BUCKET`].
#[derive(Debug)]
pub struct S3sFsServer {
    binary: PathBuf,
    port: u16,
    /// Holds `data/` (the server's root) and the server's log.
    directory: TempDir,
    child: Option<Child>,
}

impl S3sFsServer {
    /// Starts a server on a free loopback port with an empty bucket.
    ///
    /// Fails (it does not skip) when `s3s-fs` is not installed, so a test run without it
    /// cannot pass by testing nothing.
    pub fn start() -> Result<Self, String> {
        let binary = find_binary()?;
        let directory = tempfile::Builder::new()
            .prefix("blockgate-s3s-fs-")
            .tempdir()
            .map_err(|e| format!("cannot create a directory for s3s-fs: {e}"))?;
        let bucket = directory.path().join("data").join(TEST_BUCKET);
        fs::create_dir_all(&bucket)
            .map_err(|e| format!("cannot create {}: {e}", bucket.display()))?;

        let mut server = Self {
            binary,
            port: 0,
            directory,
            child: None,
        };
        let mut failures = Vec::new();
        for _ in 0..PORT_ATTEMPTS {
            server.port = free_port()?;
            match server.run() {
                Ok(()) => return Ok(server),
                Err(e) => failures.push(e),
            }
        }
        Err(failures.join("\n"))
    }

    /// The URL to give an S3 client.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A configuration for [`TEST_BUCKET`] under `prefix`, with this server's credentials.
    pub fn config(&self, prefix: &str) -> S3Config {
        S3Config {
            bucket: TEST_BUCKET.to_owned(),
            prefix: prefix.to_owned(),
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".to_owned()),
            path_style: true,
            access_key: Some(ACCESS_KEY.to_owned()),
            secret_key: Some(SECRET_KEY.to_owned()),
            max_attempts: 3,
            sign_payload: false,
        }
    }

    /// The server's data directory; the bucket is its subdirectory [`TEST_BUCKET`].
    pub fn root(&self) -> PathBuf {
        self.directory.path().join("data")
    }

    /// Kills the server; requests fail until [`restart`](Self::restart). Data is kept.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Errors mean it has exited already.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        self.run()
    }

    fn log_path(&self) -> PathBuf {
        self.directory.path().join("s3s-fs.log")
    }

    /// Spawns the server and waits until it accepts connections.
    fn run(&mut self) -> Result<(), String> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("cannot open the s3s-fs log: {e}"))?;
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let stderr = log
            .try_clone()
            .map_err(|e| format!("cannot open the s3s-fs log: {e}"))?;
        let port = self.port.to_string();
        let mut child = Command::new(&self.binary)
            .args(["--host", "127.0.0.1", "--port", &port])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.root())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.binary.display()))?;

        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "s3s-fs exited with {status} before answering on port {}:\n{}",
                    self.port,
                    self.log_since(log_start)
                ));
            }
            if TcpStream::connect_timeout(&address, POLL_INTERVAL).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "s3s-fs did not answer on port {} within {START_DEADLINE:?}:\n{}",
                    self.port,
                    self.log_since(log_start)
                ));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    /// What the server logged since `offset`, for error messages.
    fn log_since(&self, offset: u64) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(self.log_path())
            && file.seek(SeekFrom::Start(offset)).is_ok()
        {
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for S3sFsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Finds `s3s-fs` on PATH, then where `cargo install` puts it.
fn find_binary() -> Result<PathBuf, String> {
    let mut directories: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).collect())
        .unwrap_or_default();
    if let Some(cargo_home) = std::env::var_os("CARGO_HOME") {
        directories.push(PathBuf::from(cargo_home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        directories.push(PathBuf::from(home).join(".cargo").join("bin"));
    }
    directories
        .into_iter()
        .map(|directory| directory.join(BINARY))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(|| {
            "s3s-fs is not installed (looked on PATH, in $CARGO_HOME/bin and ~/.cargo/bin): run \
             scripts/test.sh, or `cargo install s3s-fs --version 0.14.1 --features binary --locked`"
                .to_owned()
        })
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16, String> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .map_err(|e| format!("cannot find a free port: {e}"))
}
