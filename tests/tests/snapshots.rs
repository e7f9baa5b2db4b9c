//! Snapshots, restores, clones, expansion and garbage collection through the gateway's
//! command line, checked with NBD clients.

use std::time::Duration;

use blockgate_e2e::tools::{nbdinfo, qemu_io};
use blockgate_e2e::{Fill, Gateway, GatewayOptions, NbdClient, TestDir, VolumeModel};

const MIB: u64 = 1 << 20;
const REQUEST: u64 = 256 << 10;

fn connect(gateway: &Gateway, volume: &str) -> NbdClient {
    NbdClient::connect(gateway.nbd_socket(), volume)
        .unwrap_or_else(|e| panic!("connect to {volume}: {e}\n{}", gateway.log_tail()))
}

fn verify(gateway: &Gateway, volume: &str, model: &VolumeModel) {
    let mut client = connect(gateway, volume);
    assert_eq!(client.size(), model.size, "{volume}: size");
    model
        .verify(&mut client)
        .unwrap_or_else(|e| panic!("{volume}: {e}\n{}", gateway.log_tail()));
}

fn nbd_size(gateway: &Gateway, volume: &str) -> u64 {
    let run = nbdinfo(&["--size", &gateway.uri(volume)]).expect_success();
    run.stdout()
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("nbdinfo --size printed no number ({e}): {run}"))
}

/// A restore reads the snapshot's bytes, not the volume's later ones; a clone reads the
/// volume as it is now; the three then change independently; a restore can be larger than
/// its snapshot, and a snapshot of a restored volume restores too.
#[test]
fn restores_and_clones_read_the_right_bytes() {
    let dir = TestDir::new("restore");
    let gateway = GatewayOptions::new(dir.join("data"))
        .volume("source=8MiB")
        .start();
    let mut source = connect(&gateway, "source");
    let mut source_model = VolumeModel::new(8 * MIB);
    source_model.write(&mut source, 0, 8 * MIB, Fill::Pattern(1), REQUEST);
    source_model.write(&mut source, 3 * MIB, MIB, Fill::Zero, REQUEST);
    source.flush().expect("flush");

    let created = gateway.admin_ok(&["snapshot", "create", "source", "first", "--wait"]);
    assert_eq!(created["ready"], true, "{created}");
    assert_eq!(created["size"], 8 * MIB);
    let snapshot_model = source_model.clone();
    source_model.write(&mut source, 2 * MIB, 2 * MIB, Fill::Pattern(2), REQUEST);
    source_model.write(&mut source, 6 * MIB, MIB, Fill::Zero, REQUEST);
    source.flush().expect("flush");

    let info = gateway.admin_ok(&["snapshot", "get", "first"]);
    assert_eq!(
        (&info["id"], &info["volume"], &info["ready"]),
        (&"first".into(), &"source".into(), &true.into()),
        "{info}"
    );

    gateway.admin_ok(&["volume", "create", "restored", "--from-snapshot", "first"]);
    verify(&gateway, "restored", &snapshot_model);
    gateway.admin_ok(&["volume", "create", "cloned", "--clone-of", "source"]);
    let mut clone_model = source_model.clone();
    verify(&gateway, "cloned", &clone_model);

    // Each changes on its own.
    let mut cloned = connect(&gateway, "cloned");
    clone_model.write(&mut cloned, 0, MIB, Fill::Pattern(3), REQUEST);
    cloned.flush().expect("flush");
    source_model.write(&mut source, 7 * MIB, MIB, Fill::Pattern(4), REQUEST);
    source.flush().expect("flush");
    let mut restored_model = snapshot_model.clone();
    let mut restored = connect(&gateway, "restored");
    restored_model.write(&mut restored, 5 * MIB, MIB, Fill::Pattern(5), REQUEST);
    restored.flush().expect("flush");
    verify(&gateway, "source", &source_model);
    verify(&gateway, "cloned", &clone_model);
    verify(&gateway, "restored", &restored_model);

    // Larger than the snapshot: its bytes, then zeros.
    gateway.admin_ok(&[
        "volume",
        "create",
        "bigger",
        "--from-snapshot",
        "first",
        "--size",
        "12MiB",
    ]);
    let mut bigger_model = snapshot_model.clone();
    bigger_model.grow(12 * MIB);
    verify(&gateway, "bigger", &bigger_model);
    // A restore cannot be smaller than its snapshot.
    let refused = gateway
        .admin(&[
            "volume",
            "create",
            "smaller",
            "--from-snapshot",
            "first",
            "--size",
            "4MiB",
        ])
        .expect_err("a restore smaller than its snapshot was accepted");
    assert!(refused.stderr.contains("smaller"), "{refused}");

    // A snapshot of a restored volume, restored as a stored volume.
    gateway.admin_ok(&["snapshot", "create", "restored", "second", "--wait"]);
    gateway.admin_ok(&[
        "volume",
        "create",
        "restored-again",
        "--from-snapshot",
        "second",
        "--mode",
        "stored",
    ]);
    verify(&gateway, "restored-again", &restored_model);

    let snapshots = gateway.admin_ok(&["snapshot", "list"]);
    let ids: Vec<&str> = snapshots
        .as_array()
        .expect("array")
        .iter()
        .filter(|s| s["internal"] != true)
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids, ["first", "second"], "{snapshots}");
    let of_source = gateway.admin_ok(&["snapshot", "list", "--volume", "source"]);
    assert!(
        of_source
            .as_array()
            .expect("array")
            .iter()
            .all(|s| s["volume"] == "source"),
        "{of_source}"
    );
}

