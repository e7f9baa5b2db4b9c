//! A `blockgate-gateway serve` process on a data directory: started, waited for (`ready`),
//! stopped with SIGTERM or killed with SIGKILL, and managed through the binary's own admin
//! commands.
//!
//! The gateway's log (stderr) goes to `<data-dir>.log` beside the data directory, so it
//! survives a test that deletes the data directory; a test that panics prints its tail.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use blockgate_objstore::S3sFsServer;

use crate::binary::gateway_binary;
use crate::poll::wait_until;
use crate::tools::run_with_timeout;

/// How long a gateway may take to print `ready` (it replays write logs and lists the bucket
/// first; a loaded machine running tests in parallel can be slow).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a gateway may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an admin command may take (`snapshot wait` is given shorter timeouts).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(180);
/// Lines of the gateway's log printed when a test fails.
const LOG_TAIL_LINES: usize = 80;

/// Where the volumes' data lives, and how to reach it.
#[derive(Debug, Clone)]
enum Store {
    /// `<data-dir>/bucket`.
    Default,
    /// A local directory used as the bucket.
    Directory(PathBuf),
    /// A real S3-compatible server.
    S3 {
        url: String,
        endpoint: String,
        region: String,
        access_key: String,
        secret_key: String,
    },
}

/// How to start a gateway. Defaults suit tests: small segments, a short seal interval, metrics
/// on a free loopback port.
#[derive(Debug, Clone)]
pub struct GatewayOptions {
    data_dir: PathBuf,
    store: Store,
    volumes: Vec<String>,
    seal_interval_ms: u64,
    segment_size: String,
    log_capacity: Option<String>,
    cache_capacity: Option<String>,
    gc_grace_seconds: Option<u64>,
    attach_only: bool,
}

impl GatewayOptions {
    pub fn new(data_dir: impl Into<PathBuf>) -> GatewayOptions {
        GatewayOptions {
            data_dir: data_dir.into(),
            store: Store::Default,
            volumes: Vec::new(),
            seal_interval_ms: 200,
            segment_size: "1MiB".to_string(),
            log_capacity: None,
            cache_capacity: None,
            gc_grace_seconds: None,
            attach_only: false,
        }
    }

    /// Creates `NAME=SIZE[:stored]` at start unless it exists.
    pub fn volume(mut self, flag: &str) -> Self {
        self.volumes.push(flag.to_string());
        self
    }

    /// Uses a local directory as the bucket instead of `<data-dir>/bucket`.
    pub fn store_directory(mut self, directory: impl Into<PathBuf>) -> Self {
        self.store = Store::Directory(directory.into());
        self
    }

    /// Uses `server`'s test bucket under `prefix`, with the credentials in the standard AWS
    /// environment variables as an operator would pass them.
    pub fn s3(mut self, server: &S3sFsServer, prefix: &str) -> Self {
        let config = server.config(prefix);
        self.store = Store::S3 {
            url: format!("s3://{}/{}", config.bucket, config.prefix),
            endpoint: server.endpoint(),
            region: config.region.unwrap_or_else(|| "us-east-1".to_string()),
            access_key: config
                .access_key
                .expect("the test server has an access key"),
            secret_key: config.secret_key.expect("the test server has a secret key"),
        };
        self
    }

    pub fn seal_interval_ms(mut self, milliseconds: u64) -> Self {
        self.seal_interval_ms = milliseconds;
        self
    }

    pub fn segment_size(mut self, size: &str) -> Self {
        self.segment_size = size.to_string();
        self
    }

    pub fn log_capacity(mut self, size: &str) -> Self {
        self.log_capacity = Some(size.to_string());
        self
    }

    pub fn cache_capacity(mut self, size: &str) -> Self {
        self.cache_capacity = Some(size.to_string());
        self
    }

    pub fn gc_grace_seconds(mut self, seconds: u64) -> Self {
        self.gc_grace_seconds = Some(seconds);
        self
    }

    /// Managed mode (`serve --attach-only`): the gateway opens only volumes attached to it.
    pub fn attach_only(mut self) -> Self {
        self.attach_only = true;
        self
    }

    /// The same gateway configuration on another data directory (same bucket unless the
    /// bucket is the default one inside the data directory).
    pub fn with_data_dir(&self, data_dir: impl Into<PathBuf>) -> GatewayOptions {
        GatewayOptions {
            data_dir: data_dir.into(),
            ..self.clone()
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The directory holding the bucket's objects, for a local store.
    pub fn bucket_directory(&self) -> Option<PathBuf> {
        match &self.store {
            Store::Default => Some(self.data_dir.join("bucket")),
            Store::Directory(directory) => Some(directory.clone()),
            Store::S3 { .. } => None,
        }
    }

    pub fn start(&self) -> Gateway {
        Gateway::start(self.clone())
    }
}

/// An admin command that failed: its exit status and what it printed.
#[derive(Debug)]
pub struct AdminError {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exited with {}; stderr: {}; stdout: {}",
            self.status,
            self.stderr.trim(),
            self.stdout.trim()
        )
    }
}

