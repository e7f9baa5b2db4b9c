//! Real NBD clients against a real gateway: what they write they read back, on new
//! connections and after a restart; the export list is complete; bad requests and broken
//! clients get errors without disturbing anyone else.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use blockgate_e2e::content::{pattern, write_pattern_file};
use blockgate_e2e::nbd_client::{CMD_READ, CMD_WRITE, NBD_EINVAL, NBD_ENOSPC};
use blockgate_e2e::tools::{files_equal, nbdcopy, nbdinfo, nbdsh, qemu_io};
use blockgate_e2e::{Fill, GatewayOptions, NbdClient, NbdError, TestDir, VolumeModel, wait_until};

const MIB: u64 = 1 << 20;

/// Writes through qemu-io — whole blocks, a 7-byte write inside a sector and a 3-byte write
/// straddling a 64 KiB boundary (qemu turns those into read-modify-write of 512-byte sectors),
/// write-zeroes — then checks every range with `read -P` on new connections, before and after
/// a restart of the gateway, on a cached and a stored volume.
#[test]
fn qemu_io_writes_read_back_with_pattern_verification() {
    let dir = TestDir::new("qemu-io");
    let mut gateway = GatewayOptions::new(dir.join("data"))
        .volume("disk=16MiB")
        .volume("mirror=16MiB:stored")
        .start();
    let writes = [
        "write -P 0x11 0 64k",
        "write -P 0x22 1M 4k",
        "write -P 0x33 100 7",
        "write -P 0x44 65535 3",
        "write -P 0x55 5M 3M",
        "write -z 6M 64k",
        "write -P 0x66 16380k 4k",
        "flush",
    ];
    let reads = [
        "read -P 0x11 0 100",
        "read -P 0x33 100 7",
        "read -P 0x11 107 65428",
        "read -P 0x44 65535 3",
        "read -P 0 65538 983038",
        "read -P 0x22 1M 4k",
        "read -P 0 1028k 4092k",
        "read -P 0x55 5M 1M",
        "read -P 0 6M 64k",
        "read -P 0x55 6208k 1984k",
        "read -P 0 8M 8188k",
        "read -P 0x66 16380k 4k",
    ];
    for volume in ["disk", "mirror"] {
        let uri = gateway.uri(volume);
        qemu_io(&uri, &writes).expect_success();
        // A new connection: nothing can come from the writer's side.
        qemu_io(&uri, &reads).expect_success();
        // The verification has teeth: a wrong pattern is reported as a failure.
        let wrong = qemu_io(&uri, &["read -P 0x12 0 4k"]).expect_failure();
        assert!(
            wrong.stdout().contains("Pattern verification failed"),
            "{wrong}"
        );
    }

    // Once uploaded, and after a restart (the cached volume now reads from the bucket).
    gateway.wait_uploaded("disk", Duration::from_secs(60));
    gateway.wait_uploaded("mirror", Duration::from_secs(60));
    gateway.stop();
    gateway.restart();
    for volume in ["disk", "mirror"] {
        qemu_io(&gateway.uri(volume), &reads).expect_success();
    }
}

/// nbdsh (libnbd) writes, overwrites a sector and zeroes a block; a second nbdsh connection
/// reads exactly that back.
#[test]
fn nbdsh_round_trip() {
    let dir = TestDir::new("nbdsh");
    let gateway = GatewayOptions::new(dir.join("data"))
        .volume("disk=8MiB")
        .start();
    let uri = gateway.uri("disk");
    let expected = r#"
base = 2 * 1024 * 1024
block = bytes(range(256)) * 16
expected = bytearray(block * 16)
expected[512:1024] = b"\xab" * 512
expected[8192:12288] = bytes(4096)
"#;
    nbdsh(
        &uri,
        &format!(
            r#"{expected}
h.pwrite(block * 16, base)
h.pwrite(b"\xab" * 512, base + 512)
h.zero(4096, base + 8192)
h.flush()
assert h.pread(65536, base) == bytes(expected), "read back on the writing connection differs"
"#
        ),
    )
    .expect_success();
    let check = nbdsh(
        &uri,
        &format!(
            r#"{expected}
data = h.pread(65536, base)
if data != bytes(expected):
    first = next(i for i in range(65536) if data[i] != expected[i])
    raise AssertionError("differs at byte %d of the range" % first)
assert h.pread(4096, base - 4096) == bytes(4096), "bytes before the range were touched"
print("verified")
"#
        ),
    )
    .expect_success();
    assert!(check.stdout().contains("verified"), "{check}");
}

