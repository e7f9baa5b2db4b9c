//! The block-storage API over a real unix socket, against a real S3-compatible server
//! (s3s-fs), with in-process gateways (engines in attach-only mode) holding the volumes.

#![allow(clippy::unwrap_used, clippy::cast_possible_truncation)] // test code on 64-bit: a failed unwrap is a failed test

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use blockgate_blockstore_api::{GatewayError, GatewaySnapshot, Gateways, State, server};
use blockgate_engine::catalog::Catalog;
use blockgate_engine::{Engine, EngineConfig, EngineError, SnapshotInfo};
use blockgate_objstore::{ObjectStore, S3Store, S3sFsServer};
use blockgate_proto::blockstore::v1 as pb;
use pb::block_data_client::BlockDataClient;
use pb::block_store_client::BlockStoreClient;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 512 * 1024;

/// Gateways in this process: each node's engine.
#[derive(Debug, Default)]
struct InProcessGateways {
    engines: std::sync::Mutex<HashMap<String, Arc<Engine>>>,
}

impl InProcessGateways {
    fn engine(&self, node: &str) -> Result<Arc<Engine>, GatewayError> {
        self.engines
            .lock()
            .unwrap()
            .get(node)
            .cloned()
            .ok_or_else(|| GatewayError::Unreachable {
                node: node.to_string(),
                reason: "not running".to_string(),
            })
    }

    fn add(&self, node: &str, engine: Arc<Engine>) {
        self.engines
            .lock()
            .unwrap()
            .insert(node.to_string(), engine);
    }
}

fn refused(node: &str, error: EngineError) -> GatewayError {
    GatewayError::Refused {
        node: node.to_string(),
        kind: match error {
            EngineError::VolumeNotFound { .. } | EngineError::SnapshotNotFound { .. } => {
                "not-found".to_string()
            }
            _ => "internal".to_string(),
        },
        message: blockgate_engine::error_chain(&error),
    }
}

fn gateway_snapshot(info: SnapshotInfo) -> GatewaySnapshot {
    GatewaySnapshot {
        id: info.id,
        volume: info.volume,
        size: info.size,
        ready: info.ready,
        parent: info.parent,
        created_unix: info.created_unix,
    }
}

#[async_trait]
impl Gateways for InProcessGateways {
    async fn create_snapshot(
        &self,
        node: &str,
        volume: &str,
        snapshot: &str,
    ) -> Result<GatewaySnapshot, GatewayError> {
        let engine = self.engine(node)?;
        engine
            .create_snapshot(volume, snapshot)
            .await
            .map(gateway_snapshot)
            .map_err(|e| refused(node, e))
    }

    async fn get_snapshot(
        &self,
        node: &str,
        snapshot: &str,
    ) -> Result<Option<GatewaySnapshot>, GatewayError> {
        match self.engine(node)?.snapshot(snapshot).await {
            Ok(info) => Ok(Some(gateway_snapshot(info))),
            Err(EngineError::SnapshotNotFound { .. }) => Ok(None),
            Err(error) => Err(refused(node, error)),
        }
    }

    async fn wait_snapshot(
        &self,
        node: &str,
        snapshot: &str,
        timeout: Duration,
    ) -> Result<GatewaySnapshot, GatewayError> {
        self.engine(node)?
            .wait_snapshot_ready(snapshot, timeout)
            .await
            .map(gateway_snapshot)
            .map_err(|e| refused(node, e))
    }

    async fn expand_volume(&self, node: &str, volume: &str, size: u64) -> Result<(), GatewayError> {
        self.engine(node)?
            .expand_volume(volume, size)
            .await
            .map_err(|e| refused(node, e))
    }

    async fn detach_volume(&self, node: &str, volume: &str) -> Result<(), GatewayError> {
        self.engine(node)?
            .detach_volume(volume, Duration::from_secs(60))
            .await
            .map_err(|e| refused(node, e))
    }

    fn knows(&self, node: &str) -> bool {
        self.engines.lock().unwrap().contains_key(node)
    }
}