/// `volume expand` grows a volume: nbdinfo shows the new size at once, the new range reads
/// zeros and takes writes, an open connection can use it, shrinking is refused, and the size
/// survives a restart and a recovery from the bucket even with no write after the expansion.
#[test]
fn expansion_is_visible_to_nbd_clients_and_survives_recovery() {
    let dir = TestDir::new("expand");
    let options = GatewayOptions::new(dir.join("data"))
        .store_directory(dir.join("bucket"))
        .volume("grow=4MiB")
        .volume("grow-stored=4MiB:stored");
    let mut gateway = options.start();
    for volume in ["grow", "grow-stored"] {
        assert_eq!(nbd_size(&gateway, volume), 4 * MIB);
        qemu_io(&gateway.uri(volume), &["write -P 0x31 0 4M", "flush"]).expect_success();
        let mut open = connect(&gateway, volume);

        let expanded = gateway.admin_ok(&["volume", "expand", volume, "--size", "12MiB"]);
        assert_eq!(expanded["size"], 12 * MIB, "{expanded}");
        assert_eq!(nbd_size(&gateway, volume), 12 * MIB);
        qemu_io(
            &gateway.uri(volume),
            &[
                "read -P 0x31 0 4M",
                "read -P 0 4M 8M",
                "write -P 0x32 10M 1M",
                "flush",
                "read -P 0x32 10M 1M",
            ],
        )
        .expect_success();
        // The connection opened before the expansion reaches the new range too.
        assert_eq!(
            open.read(10 * MIB, 4096)
                .expect("read past the old end on an old connection"),
            vec![0x32; 4096]
        );

        let refused = gateway
            .admin(&["volume", "expand", volume, "--size", "8MiB"])
            .expect_err("shrinking was accepted");
        assert!(refused.stderr.contains("cannot shrink"), "{refused}");
        // Grown again with no write after it.
        gateway.admin_ok(&["volume", "expand", volume, "--size", "16MiB"]);
        assert_eq!(nbd_size(&gateway, volume), 16 * MIB);
    }

    gateway.stop();
    gateway.restart();
    for volume in ["grow", "grow-stored"] {
        assert_eq!(
            nbd_size(&gateway, volume),
            16 * MIB,
            "{volume} after restart"
        );
        gateway.wait_uploaded(volume, Duration::from_secs(60));
    }
    gateway.kill();
    let fresh = options.with_data_dir(dir.join("fresh")).start();
    for volume in ["grow", "grow-stored"] {
        assert_eq!(
            nbd_size(&fresh, volume),
            16 * MIB,
            "{volume} restored from the bucket"
        );
        qemu_io(
            &fresh.uri(volume),
            &[
                "read -P 0x31 0 4M",
                "read -P 0 4M 6M",
                "read -P 0x32 10M 1M",
                "read -P 0 11M 5M",
            ],
        )
        .expect_success();
    }
}