/// nbdcopy (multi-connection, many requests in flight) copies a 64 MiB pseudo-random image in
/// and back out byte for byte; after upload a gateway on a fresh data directory (cold cache,
/// same bucket) gives the same image back.
#[test]
fn nbdcopy_round_trips_a_64_mib_image() {
    let dir = TestDir::new("nbdcopy");
    let options = GatewayOptions::new(dir.join("data"))
        .store_directory(dir.join("bucket"))
        .volume("image=64MiB");
    let mut gateway = options.start();
    let source = dir.join("source.img");
    write_pattern_file(&source, 7, 64 * MIB);
    let uri = gateway.uri("image");
    nbdcopy(&["--flush", &source.display().to_string(), &uri]).expect_success();
    let copy = dir.join("copy.img");
    nbdcopy(&[&uri, &copy.display().to_string()]).expect_success();
    files_equal(&source, &copy).expect_success();

    gateway.wait_uploaded("image", Duration::from_secs(120));
    gateway.kill();
    let cold = options.with_data_dir(dir.join("cold")).start();
    let cold_copy = dir.join("cold-copy.img");
    nbdcopy(&[&cold.uri("image"), &cold_copy.display().to_string()]).expect_success();
    files_equal(&source, &cold_copy).expect_success();
}

/// `nbdinfo --list` (NBD_OPT_LIST, then NBD_OPT_INFO per export) shows every volume with its
/// size and mode, including one created while the gateway runs.
#[test]
fn nbdinfo_lists_every_volume() {
    let dir = TestDir::new("list");
    let gateway = GatewayOptions::new(dir.join("data"))
        .volume("alpha=4MiB")
        .volume("beta=8MiB:stored")
        .start();
    assert_eq!(gateway.exports_at_start(), ["alpha", "beta"]);
    gateway.admin_ok(&["volume", "create", "gamma", "--size", "12MiB"]);

    let socket = gateway.nbd_socket().display().to_string();
    let listing =
        nbdinfo(&["--list", "--json", &format!("nbd+unix:///?socket={socket}")]).expect_success();
    let json: serde_json::Value = serde_json::from_str(&listing.stdout())
        .unwrap_or_else(|e| panic!("nbdinfo printed no JSON ({e}): {listing}"));
    let exports = json["exports"].as_array().expect("exports array");
    let mut seen: Vec<(String, u64, String)> = exports
        .iter()
        .map(|export| {
            (
                export["export-name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                export["export-size"].as_u64().unwrap_or_default(),
                export["description"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            (
                "alpha".to_string(),
                4 * MIB,
                "blockgate cached volume alpha".to_string()
            ),
            (
                "beta".to_string(),
                8 * MIB,
                "blockgate stored volume beta".to_string()
            ),
            (
                "gamma".to_string(),
                12 * MIB,
                "blockgate cached volume gamma".to_string()
            ),
        ]
    );
    // Our own client's NBD_OPT_LIST agrees.
    let mut names = NbdClient::list(gateway.nbd_socket()).expect("NBD_OPT_LIST");
    names.sort();
    assert_eq!(names, ["alpha", "beta", "gamma"]);
    // A name that is not listed cannot be opened.
    let missing = nbdinfo(&[&format!("nbd+unix:///delta?socket={socket}")]).expect_failure();
    assert!(
        missing.stderr().contains("delta") || missing.stderr().contains("export"),
        "{missing}"
    );
}

/// Requests past the end get the protocol's error reply (EINVAL for reads, ENOSPC for writes
/// as the NBD spec asks), change nothing, and the same connection keeps working.
#[test]
fn request_beyond_the_end_fails_and_the_connection_keeps_working() {
    let dir = TestDir::new("beyond");
    let gateway = GatewayOptions::new(dir.join("data"))
        .volume("disk=4MiB")
        .volume("large=64MiB")
        .start();
    // libnbd checks bounds itself unless strict mode is off: we want the server's answer.
    let run = nbdsh(
        &gateway.uri("disk"),
        r#"
import errno
h.set_strict_mode(0)
size = h.get_size()
assert size == 4 * 1024 * 1024, size
tail = b"\x5a" * 4096
h.pwrite(tail, size - 4096)

def expect_error(what, call, codes):
    try:
        call()
    except nbd.Error as error:
        assert error.errno in codes, "%s: errno %r, expected one of %r" % (what, error.errno, codes)
        return
    raise AssertionError("%s succeeded" % what)

expect_error("read past the end", lambda: h.pread(4096, size), ("EINVAL", errno.EINVAL))
expect_error("read straddling the end", lambda: h.pread(8192, size - 4096), ("EINVAL", errno.EINVAL))
expect_error("write straddling the end", lambda: h.pwrite(b"\xff" * 8192, size - 4096), ("ENOSPC", errno.ENOSPC, "EINVAL", errno.EINVAL))
expect_error("zero past the end", lambda: h.zero(4096, size), ("ENOSPC", errno.ENOSPC, "EINVAL", errno.EINVAL))

# The same connection still works, and the refused write changed nothing.
assert h.pread(4096, size - 4096) == tail, "the refused write touched the last block"
h.pwrite(b"\x77" * 4096, 0)
h.flush()
assert h.pread(4096, 0) == b"\x77" * 4096
print("connection still works")
"#,
    )
    .expect_success();
    assert!(run.stdout().contains("connection still works"), "{run}");

    // Offsets whose end overflows 64 bits, sent by our own client.
    let mut client = NbdClient::connect(gateway.nbd_socket(), "disk").expect("connect");
    for (offset, length) in [(u64::MAX - 4095, 8192u32), (1u64 << 63, 4096)] {
        match client.read(offset, length) {
            Err(NbdError::Server(NBD_EINVAL)) => {}
            other => panic!("read at {offset:#x}+{length}: expected EINVAL, got {other:?}"),
        }
        match client.write(offset, &[0xee; 4096][..length.min(4096) as usize]) {
            Err(NbdError::Server(NBD_EINVAL | NBD_ENOSPC)) => {}
            other => panic!("write at {offset:#x}: expected EINVAL or ENOSPC, got {other:?}"),
        }
    }
    // Requests not aligned to the advertised 512-byte minimum block are refused and change
    // nothing; the payload of the refused write does not desynchronise the connection.
    match client.write(100, &[0xee; 7]) {
        Err(NbdError::Server(NBD_EINVAL)) => {}
        other => panic!("misaligned write: expected EINVAL, got {other:?}"),
    }
    match client.read(512, 100) {
        Err(NbdError::Server(NBD_EINVAL)) => {}
        other => panic!("misaligned read: expected EINVAL, got {other:?}"),
    }
    assert_eq!(
        client
            .read(0, 4096)
            .expect("read after the refused requests"),
        vec![0x77; 4096]
    );

    // The advertised maximum block (32 MiB) is accepted; one sector more is refused.
    let mut large = NbdClient::connect(gateway.nbd_socket(), "large").expect("connect");
    let max = 32u32 << 20;
    assert_eq!(
        large
            .read(0, max)
            .expect("a read of the maximum block size")
            .len(),
        max as usize
    );
    match large.read(0, max + 512) {
        Err(NbdError::Server(_)) => {}
        other => panic!("read over the maximum block size: expected an error, got {other:?}"),
    }
    large
        .write(MIB, &pattern(9, MIB, 4096))
        .expect("write after the refused read");
    assert_eq!(large.read(MIB, 4096).expect("read"), pattern(9, MIB, 4096));
}

/// Broken clients — junk instead of a handshake, junk requests after a good handshake, a write
/// header announcing 4 GiB, an unknown command, a write whose payload stops half way, hundreds
/// of requests whose replies are never read, a client that connects and says nothing — each
/// end only their own session and change no data, while a well-behaved client keeps writing,
/// flushing and reading correct data throughout and new clients can still connect.
#[test]
fn garbage_clients_do_not_disturb_other_clients() {
    let dir = TestDir::new("garbage");
    let mut gateway = GatewayOptions::new(dir.join("data"))
        .volume("disk=16MiB")
        .start();
    let socket = gateway.nbd_socket().to_path_buf();
    // Progress, printed with the failure if a step fails or hangs.
    let started = std::time::Instant::now();
    let step = |what: &str| eprintln!("[{:?}] {what}", started.elapsed());

    // A well-behaved client works through the whole test on its own thread.
    let worker_socket = socket.clone();
    let (stop_sender, stop) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || -> Result<u64, String> {
        let mut client = NbdClient::connect(&worker_socket, "disk").map_err(|e| e.to_string())?;
        let mut model = VolumeModel::new(16 * MIB);
        let mut rounds = 0u64;
        loop {
            // Offsets below 14 MiB: the top 2 MiB are for the broken clients.
            let offset = (rounds * 3 % 14) * MIB;
            model.write(
                &mut client,
                offset,
                MIB,
                Fill::Pattern(100 + rounds),
                256 << 10,
            );
            client.flush().map_err(|e| format!("flush: {e}"))?;
            model
                .verify_range(&mut client, offset, MIB)
                .map_err(|e| format!("round {rounds}: {e}"))?;
            rounds += 1;
            if stop.try_recv().is_ok() {
                model.verify(&mut client)?;
                return Ok(rounds);
            }
        }
    });

    step("junk handshake");
    // 1. Junk instead of the client flags.
    let mut junk = UnixStream::connect(&socket).expect("connect");
    junk.write_all(&pattern(1, 0, 64 << 10)).ok();
    expect_closed_by_server(&mut junk, "junk handshake");

    step("junk requests");
    // 2. A proper handshake, then requests with a bad magic.
    let mut bad_requests = NbdClient::connect(&socket, "disk").expect("connect");
    bad_requests
        .write_raw(&pattern(2, 0, 4096))
        .expect("send junk requests");
    match bad_requests.wait_reply(Duration::from_secs(30)) {
        Err(_) => {}
        Ok(reply) => panic!("junk request got a reply instead of a closed session: {reply:?}"),
    }

    step("4 GiB write header");
    // 3. A write header announcing a 4 GiB payload that never comes.
    let mut huge = NbdClient::connect(&socket, "disk").expect("connect");
    huge.send(CMD_WRITE, 0, 0, u32::MAX, &[0u8; 1024])
        .expect("send the write header");
    match huge.wait_reply(Duration::from_secs(30)) {
        Err(_) | Ok(Some(_)) => {}
        Ok(None) => panic!("the gateway neither refused nor closed a 4 GiB write"),
    }

    step("unknown command, empty read");
    // 4. Unknown commands and a read of 0 bytes on a good session: errors, not a crash.
    let mut odd = NbdClient::connect(&socket, "disk").expect("connect");
    let handle = odd.send(42, 0, 0, 4096, &[]).expect("send command 42");
    if let Ok(Some(reply)) = odd.wait_reply(Duration::from_secs(30)) {
        assert_eq!(reply.handle, handle);
        assert_ne!(reply.error, 0, "unknown command 42 succeeded");
    }
    let _ = odd.send(CMD_READ, 0, 0, 0, &[]);
    let _ = odd.wait_reply(Duration::from_secs(30));

    step("torn write");
    // 5. A write whose payload stops half way, then a hang-up: nothing of it is applied.
    let mut torn = NbdClient::connect(&socket, "disk").expect("connect");
    torn.send(CMD_WRITE, 0, 15 * MIB, 64 << 10, &[0xdd; 32 << 10])
        .expect("send half a write");
    drop(torn);

    step("unread replies");
    // 6. Many requests whose replies are never read, then a hang-up.
    let mut flood = NbdClient::connect(&socket, "disk").expect("connect");
    for index in 0..512u64 {
        if flood
            .send(CMD_READ, 0, (index % 16) * MIB, 1 << 20, &[])
            .is_err()
        {
            break;
        }
    }
    drop(flood);

    step("silent client");
    // 7. A client that connects and never speaks.
    let _silent = UnixStream::connect(&socket).expect("connect");

    step("new clients");
    // Meanwhile: new clients connect, list and do I/O.
    for round in 0..3 {
        let mut names = NbdClient::list(&socket).expect("NBD_OPT_LIST while junk was sent");
        names.sort();
        assert_eq!(names, ["disk"], "round {round}");
        let info = nbdinfo(&["--size", &gateway.uri("disk")]).expect_success();
        assert_eq!(info.stdout().trim(), (16 * MIB).to_string());
    }

    step("stopping the well-behaved client");
    stop_sender.send(()).expect("worker is running");
    let rounds = worker
        .join()
        .expect("worker thread panicked")
        .unwrap_or_else(|e| panic!("the well-behaved client was disturbed: {e}"));
    assert!(rounds > 0);
    let mut check = NbdClient::connect(&socket, "disk").expect("connect");
    let tail = check
        .read(15 * MIB, 64 << 10)
        .expect("read the torn write's range");
    assert!(
        tail.iter().all(|b| *b == 0),
        "bytes of a write whose payload never fully arrived were applied"
    );
    assert!(
        gateway.is_running(),
        "the gateway died\n{}",
        gateway.log_tail()
    );
    wait_until(
        Duration::from_secs(10),
        "the broken sessions to be counted as errors",
        || match gateway.metric("blockgate_nbd_session_errors_total", "") {
            Ok(errors) if errors >= 2.0 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
}

/// Reads until the server closes the connection, which it must do within the deadline.
fn expect_closed_by_server(stream: &mut UnixStream, what: &str) {
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("set timeout");
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(_) => {}
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(error) => panic!("{what}: the server did not close the connection: {error}"),
        }
    }
}
