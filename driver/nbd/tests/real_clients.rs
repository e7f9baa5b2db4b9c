//! The session against real NBD clients: qemu-io (QEMU's block layer), and libnbd's nbdinfo
//! and nbdsh. The tools are required: a missing tool fails these tests, it never skips them
//! (on Debian: `apt-get install qemu-utils libnbd-bin python3-libnbd`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
mod common;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;

use blockgate_nbd::{ServeOptions, SessionError};
use common::*;
use tokio::net::UnixListener;
use tokio::sync::{Mutex, mpsc};

const SIZE: u64 = 4 << 20;

/// A unix-socket NBD server in a temporary directory, recording how each session ended.
struct UnixServer {
    socket: PathBuf,
    /// How each session ended, in the order they ended.
    sessions: Mutex<mpsc::UnboundedReceiver<Result<(), SessionError>>>,
    accept_loop: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl UnixServer {
    fn start(exports: Arc<MemoryExports>) -> UnixServer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let (recorded, sessions) = mpsc::unbounded_channel();
        let accept_loop = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let exports = Arc::clone(&exports);
                let recorded = recorded.clone();
                tokio::spawn(async move {
                    let result =
                        blockgate_nbd::serve(stream, exports, &ServeOptions::default()).await;
                    let _ = recorded.send(result);
                });
            }
        });
        UnixServer {
            socket,
            sessions: Mutex::new(sessions),
            accept_loop,
            _dir: dir,
        }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Waits until `count` sessions have ended and asserts that each ended cleanly.
    async fn assert_sessions_ended_cleanly(&self, count: usize) {
        let mut sessions = self.sessions.lock().await;
        for _ in 0..count {
            let session = tokio::time::timeout(DEADLINE, sessions.recv())
                .await
                .expect("session did not end")
                .expect("accept loop stopped");
            assert!(session.is_ok(), "session ended with {session:?}");
        }
    }
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        self.accept_loop.abort();
    }
}

/// Runs a client tool to completion off the async runtime; a missing tool fails the test.
async fn run(program: &str, args: Vec<String>) -> Output {
    let program = program.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut command = Command::new(&program);
        command.args(&args);
        // nbdsh runs `python3` from PATH; the libnbd bindings are in the system Python, which
        // a pyenv or virtualenv earlier in PATH would hide.
        let path = std::env::var("PATH").unwrap_or_default();
        command.env("PATH", format!("/usr/bin:/bin:{path}"));
        let output = command
            .output()
            .unwrap_or_else(|error| panic!("cannot run {program} (is it installed?): {error}"));
        eprintln!(
            "{program} {args:?}\n--- stdout\n{}\n--- stderr\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        output
    })
    .await
    .unwrap()
}

