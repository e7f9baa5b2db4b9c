//! Finding the `blockgate-gateway` binary of this workspace, built from the current sources.
//!
//! `CARGO_BIN_EXE_*` only names binaries of the test's own package, so the gateway is looked up
//! in the target directory this test executable was built into (`<target>/<profile>/deps/..`),
//! after one `cargo build -p blockgate-gateway` per test run (cargo does nothing when it is up
//! to date). `BLOCKGATE_GATEWAY_BIN` names a prebuilt binary instead and skips the build.

use std::fs::OpenOptions;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const BINARY: &str = "blockgate-gateway";

/// The gateway binary, built if needed. Panics with cargo's output when it cannot be built.
pub fn gateway_binary() -> &'static Path {
    static BINARY_PATH: OnceLock<PathBuf> = OnceLock::new();
    BINARY_PATH.get_or_init(|| locate_or_build().unwrap_or_else(|error| panic!("{error}")))
}

fn locate_or_build() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("BLOCKGATE_GATEWAY_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(format!(
                "BLOCKGATE_GATEWAY_BIN={} is not a file",
                path.display()
            ));
        }
        return Ok(path);
    }
    let executable =
        std::env::current_exe().map_err(|e| format!("cannot find the test executable: {e}"))?;
    // <target>/<profile>/deps/<test executable>
    let profile_dir = executable
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test executable path {}", executable.display()))?;
    build_once_per_run(profile_dir)?;
    let binary = profile_dir.join(BINARY);
    if !binary.is_file() {
        return Err(format!(
            "cargo built blockgate-gateway but {} does not exist",
            binary.display()
        ));
    }
    Ok(binary)
}

/// Runs `cargo build -p blockgate-gateway` once per test run: nextest runs every test in its
/// own process, so the processes agree through a lock file and a marker holding the run id.
fn build_once_per_run(profile_dir: &Path) -> Result<(), String> {
    let run = std::env::var("NEXTEST_RUN_ID")
        .unwrap_or_else(|_| format!("process-{}", std::process::id()));
    let lock_path = profile_dir.join("blockgate-e2e-build.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
    // SAFETY: flock on a descriptor we own; the lock is released when `lock` is closed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(format!(
            "cannot lock {}: {}",
            lock_path.display(),
            std::io::Error::last_os_error()
        ));
    }
    let marker = profile_dir.join("blockgate-e2e-build.run");
    if std::fs::read_to_string(&marker).is_ok_and(|built| built == run) {
        return Ok(());
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("the e2e package has no parent directory")?;
    let target_dir = profile_dir
        .parent()
        .ok_or("the profile directory has no parent")?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--quiet",
            "-p",
            "blockgate-gateway",
            "--bin",
            BINARY,
        ])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            command.arg("--release");
        }
        Some(profile) => {
            command.args(["--profile", profile]);
        }
    }
    let output = command
        .output()
        .map_err(|e| format!("cannot run cargo to build blockgate-gateway: {e}"))?;
    if !output.status.success() {
        return Err(format!(
            "cargo build -p blockgate-gateway failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    std::fs::write(&marker, run).map_err(|e| format!("cannot write {}: {e}", marker.display()))
}
