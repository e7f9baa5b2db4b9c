//! The node service against a real engine (in-memory bucket) and an in-memory kernel that
//! speaks NBD on the sockets it is given, as the kernel's driver would.

use std::sync::Arc;
use std::time::Duration;

use blockgate_blockstore::documents::Mode;
use blockgate_engine::{Engine, EngineConfig, VolumeSource, VolumeSpec};
use blockgate_objstore::{FaultStore, Faults, MemoryStore, ObjectStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tonic::Code;

use super::*;
use crate::kernel::fake::FakeKernel;

const SIZE: u64 = 16 << 20;

struct Fixture {
    _dir: tempfile::TempDir,
    data: std::path::PathBuf,
    store: Arc<dyn ObjectStore>,
    faults: Faults,
    kernel: Arc<FakeKernel>,
}

fn config() -> EngineConfig {
    EngineConfig {
        attach_only: true,
        seal_interval: Duration::from_millis(50),
        max_retry_delay: Duration::from_millis(50),
        ..EngineConfig::default()
    }
}

impl Fixture {
    /// A bucket holding volume `vol` (created and detached by another gateway, epoch 1).
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (store, faults) = FaultStore::new(Arc::new(MemoryStore::new()));
        let store: Arc<dyn ObjectStore> = Arc::new(store);
        let creator = Engine::open(
            &dir.path().join("creator"),
            store.clone(),
            EngineConfig::default(),
        )
        .await
        .unwrap();
        creator
            .create_volume(VolumeSpec {
                id: "vol".into(),
                size: SIZE,
                mode: Mode::Cached,
                source: VolumeSource::Empty,
            })
            .await
            .unwrap();
        creator
            .detach_volume("vol", Duration::from_secs(10))
            .await
            .unwrap();
        creator.shutdown().await;
        Fixture {
            data: dir.path().join("node"),
            _dir: dir,
            store,
            faults,
            kernel: FakeKernel::new(),
        }
    }

    async fn node(&self) -> (Arc<Engine>, Arc<Node>) {
        let engine = Engine::open(&self.data, self.store.clone(), config())
            .await
            .unwrap();
        let node = Node::new(
            engine.clone(),
            self.kernel.clone(),
            NodeConfig::new(&self.data),
        );
        node.recover().await.unwrap();
        (engine, node)
    }
}

/// A minimal NBD transmission client: what the kernel sends on its sockets.
async fn request(
    stream: &mut UnixStream,
    command: u16,
    offset: u64,
    length: u32,
    payload: &[u8],
) -> (u32, Vec<u8>) {
    let mut header = Vec::new();
    header.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    header.extend_from_slice(&0u16.to_be_bytes());
    header.extend_from_slice(&command.to_be_bytes());
    header.extend_from_slice(&7u64.to_be_bytes());
    header.extend_from_slice(&offset.to_be_bytes());
    header.extend_from_slice(&length.to_be_bytes());
    header.extend_from_slice(payload);
    stream.write_all(&header).await.unwrap();
    let mut reply = [0u8; 16];
    stream.read_exact(&mut reply).await.unwrap();
    assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes());
    let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
    let mut data = Vec::new();
    if command == 0 && error == 0 {
        data.resize(length as usize, 0);
        stream.read_exact(&mut data).await.unwrap();
    }
    (error, data)
}

async fn write(stream: &mut UnixStream, offset: u64, data: &[u8]) {
    let length = u32::try_from(data.len()).unwrap();
    assert_eq!(request(stream, 1, offset, length, data).await.0, 0);
}

async fn flush(stream: &mut UnixStream) {
    assert_eq!(request(stream, 3, 0, 0, &[]).await.0, 0);
}

async fn read(stream: &mut UnixStream, offset: u64, length: u32) -> Vec<u8> {
    let (error, data) = request(stream, 0, offset, length, &[]).await;
    assert_eq!(error, 0);
    data
}

fn code(result: Result<impl std::fmt::Debug, NodeError>) -> Code {
    result.map_err(|e| Status::from(e).code()).unwrap_err()
}