/// A snapshot that a volume was restored from cannot be deleted, with a message that says
/// why and what to do; once that volume is gone it can. Garbage collection runs, and every
/// live volume still reads correctly afterwards, also from the bucket alone.
#[test]
fn a_snapshot_in_use_is_not_deleted_and_gc_keeps_live_data() {
    let dir = TestDir::new("gc");
    let options = GatewayOptions::new(dir.join("data")).volume("base=8MiB");
    let mut gateway = options.start();
    let mut base = connect(&gateway, "base");
    let mut base_model = VolumeModel::new(8 * MIB);
    base_model.write(&mut base, 0, 8 * MIB, Fill::Pattern(1), REQUEST);
    base.flush().expect("flush");
    gateway.admin_ok(&["snapshot", "create", "base", "keep", "--wait"]);
    let snapshot_model = base_model.clone();
    gateway.admin_ok(&["volume", "create", "child", "--from-snapshot", "keep"]);
    // Overwrite all of base, so the snapshot's segments are no longer base's.
    base_model.write(&mut base, 0, 8 * MIB, Fill::Pattern(2), REQUEST);
    base.flush().expect("flush");

    let refused = gateway
        .admin(&["snapshot", "delete", "keep"])
        .expect_err("a snapshot in use was deleted");
    assert!(
        refused
            .stderr
            .contains("snapshot keep is the source of volume child; delete the volume first"),
        "unclear refusal: {refused}"
    );
    assert!(
        gateway.admin_ok(&["snapshot", "get", "keep"])["ready"] == true,
        "the refused delete changed the snapshot"
    );
    let missing = gateway
        .admin(&["snapshot", "delete", "no-such-snapshot"])
        .expect_err("deleting a missing snapshot succeeded");
    assert!(
        missing.stderr.contains("no-such-snapshot") && missing.stderr.contains("not found"),
        "{missing}"
    );

    let report = gateway.admin_ok(&["gc"]);
    for field in [
        "deleted_segments",
        "deleted_checkpoints",
        "waiting_for_grace",
    ] {
        assert!(report[field].is_u64(), "gc report lacks {field}: {report}");
    }
    verify(&gateway, "base", &base_model);
    verify(&gateway, "child", &snapshot_model);

    gateway.admin_ok(&["volume", "delete", "child"]);
    gateway.admin_ok(&["snapshot", "delete", "keep"]);
    let snapshots = gateway.admin_ok(&["snapshot", "list"]);
    assert!(
        snapshots
            .as_array()
            .expect("array")
            .iter()
            .all(|s| s["id"] != "keep"),
        "{snapshots}"
    );
    let gone = gateway
        .admin(&["snapshot", "get", "keep"])
        .expect_err("a deleted snapshot is still there");
    assert!(gone.stderr.contains("not found"), "{gone}");
    let volumes = gateway.admin_ok(&["volume", "list"]);
    assert!(
        volumes
            .as_array()
            .expect("array")
            .iter()
            .all(|v| v["id"] != "child"),
        "{volumes}"
    );
    assert!(
        NbdClient::connect(gateway.nbd_socket(), "child").is_err(),
        "a deleted volume is still exported"
    );
    gateway.admin_ok(&["gc"]);
    verify(&gateway, "base", &base_model);

    // What gc left is enough to recover base.
    gateway.wait_uploaded("base", Duration::from_secs(60));
    gateway.kill();
    std::fs::rename(
        options.data_dir().join("bucket"),
        dir.join("bucket-after-gc"),
    )
    .expect("move the bucket");
    let recovered = options
        .with_data_dir(dir.join("recovered"))
        .store_directory(dir.join("bucket-after-gc"))
        .start();
    verify(&recovered, "base", &base_model);
    let listed = recovered.admin_ok(&["volume", "list"]);
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(1),
        "deleted volumes came back from the bucket: {listed}"
    );
}

/// Makes every put under `directory` of a local bucket fail, as an object store that refuses
/// or throttles one prefix would: the directory is moved to `aside` (outside the bucket) and
/// a file takes its name until [`restore`](Self::restore).
struct RefusedPrefix {
    directory: std::path::PathBuf,
    aside: std::path::PathBuf,
}

impl RefusedPrefix {
    fn new(directory: std::path::PathBuf, aside: std::path::PathBuf) -> RefusedPrefix {
        if directory.exists() {
            std::fs::rename(&directory, &aside).expect("move the prefix aside");
        } else {
            std::fs::create_dir_all(&aside).expect("create the aside directory");
        }
        std::fs::write(&directory, b"in the way").expect("block the prefix");
        RefusedPrefix { directory, aside }
    }

    fn restore(self) {
        std::fs::remove_file(&self.directory).expect("unblock the prefix");
        std::fs::rename(&self.aside, &self.directory).expect("move the prefix back");
    }
}

