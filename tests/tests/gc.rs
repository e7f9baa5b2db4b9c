//! Garbage collection past its grace period (DESIGN.md §3): segments that no volume map and
//! no snapshot references are deleted; everything a volume or a snapshot still needs stays,
//! in the running gateway and in the bucket alone.

use std::path::Path;
use std::time::Duration;

use blockgate_e2e::{
    Fill, Gateway, GatewayOptions, NbdClient, TestDir, VolumeModel, wait_until_every,
};

const MIB: u64 = 1 << 20;
/// One request per segment: with `--segment-size 64KiB` every write seals its log file.
const REQUEST: u64 = 64 << 10;

fn connect(gateway: &Gateway, volume: &str) -> NbdClient {
    NbdClient::connect(gateway.nbd_socket(), volume)
        .unwrap_or_else(|e| panic!("connect to {volume}: {e}\n{}", gateway.log_tail()))
}

fn verify(gateway: &Gateway, volume: &str, model: &VolumeModel) {
    let mut client = connect(gateway, volume);
    model
        .verify(&mut client)
        .unwrap_or_else(|e| panic!("{volume}: {e}\n{}", gateway.log_tail()));
}

fn segment_count(bucket: &Path, volume: &str) -> usize {
    std::fs::read_dir(bucket.join("volumes").join(volume).join("segments"))
        .expect("segments directory")
        .filter_map(Result::ok)
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with('.'))
        .count()
}

/// Two volumes are written (64 segments each, enough for a checkpoint), snapshotted, and
/// overwritten (64 more). `kept`'s snapshot stays and a volume is restored from it; `freed`'s
/// snapshot is deleted. Garbage collection, run until its grace period (shortened to 3 s)
/// has passed, deletes
/// `freed`'s overwritten segments and none of `kept`'s; every volume and the remaining
/// snapshot read correctly, live and from the bucket alone.
#[test]
fn garbage_collection_frees_only_what_nothing_references() {
    let dir = TestDir::new("gc-grace");
    let bucket = dir.join("bucket");
    let options = GatewayOptions::new(dir.join("data"))
        .store_directory(&bucket)
        .segment_size("64KiB")
        .gc_grace_seconds(3)
        .volume("kept=4MiB")
        .volume("freed=4MiB");
    let mut gateway = options.start();
    let mut snapshot_models = Vec::new();
    let mut models = Vec::new();
    for (index, volume) in (0u64..).zip(["kept", "freed"]) {
        let mut client = connect(&gateway, volume);
        let mut model = VolumeModel::new(4 * MIB);
        model.write(&mut client, 0, 4 * MIB, Fill::Pattern(10 + index), REQUEST);
        client.flush().expect("flush");
        gateway.wait_uploaded(volume, Duration::from_secs(60));
        let snapshot = format!("{volume}-snap");
        gateway.admin_ok(&["snapshot", "create", volume, &snapshot, "--wait"]);
        snapshot_models.push(model.clone());
        model.write(&mut client, 0, 4 * MIB, Fill::Pattern(20 + index), REQUEST);
        client.flush().expect("flush");
        gateway.wait_uploaded(volume, Duration::from_secs(60));
        models.push(model);
    }
    gateway.admin_ok(&[
        "volume",
        "create",
        "restored",
        "--from-snapshot",
        "kept-snap",
    ]);
    gateway.admin_ok(&["snapshot", "delete", "freed-snap"]);
    let kept_before = segment_count(&bucket, "kept");
    let freed_before = segment_count(&bucket, "freed");
    assert!(
        kept_before >= 128 && freed_before >= 128,
        "expected 128 segments per volume, found {kept_before} and {freed_before}"
    );

    let mut deleted = 0;
    let mut rounds = 0;
    wait_until_every(
        Duration::from_secs(60),
        Duration::from_secs(1),
        "garbage collection to get past its grace period",
        || {
            let report = gateway.admin_ok(&["gc"]);
            deleted += report["deleted_segments"].as_u64().unwrap_or_default();
            rounds += 1;
            if rounds > 1 && report["waiting_for_grace"] == 0 {
                Ok(())
            } else {
                Err(report.to_string())
            }
        },
    );
    let kept_after = segment_count(&bucket, "kept");
    let freed_after = segment_count(&bucket, "freed");
    eprintln!(
        "gc deleted {deleted} segments: kept {kept_before} -> {kept_after}, freed \
         {freed_before} -> {freed_after}"
    );
    assert_eq!(
        kept_after, kept_before,
        "segments that a snapshot and a restored volume need were deleted"
    );
    assert!(
        freed_after + 64 <= freed_before,
        "the 64 overwritten segments of a volume without snapshots were not collected \
         ({freed_before} -> {freed_after})"
    );

    verify(&gateway, "kept", &models[0]);
    verify(&gateway, "freed", &models[1]);
    verify(&gateway, "restored", &snapshot_models[0]);
    gateway.kill();
    let cold = options.with_data_dir(dir.join("cold")).start();
    verify(&cold, "kept", &models[0]);
    verify(&cold, "freed", &models[1]);
    verify(&cold, "restored", &snapshot_models[0]);
    cold.admin_ok(&[
        "volume",
        "create",
        "restored-again",
        "--from-snapshot",
        "kept-snap",
    ]);
    verify(&cold, "restored-again", &snapshot_models[0]);
}