#[tokio::test]
async fn attach_serves_the_volume_to_the_kernel_and_is_idempotent() {
    let fixture = Fixture::new().await;
    let (_engine, node) = fixture.node().await;
    let attached = node.attach("vol", 2, false, 0).await.unwrap();
    assert_eq!(attached.device_path, "/dev/nbd0");
    assert_eq!(
        (
            attached.size_bytes,
            attached.block_size,
            attached.connections
        ),
        (SIZE, 4096, 2)
    );
    fixture.kernel.with(0, |device| {
        assert_eq!(device.config.backend, "blockgate:vol");
        assert_eq!(device.config.size, SIZE);
        let flags = device.config.server_flags;
        for flag in [1 << 2, 1 << 3, 1 << 5, 1 << 6, 1 << 8] {
            assert_ne!(
                flags & flag,
                0,
                "flush, fua, trim, write-zeroes, multi-conn"
            );
        }
    });
    let mut sockets = fixture.kernel.take_sockets(0);
    assert_eq!(sockets.len(), 2);
    let data = vec![0x5a; 8192];
    write(&mut sockets[0], 4096, &data).await;
    flush(&mut sockets[0]).await;
    assert_eq!(read(&mut sockets[1], 4096, 8192).await, data);

    let again = node.attach("vol", 2, false, 0).await.unwrap();
    assert_eq!(again, attached);
    assert_eq!(fixture.kernel.devices.lock().unwrap().len(), 1);
    assert_eq!(node.list().await, vec![attached]);
    let saved = std::fs::read_to_string(fixture.data.join(STATE_FILE)).unwrap();
    assert!(saved.contains("\"epoch\": 2"), "{saved}");
}