struct Harness {
    s3: S3sFsServer,
    dir: tempfile::TempDir,
    store: Arc<dyn ObjectStore>,
    gateways: Arc<InProcessGateways>,
    volumes: BlockStoreClient<Channel>,
    data: BlockDataClient<Channel>,
    _shutdown: tokio::sync::oneshot::Sender<()>,
}

impl Harness {
    async fn start() -> Harness {
        let s3 = S3sFsServer::start().expect("start s3s-fs");
        let store: Arc<dyn ObjectStore> =
            Arc::new(S3Store::new(s3.config("api")).await.expect("S3 store"));
        let dir = tempfile::tempdir().unwrap();
        let gateways = Arc::new(InProcessGateways::default());
        let state = State::new(Catalog::new(store.clone(), 4096), gateways.clone());
        let socket = dir.path().join("api.sock");
        let listener = blockgate_proto::unix::bind(&socket).unwrap();
        let (shutdown, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(server::serve(listener, state, async {
            let _ = stopped.await;
        }));
        let channel = blockgate_proto::unix::channel_lazy(&socket);
        Harness {
            s3,
            store,
            gateways,
            volumes: BlockStoreClient::new(channel.clone()),
            data: BlockDataClient::new(channel).max_decoding_message_size(server::MAX_MESSAGE),
            dir,
            _shutdown: shutdown,
        }
    }

    async fn gateway(&self, node: &str) -> Arc<Engine> {
        let config = EngineConfig {
            attach_only: true,
            seal_interval: Duration::from_millis(100),
            segment_target: MIB,
            gc_grace: Duration::from_secs(3600),
            ..EngineConfig::default()
        };
        let engine = Engine::open(&self.dir.path().join(node), self.store.clone(), config)
            .await
            .expect("open gateway engine");
        self.gateways.add(node, engine.clone());
        engine
    }

    async fn create(
        &mut self,
        name: &str,
        size: u64,
        source: Option<pb::volume_source::Kind>,
    ) -> pb::Volume {
        self.volumes
            .create_volume(pb::CreateVolumeRequest {
                name: name.to_string(),
                size_bytes: size,
                mode: pb::VolumeMode::Cached as i32,
                source: source.map(|kind| pb::VolumeSource { kind: Some(kind) }),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|status| panic!("create {name}: {status}"))
            .into_inner()
    }

    async fn attach(
        &mut self,
        volume: &str,
        node: &str,
        force: bool,
    ) -> Result<u64, tonic::Status> {
        self.volumes
            .attach_volume(pb::AttachVolumeRequest {
                volume_id: volume.to_string(),
                node_id: node.to_string(),
                force,
                readonly: false,
            })
            .await
            .map(|r| r.into_inner().epoch)
    }

    async fn snapshot_ready(&mut self, volume: &str, name: &str) -> pb::Snapshot {
        let first = self
            .volumes
            .create_snapshot(pb::CreateSnapshotRequest {
                name: name.to_string(),
                volume_id: volume.to_string(),
            })
            .await
            .unwrap_or_else(|status| panic!("snapshot {name}: {status}"))
            .into_inner();
        assert_eq!(first.volume_id, volume);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let snapshot = self
                .volumes
                .get_snapshot(pb::GetSnapshotRequest {
                    id: name.to_string(),
                })
                .await
                .unwrap()
                .into_inner();
            if snapshot.ready_to_use {
                return snapshot;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "snapshot {name} never became ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn changed(&mut self, first: &str, second: &str) -> BTreeSet<u64> {
        let mut blocks = BTreeSet::new();
        let mut start = 0;
        loop {
            let page = self
                .data
                .list_changed_blocks(pb::ListChangedBlocksRequest {
                    first_snapshot_id: first.to_string(),
                    second_snapshot_id: second.to_string(),
                    starting_block_index: start,
                    max_results: 3,
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(page.block_size as u64, BLOCK);
            blocks.extend(page.changed_blocks.iter().map(|b| b.block_index));
            match page.next_block_index {
                Some(next) => start = next,
                None => return blocks,
            }
        }
    }

    async fn block(&mut self, snapshot: &str, index: u64) -> Vec<u8> {
        let reply = self
            .data
            .get_snapshot_block(pb::GetSnapshotBlockRequest {
                snapshot_id: snapshot.to_string(),
                block_index: index,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.checksum, hex(&Sha256::digest(&reply.data)));
        reply.data
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn fill(seed: u8, length: usize) -> Vec<u8> {
    (0..length)
        .map(|i| seed ^ (i as u8).wrapping_mul(31))
        .collect()
}

async fn write(engine: &Engine, volume: &str, model: &mut [u8], offset: u64, data: &[u8]) {
    let v = engine.volume(volume).unwrap();
    v.write(offset, data, false).await.unwrap();
    model[offset as usize..offset as usize + data.len()].copy_from_slice(data);
}

async fn read_all(engine: &Engine, volume: &str, size: u64) -> Vec<u8> {
    let v = engine.volume(volume).unwrap();
    let mut out = Vec::with_capacity(size as usize);
    let mut at = 0;
    while at < size {
        let chunk = (size - at).min(MIB) as u32;
        out.extend_from_slice(&v.read(at, chunk).await.unwrap());
        at += u64::from(chunk);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_blocks_are_exactly_the_blocks_written_between_two_snapshots() {
    let mut h = Harness::start().await;
    let size = 16 * MIB;
    let created = h.create("vol", size, None).await;
    assert_eq!(created.size_bytes, size);
    let a = h.gateway("node-a").await;
    let epoch = h.attach("vol", "node-a", false).await.unwrap();
    assert!(
        epoch > 1,
        "a new epoch beyond the creation checkpoint's: {epoch}"
    );
    a.attach_volume("vol", epoch).await.unwrap();

    let mut model = vec![0u8; size as usize];
    write(&a, "vol", &mut model, 0, &fill(1, 3 * MIB as usize)).await;
    write(&a, "vol", &mut model, 10 * MIB, &fill(2, 4096)).await;
    a.volume("vol").unwrap().flush().await.unwrap();
    let s1 = h.snapshot_ready("vol", "s1").await;
    assert_eq!(s1.size_bytes, size);
    let at_s1 = model.clone();

    // Between the snapshots: a write inside block 2, one straddling blocks 7 and 8, and a
    // whole block 20; block 0 is overwritten with the same bytes (still a write).
    let written = [
        (2 * BLOCK + 4096, 8192u64),
        (8 * BLOCK - 4096, 8192),
        (20 * BLOCK, BLOCK),
        (0, 4096),
    ];
    for (i, (offset, length)) in written.iter().enumerate() {
        let data = if *offset == 0 {
            model[..*length as usize].to_vec()
        } else {
            fill(10 + i as u8, *length as usize)
        };
        write(&a, "vol", &mut model, *offset, &data).await;
    }
    a.volume("vol").unwrap().flush().await.unwrap();
    let s2 = h.snapshot_ready("vol", "s2").await;
    assert_eq!(s2.parent_id, "s1");

    let expected: BTreeSet<u64> = [0, 2, 7, 8, 20].into_iter().collect();
    assert_eq!(h.changed("s1", "s2").await, expected);
    assert_eq!(
        h.changed("s2", "s1").await,
        expected,
        "the diff is symmetric"
    );
    // Without a first snapshot: every written block of s1.
    let allocated: BTreeSet<u64> = (0..6).chain([20]).collect();
    assert_eq!(h.changed("", "s1").await, allocated);

    // Block data matches the volume at each point.
    for index in [0u64, 2, 7, 8, 20, 31] {
        let range = (index * BLOCK) as usize..((index + 1) * BLOCK) as usize;
        assert_eq!(
            h.block("s1", index).await,
            at_s1[range.clone()],
            "s1 block {index}"
        );
        assert_eq!(h.block("s2", index).await, model[range], "s2 block {index}");
    }
    let beyond = h
        .data
        .get_snapshot_block(pb::GetSnapshotBlockRequest {
            snapshot_id: "s2".into(),
            block_index: 32,
        })
        .await
        .unwrap_err();
    assert_eq!(beyond.code(), Code::OutOfRange);

    // Restore both snapshots on another node and compare every byte.
    let b = h.gateway("node-b").await;
    for (snapshot, expected) in [("s1", &at_s1), ("s2", &model)] {
        let name = format!("restored-{snapshot}");
        let restored = h
            .create(
                &name,
                0,
                Some(pb::volume_source::Kind::SnapshotId(snapshot.into())),
            )
            .await;
        assert_eq!(restored.size_bytes, size);
        let epoch = h.attach(&name, "node-b", false).await.unwrap();
        b.attach_volume(&name, epoch).await.unwrap();
        assert!(
            read_all(&b, &name, size).await == **expected,
            "{name} differs"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_writer_is_refused_and_a_forced_takeover_fences_the_first() {
    let mut h = Harness::start().await;
    let size = 4 * MIB;
    h.create("vol", size, None).await;
    let a = h.gateway("node-a").await;
    let b = h.gateway("node-b").await;
    let first = h.attach("vol", "node-a", false).await.unwrap();
    assert_eq!(
        h.attach("vol", "node-a", false).await.unwrap(),
        first,
        "idempotent"
    );
    a.attach_volume("vol", first).await.unwrap();
    let mut model = vec![0u8; size as usize];
    write(&a, "vol", &mut model, 0, &fill(1, MIB as usize)).await;
    a.volume("vol").unwrap().flush().await.unwrap();
    h.snapshot_ready("vol", "before").await;

    let refused = h.attach("vol", "node-b", false).await.unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused}");
    assert!(refused.message().contains("node-a"), "{refused}");
    let delete = h
        .volumes
        .delete_volume(pb::DeleteVolumeRequest {
            id: "vol".into(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(delete.code(), Code::FailedPrecondition);

    // node-a is "gone": force the takeover.
    let second = h.attach("vol", "node-b", true).await.unwrap();
    assert!(second > first);
    b.attach_volume("vol", second).await.unwrap();
    // A stale epoch cannot be used to attach again.
    assert!(matches!(
        b.attach_volume("vol", first).await,
        Err(EngineError::Fenced { .. })
    ));
    write(&b, "vol", &mut model, MIB, &fill(2, MIB as usize)).await;
    b.volume("vol").unwrap().flush().await.unwrap();

    // The fenced writer keeps trying: its writes are refused once it tries to upload.
    let stale = a.volume("vol").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let result = stale.write(0, &fill(9, 4096), false).await;
        if matches!(result, Err(EngineError::Fenced { .. })) {
            break;
        }
        let _ = stale.flush().await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stale writer was never refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The bucket holds the current writer's data: detach cleanly and read it back.
    h.volumes
        .detach_volume(pb::DetachVolumeRequest {
            volume_id: "vol".into(),
            node_id: "node-b".into(),
        })
        .await
        .unwrap();
    let s = h.snapshot_ready("vol", "after").await;
    assert_eq!(s.volume_id, "vol");
    for index in 0..(size / BLOCK) {
        let range = (index * BLOCK) as usize..((index + 1) * BLOCK) as usize;
        assert_eq!(h.block("after", index).await, model[range], "block {index}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_page_and_errors_carry_the_right_codes() {
    let mut h = Harness::start().await;
    for i in 0..7 {
        h.create(&format!("v{i}"), MIB, None).await;
    }
    // Idempotent by name; other parameters are ALREADY_EXISTS.
    h.create("v0", MIB, None).await;
    let conflict = h
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            name: "v0".into(),
            size_bytes: 2 * MIB,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(conflict.code(), Code::AlreadyExists);
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = h
            .volumes
            .list_volumes(pb::ListVolumesRequest {
                page_size: 3,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.volumes.len() <= 3);
        seen.extend(page.volumes.into_iter().map(|v| v.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, (0..7).map(|i| format!("v{i}")).collect::<Vec<_>>());

    let cases: Vec<(tonic::Status, Code)> = vec![
        (
            h.volumes
                .get_volume(pb::GetVolumeRequest { id: "nope".into() })
                .await
                .unwrap_err(),
            Code::NotFound,
        ),
        (
            h.volumes
                .create_volume(pb::CreateVolumeRequest {
                    name: "Bad Name".into(),
                    size_bytes: MIB,
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
        ),
        (
            h.volumes
                .create_volume(pb::CreateVolumeRequest {
                    name: "odd".into(),
                    size_bytes: 1000,
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
        ),
        (
            h.volumes
                .create_volume(pb::CreateVolumeRequest {
                    name: "zipped".into(),
                    size_bytes: MIB,
                    compression: pb::Compression::Zstd as i32,
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            Code::Unimplemented,
        ),
        (
            h.volumes
                .expand_volume(pb::ExpandVolumeRequest {
                    id: "v1".into(),
                    size_bytes: MIB / 2,
                })
                .await
                .unwrap_err(),
            Code::OutOfRange,
        ),
        (
            h.volumes
                .create_volume(pb::CreateVolumeRequest {
                    name: "from-nothing".into(),
                    source: Some(pb::VolumeSource {
                        kind: Some(pb::volume_source::Kind::SnapshotId("missing".into())),
                    }),
                    ..Default::default()
                })
                .await
                .unwrap_err(),
            Code::NotFound,
        ),
        (
            h.volumes
                .list_volumes(pb::ListVolumesRequest {
                    page_size: 1,
                    page_token: "!!".into(),
                })
                .await
                .unwrap_err(),
            Code::InvalidArgument,
        ),
    ];
    for (status, code) in cases {
        assert_eq!(status.code(), code, "{status}");
        assert!(!status.message().is_empty(), "{status:?}");
    }

    // A detached volume grows through the bucket; the next attach sees the new size.
    let grown = h
        .volumes
        .expand_volume(pb::ExpandVolumeRequest {
            id: "v1".into(),
            size_bytes: 3 * MIB,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grown.size_bytes, 3 * MIB);
    let engine = h.gateway("node-a").await;
    let epoch = h.attach("v1", "node-a", false).await.unwrap();
    let volume = engine.attach_volume("v1", epoch).await.unwrap();
    assert_eq!(volume.size(), 3 * MIB);

    // Deleting a volume keeps its snapshots usable; deleting a snapshot in use is refused.
    h.snapshot_ready("v2", "v2-snap").await;
    h.create(
        "v2-copy",
        0,
        Some(pb::volume_source::Kind::SnapshotId("v2-snap".into())),
    )
    .await;
    h.volumes
        .delete_volume(pb::DeleteVolumeRequest {
            id: "v2".into(),
            force: false,
        })
        .await
        .unwrap();
    let in_use = h
        .volumes
        .delete_snapshot(pb::DeleteSnapshotRequest {
            id: "v2-snap".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(in_use.code(), Code::FailedPrecondition, "{in_use}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_snapshot_is_verified_and_restores() {
    let mut h = Harness::start().await;
    let size = 2 * MIB;
    let started = h
        .data
        .start_snapshot(pb::StartSnapshotRequest {
            name: "imported".into(),
            volume_size: size,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(started.block_size as u64, BLOCK);
    assert!(!started.snapshot.unwrap().ready_to_use);

    let blocks: Vec<(u64, Vec<u8>)> =
        vec![(0, fill(3, BLOCK as usize)), (3, fill(4, BLOCK as usize))];
    // A block with a wrong checksum is refused and changes nothing.
    let bad = h
        .data
        .put_snapshot_block(pb::PutSnapshotBlockRequest {
            snapshot_id: "imported".into(),
            block_index: 1,
            data: fill(5, BLOCK as usize),
            checksum: hex(&Sha256::digest(b"something else")),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    let short = h
        .data
        .put_snapshot_block(pb::PutSnapshotBlockRequest {
            snapshot_id: "imported".into(),
            block_index: 1,
            data: vec![1; 10],
            checksum: hex(&Sha256::digest([1u8; 10])),
        })
        .await
        .unwrap_err();
    assert_eq!(short.code(), Code::InvalidArgument);
    for (index, data) in &blocks {
        h.data
            .put_snapshot_block(pb::PutSnapshotBlockRequest {
                snapshot_id: "imported".into(),
                block_index: *index,
                data: data.clone(),
                checksum: hex(&Sha256::digest(data)),
            })
            .await
            .unwrap();
    }
    let mut aggregate = Sha256::new();
    for (_, data) in &blocks {
        aggregate.update(Sha256::digest(data));
    }
    let aggregate = hex(&aggregate.finalize());
    let wrong_count = h
        .data
        .complete_snapshot(pb::CompleteSnapshotRequest {
            snapshot_id: "imported".into(),
            changed_blocks_count: 3,
            checksum: aggregate.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong_count.code(), Code::InvalidArgument);
    let wrong_sum = h
        .data
        .complete_snapshot(pb::CompleteSnapshotRequest {
            snapshot_id: "imported".into(),
            changed_blocks_count: 2,
            checksum: hex(&Sha256::digest(b"nope")),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong_sum.code(), Code::InvalidArgument);
    let done = h
        .data
        .complete_snapshot(pb::CompleteSnapshotRequest {
            snapshot_id: "imported".into(),
            changed_blocks_count: 2,
            checksum: aggregate,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(done.ready_to_use);

    assert_eq!(
        h.changed("", "imported").await,
        [0, 3].into_iter().collect()
    );
    assert_eq!(h.block("imported", 3).await, blocks[1].1);
    assert_eq!(h.block("imported", 1).await, vec![0u8; BLOCK as usize]);

    let restored = h
        .create(
            "from-import",
            0,
            Some(pb::volume_source::Kind::SnapshotId("imported".into())),
        )
        .await;
    assert_eq!(restored.size_bytes, size);
    let engine = h.gateway("node-a").await;
    let epoch = h.attach("from-import", "node-a", false).await.unwrap();
    engine.attach_volume("from-import", epoch).await.unwrap();
    let bytes = read_all(&engine, "from-import", size).await;
    assert_eq!(&bytes[..BLOCK as usize], &blocks[0].1[..]);
    assert_eq!(&bytes[3 * BLOCK as usize..], &blocks[1].1[..]);
    assert!(
        bytes[BLOCK as usize..3 * BLOCK as usize]
            .iter()
            .all(|b| *b == 0)
    );

    // An import left unfinished past its timeout is refused and swept.
    h.data
        .start_snapshot(pb::StartSnapshotRequest {
            name: "abandoned".into(),
            volume_size: size,
            timeout_seconds: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let late = h
        .data
        .put_snapshot_block(pb::PutSnapshotBlockRequest {
            snapshot_id: "abandoned".into(),
            block_index: 0,
            data: blocks[0].1.clone(),
            checksum: hex(&Sha256::digest(&blocks[0].1)),
        })
        .await
        .unwrap_err();
    assert_eq!(late.code(), Code::FailedPrecondition, "{late}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_store_outage_is_unavailable_and_changes_nothing() {
    let mut h = Harness::start().await;
    h.create("kept", MIB, None).await;
    h.s3.stop();
    let info = h
        .volumes
        .get_service_info(pb::GetServiceInfoRequest {})
        .await
        .unwrap_err();
    assert_eq!(info.code(), Code::Unavailable, "{info}");
    let create = h
        .volumes
        .create_volume(pb::CreateVolumeRequest {
            name: "during-outage".into(),
            size_bytes: MIB,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(create.code(), Code::Unavailable, "{create}");
    let attach = h.attach("kept", "node-a", false).await.unwrap_err();
    assert_eq!(attach.code(), Code::Unavailable, "{attach}");
    h.s3.restart().expect("restart s3s-fs");
    let volumes = h
        .volumes
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes;
    assert_eq!(
        volumes.iter().map(|v| v.id.as_str()).collect::<Vec<_>>(),
        ["kept"],
        "nothing was created or lost during the outage"
    );
    assert!(volumes[0].attachment.is_none());
}