/// A running gateway. Killed with SIGKILL when dropped.
#[derive(Debug)]
pub struct Gateway {
    options: GatewayOptions,
    child: Option<Child>,
    log_path: PathBuf,
    nbd_socket: PathBuf,
    metrics_address: SocketAddr,
    exports: Vec<String>,
}

impl Gateway {
    /// Starts `blockgate-gateway serve` and waits until it prints `ready`.
    pub fn start(options: GatewayOptions) -> Gateway {
        std::fs::create_dir_all(&options.data_dir).expect("cannot create the data directory");
        let log_path = log_path_for(&options.data_dir);
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .expect("cannot open the gateway log");
        let _ = writeln!(log, "==== blockgate-gateway serve starting ====");
        let mut command = Command::new(gateway_binary());
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&options.data_dir)
            .args(["--metrics", "127.0.0.1:0"])
            .args(["--seal-interval-ms", &options.seal_interval_ms.to_string()])
            .args(["--segment-size", &options.segment_size])
            // Garbage collection only on request, so tests see its effects when they ask.
            .args(["--gc-interval-seconds", "0"])
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            // An error at start is one readable line, not a backtrace (panics keep theirs).
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log);
        if let Some(size) = &options.log_capacity {
            command.args(["--log-capacity", size]);
        }
        if let Some(size) = &options.cache_capacity {
            command.args(["--cache-capacity", size]);
        }
        if let Some(seconds) = options.gc_grace_seconds {
            command.args(["--gc-grace-seconds", &seconds.to_string()]);
        }
        if options.attach_only {
            command.arg("--attach-only");
        }
        for volume in &options.volumes {
            command.args(["--volume", volume]);
        }
        match &options.store {
            Store::Default => {}
            Store::Directory(directory) => {
                command.arg("--store").arg(directory);
            }
            Store::S3 {
                url,
                endpoint,
                region,
                access_key,
                secret_key,
            } => {
                command
                    .args(["--store", url, "--s3-endpoint", endpoint])
                    .args(["--s3-region", region, "--s3-path-style"])
                    .env("AWS_ACCESS_KEY_ID", access_key)
                    .env("AWS_SECRET_ACCESS_KEY", secret_key)
                    .env("AWS_REGION", region)
                    // Hermetic: no profile files, no instance metadata lookups.
                    .env("AWS_EC2_METADATA_DISABLED", "true")
                    .env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
                    .env(
                        "AWS_SHARED_CREDENTIALS_FILE",
                        "/nonexistent/aws-credentials",
                    )
                    .env_remove("AWS_PROFILE")
                    .env_remove("AWS_SESSION_TOKEN");
            }
        }
        let mut child = command.spawn().expect("cannot start blockgate-gateway");
        let stdout = child.stdout.take().expect("stdout is piped");
        let (lines_sender, lines) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            // Keeps draining stdout after `ready` so the gateway never blocks on a full pipe.
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = lines_sender.send(line);
            }
        });
        let mut gateway = Gateway {
            nbd_socket: options.data_dir.join("nbd.sock"),
            options,
            child: Some(child),
            log_path,
            metrics_address: SocketAddr::from(([127, 0, 0, 1], 0)),
            exports: Vec::new(),
        };
        gateway.wait_ready(&lines);
        gateway
    }

    fn wait_ready(&mut self, lines: &mpsc::Receiver<String>) {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left.min(Duration::from_millis(100))) {
                Ok(line) => {
                    if let Some(address) = line
                        .strip_prefix("metrics: http://")
                        .and_then(|rest| rest.strip_suffix("/metrics"))
                    {
                        self.metrics_address = address
                            .parse()
                            .unwrap_or_else(|e| panic!("bad metrics address in {line:?}: {e}"));
                    }
                    if let Some(rest) = line.strip_prefix("export ")
                        && let Some((name, uri)) = rest.split_once(": ")
                    {
                        assert!(
                            uri.ends_with(&format!("socket={}", self.nbd_socket.display())),
                            "export line {line:?} names another socket than {}",
                            self.nbd_socket.display()
                        );
                        self.exports.push(name.to_string());
                    }
                    let ready = line == "ready";
                    seen.push(line);
                    if ready {
                        assert_ne!(
                            self.metrics_address.port(),
                            0,
                            "the gateway never printed its metrics address: {seen:?}"
                        );
                        return;
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.as_mut().and_then(|c| c.wait().ok());
                    panic!(
                        "blockgate-gateway exited ({status:?}) before printing `ready`; stdout: {seen:?}\n{}",
                        self.log_tail()
                    );
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "blockgate-gateway did not print `ready` within {START_TIMEOUT:?}; stdout: {seen:?}\n{}",
                    self.log_tail()
                );
            }
        }
    }

    pub fn options(&self) -> &GatewayOptions {
        &self.options
    }

    pub fn data_dir(&self) -> &Path {
        &self.options.data_dir
    }

    pub fn nbd_socket(&self) -> &Path {
        &self.nbd_socket
    }

    /// The volumes the gateway printed an `export` line for at start.
    pub fn exports_at_start(&self) -> &[String] {
        &self.exports
    }

    /// `nbd+unix:///VOLUME?socket=...`
    pub fn uri(&self, volume: &str) -> String {
        format!("nbd+unix:///{volume}?socket={}", self.nbd_socket.display())
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("gateway is running")
    }

    /// True while the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Kills the gateway with SIGKILL, as a crash or the OOM killer would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // An error means it has exited already.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the gateway with SIGTERM and waits for it to exit; panics if it does not.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: sending a signal to our own child process, which has not been reaped yet.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    assert!(
                        status.success(),
                        "gateway exited with {status} after SIGTERM\n{}",
                        self.log_tail()
                    );
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "gateway did not exit within {STOP_TIMEOUT:?} of SIGTERM\n{}",
                        self.log_tail()
                    );
                }
            }
        }
    }

    /// Kills the gateway if it still runs (SIGKILL; call [`stop`](Self::stop) first for a
    /// clean shutdown) and starts it again with the same data directory and options.
    pub fn restart(&mut self) {
        self.kill();
        *self = Gateway::start(self.options.clone());
    }

    /// Runs `blockgate-gateway ARGS... --data-dir DIR` and parses its JSON output (`null`
    /// when it printed nothing).
    pub fn admin(&self, args: &[&str]) -> Result<serde_json::Value, AdminError> {
        let mut command = Command::new(gateway_binary());
        command
            .args(args)
            .arg("--data-dir")
            .arg(&self.options.data_dir)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .env("NO_COLOR", "1");
        let output = run_with_timeout(command, ADMIN_TIMEOUT).output;
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if !output.status.success() {
            return Err(AdminError {
                status: output.status,
                stdout,
                stderr,
            });
        }
        if stdout.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&stdout).map_err(|e| AdminError {
            status: output.status,
            stdout: stdout.clone(),
            stderr: format!("output is not JSON: {e}"),
        })
    }

    /// Like [`admin`](Self::admin) but panics, with the gateway's log, if the command fails.
    pub fn admin_ok(&self, args: &[&str]) -> serde_json::Value {
        self.admin(args).unwrap_or_else(|error| {
            panic!(
                "`blockgate-gateway {}` failed: {error}\n{}",
                args.join(" "),
                self.log_tail()
            )
        })
    }

    /// `volume list`, by volume id.
    pub fn volume_status(&self, volume: &str) -> serde_json::Value {
        let list = self.admin_ok(&["volume", "list"]);
        list.as_array()
            .and_then(|volumes| volumes.iter().find(|v| v["id"] == volume))
            .cloned()
            .unwrap_or_else(|| panic!("volume {volume} is not in `volume list`: {list}"))
    }

    /// The ids in `volume list`.
    pub fn volume_ids(&self) -> Vec<String> {
        let list = self.admin_ok(&["volume", "list"]);
        list.as_array()
            .map(|volumes| {
                volumes
                    .iter()
                    .filter_map(|v| v["id"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until every write to `volume` is in the bucket: `log_bytes` is 0 in `volume
    /// list` (the seal interval seals a partly filled log file, then it is uploaded).
    pub fn wait_uploaded(&self, volume: &str, timeout: Duration) {
        wait_until(
            timeout,
            &format!("volume {volume} to upload its log"),
            || {
                let status = self.volume_status(volume);
                match status["log_bytes"].as_u64() {
                    Some(0) => Ok(()),
                    _ => Err(status.to_string()),
                }
            },
        );
    }

    /// The Prometheus exposition from the metrics endpoint.
    pub fn metrics(&self) -> Result<String, String> {
        let mut stream = TcpStream::connect_timeout(&self.metrics_address, Duration::from_secs(5))
            .map_err(|e| format!("cannot connect to metrics at {}: {e}", self.metrics_address))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| e.to_string())?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
            .map_err(|e| format!("cannot send the metrics request: {e}"))?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .map_err(|e| format!("cannot read the metrics response: {e}"))?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("malformed HTTP response: {response:?}"))?;
        if !head.starts_with("HTTP/1.1 200") {
            return Err(format!("metrics answered {head:?}"));
        }
        Ok(body.to_string())
    }

    /// One sample: `name` with the label set `labels` (e.g. `{volume="v"}`, or "" for none).
    pub fn metric(&self, name: &str, labels: &str) -> Result<f64, String> {
        let body = self.metrics()?;
        let prefix = format!("{name}{labels} ");
        body.lines()
            .find_map(|line| line.strip_prefix(&prefix))
            .ok_or_else(|| format!("no sample {name}{labels} in the metrics"))?
            .trim()
            .parse::<f64>()
            .map_err(|e| format!("sample {name}{labels} is not a number: {e}"))
    }

    /// The last lines of the gateway's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log_path) {
            let _ = file.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(LOG_TAIL_LINES);
        format!(
            "---- last lines of {} ----\n{}\n----",
            self.log_path.display(),
            lines[from..].join("\n")
        )
    }

    /// The whole log of this data directory's gateways so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.log_tail());
        }
    }
}

fn log_path_for(data_dir: &Path) -> PathBuf {
    let mut name = data_dir
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_else(|| "gateway".into());
    name.push(".log");
    data_dir.with_file_name(name)
}
