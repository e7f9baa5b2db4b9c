//! Running whole-system tests inside the test guest (`scripts/guest/run.sh`: QEMU/TCG, a Debian
//! 12 guest whose Linux 6.12 has `nbd` and `ublk_drv`), for what the host kernel cannot do:
//! kernel block devices, mounts, fsck.
//!
//! A guest test has two halves in one test executable. On the host, [`GuestJob`] packs a job
//! directory (the workspace binaries, this test executable, scripts) and boots the guest on it;
//! in the guest ([`in_guest`]), the same executable runs again as root and drives the real
//! processes ([`Process`]) over their unix sockets ([`unix_channel`]).
//!
//! This module never decides what a test asserts: it only packs, boots, and reports what came
//! back (exit status, console, `out/`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use crate::TestDir;

/// Set to `1` in the guest's job environment (by `scripts/guest/guest-init.sh`).
pub const GUEST_VARIABLE: &str = "BLOCKGATE_GUEST";

/// Whether this process runs inside the test guest.
pub fn in_guest() -> bool {
    std::env::var_os(GUEST_VARIABLE).is_some_and(|value| value == "1")
}

/// Why this host cannot boot the test guest, or `None` when it can. Only a missing privilege
/// counts (the guest scripts need root for debootstrap, chroot and the job image): every other
/// problem (no network for the first build, a missing host tool) is a failure, not a skip.
pub fn why_the_guest_cannot_run() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    (euid != 0).then(|| {
        format!(
            "the test guest needs root (scripts/guest/*.sh run debootstrap and chroot), and this runs as uid {euid}"
        )
    })
}

/// The workspace's root directory (where `scripts/` and `tests/` live).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e package lives in a subdirectory of the workspace")
        .to_path_buf()
}

/// A job directory for `scripts/guest/run.sh`, removed after a passing test and kept (with
/// the guest's console and `out/`) after a failing one.
#[derive(Debug)]
pub struct GuestJob {
    dir: TestDir,
}

/// What a guest run gave back.
#[derive(Debug)]
pub struct GuestRun {
    /// `run.sh`'s exit status: the job's own, 124 on a timeout, 125 when the guest died.
    pub status: Option<i32>,
    /// The guest's serial console (kernel messages, the job's stdout and stderr), without CRs.
    pub console: String,
    /// `JOB_DIR/out`: what the job wrote to `/job/out`.
    pub out: PathBuf,
    /// Wall time of `scripts/guest/run.sh`, including a guest build when the cache was cold.
    pub elapsed: Duration,
}

impl GuestJob {
    pub fn new(name: &str) -> GuestJob {
        let dir = TestDir::new(name);
        std::fs::create_dir(dir.join("job")).expect("create the job directory");
        GuestJob { dir }
    }

    /// The job directory (the guest's `/job`).
    pub fn path(&self) -> PathBuf {
        self.dir.join("job")
    }

    /// Copies an executable into the job as `name`, without its debug info when `strip` is
    /// there (debug info is most of a debug binary's size, and the job disk holds a copy).
    pub fn add_executable(&self, source: &Path, name: &str) {
        let target = self.path().join(name);
        let stripped = Command::new("strip")
            .arg("--strip-debug")
            .arg("-o")
            .arg(&target)
            .arg(source)
            .status()
            .is_ok_and(|status| status.success());
        if !stripped {
            std::fs::copy(source, &target).unwrap_or_else(|e| {
                panic!(
                    "cannot copy {} into the job as {name}: {e}",
                    source.display()
                )
            });
        }
    }

    /// Copies a file into the job as `name`.
    pub fn add_file(&self, source: &Path, name: &str) {
        std::fs::copy(source, self.path().join(name)).unwrap_or_else(|e| {
            panic!(
                "cannot copy {} into the job as {name}: {e}",
                source.display()
            )
        });
    }

    /// Boots the guest on the job and waits for it (at most `timeout`, enforced by run.sh).
    /// The console goes to a file beside the job, so a hang still leaves it for inspection.
    pub fn run(&self, timeout: Duration) -> GuestRun {
        let script = workspace_dir().join("scripts/guest/run.sh");
        let console_path = self.dir.join("console.log");
        let console = File::create(&console_path).expect("create the console log");
        let stderr = console.try_clone().expect("clone the console log handle");
        let started = Instant::now();
        let status = Command::new("bash")
            .arg(&script)
            .arg("--timeout")
            .arg(timeout.as_secs().to_string())
            .arg(self.path())
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(stderr)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        let elapsed = started.elapsed();
        let console = std::fs::read(&console_path).expect("read the console log");
        GuestRun {
            status: status.code(),
            console: String::from_utf8_lossy(&console).replace('\r', ""),
            out: self.path().join("out"),
            elapsed,
        }
    }
}

impl GuestRun {
    /// The last `lines` lines of the console.
    pub fn console_tail(&self, lines: usize) -> String {
        let all: Vec<&str> = self.console.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A file of `out/` as text, empty when missing.
    pub fn out_text(&self, name: &str) -> String {
        std::fs::read_to_string(self.out.join(name)).unwrap_or_default()
    }
}

/// A child process killed (SIGKILL) when dropped, its stdout and stderr in a log file.
#[derive(Debug)]
pub struct Process {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Process {
    pub fn spawn(name: &str, program: &Path, args: &[String], log: PathBuf) -> Process {
        let stdout = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let stderr = stdout.try_clone().expect("clone the log file handle");
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Process {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `Some(status)` once it exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of its log, under a header naming it.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        format!(
            "--- {} ({}) ---\n{}",
            self.name,
            self.log.display(),
            all[all.len().saturating_sub(lines)..].join("\n")
        )
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gRPC channel over a unix socket; fails while nothing accepts on it.
pub fn unix_channel(runtime: &tokio::runtime::Runtime, socket: &Path) -> Result<Channel, String> {
    runtime
        .block_on(blockgate_proto::unix::connect(socket))
        .map_err(|e| format!("cannot connect to {}: {e:?}", socket.display()))
}
