//! The real NBD clients a user would run against the gateway: qemu-io, nbdsh, nbdinfo,
//! nbdcopy, and Debian's python3 with libnbd's `nbd` module.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Debian's python3, which has libnbd's `nbd` module (a pyenv python on PATH does not).
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// What a tool did: its exit status and output, printable in a failure message.
#[derive(Debug)]
pub struct ToolRun {
    pub command: String,
    pub output: Output,
}

impl ToolRun {
    pub fn success(&self) -> bool {
        self.output.status.success()
    }

    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.output.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.output.stderr).into_owned()
    }

    /// Panics with the tool's output unless it exited with 0.
    pub fn expect_success(self) -> ToolRun {
        assert!(self.success(), "{self}");
        self
    }

    /// Panics unless the tool failed.
    pub fn expect_failure(self) -> ToolRun {
        assert!(!self.success(), "expected a failure: {self}");
        self
    }
}

impl std::fmt::Display for ToolRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` exited with {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.command,
            self.output.status,
            self.stdout().trim_end(),
            self.stderr().trim_end()
        )
    }
}

/// How long any one tool may run: a client stuck on a hung gateway becomes a failure that
/// says so, not a test that never ends.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(180);

fn run(mut command: Command) -> ToolRun {
    // nbdsh runs `python3 -m nbd`: make that Debian's python3, which has the module.
    let path = std::env::var("PATH").unwrap_or_default();
    command.env("PATH", format!("/usr/bin:/bin:{path}"));
    run_with_timeout(command, TOOL_TIMEOUT)
}

/// Runs `command` to completion with its output captured; kills it and panics with what it
/// printed if it takes longer than `timeout`.
pub fn run_with_timeout(mut command: Command, timeout: Duration) -> ToolRun {
    let description = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {description}: {e}"));
    let stdout = drain(child.stdout.take().expect("piped"));
    let stderr = drain(child.stderr.take().expect("piped"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{description} did not finish within {timeout:?} and was killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
                    String::from_utf8_lossy(&stdout.join().unwrap_or_default()),
                    String::from_utf8_lossy(&stderr.join().unwrap_or_default())
                );
            }
            Err(error) => panic!("cannot wait for {description}: {error}"),
        }
    };
    ToolRun {
        command: description,
        output: Output {
            status,
            stdout: stdout.join().unwrap_or_default(),
            stderr: stderr.join().unwrap_or_default(),
        },
    }
}

/// Reads a pipe to its end on a thread, so a chatty child never blocks on a full pipe.
fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

/// `qemu-io -f raw -c C1 -c C2 ... URI`. qemu-io exits non-zero if any command failed
/// (including a `read -P` whose pattern did not match).
pub fn qemu_io(uri: &str, commands: &[&str]) -> ToolRun {
    let mut command = Command::new("qemu-io");
    command.args(["-f", "raw"]);
    for each in commands {
        command.args(["-c", each]);
    }
    command.arg(uri);
    run(command)
}

/// `nbdsh -u URI -c SCRIPT`: `h` is the connected handle; an exception fails the run.
pub fn nbdsh(uri: &str, script: &str) -> ToolRun {
    let mut command = Command::new("nbdsh");
    command.args(["-u", uri, "-c", script]);
    run(command)
}

/// `nbdinfo ARGS...`
pub fn nbdinfo(args: &[&str]) -> ToolRun {
    let mut command = Command::new("nbdinfo");
    command.args(args);
    run(command)
}

/// `nbdcopy ARGS...`
pub fn nbdcopy(args: &[&str]) -> ToolRun {
    let mut command = Command::new("nbdcopy");
    command.args(args);
    run(command)
}

/// `cmp A B`: true when the files are identical.
pub fn files_equal(a: &Path, b: &Path) -> ToolRun {
    let mut command = Command::new("cmp");
    command.arg(a).arg(b);
    run(command)
}

/// The path of a python script shipped with this package.
pub fn python_script(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("python")
        .join(name)
}

/// A `Command` for Debian's python3 running a script of this package.
pub fn python_command(script: &str) -> Command {
    let mut command = Command::new(SYSTEM_PYTHON);
    command.arg(python_script(script));
    command
}
