//! The block-storage API as deployed: the real `blockgate-blockstore` binary over a real S3
//! server (s3s-fs), and real `blockgate-gateway --attach-only` processes holding the volumes,
//! reached through their admin sockets. Data goes in and out over NBD.
//!
//! Create a volume, attach it to gateway A, write, snapshot (cut by A, through its admin
//! socket), write more, snapshot again: the changed blocks between the two snapshots are
//! exactly the blocks written in between. Detach (A uploads everything), restore both
//! snapshots to new volumes on gateway B, and compare every byte with what was written.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use blockgate_e2e::binary::blockstore_binary;
use blockgate_e2e::{Fill, Gateway, GatewayOptions, NbdClient, TestDir, VolumeModel, wait_until};
use blockgate_objstore::S3sFsServer;
use blockgate_proto::blockstore::v1 as pb;
use pb::block_data_client::BlockDataClient;
use pb::block_store_client::BlockStoreClient;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 512 * 1024;
const SIZE: u64 = 16 * MIB;

/// `blockgate-blockstore serve`, killed when dropped; its stderr in a log file.
struct Api {
    child: Child,
    log: PathBuf,
}

impl Api {
    fn start(dir: &TestDir, s3: &S3sFsServer, socket: &Path, gateways: &[(&str, &Gateway)]) -> Api {
        let log = dir.join("blockstore.log");
        let config = s3.config("api");
        let mut command = Command::new(blockstore_binary());
        command
            .arg("serve")
            .arg("--store")
            .arg(format!("s3://{}/{}", config.bucket, config.prefix))
            .args(["--s3-path-style", "--s3-endpoint", &s3.endpoint()])
            .arg("--s3-region")
            .arg(config.region.unwrap_or_else(|| "us-east-1".to_string()))
            .arg("--listen")
            .arg(format!("unix://{}", socket.display()))
            .env("AWS_ACCESS_KEY_ID", config.access_key.unwrap_or_default())
            .env(
                "AWS_SECRET_ACCESS_KEY",
                config.secret_key.unwrap_or_default(),
            )
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create the API log"));
        for (node, gateway) in gateways {
            command.arg("--gateway").arg(format!(
                "{node}={}",
                gateway.data_dir().join("admin.sock").display()
            ));
        }
        let child = command.spawn().expect("start blockgate-blockstore");
        Api { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Api {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Clients {
    runtime: tokio::runtime::Runtime,
    volumes: BlockStoreClient<Channel>,
    data: BlockDataClient<Channel>,
}

impl Clients {
    fn connect(socket: &Path, api: &Api) -> Clients {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let channel = wait_until(Duration::from_secs(60), "the API socket", || {
            runtime
                .block_on(blockgate_proto::unix::connect(socket))
                .map_err(|e| format!("{e}\n{}", api.log()))
        });
        Clients {
            volumes: BlockStoreClient::new(channel.clone()),
            data: BlockDataClient::new(channel).max_decoding_message_size(4 << 20),
            runtime,
        }
    }

    fn create(&mut self, name: &str, size: u64, snapshot: Option<&str>) -> pb::Volume {
        let request = pb::CreateVolumeRequest {
            name: name.into(),
            size_bytes: size,
            source: snapshot.map(|s| pb::VolumeSource {
                kind: Some(pb::volume_source::Kind::SnapshotId(s.into())),
            }),
            ..Default::default()
        };
        self.runtime
            .block_on(self.volumes.create_volume(request))
            .unwrap_or_else(|status| panic!("create {name}: {status}"))
            .into_inner()
    }

    fn attach(&mut self, volume: &str, node: &str) -> u64 {
        let request = pb::AttachVolumeRequest {
            volume_id: volume.into(),
            node_id: node.into(),
            ..Default::default()
        };
        self.runtime
            .block_on(self.volumes.attach_volume(request))
            .unwrap_or_else(|status| panic!("attach {volume} to {node}: {status}"))
            .into_inner()
            .epoch
    }

    fn detach(&mut self, volume: &str, node: &str) {
        let request = pb::DetachVolumeRequest {
            volume_id: volume.into(),
            node_id: node.into(),
        };
        self.runtime
            .block_on(self.volumes.detach_volume(request))
            .unwrap_or_else(|status| panic!("detach {volume} from {node}: {status}"));
    }

    fn snapshot_ready(&mut self, volume: &str, name: &str) -> pb::Snapshot {
        let request = pb::CreateSnapshotRequest {
            name: name.into(),
            volume_id: volume.into(),
        };
        self.runtime
            .block_on(self.volumes.create_snapshot(request))
            .unwrap_or_else(|status| panic!("snapshot {name}: {status}"));
        wait_until(Duration::from_secs(60), "the snapshot to be ready", || {
            let snapshot = self
                .runtime
                .block_on(
                    self.volumes
                        .get_snapshot(pb::GetSnapshotRequest { id: name.into() }),
                )
                .map_err(|status| status.to_string())?
                .into_inner();
            if snapshot.ready_to_use {
                Ok(snapshot)
            } else {
                Err(format!("{snapshot:?}"))
            }
        })
    }

    fn changed(&mut self, first: &str, second: &str) -> BTreeSet<u64> {
        let request = pb::ListChangedBlocksRequest {
            first_snapshot_id: first.into(),
            second_snapshot_id: second.into(),
            ..Default::default()
        };
        let reply = self
            .runtime
            .block_on(self.data.list_changed_blocks(request))
            .unwrap_or_else(|status| panic!("changed blocks: {status}"))
            .into_inner();
        assert_eq!(u64::from(reply.block_size), BLOCK);
        assert_eq!(reply.next_block_index, None);
        reply.changed_blocks.iter().map(|b| b.block_index).collect()
    }
}

fn connect(gateway: &Gateway, volume: &str) -> NbdClient {
    NbdClient::connect(gateway.nbd_socket(), volume)
        .unwrap_or_else(|e| panic!("connect to {volume}: {e}\n{}", gateway.log_tail()))
}

fn attach_on(gateway: &Gateway, volume: &str, epoch: u64) {
    gateway.admin_ok(&["volume", "attach", volume, "--epoch", &epoch.to_string()]);
}

#[test]
fn snapshots_through_the_api_diff_and_restore_exactly() {
    let dir = TestDir::new("blockstore-api");
    let s3 = S3sFsServer::start().expect("start s3s-fs");
    let options = |name: &str| {
        GatewayOptions::new(dir.join(name))
            .s3(&s3, "api")
            .attach_only()
            .seal_interval_ms(200)
            .segment_size("1MiB")
    };
    let a = options("gateway-a").start();
    let b = options("gateway-b").start();
    let socket = dir.join("api.sock");
    let api = Api::start(&dir, &s3, &socket, &[("node-a", &a), ("node-b", &b)]);
    let mut clients = Clients::connect(&socket, &api);

    clients.create("vol", SIZE, None);
    let epoch = clients.attach("vol", "node-a");
    attach_on(&a, "vol", epoch);
    let mut nbd = connect(&a, "vol");
    let mut model = VolumeModel::new(SIZE);
    model.write(&mut nbd, 0, 3 * MIB, Fill::Pattern(1), 256 << 10);
    model.write(&mut nbd, 10 * MIB, 4096, Fill::Pattern(2), 4096);
    nbd.flush().expect("flush");
    // Cut by gateway A (the API asks it over its admin socket): includes what is still in
    // A's write log.
    clients.snapshot_ready("vol", "s1");
    let at_s1 = model.clone();

    let written = [
        (2 * BLOCK + 4096, 8192),
        (8 * BLOCK - 4096, 8192),
        (20 * BLOCK, BLOCK),
    ];
    for (i, (offset, length)) in written.into_iter().enumerate() {
        model.write(&mut nbd, offset, length, Fill::Pattern(10 + i as u64), 4096);
    }
    nbd.flush().expect("flush");
    let s2 = clients.snapshot_ready("vol", "s2");
    assert_eq!(s2.parent_id, "s1");
    assert_eq!(
        clients.changed("s1", "s2"),
        [2, 7, 8, 20].into_iter().collect(),
        "{}",
        api.log()
    );
    nbd.disconnect();

    // Detaching asks A to upload everything and close the volume.
    clients.detach("vol", "node-a");
    assert!(
        !a.volume_ids().contains(&"vol".to_string()),
        "A still holds the volume after the detach"
    );

    for (snapshot, expected) in [("s1", &at_s1), ("s2", &model)] {
        let name = format!("restored-{snapshot}");
        let restored = clients.create(&name, 0, Some(snapshot));
        assert_eq!(restored.size_bytes, SIZE);
        let epoch = clients.attach(&name, "node-b");
        attach_on(&b, &name, epoch);
        let mut client = connect(&b, &name);
        expected
            .verify(&mut client)
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", b.log_tail()));
    }
    // The original volume, attached on B, is the volume as last written.
    let epoch = clients.attach("vol", "node-b");
    attach_on(&b, "vol", epoch);
    model
        .verify(&mut connect(&b, "vol"))
        .unwrap_or_else(|e| panic!("vol on B: {e}\n{}", b.log_tail()));
}