#[tokio::test]
async fn refusals_carry_the_contract_codes() {
    let fixture = Fixture::new().await;
    let (_engine, node) = fixture.node().await;
    assert_eq!(code(node.attach("nope", 2, false, 0).await), Code::NotFound);
    assert_eq!(
        code(node.attach("", 2, false, 0).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(node.attach("vol", 2, false, 99).await),
        Code::InvalidArgument
    );
    assert_eq!(code(node.stats("vol").await), Code::NotFound);
    assert_eq!(code(node.expand("vol", SIZE * 2).await), Code::NotFound);

    *fixture.kernel.no_module.lock().unwrap() = true;
    let status = Status::from(node.attach("vol", 3, false, 1).await.unwrap_err());
    assert_eq!(status.code(), Code::Unavailable);
    assert!(status.message().contains("modprobe nbd"), "{status:?}");
    assert!(node.list().await.is_empty(), "nothing recorded");
    *fixture.kernel.no_module.lock().unwrap() = false;

    node.attach("vol", 3, false, 1).await.unwrap();
    assert_eq!(
        code(node.attach("vol", 2, false, 0).await),
        Code::FailedPrecondition,
        "a stale epoch"
    );
}

#[tokio::test]
async fn a_newer_epoch_keeps_the_device_and_its_data() {
    let fixture = Fixture::new().await;
    let (_engine, node) = fixture.node().await;
    node.attach("vol", 2, false, 1).await.unwrap();
    let mut old = fixture.kernel.take_sockets(0);
    write(&mut old[0], 0, &[1; 4096]).await;
    flush(&mut old[0]).await;

    let attached = node.attach("vol", 3, false, 1).await.unwrap();
    assert_eq!(
        (attached.device_path.as_str(), attached.epoch),
        ("/dev/nbd0", 3)
    );
    assert_eq!(fixture.kernel.with(0, |d| d.reconfigures), 1);
    let mut new = fixture.kernel.take_sockets(0);
    assert_eq!(read(&mut new[0], 0, 4096).await, vec![1; 4096]);
}

#[tokio::test]
async fn a_restarted_gateway_reconnects_the_devices_it_had() {
    let fixture = Fixture::new().await;
    {
        let (engine, node) = fixture.node().await;
        node.attach("vol", 2, false, 2).await.unwrap();
        let mut sockets = fixture.kernel.take_sockets(0);
        write(&mut sockets[1], 65536, &[7; 4096]).await;
        flush(&mut sockets[1]).await;
        node.suspend().await;
        engine.shutdown().await;
    }
    let (_engine, node) = fixture.node().await;
    assert_eq!(fixture.kernel.with(0, |d| d.reconfigures), 1);
    let mut sockets = fixture.kernel.take_sockets(0);
    assert_eq!(sockets.len(), 2);
    assert_eq!(read(&mut sockets[0], 65536, 4096).await, vec![7; 4096]);
    let stats = node.stats("vol").await.unwrap();
    assert_eq!(stats.epoch, 2);
    assert!(!stats.condition.unwrap().abnormal);

    // A device the kernel lost meanwhile is connected anew at the same index.
    node.suspend().await;
    fixture.kernel.forget(0);
    drop(node);
    let (_engine2, _node) = {
        _engine.shutdown().await;
        drop(_engine);
        fixture.node().await
    };
    assert_eq!(
        fixture.kernel.with(0, |d| (d.configured, d.reconfigures)),
        (true, 0)
    );
}

#[tokio::test]
async fn detach_uploads_first_and_keeps_the_device_when_it_cannot() {
    let fixture = Fixture::new().await;
    let (_engine, node) = fixture.node().await;
    node.attach("vol", 2, false, 1).await.unwrap();
    let mut sockets = fixture.kernel.take_sockets(0);
    fixture.faults.set_outage(true);
    write(&mut sockets[0], 0, &[9; 4096]).await;
    flush(&mut sockets[0]).await;
    let failed = node.detach("vol", Duration::from_millis(300)).await;
    let failed = Status::from(failed.unwrap_err()).code();
    assert!(
        matches!(failed, Code::Unavailable | Code::DeadlineExceeded),
        "{failed:?}"
    );
    assert!(fixture.kernel.with(0, |d| d.configured), "the device stays");
    assert_eq!(node.list().await.len(), 1);
    assert_eq!(read(&mut sockets[0], 0, 4096).await, vec![9; 4096]);
    assert!(fixture.kernel.with(0, |d| d.flushes) >= 1);

    fixture.faults.set_outage(false);
    node.detach("vol", Duration::from_secs(10)).await.unwrap();
    assert!(!fixture.kernel.with(0, |d| d.configured));
    assert!(node.list().await.is_empty());
    node.detach("vol", Duration::from_secs(10)).await.unwrap();
    let saved = std::fs::read_to_string(fixture.data.join(STATE_FILE)).unwrap();
    assert!(!saved.contains("vol"), "{saved}");
}

#[tokio::test]
async fn a_failed_disconnect_is_finished_by_the_retry() {
    let fixture = Fixture::new().await;
    let (engine, node) = fixture.node().await;
    node.attach("vol", 2, false, 1).await.unwrap();
    *fixture.kernel.fail_disconnect.lock().unwrap() = true;
    assert_eq!(
        code(node.detach("vol", Duration::from_secs(10)).await),
        Code::Unavailable
    );
    assert!(engine.volume("vol").is_err(), "uploaded and closed");
    node.detach("vol", Duration::from_secs(10)).await.unwrap();
    assert!(!fixture.kernel.with(0, |d| d.configured));
}

#[tokio::test]
async fn expand_resizes_the_device_and_stats_report_it() {
    let fixture = Fixture::new().await;
    let (_engine, node) = fixture.node().await;
    node.attach("vol", 2, false, 1).await.unwrap();
    let grown = node.expand("vol", SIZE * 2).await.unwrap();
    assert_eq!(grown.size_bytes, SIZE * 2);
    assert_eq!(fixture.kernel.with(0, |d| d.size), SIZE * 2);
    let stats = node.stats("vol").await.unwrap();
    assert_eq!((stats.size_bytes, stats.fenced), (SIZE * 2, false));

    fixture.kernel.forget(0);
    let stats = node.stats("vol").await.unwrap();
    let condition = stats.condition.unwrap();
    assert!(condition.abnormal);
    assert!(
        condition.message.contains("disconnected"),
        "{}",
        condition.message
    );
}

#[tokio::test]
async fn a_connection_the_kernel_drops_is_replaced() {
    let fixture = Fixture::new().await;
    let (_engine, node) = fixture.node().await;
    node.attach("vol", 2, false, 2).await.unwrap();
    let mut sockets = fixture.kernel.take_sockets(0);
    // The kernel timed a request out and shut that socket down.
    drop(sockets.remove(0));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while fixture.kernel.with(0, |d| d.reconfigures) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never repaired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut fresh = fixture.kernel.take_sockets(0);
    assert_eq!(fresh.len(), 1);
    write(&mut fresh[0], 0, &[3; 4096]).await;
    assert_eq!(read(&mut sockets[0], 0, 4096).await, vec![3; 4096]);
}

#[tokio::test]
async fn the_api_is_served_on_the_unix_socket() {
    let fixture = Fixture::new().await;
    let (_engine, node) = fixture.node().await;
    let socket = fixture.data.join("node.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let server = tokio::spawn(serve(listener, node, std::future::pending()));
    let mut client = connect(&socket).await.unwrap();
    let attached = client
        .attach_volume(proto::AttachVolumeRequest {
            volume_id: "vol".into(),
            epoch: 2,
            readonly: false,
            connections: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(attached.frontend, "nbd");
    let stale = client
        .attach_volume(proto::AttachVolumeRequest {
            volume_id: "vol".into(),
            epoch: 1,
            readonly: false,
            connections: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let list = client
        .list_attachments(proto::ListAttachmentsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.attachments, vec![attached]);
    server.abort();
}

#[tokio::test]
async fn a_reader_serves_the_bucket_state_read_only() {
    let fixture = Fixture::new().await;
    // Write data as the writer, detach (everything reaches the bucket), then attach read-only.
    let (engine, node) = fixture.node().await;
    node.attach("vol", 2, false, 1).await.unwrap();
    let mut sockets = fixture.kernel.take_sockets(0);
    let data = vec![0x3c; 65536];
    write(&mut sockets[0], 1 << 20, &data).await;
    flush(&mut sockets[0]).await;
    node.detach("vol", Duration::from_secs(10)).await.unwrap();

    let attached = node.attach("vol", 0, true, 2).await.unwrap();
    assert!(attached.readonly);
    assert_eq!((attached.epoch, attached.size_bytes), (0, SIZE));
    let index: u32 = attached
        .device_path
        .trim_start_matches("/dev/nbd")
        .parse()
        .unwrap();
    fixture.kernel.with(index, |device| {
        assert_ne!(device.config.server_flags & 1 << 1, 0, "NBD_FLAG_READ_ONLY");
    });
    let mut sockets = fixture.kernel.take_sockets(index);
    assert_eq!(read(&mut sockets[1], 1 << 20, 65536).await, data);
    assert_eq!(read(&mut sockets[0], 0, 4096).await, vec![0; 4096]);
    let (error, _) = request(&mut sockets[0], 1, 0, 4096, &[1; 4096]).await;
    assert_eq!(error, 1, "a write to a reader is EPERM");
    assert_eq!(
        node.attach("vol", 0, true, 2).await.unwrap(),
        attached,
        "idempotent"
    );
    assert_eq!(
        code(node.attach("vol", 3, false, 0).await),
        Code::FailedPrecondition,
        "no writer while a reader is attached here"
    );
    assert_eq!(
        code(node.expand("vol", SIZE * 2).await),
        Code::FailedPrecondition
    );
    let stats = node.stats("vol").await.unwrap();
    assert_eq!(stats.size_bytes, SIZE);
    assert!(!stats.condition.unwrap().abnormal);

    // A restart brings the reader back on its device.
    drop(sockets);
    node.suspend().await;
    engine.shutdown().await;
    drop(node);
    drop(engine);
    let (_engine, restarted) = fixture.node().await;
    assert_eq!(restarted.list().await.len(), 1);
    let mut sockets = fixture.kernel.take_sockets(index);
    assert_eq!(read(&mut sockets[0], 1 << 20, 4096).await, data[..4096]);
    restarted
        .detach("vol", Duration::from_secs(10))
        .await
        .unwrap();
    assert!(restarted.list().await.is_empty());
    assert_eq!(
        code(restarted.attach("vol", 0, false, 1).await),
        Code::InvalidArgument,
        "epoch 0 is not a writer epoch"
    );
    restarted.attach("vol", 3, false, 1).await.unwrap();
    assert_eq!(
        code(restarted.attach("vol", 0, true, 1).await),
        Code::FailedPrecondition,
        "no reader while the writer is here"
    );
}
