//! The bucket alone is enough (DESIGN.md §9.2): a gateway is killed, its data directory is
//! lost except the bucket, and a new gateway brings back every volume, every snapshot and
//! every byte, including restores of the snapshots.

use std::collections::BTreeMap;
use std::time::Duration;

use blockgate_e2e::{Fill, Gateway, GatewayOptions, NbdClient, TestDir, VolumeModel};

const MIB: u64 = 1 << 20;
const SIZE: u64 = 16 * MIB;
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

/// Cached and stored volumes (one from `--volume`, one from `volume create`) are written,
/// snapshotted with `--wait`, written again, and uploaded; the gateway is killed with
/// SIGKILL and everything in its data directory but `bucket/` is deleted. The restarted
/// gateway lists both volumes and both snapshots, serves the latest data, and restores each
/// snapshot to its snapshot-time data; writes after the recovery survive another restart.
#[test]
fn the_bucket_alone_restores_every_volume_and_snapshot() {
    let dir = TestDir::new("recovery");
    let options = GatewayOptions::new(dir.join("data")).volume("cached=16MiB");
    let mut gateway = options.start();
    gateway.admin_ok(&[
        "volume", "create", "stored", "--size", "16MiB", "--mode", "stored",
    ]);
    let mut models: BTreeMap<&str, VolumeModel> = BTreeMap::new();
    for (index, volume) in (0u64..).zip(["cached", "stored"]) {
        let mut client = connect(&gateway, volume);
        let mut model = VolumeModel::new(SIZE);
        model.write(&mut client, 0, 6 * MIB, Fill::Pattern(10 + index), REQUEST);
        model.write(&mut client, MIB, 64 << 10, Fill::Zero, REQUEST);
        model.write(
            &mut client,
            12 * MIB,
            4 * MIB,
            Fill::Pattern(20 + index),
            REQUEST,
        );
        client.flush().expect("flush");
        models.insert(volume, model);
    }
    for volume in ["cached", "stored"] {
        let snapshot = format!("{volume}-snap");
        let info = gateway.admin_ok(&["snapshot", "create", volume, &snapshot, "--wait"]);
        assert_eq!(info["ready"], true, "snapshot --wait returned {info}");
        assert_eq!(info["volume"], volume);
    }
    let snapshot_models = models.clone();
    for (index, volume) in (0u64..).zip(["cached", "stored"]) {
        let mut client = connect(&gateway, volume);
        let model = models.get_mut(volume).expect("model");
        model.write(
            &mut client,
            4 * MIB,
            6 * MIB,
            Fill::Pattern(30 + index),
            REQUEST,
        );
        model.write(&mut client, 0, 512 << 10, Fill::Zero, REQUEST);
        model.write(
            &mut client,
            SIZE - 4096,
            4096,
            Fill::Pattern(40 + index),
            REQUEST,
        );
        client.flush().expect("flush");
    }
    for volume in ["cached", "stored"] {
        gateway.wait_uploaded(volume, Duration::from_secs(60));
    }
    gateway.kill();

    // The node is lost; the bucket is all that is left.
    for entry in std::fs::read_dir(options.data_dir()).expect("data directory") {
        let entry = entry.expect("entry");
        if entry.file_name() != "bucket" {
            let path = entry.path();
            if path.is_dir() {
                std::fs::remove_dir_all(&path).expect("remove");
            } else {
                std::fs::remove_file(&path).expect("remove");
            }
        }
    }
    let mut gateway = options.start();

    let volumes = gateway.admin_ok(&["volume", "list"]);
    let mut listed: Vec<(String, String, u64)> = volumes
        .as_array()
        .expect("volume list is an array")
        .iter()
        .map(|v| {
            (
                v["id"].as_str().unwrap_or_default().to_string(),
                v["mode"].as_str().unwrap_or_default().to_string(),
                v["size"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            ("cached".to_string(), "cached".to_string(), SIZE),
            ("stored".to_string(), "stored".to_string(), SIZE),
        ],
        "{volumes}"
    );
    let snapshots = gateway.admin_ok(&["snapshot", "list"]);
    let mut listed: Vec<(String, String, bool)> = snapshots
        .as_array()
        .expect("snapshot list is an array")
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap_or_default().to_string(),
                s["volume"].as_str().unwrap_or_default().to_string(),
                s["ready"].as_bool().unwrap_or_default(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            ("cached-snap".to_string(), "cached".to_string(), true),
            ("stored-snap".to_string(), "stored".to_string(), true),
        ],
        "{snapshots}"
    );

    for (volume, model) in &models {
        verify(&gateway, volume, model);
    }
    for (volume, mode) in [("cached", "cached"), ("stored", "stored")] {
        let restored = format!("{volume}-restored");
        let snapshot = format!("{volume}-snap");
        gateway.admin_ok(&[
            "volume",
            "create",
            &restored,
            "--from-snapshot",
            &snapshot,
            "--mode",
            mode,
        ]);
        verify(&gateway, &restored, &snapshot_models[volume]);
    }

    // The recovered gateway is the volumes' writer now: new writes survive a restart.
    let model = models.get_mut("cached").expect("model");
    let mut client = connect(&gateway, "cached");
    model.write(&mut client, 8 * MIB, MIB, Fill::Pattern(50), REQUEST);
    client.flush().expect("flush");
    drop(client);
    gateway.kill();
    gateway.restart();
    for (volume, model) in &models {
        verify(&gateway, volume, model);
    }
    verify(&gateway, "cached-restored", &snapshot_models["cached"]);
}