/// A snapshot whose manifest cannot be written yet (its segment is uploaded, but the store
/// refuses the `snapshots/` prefix) is still a snapshot: `snapshot get` shows it, not ready,
/// while later writes are uploaded; and after kill -9 and a restart with the store healthy
/// again it becomes ready with the data of its point in time.
#[test]
fn a_snapshot_waiting_for_its_manifest_stays_visible_and_survives_a_crash() {
    let dir = TestDir::new("manifest-retry");
    let bucket = dir.join("bucket");
    let options = GatewayOptions::new(dir.join("data"))
        .store_directory(&bucket)
        .volume("vol=8MiB");
    let mut gateway = options.start();
    let mut client = connect(&gateway, "vol");
    let mut model = VolumeModel::new(8 * MIB);
    model.write(&mut client, 0, MIB, Fill::Pattern(1), REQUEST);
    client.flush().expect("flush");
    gateway.wait_uploaded("vol", Duration::from_secs(60));

    let refused = RefusedPrefix::new(bucket.join("snapshots"), dir.join("snapshots-aside"));
    let created = gateway.admin_ok(&["snapshot", "create", "vol", "pending"]);
    assert_eq!(created["ready"], false, "{created}");
    let snapshot_model = model.clone();
    // Writes after the snapshot are uploaded while its manifest is refused.
    model.write(&mut client, 2 * MIB, MIB, Fill::Pattern(2), REQUEST);
    client.flush().expect("flush");
    gateway.wait_uploaded("vol", Duration::from_secs(60));

    let shown = gateway.admin(&["snapshot", "get", "pending"]);
    match shown {
        Ok(info) => assert_eq!(info["ready"], false, "{info}"),
        Err(error) => panic!(
            "a snapshot that was created and is waiting for its manifest is reported as: {error}"
        ),
    }

    gateway.kill();
    refused.restore();
    gateway.restart();
    let ready = gateway
        .admin(&["snapshot", "wait", "pending", "--timeout-seconds", "60"])
        .unwrap_or_else(|error| {
            panic!(
                "the snapshot was lost in the crash: {error}\n{}",
                gateway.log_tail()
            )
        });
    assert_eq!(ready["ready"], true, "{ready}");
    gateway.admin_ok(&["volume", "create", "restored", "--from-snapshot", "pending"]);
    verify(&gateway, "restored", &snapshot_model);
    verify(&gateway, "vol", &model);
}

/// A snapshot cut while segment uploads fail (the store refuses the volume's `segments/`
/// prefix) is kept across kill -9: once the store is healthy again the restarted gateway
/// uploads the replayed log and the snapshot becomes ready with the data of its point in time.
#[test]
fn a_snapshot_cut_while_uploads_fail_survives_a_crash() {
    let dir = TestDir::new("upload-retry");
    let bucket = dir.join("bucket");
    let options = GatewayOptions::new(dir.join("data"))
        .store_directory(&bucket)
        .volume("vol=8MiB");
    let mut gateway = options.start();
    let mut client = connect(&gateway, "vol");
    let mut model = VolumeModel::new(8 * MIB);
    model.write(&mut client, 0, MIB, Fill::Pattern(1), REQUEST);
    client.flush().expect("flush");
    gateway.wait_uploaded("vol", Duration::from_secs(60));

    let refused = RefusedPrefix::new(
        bucket.join("volumes").join("vol").join("segments"),
        dir.join("segments-aside"),
    );
    model.write(&mut client, 2 * MIB, MIB, Fill::Pattern(2), REQUEST);
    client.flush().expect("flush");
    let created = gateway.admin_ok(&["snapshot", "create", "vol", "cut-in-outage"]);
    assert_eq!(created["ready"], false, "{created}");
    let snapshot_model = model.clone();
    // The upload is being retried, so the snapshot cannot be ready.
    gateway.admin_ok(&[
        "snapshot",
        "wait",
        "cut-in-outage",
        "--timeout-seconds",
        "1",
    ]);
    let info = gateway.admin_ok(&["snapshot", "get", "cut-in-outage"]);
    assert_eq!(
        info["ready"], false,
        "ready while its segment is not uploaded: {info}"
    );

    gateway.kill();
    refused.restore();
    gateway.restart();
    let ready = gateway
        .admin(&[
            "snapshot",
            "wait",
            "cut-in-outage",
            "--timeout-seconds",
            "60",
        ])
        .unwrap_or_else(|error| {
            panic!(
                "the snapshot was lost in the crash: {error}\n{}",
                gateway.log_tail()
            )
        });
    assert_eq!(ready["ready"], true, "{ready}");
    gateway.admin_ok(&[
        "volume",
        "create",
        "restored",
        "--from-snapshot",
        "cut-in-outage",
    ]);
    verify(&gateway, "restored", &snapshot_model);
    let mut client = connect(&gateway, "vol");
    model.write(&mut client, 4 * MIB, MIB, Fill::Pattern(3), REQUEST);
    client.flush().expect("flush");
    verify(&gateway, "vol", &model);
    verify(&gateway, "restored", &snapshot_model);
}