fn two_exports() -> (Arc<MemoryExports>, Arc<MemoryDevice>) {
    let device = MemoryDevice::new(export_info("disk", SIZE));
    let mut small = export_info("small", 1 << 20);
    small.read_only = true;
    small.min_block = 4096;
    small.preferred_block = 4096;
    small.max_block = 4096;
    small.can_multi_conn = false;
    let exports = MemoryExports::new(vec![Arc::clone(&device), MemoryDevice::new(small)]);
    (exports, device)
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_writes_reads_and_flushes() {
    let (exports, device) = two_exports();
    let server = UnixServer::start(exports);
    let output = run(
        "qemu-io",
        [
            "-f",
            "raw",
            &server.uri("disk"),
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "flush",
            "-c",
            "write -f -P 0x5c 1M 64k",
            "-c",
            "write -z 2M 64k",
            "-c",
            "discard 3M 64k",
            "-c",
            "read -P 0x5c 1M 64k",
            "-c",
            "read -P 0 2M 64k",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    let text = stdout(&output);
    assert!(output.status.success(), "qemu-io failed");
    assert!(
        text.contains("wrote 1048576/1048576 bytes at offset 0"),
        "{text}"
    );
    assert!(
        text.contains("read 1048576/1048576 bytes at offset 0"),
        "{text}"
    );
    assert!(
        text.contains("wrote 65536/65536 bytes at offset 2097152"),
        "{text}"
    );
    assert!(!text.contains("Pattern verification failed"), "{text}");
    assert!(!text.to_lowercase().contains("error"), "{text}");
    let contents = device.contents();
    assert!(contents[..1 << 20].iter().all(|byte| *byte == 0xab));
    assert!(
        contents[1 << 20..(1 << 20) + 65536]
            .iter()
            .all(|byte| *byte == 0x5c)
    );
    assert!(Counters::get(&device.counters.flushes) >= 1);
    assert!(Counters::get(&device.counters.fua) >= 1);
    assert!(Counters::get(&device.counters.zeroes) >= 1);
    assert!(Counters::get(&device.counters.trims) >= 1);
    server.assert_sessions_ended_cleanly(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_reads_run_concurrently() {
    let (exports, device) = two_exports();
    device.fill(0, &[1; 4096]);
    device.fill(4096, &[2; 4096]);
    let gate = Gate::at(0);
    device.hold_reads(&gate);
    let server = UnixServer::start(exports);
    let uri = server.uri("disk");
    let qemu = tokio::spawn(run(
        "qemu-io",
        [
            "-f",
            "raw",
            &uri,
            "-c",
            "aio_read -P 1 0 4k",
            "-c",
            "aio_read -P 2 4k 4k",
            "-c",
            "aio_flush",
        ]
        .map(String::from)
        .to_vec(),
    ));
    // Both reads reach the device while the first one is held there: they run concurrently.
    gate.entered().await;
    device.reads_started(2).await;
    gate.release();
    let output = qemu.await.unwrap();
    let text = stdout(&output);
    assert!(output.status.success(), "qemu-io failed");
    assert!(text.contains("read 4096/4096 bytes at offset 0"), "{text}");
    assert!(
        text.contains("read 4096/4096 bytes at offset 4096"),
        "{text}"
    );
    assert!(!text.contains("Pattern verification failed"), "{text}");
    server.assert_sessions_ended_cleanly(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_bench_at_queue_depth_32() {
    let (exports, _device) = two_exports();
    let server = UnixServer::start(exports);
    for write in [true, false] {
        let mut args: Vec<String> = ["-f", "raw", "-c", "20000", "-d", "32", "-s", "4k"]
            .map(String::from)
            .to_vec();
        if write {
            args.extend(["-w", "--pattern=0x3c"].map(String::from));
        }
        args.push(server.uri("disk"));
        let output = run("qemu-img", [vec!["bench".to_owned()], args].concat()).await;
        assert!(output.status.success(), "qemu-img bench failed");
        assert!(
            stdout(&output).contains("Run completed"),
            "{}",
            stdout(&output)
        );
    }
    server.assert_sessions_ended_cleanly(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_opens_read_only_exports_with_large_blocks() {
    let (exports, _device) = two_exports();
    let server = UnixServer::start(exports);
    // Read-write opening is refused (the export says read-only); read-only works, honouring
    // the 4 KiB minimum block size even for a smaller read.
    let refused = run(
        "qemu-io",
        ["-f", "raw", &server.uri("small"), "-c", "read 0 4k"]
            .map(String::from)
            .to_vec(),
    )
    .await;
    assert!(!refused.status.success());
    let output = run(
        "qemu-io",
        [
            "-r",
            "-f",
            "raw",
            &server.uri("small"),
            "-c",
            "read -P 0 0 4k",
            "-c",
            "read -P 0 1536 512",
        ]
        .map(String::from)
        .to_vec(),
    )
    .await;
    let text = stdout(&output);
    assert!(output.status.success(), "qemu-io failed");
    assert!(text.contains("read 4096/4096 bytes at offset 0"), "{text}");
    assert!(text.contains("read 512/512 bytes at offset 1536"), "{text}");
    server.assert_sessions_ended_cleanly(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_the_export() {
    let (exports, _device) = two_exports();
    let server = UnixServer::start(exports);
    let output = run("nbdinfo", vec!["--json".into(), server.uri("disk")]).await;
    assert!(output.status.success(), "nbdinfo failed");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let export = &json["exports"][0];
    assert_eq!(export["export-name"], "disk");
    assert_eq!(export["description"], "test export disk");
    assert_eq!(export["export-size"], SIZE);
    assert_eq!(export["is_read_only"], false);
    assert_eq!(export["can_flush"], true);
    assert_eq!(export["can_fua"], true);
    assert_eq!(export["can_trim"], true);
    assert_eq!(export["can_zero"], true);
    assert_eq!(export["can_fast_zero"], false);
    assert_eq!(export["can_multi_conn"], true);
    assert_eq!(export["block_size_minimum"], 512);
    assert_eq!(export["block_size_preferred"], 4096);
    assert_eq!(export["block_size_maximum"], 1 << 20);
    assert_eq!(json["protocol"], "newstyle-fixed");

    let output = run(
        "nbdinfo",
        vec!["--list".into(), "--json".into(), server.uri("")],
    )
    .await;
    assert!(output.status.success(), "nbdinfo --list failed");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let exports = json["exports"].as_array().unwrap();
    let names: Vec<&str> = exports
        .iter()
        .map(|export| export["export-name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["disk", "small"]);
    let small = &exports[1];
    assert_eq!(small["is_read_only"], true);
    assert_eq!(small["block_size_minimum"], 4096);
    assert_eq!(small["block_size_maximum"], 4096);
    assert_eq!(small["export-size"], 1 << 20);
    // nbdinfo --list ends each probe with NBD_OPT_ABORT or a disconnect.
    server.assert_sessions_ended_cleanly(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_drives_every_command_and_sees_protocol_errors() {
    let (exports, device) = two_exports();
    let server = UnixServer::start(exports);
    let script = format!(
        r#"
import errno
h.set_strict_mode(0)
h.connect_uri({uri:?})
assert h.get_size() == {SIZE}
assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero()
assert not h.can_df() and not h.can_cache() and not h.can_fast_zero()
h.pwrite(b"\x5a" * 4096, 8192, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8192) == b"\x5a" * 4096
h.zero(4096, 8192, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(4096, 8192) == bytes(4096)
h.pwrite(b"\x11" * 512, 0)
h.trim(512, 512)
h.flush()
for what, call, expected in [
    ("read past the end", lambda: h.pread(512, {SIZE}), errno.EINVAL),
    ("write past the end", lambda: h.pwrite(bytes(1024), {SIZE} - 512), errno.ENOSPC),
    ("misaligned read", lambda: h.pread(512, 100), errno.EINVAL),
    ("oversized read", lambda: h.pread(2 << 20, 0), errno.EINVAL),
]:
    try:
        call()
    except nbd.Error as e:
        assert e.errnum == expected, (what, e)
    else:
        raise SystemExit(what + " succeeded")
assert h.pread(512, 0) == b"\x11" * 512
h.shutdown()
print("nbdsh ok")
"#,
        uri = server.uri("disk"),
    );
    let output = run("nbdsh", vec!["-c".into(), script]).await;
    assert!(output.status.success(), "nbdsh failed");
    assert!(stdout(&output).contains("nbdsh ok"));
    let contents = device.contents();
    assert!(contents[..512].iter().all(|byte| *byte == 0x11));
    assert!(contents[8192..12288].iter().all(|byte| *byte == 0));
    server.assert_sessions_ended_cleanly(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdsh_option_mode_lists_queries_and_aborts() {
    let (exports, _device) = two_exports();
    let server = UnixServer::start(exports);
    let script = format!(
        r#"
h.set_opt_mode(True)
h.connect_uri({uri:?})
names = []
h.opt_list(lambda name, description: names.append((name, description)))
assert names == [("disk", "test export disk"), ("small", "test export small")], names
h.set_export_name("small")
h.opt_info()
assert h.get_size() == 1 << 20
assert h.is_read_only()
assert h.get_block_size(nbd.SIZE_MINIMUM) == 4096
h.set_export_name("nope")
try:
    h.opt_info()
except nbd.Error as e:
    pass
else:
    raise SystemExit("unknown export accepted")
h.opt_abort()
print("opt ok")
"#,
        uri = server.uri(""),
    );
    let output = run("nbdsh", vec!["-c".into(), script]).await;
    assert!(output.status.success(), "nbdsh failed");
    assert!(stdout(&output).contains("opt ok"));
    server.assert_sessions_ended_cleanly(1).await;
}
