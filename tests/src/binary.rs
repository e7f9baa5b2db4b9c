//! Finding the binaries of this workspace (`blockgate-gateway`, `blockgate-csi`,
//! `blockgate-blockstore`), built from the current sources.
//!
//! `CARGO_BIN_EXE_*` only names binaries of the test's own package, so the binaries are looked
//! up in the target directory this test executable was built into (`<target>/<profile>/deps/..`),
//! after one `cargo build -p blockgate-gateway -p blockgate-csi -p blockgate-blockstore-api
//! --bins` per test run (cargo does nothing when they are up to date).
//! `BLOCKGATE_GATEWAY_BIN`, `BLOCKGATE_CSI_BIN` and `BLOCKGATE_BLOCKSTORE_BIN` name prebuilt
//! binaries instead and skip the build.

use std::fs::OpenOptions;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// A binary of the workspace: its name and the variable naming a prebuilt one.
struct Binary {
    name: &'static str,
    override_var: &'static str,
}

const GATEWAY: Binary = Binary {
    name: "blockgate-gateway",
    override_var: "BLOCKGATE_GATEWAY_BIN",
};
const CSI: Binary = Binary {
    name: "blockgate-csi",
    override_var: "BLOCKGATE_CSI_BIN",
};
const BLOCKSTORE: Binary = Binary {
    name: "blockgate-blockstore",
    override_var: "BLOCKGATE_BLOCKSTORE_BIN",
};

/// The packages built once per test run, holding every binary above.
const PACKAGES: [&str; 3] = [
    "blockgate-gateway",
    "blockgate-csi",
    "blockgate-blockstore-api",
];

/// The gateway binary, built if needed. Panics with cargo's output when it cannot be built.
pub fn gateway_binary() -> &'static Path {
    static BINARY_PATH: OnceLock<PathBuf> = OnceLock::new();
    BINARY_PATH.get_or_init(|| locate_or_build(&GATEWAY).unwrap_or_else(|error| panic!("{error}")))
}

/// The CSI plugin binary, built if needed. Panics with cargo's output when it cannot be built.
pub fn csi_binary() -> &'static Path {
    static BINARY_PATH: OnceLock<PathBuf> = OnceLock::new();
    BINARY_PATH.get_or_init(|| locate_or_build(&CSI).unwrap_or_else(|error| panic!("{error}")))
}

/// The block-storage API binary, built if needed. Panics with cargo's output when it cannot be
/// built.
pub fn blockstore_binary() -> &'static Path {
    static BINARY_PATH: OnceLock<PathBuf> = OnceLock::new();
    BINARY_PATH
        .get_or_init(|| locate_or_build(&BLOCKSTORE).unwrap_or_else(|error| panic!("{error}")))
}

fn locate_or_build(binary: &Binary) -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os(binary.override_var) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(format!(
                "{}={} is not a file",
                binary.override_var,
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
    let path = profile_dir.join(binary.name);
    if !path.is_file() {
        return Err(format!(
            "cargo built {} but {} does not exist",
            binary.name,
            path.display()
        ));
    }
    Ok(path)
}

/// Runs `cargo build -p <each of PACKAGES> --bins` once per test run: nextest runs every test in its
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
    command.args(["build", "--quiet", "--bins"]);
    for package in PACKAGES {
        command.args(["-p", package]);
    }
    command
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
        .map_err(|e| format!("cannot run cargo to build {}: {e}", PACKAGES.join(", ")))?;
    if !output.status.success() {
        return Err(format!(
            "cargo build -p {} --bins failed ({}):\n{}",
            PACKAGES.join(" -p "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    std::fs::write(&marker, run).map_err(|e| format!("cannot write {}: {e}", marker.display()))
}
