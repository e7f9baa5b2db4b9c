//! CSI conformance of `blockgate-csi --mode controller`: the spec's MUSTs for Identity,
//! Controller and SnapshotMetadata, checked over the plugin's unix socket against the real
//! binaries (`blockgate-blockstore serve` on a temporary bucket directory behind it).
//!
//! Every failure message carries both servers' logs.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use blockgate_e2e::TestDir;
use blockgate_e2e::binary::{blockstore_binary, csi_binary};
use blockgate_e2e::wait_until;
use blockgate_proto::csi::v1 as csi;
use csi::controller_client::ControllerClient;
use csi::controller_service_capability::rpc::Type as Rpc;
use csi::identity_client::IdentityClient;
use csi::snapshot_metadata_client::SnapshotMetadataClient;
use csi::volume_capability::access_mode::Mode;
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const GIB: i64 = 1 << 30;
const MIB: i64 = 1 << 20;

/// A child process killed when dropped, its stderr in a log file.
#[derive(Debug)]
struct Process {
    child: Child,
    log: PathBuf,
}

impl Process {
    fn spawn(program: &Path, args: &[String], log: PathBuf) -> Process {
        let stderr = File::create(&log).expect("create the log file");
        let child = Command::new(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Process { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> libc::pid_t {
        libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t")
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unix_channel(runtime: &tokio::runtime::Runtime, socket: &Path) -> Result<Channel, String> {
    runtime
        .block_on(blockgate_proto::unix::connect(socket))
        .map_err(|e| format!("cannot connect: {e:?}"))
}

/// The block-storage API and the CSI controller in front of it.
struct Plugin {
    runtime: tokio::runtime::Runtime,
    dir: TestDir,
    blockstore: Option<Process>,
    csi: Option<Process>,
    csi_socket: PathBuf,
    identity: IdentityClient<Channel>,
    controller: ControllerClient<Channel>,
    metadata: SnapshotMetadataClient<Channel>,
}

impl Plugin {
    fn start(name: &str) -> Plugin {
        let dir = TestDir::new(name);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let bucket = dir.join("bucket");
        std::fs::create_dir_all(&bucket).expect("create the bucket directory");
        let api_socket = dir.join("api.sock");
        let blockstore = Process::spawn(
            blockstore_binary(),
            &[
                "serve".into(),
                "--store".into(),
                bucket.display().to_string(),
                "--listen".into(),
                format!("unix://{}", api_socket.display()),
            ],
            dir.join("blockstore.log"),
        );
        let csi_socket = dir.join("csi").join("csi.sock");
        let csi = start_csi(&csi_socket, &api_socket, &dir.join("csi.log"));
        let channel = wait_until(
            START_TIMEOUT,
            "the CSI socket to accept connections",
            || unix_channel(&runtime, &csi_socket),
        );
        let mut plugin = Plugin {
            identity: IdentityClient::new(channel.clone()),
            controller: ControllerClient::new(channel.clone()),
            metadata: SnapshotMetadataClient::new(channel),
            runtime,
            dir,
            blockstore: Some(blockstore),
            csi: Some(csi),
            csi_socket,
        };
        plugin.wait_ready();
        plugin
    }

    fn wait_ready(&mut self) {
        let mut identity = self.identity.clone();
        wait_until(START_TIMEOUT, "Probe to say ready", || {
            match self.runtime.block_on(identity.probe(csi::ProbeRequest {})) {
                Ok(response) if response.get_ref().ready == Some(true) => Ok(()),
                Ok(response) => Err(format!("{:?}\n{}", response.get_ref(), self.logs())),
                Err(status) => Err(format!("{status:?}\n{}", self.logs())),
            }
        });
    }

    fn logs(&self) -> String {
        let log =
            |process: &Option<Process>| process.as_ref().map(Process::log).unwrap_or_default();
        format!(
            "--- blockgate-blockstore log ---\n{}\n--- blockgate-csi log ---\n{}",
            log(&self.blockstore),
            log(&self.csi)
        )
    }

    /// The successful answer of `call`, or a panic naming `what` with the logs.
    fn ok<T>(&self, what: &str, call: impl Future<Output = Result<Response<T>, Status>>) -> T {
        match self.runtime.block_on(call) {
            Ok(response) => response.into_inner(),
            Err(status) => panic!("{what}: unexpected {status:?}\n{}", self.logs()),
        }
    }

    /// Asserts `call` fails with `code`.
    fn fails<T: std::fmt::Debug>(
        &self,
        what: &str,
        code: Code,
        call: impl Future<Output = Result<Response<T>, Status>>,
    ) -> Status {
        match self.runtime.block_on(call) {
            Ok(response) => panic!(
                "{what}: expected {code:?}, got {:?}\n{}",
                response.get_ref(),
                self.logs()
            ),
            Err(status) if status.code() == code => status,
            Err(status) => panic!("{what}: expected {code:?}, got {status:?}\n{}", self.logs()),
        }
    }

    fn c(&self) -> ControllerClient<Channel> {
        self.controller.clone()
    }

    fn create(&self, name: &str, size: i64) -> csi::Volume {
        self.ok(
            &format!("CreateVolume {name}"),
            self.c().create_volume(create_request(name, size)),
        )
        .volume
        .unwrap_or_else(|| panic!("CreateVolume {name} returned no volume"))
    }

    fn snapshot(&self, name: &str, volume: &str) -> csi::Snapshot {
        self.ok(
            &format!("CreateSnapshot {name}"),
            self.c().create_snapshot(csi::CreateSnapshotRequest {
                source_volume_id: volume.into(),
                name: name.into(),
                ..Default::default()
            }),
        )
        .snapshot
        .unwrap_or_else(|| panic!("CreateSnapshot {name} returned no snapshot"))
    }

    fn publish(
        &self,
        volume: &str,
        node: &str,
        mode: Mode,
        readonly: bool,
    ) -> impl Future<Output = Result<Response<csi::ControllerPublishVolumeResponse>, Status>> + use<>
    {
        let mut controller = self.c();
        let request = csi::ControllerPublishVolumeRequest {
            volume_id: volume.into(),
            node_id: node.into(),
            volume_capability: Some(mount(mode)),
            readonly,
            ..Default::default()
        };
        async move { controller.controller_publish_volume(request).await }
    }
}

fn start_csi(socket: &Path, api_socket: &Path, log: &Path) -> Process {
    Process::spawn(
        csi_binary(),
        &[
            "--mode".into(),
            "controller".into(),
            "--endpoint".into(),
            format!("unix://{}", socket.display()),
            "--blockstore".into(),
            format!("unix://{}", api_socket.display()),
        ],
        log.to_path_buf(),
    )
}

fn mount(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode.into() }),
        access_type: Some(csi::volume_capability::AccessType::Mount(
            csi::volume_capability::MountVolume {
                fs_type: "ext4".into(),
                ..Default::default()
            },
        )),
    }
}

fn block(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode.into() }),
        access_type: Some(csi::volume_capability::AccessType::Block(
            csi::volume_capability::BlockVolume {},
        )),
    }
}

fn create_request(name: &str, size: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount(Mode::SingleNodeWriter)],
        parameters: HashMap::from([
            ("mode".into(), "cached".into()),
            ("csi.storage.k8s.io/pvc/name".into(), "data".into()),
        ]),
        ..Default::default()
    }
}

#[test]
fn identity_reports_the_plugin_and_is_ready() {
    let plugin = Plugin::start("csi-identity");
    let mut identity = plugin.identity.clone();
    let info = plugin.ok(
        "GetPluginInfo",
        identity.get_plugin_info(csi::GetPluginInfoRequest {}),
    );
    assert_eq!(info.name, "blockgate.csi.io");
    assert!(!info.vendor_version.is_empty());

    let capabilities = plugin.ok(
        "GetPluginCapabilities",
        identity.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}),
    );
    use csi::plugin_capability::{Type, service, volume_expansion};
    let services: BTreeSet<i32> = capabilities
        .capabilities
        .iter()
        .filter_map(|c| match &c.r#type {
            Some(Type::Service(s)) => Some(s.r#type),
            _ => None,
        })
        .collect();
    assert!(services.contains(&service::Type::ControllerService.into()));
    assert!(services.contains(&service::Type::SnapshotMetadataService.into()));
    assert!(capabilities.capabilities.iter().any(|c| matches!(
        &c.r#type,
        Some(Type::VolumeExpansion(e)) if e.r#type == i32::from(volume_expansion::Type::Online)
    )));

    let probe = plugin.ok("Probe", identity.probe(csi::ProbeRequest {}));
    assert_eq!(probe.ready, Some(true));

    let controller = plugin.ok(
        "ControllerGetCapabilities",
        plugin
            .c()
            .controller_get_capabilities(csi::ControllerGetCapabilitiesRequest {}),
    );
    let rpcs: BTreeSet<i32> = controller
        .capabilities
        .iter()
        .filter_map(|c| {
            let csi::controller_service_capability::Type::Rpc(rpc) = c.r#type.as_ref()?;
            Some(rpc.r#type)
        })
        .collect();
    for rpc in [
        Rpc::CreateDeleteVolume,
        Rpc::PublishUnpublishVolume,
        Rpc::ListVolumes,
        Rpc::GetCapacity,
        Rpc::CreateDeleteSnapshot,
        Rpc::ListSnapshots,
        Rpc::CloneVolume,
        Rpc::PublishReadonly,
        Rpc::ExpandVolume,
        Rpc::ListVolumesPublishedNodes,
        Rpc::VolumeCondition,
        Rpc::GetVolume,
        Rpc::SingleNodeMultiWriter,
        Rpc::GetSnapshot,
    ] {
        assert!(rpcs.contains(&rpc.into()), "{rpc:?} is not advertised");
    }
    assert!(!rpcs.contains(&Rpc::ModifyVolume.into()));

    let capacity = plugin.ok(
        "GetCapacity",
        plugin.c().get_capacity(csi::GetCapacityRequest {
            volume_capabilities: vec![mount(Mode::SingleNodeWriter)],
            ..Default::default()
        }),
    );
    assert!(capacity.available_capacity > 0);
    assert_eq!(
        capacity.maximum_volume_size,
        Some(capacity.available_capacity)
    );
    assert!(capacity.minimum_volume_size.is_some_and(|min| min > 0));
}

#[test]
fn every_rpc_refuses_missing_required_fields() {
    let plugin = Plugin::start("csi-required");
    let c = || plugin.c();
    let invalid = Code::InvalidArgument;
    let mut no_caps = create_request("vol-a", GIB);
    no_caps.volume_capabilities.clear();
    plugin.fails(
        "CreateVolume without name",
        invalid,
        c().create_volume(create_request("", GIB)),
    );
    plugin.fails(
        "CreateVolume without capabilities",
        invalid,
        c().create_volume(no_caps),
    );
    plugin.fails(
        "DeleteVolume without id",
        invalid,
        c().delete_volume(csi::DeleteVolumeRequest::default()),
    );
    plugin.create("vol-a", GIB);
    plugin.fails(
        "ControllerPublishVolume without volume id",
        invalid,
        c().controller_publish_volume(csi::ControllerPublishVolumeRequest {
            node_id: "node-a".into(),
            volume_capability: Some(mount(Mode::SingleNodeWriter)),
            ..Default::default()
        }),
    );
    plugin.fails(
        "ControllerPublishVolume without node id",
        invalid,
        c().controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: "vol-a".into(),
            volume_capability: Some(mount(Mode::SingleNodeWriter)),
            ..Default::default()
        }),
    );
    plugin.fails(
        "ControllerPublishVolume without capability",
        invalid,
        c().controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: "vol-a".into(),
            node_id: "node-a".into(),
            ..Default::default()
        }),
    );
    plugin.fails(
        "ControllerUnpublishVolume without volume id",
        invalid,
        c().controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            node_id: "node-a".into(),
            ..Default::default()
        }),
    );
    plugin.fails(
        "ValidateVolumeCapabilities without volume id",
        invalid,
        c().validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_capabilities: vec![mount(Mode::SingleNodeWriter)],
            ..Default::default()
        }),
    );
    plugin.fails(
        "ValidateVolumeCapabilities without capabilities",
        invalid,
        c().validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "vol-a".into(),
            ..Default::default()
        }),
    );
    plugin.fails(
        "CreateSnapshot without source",
        invalid,
        c().create_snapshot(csi::CreateSnapshotRequest {
            name: "snap".into(),
            ..Default::default()
        }),
    );
    plugin.fails(
        "CreateSnapshot without name",
        invalid,
        c().create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: "vol-a".into(),
            ..Default::default()
        }),
    );
    plugin.fails(
        "DeleteSnapshot without id",
        invalid,
        c().delete_snapshot(csi::DeleteSnapshotRequest::default()),
    );
    plugin.fails(
        "GetSnapshot without id",
        invalid,
        c().get_snapshot(csi::GetSnapshotRequest::default()),
    );
    plugin.fails(
        "ControllerExpandVolume without volume id",
        invalid,
        c().controller_expand_volume(csi::ControllerExpandVolumeRequest {
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 2 * GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }),
    );
    plugin.fails(
        "ControllerExpandVolume without capacity",
        invalid,
        c().controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "vol-a".into(),
            ..Default::default()
        }),
    );
    plugin.fails(
        "ControllerGetVolume without id",
        invalid,
        c().controller_get_volume(csi::ControllerGetVolumeRequest::default()),
    );
    let mut metadata = plugin.metadata.clone();
    plugin.fails(
        "GetMetadataAllocated without snapshot id",
        invalid,
        metadata.get_metadata_allocated(csi::GetMetadataAllocatedRequest::default()),
    );
    let mut metadata = plugin.metadata.clone();
    plugin.fails(
        "GetMetadataDelta without base",
        invalid,
        metadata.get_metadata_delta(csi::GetMetadataDeltaRequest {
            target_snapshot_id: "snap".into(),
            ..Default::default()
        }),
    );
    plugin.fails(
        "ControllerModifyVolume",
        Code::Unimplemented,
        c().controller_modify_volume(csi::ControllerModifyVolumeRequest {
            volume_id: "vol-a".into(),
            ..Default::default()
        }),
    );
}

#[test]
fn create_volume_is_idempotent_and_checks_what_it_is_asked() {
    let plugin = Plugin::start("csi-create");
    let c = || plugin.c();
    let first = plugin.create("pvc-1", GIB);
    assert_eq!(first.volume_id, "pvc-1");
    assert_eq!(first.capacity_bytes, GIB);
    assert_eq!(
        first.volume_context.get("mode").map(String::as_str),
        Some("cached")
    );
    let again = plugin.create("pvc-1", GIB);
    assert_eq!(again.volume_id, first.volume_id);
    assert_eq!(again.capacity_bytes, first.capacity_bytes);
    plugin.fails(
        "CreateVolume with the same name and another size",
        Code::AlreadyExists,
        c().create_volume(create_request("pvc-1", 2 * GIB)),
    );

    // Sizes round up to the volume block size; no range means 1 GiB.
    let odd = plugin.create("pvc-odd", 10 * MIB + 1);
    assert!(odd.capacity_bytes > 10 * MIB, "{odd:?}");
    let mut default_size = create_request("pvc-default", 0);
    default_size.capacity_range = None;
    let default_size = plugin.ok(
        "CreateVolume without range",
        c().create_volume(default_size),
    );
    assert_eq!(default_size.volume.map(|v| v.capacity_bytes), Some(GIB));

    // A name that is not a valid block-storage id still makes a volume, under a derived id.
    let odd_name = "Volume With Spaces/and slashes";
    let mapped = plugin.create(odd_name, GIB);
    assert_ne!(mapped.volume_id, odd_name);
    assert_eq!(plugin.create(odd_name, GIB).volume_id, mapped.volume_id);

    let mut range = create_request("pvc-range", GIB);
    range.capacity_range = Some(csi::CapacityRange {
        required_bytes: 2 * GIB,
        limit_bytes: GIB,
    });
    plugin.fails(
        "limit below required",
        Code::OutOfRange,
        c().create_volume(range),
    );
    plugin.fails(
        "size above the maximum",
        Code::OutOfRange,
        c().create_volume(create_request("pvc-huge", i64::MAX / 2)),
    );

    for (mode, accepted) in [
        (Mode::SingleNodeWriter, true),
        (Mode::SingleNodeSingleWriter, true),
        (Mode::SingleNodeMultiWriter, true),
        (Mode::SingleNodeReaderOnly, true),
        (Mode::MultiNodeReaderOnly, true),
        (Mode::MultiNodeSingleWriter, false),
        (Mode::MultiNodeMultiWriter, false),
    ] {
        let name = format!(
            "pvc-mode-{}",
            mode.as_str_name().to_lowercase().replace('_', "-")
        );
        let mut request = create_request(&name, GIB);
        request.volume_capabilities = vec![block(mode)];
        if accepted {
            plugin.ok(
                &format!("CreateVolume {mode:?}"),
                c().create_volume(request),
            );
        } else {
            let status = plugin.fails(
                &format!("CreateVolume {mode:?}"),
                Code::InvalidArgument,
                c().create_volume(request),
            );
            assert!(status.message().contains(mode.as_str_name()), "{status:?}");
        }
    }
    let mut btrfs = create_request("pvc-btrfs", GIB);
    if let Some(csi::volume_capability::AccessType::Mount(mount)) =
        btrfs.volume_capabilities[0].access_type.as_mut()
    {
        mount.fs_type = "btrfs".into();
    }
    plugin.fails(
        "fs type btrfs",
        Code::InvalidArgument,
        c().create_volume(btrfs),
    );
    let mut unknown = create_request("pvc-unknown-param", GIB);
    unknown.parameters.insert("replicas".into(), "3".into());
    let status = plugin.fails(
        "unknown parameter",
        Code::InvalidArgument,
        c().create_volume(unknown),
    );
    assert!(status.message().contains("replicas"), "{status:?}");
    let mut stored = create_request("pvc-stored", GIB);
    stored.parameters.extend([
        ("mode".into(), "stored".into()),
        ("compression".into(), "none".into()),
        ("encrypted".into(), "false".into()),
        ("fsType".into(), "xfs".into()),
    ]);
    let stored = plugin.ok("stored volume", c().create_volume(stored));
    let context = stored.volume.map(|v| v.volume_context).unwrap_or_default();
    assert_eq!(context.get("mode").map(String::as_str), Some("stored"));
    assert_eq!(context.get("fsType").map(String::as_str), Some("xfs"));

    // Compression the block-storage API does not have yet is refused by it, with its reason.
    let mut zstd = create_request("pvc-zstd", GIB);
    zstd.parameters.insert("compression".into(), "zstd".into());
    if let Err(status) = plugin.runtime.block_on(c().create_volume(zstd)) {
        assert_eq!(
            status.code(),
            Code::Unimplemented,
            "{status:?}\n{}",
            plugin.logs()
        );
        eprintln!("compression=zstd: {status:?}");
    }

    // NOT_FOUND cases.
    let mut from_missing = create_request("pvc-from-missing", GIB);
    from_missing.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: "no-such-snapshot".into(),
            },
        )),
    });
    plugin.fails(
        "CreateVolume from a missing snapshot",
        Code::NotFound,
        c().create_volume(from_missing),
    );
    plugin.fails(
        "ControllerGetVolume of a missing volume",
        Code::NotFound,
        c().controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: "no-such-volume".into(),
        }),
    );
    plugin.fails(
        "ValidateVolumeCapabilities of a missing volume",
        Code::NotFound,
        c().validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "no-such-volume".into(),
            volume_capabilities: vec![mount(Mode::SingleNodeWriter)],
            ..Default::default()
        }),
    );
    plugin.fails(
        "ControllerExpandVolume of a missing volume",
        Code::NotFound,
        c().controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "no-such-volume".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 2 * GIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }),
    );
    plugin.fails(
        "ControllerPublishVolume of a missing volume",
        Code::NotFound,
        c().controller_publish_volume(csi::ControllerPublishVolumeRequest {
            volume_id: "no-such-volume".into(),
            node_id: "node-a".into(),
            volume_capability: Some(mount(Mode::SingleNodeWriter)),
            ..Default::default()
        }),
    );
    plugin.fails(
        "GetSnapshot of a missing snapshot",
        Code::NotFound,
        c().get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: "no-such-snapshot".into(),
            ..Default::default()
        }),
    );
    plugin.fails(
        "CreateSnapshot of a missing volume",
        Code::NotFound,
        c().create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: "no-such-volume".into(),
            name: "snap-of-nothing".into(),
            ..Default::default()
        }),
    );

    // ValidateVolumeCapabilities confirms only supported capabilities.
    let confirmed = plugin.ok(
        "ValidateVolumeCapabilities supported",
        c().validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-1".into(),
            volume_capabilities: vec![
                mount(Mode::SingleNodeWriter),
                block(Mode::MultiNodeReaderOnly),
            ],
            ..Default::default()
        }),
    );
    assert!(confirmed.confirmed.is_some(), "{confirmed:?}");
    let refused = plugin.ok(
        "ValidateVolumeCapabilities unsupported",
        c().validate_volume_capabilities(csi::ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-1".into(),
            volume_capabilities: vec![
                mount(Mode::SingleNodeWriter),
                block(Mode::MultiNodeMultiWriter),
            ],
            ..Default::default()
        }),
    );
    assert!(refused.confirmed.is_none(), "{refused:?}");
    assert!(
        refused.message.contains("MULTI_NODE_MULTI_WRITER"),
        "{refused:?}"
    );

    let volume = plugin.ok(
        "ControllerGetVolume",
        c().controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: "pvc-1".into(),
        }),
    );
    assert_eq!(volume.volume.map(|v| v.capacity_bytes), Some(GIB));
    let status = volume.status.expect("volume status");
    assert!(status.published_node_ids.is_empty());
    assert!(status.volume_condition.is_some_and(|c| !c.abnormal));

    // DeleteVolume is idempotent.
    for attempt in 0..2 {
        plugin.ok(
            &format!("DeleteVolume attempt {attempt}"),
            c().delete_volume(csi::DeleteVolumeRequest {
                volume_id: "pvc-1".into(),
                ..Default::default()
            }),
        );
    }
    plugin.ok(
        "DeleteVolume of an id that never existed",
        c().delete_volume(csi::DeleteVolumeRequest {
            volume_id: "never-existed".into(),
            ..Default::default()
        }),
    );
    plugin.fails(
        "ControllerGetVolume after delete",
        Code::NotFound,
        c().controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: "pvc-1".into(),
        }),
    );
}

#[test]
fn publish_is_idempotent_and_keeps_one_writer() {
    let plugin = Plugin::start("csi-publish");
    let c = || plugin.c();
    plugin.create("pvc-p", GIB);
    let first = plugin.ok(
        "publish to node-a",
        plugin.publish("pvc-p", "node-a", Mode::SingleNodeWriter, false),
    );
    assert_eq!(
        first
            .publish_context
            .get("blockgate.io/node")
            .map(String::as_str),
        Some("node-a")
    );
    assert_eq!(
        first
            .publish_context
            .get("blockgate.io/readonly")
            .map(String::as_str),
        Some("false")
    );
    assert!(first.publish_context.contains_key("blockgate.io/epoch"));
    let again = plugin.ok(
        "publish to node-a again",
        plugin.publish("pvc-p", "node-a", Mode::SingleNodeWriter, false),
    );
    assert_eq!(again.publish_context, first.publish_context);

    plugin.fails(
        "publish to a second writer node",
        Code::FailedPrecondition,
        plugin.publish("pvc-p", "node-b", Mode::SingleNodeWriter, false),
    );
    let volume = plugin.ok(
        "ControllerGetVolume while published",
        c().controller_get_volume(csi::ControllerGetVolumeRequest {
            volume_id: "pvc-p".into(),
        }),
    );
    assert_eq!(
        volume.status.map(|s| s.published_node_ids),
        Some(vec!["node-a".to_owned()])
    );
    plugin.fails(
        "DeleteVolume while published",
        Code::FailedPrecondition,
        c().delete_volume(csi::DeleteVolumeRequest {
            volume_id: "pvc-p".into(),
            ..Default::default()
        }),
    );

    for attempt in 0..2 {
        plugin.ok(
            &format!("unpublish from node-a, attempt {attempt}"),
            c().controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: "pvc-p".into(),
                node_id: "node-a".into(),
                ..Default::default()
            }),
        );
    }
    let second = plugin.ok(
        "publish to node-b after unpublish",
        plugin.publish("pvc-p", "node-b", Mode::SingleNodeWriter, false),
    );
    assert_eq!(
        second
            .publish_context
            .get("blockgate.io/node")
            .map(String::as_str),
        Some("node-b")
    );
    // An empty node id unpublishes from every node.
    plugin.ok(
        "unpublish from every node",
        c().controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: "pvc-p".into(),
            ..Default::default()
        }),
    );

    // Read-only many: several reader nodes at once.
    for node in ["node-r1", "node-r2"] {
        let reader = plugin.ok(
            &format!("reader publish to {node}"),
            plugin.publish("pvc-p", node, Mode::MultiNodeReaderOnly, true),
        );
        assert_eq!(
            reader
                .publish_context
                .get("blockgate.io/readonly")
                .map(String::as_str),
            Some("true")
        );
    }
    plugin.fails(
        "writer publish to a reader node",
        Code::AlreadyExists,
        plugin.publish("pvc-p", "node-r1", Mode::SingleNodeWriter, false),
    );
    plugin.ok(
        "unpublish every reader",
        c().controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: "pvc-p".into(),
            ..Default::default()
        }),
    );
    plugin.ok(
        "unpublish a volume that does not exist",
        c().controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: "no-such-volume".into(),
            node_id: "node-a".into(),
            ..Default::default()
        }),
    );
    plugin.ok(
        "DeleteVolume after unpublish",
        c().delete_volume(csi::DeleteVolumeRequest {
            volume_id: "pvc-p".into(),
            ..Default::default()
        }),
    );
}

#[test]
fn volumes_and_snapshots_page_with_max_entries() {
    let plugin = Plugin::start("csi-paging");
    let c = || plugin.c();
    let names: BTreeSet<String> = (0..7).map(|i| format!("pvc-page-{i}")).collect();
    for name in &names {
        plugin.create(name, 16 * MIB);
    }
    plugin.ok(
        "publish",
        plugin.publish("pvc-page-3", "node-a", Mode::SingleNodeWriter, false),
    );

    let mut seen = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = plugin.ok(
            "ListVolumes page",
            c().list_volumes(csi::ListVolumesRequest {
                max_entries: 3,
                starting_token: token.clone(),
            }),
        );
        assert!(page.entries.len() <= 3, "{page:?}");
        for entry in page.entries {
            let volume = entry.volume.expect("entry has a volume");
            let status = entry.status.expect("entry has a status");
            assert!(status.volume_condition.is_some());
            if volume.volume_id == "pvc-page-3" {
                assert_eq!(status.published_node_ids, vec!["node-a".to_owned()]);
            } else {
                assert!(status.published_node_ids.is_empty());
            }
            seen.push(volume.volume_id);
        }
        pages += 1;
        assert!(pages <= 10, "ListVolumes does not end");
        if page.next_token.is_empty() {
            break;
        }
        token = page.next_token;
    }
    assert!(pages >= 3, "7 volumes in pages of 3 took {pages} pages");
    let unique: BTreeSet<String> = seen.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        seen.len(),
        "a volume was listed twice: {seen:?}"
    );
    assert_eq!(unique, names);
    plugin.fails(
        "ListVolumes with a bad token",
        Code::Aborted,
        c().list_volumes(csi::ListVolumesRequest {
            max_entries: 3,
            starting_token: "not-a-token".into(),
        }),
    );

    let snapshot_names: BTreeSet<String> = (0..5).map(|i| format!("snap-page-{i}")).collect();
    for (i, name) in snapshot_names.iter().enumerate() {
        plugin.snapshot(
            name,
            if i % 2 == 0 {
                "pvc-page-0"
            } else {
                "pvc-page-1"
            },
        );
    }
    let list_all = |source: &str, max: i32| {
        let mut seen = Vec::new();
        let mut token = String::new();
        loop {
            let page = plugin.ok(
                "ListSnapshots page",
                c().list_snapshots(csi::ListSnapshotsRequest {
                    max_entries: max,
                    starting_token: token.clone(),
                    source_volume_id: source.into(),
                    ..Default::default()
                }),
            );
            assert!(max == 0 || page.entries.len() <= usize::try_from(max).unwrap_or(0));
            seen.extend(
                page.entries
                    .into_iter()
                    .filter_map(|e| e.snapshot)
                    .map(|s| s.snapshot_id),
            );
            if page.next_token.is_empty() {
                return seen;
            }
            assert!(seen.len() < 100, "ListSnapshots does not end");
            token = page.next_token;
        }
    };
    let all = list_all("", 2);
    let unique: BTreeSet<String> = all.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        all.len(),
        "a snapshot was listed twice: {all:?}"
    );
    assert_eq!(unique, snapshot_names);
    let of_volume_0: BTreeSet<String> = list_all("pvc-page-0", 1).into_iter().collect();
    assert_eq!(
        of_volume_0,
        ["snap-page-0", "snap-page-2", "snap-page-4"]
            .map(String::from)
            .into()
    );
    assert!(list_all("no-such-volume", 2).is_empty());
    let one = plugin.ok(
        "ListSnapshots by id",
        c().list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: "snap-page-1".into(),
            ..Default::default()
        }),
    );
    assert_eq!(one.entries.len(), 1);
    let none = plugin.ok(
        "ListSnapshots by a missing id",
        c().list_snapshots(csi::ListSnapshotsRequest {
            snapshot_id: "no-such-snapshot".into(),
            ..Default::default()
        }),
    );
    assert!(none.entries.is_empty());
    plugin.fails(
        "ListSnapshots with a bad token",
        Code::Aborted,
        c().list_snapshots(csi::ListSnapshotsRequest {
            max_entries: 2,
            starting_token: "bg1-zz".into(),
            ..Default::default()
        }),
    );
}

#[test]
fn snapshots_restore_clone_expand_and_report_metadata() {
    let plugin = Plugin::start("csi-snapshots");
    let c = || plugin.c();
    plugin.create("pvc-src", 64 * MIB);

    let snapshot = plugin.snapshot("snap-1", "pvc-src");
    assert_eq!(snapshot.source_volume_id, "pvc-src");
    assert_eq!(snapshot.size_bytes, 64 * MIB);
    assert!(snapshot.creation_time.is_some());
    let again = plugin.snapshot("snap-1", "pvc-src");
    assert_eq!(again.snapshot_id, snapshot.snapshot_id);
    plugin.create("pvc-other", 64 * MIB);
    plugin.fails(
        "CreateSnapshot with a name taken by another volume's snapshot",
        Code::AlreadyExists,
        c().create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: "pvc-other".into(),
            name: "snap-1".into(),
            ..Default::default()
        }),
    );
    let got = plugin.ok(
        "GetSnapshot",
        c().get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: snapshot.snapshot_id.clone(),
            ..Default::default()
        }),
    );
    assert_eq!(
        got.snapshot.map(|s| s.source_volume_id),
        Some("pvc-src".into())
    );
    let ready = wait_until(START_TIMEOUT, "the snapshot to be ready", || {
        let snapshot = plugin
            .runtime
            .block_on(c().get_snapshot(csi::GetSnapshotRequest {
                snapshot_id: "snap-1".into(),
                ..Default::default()
            }))
            .map_err(|s| format!("{s:?}"))?
            .into_inner()
            .snapshot
            .ok_or("no snapshot")?;
        if snapshot.ready_to_use {
            Ok(snapshot)
        } else {
            Err(format!("{snapshot:?}"))
        }
    });
    assert!(ready.ready_to_use);

    // Snapshot → volume.
    let mut restore = create_request("pvc-restored", 64 * MIB);
    let source = csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(
            csi::volume_content_source::SnapshotSource {
                snapshot_id: "snap-1".into(),
            },
        )),
    };
    restore.volume_content_source = Some(source.clone());
    let restored = plugin
        .ok(
            "CreateVolume from snapshot",
            c().create_volume(restore.clone()),
        )
        .volume
        .expect("volume");
    assert_eq!(restored.content_source, Some(source));
    assert_eq!(restored.capacity_bytes, 64 * MIB);
    let restored_again = plugin
        .ok(
            "CreateVolume from snapshot again",
            c().create_volume(restore),
        )
        .volume
        .expect("volume");
    assert_eq!(restored_again.volume_id, restored.volume_id);
    let mut too_small = create_request("pvc-too-small", 16 * MIB);
    too_small.capacity_range = Some(csi::CapacityRange {
        required_bytes: 16 * MIB,
        limit_bytes: 32 * MIB,
    });
    too_small.volume_content_source = restored.content_source.clone();
    plugin.fails(
        "CreateVolume from a snapshot larger than the limit",
        Code::OutOfRange,
        c().create_volume(too_small),
    );

    // Clone.
    let mut clone = create_request("pvc-clone", 128 * MIB);
    let clone_source = csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(
            csi::volume_content_source::VolumeSource {
                volume_id: "pvc-src".into(),
            },
        )),
    };
    clone.volume_content_source = Some(clone_source.clone());
    let cloned = plugin
        .ok("CreateVolume from a volume", c().create_volume(clone))
        .volume
        .expect("volume");
    assert_eq!(cloned.content_source, Some(clone_source));
    assert_eq!(cloned.capacity_bytes, 128 * MIB);

    // Expand.
    let expanded = plugin.ok(
        "ControllerExpandVolume",
        c().controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "pvc-src".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(mount(Mode::SingleNodeWriter)),
            ..Default::default()
        }),
    );
    assert_eq!(expanded.capacity_bytes, 128 * MIB);
    assert!(expanded.node_expansion_required);
    let block_expand = plugin.ok(
        "ControllerExpandVolume (block)",
        c().controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "pvc-src".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 128 * MIB,
                limit_bytes: 0,
            }),
            volume_capability: Some(block(Mode::SingleNodeWriter)),
            ..Default::default()
        }),
    );
    assert_eq!(block_expand.capacity_bytes, 128 * MIB);
    assert!(!block_expand.node_expansion_required);
    plugin.fails(
        "ControllerExpandVolume shrinking",
        Code::OutOfRange,
        c().controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "pvc-src".into(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: 32 * MIB,
                limit_bytes: 0,
            }),
            ..Default::default()
        }),
    );

    // Changed-block metadata of a never-written volume's snapshot: no blocks, capacity set.
    let mut metadata = plugin.metadata.clone();
    let mut stream = plugin.ok(
        "GetMetadataAllocated",
        metadata.get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: "snap-1".into(),
            ..Default::default()
        }),
    );
    let mut messages = Vec::new();
    while let Some(message) = plugin
        .runtime
        .block_on(stream.message())
        .unwrap_or_else(|s| panic!("GetMetadataAllocated stream: {s:?}\n{}", plugin.logs()))
    {
        messages.push(message);
    }
    assert!(!messages.is_empty(), "no message says the capacity");
    for message in &messages {
        assert!(message.block_metadata.is_empty(), "{message:?}");
        assert_eq!(message.volume_capacity_bytes, 64 * MIB);
        assert_eq!(
            message.block_metadata_type,
            i32::from(csi::BlockMetadataType::FixedLength)
        );
    }
    let mut metadata = plugin.metadata.clone();
    plugin.fails(
        "GetMetadataAllocated of a missing snapshot",
        Code::NotFound,
        metadata.get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: "no-such-snapshot".into(),
            ..Default::default()
        }),
    );
    let mut metadata = plugin.metadata.clone();
    plugin.fails(
        "GetMetadataAllocated beyond the volume",
        Code::OutOfRange,
        metadata.get_metadata_allocated(csi::GetMetadataAllocatedRequest {
            snapshot_id: "snap-1".into(),
            starting_offset: 64 * MIB,
            ..Default::default()
        }),
    );
    plugin.snapshot("snap-2", "pvc-src");
    let mut metadata = plugin.metadata.clone();
    let mut delta = plugin.ok(
        "GetMetadataDelta",
        metadata.get_metadata_delta(csi::GetMetadataDeltaRequest {
            base_snapshot_id: "snap-1".into(),
            target_snapshot_id: "snap-2".into(),
            ..Default::default()
        }),
    );
    while let Some(message) = plugin
        .runtime
        .block_on(delta.message())
        .unwrap_or_else(|s| panic!("GetMetadataDelta stream: {s:?}\n{}", plugin.logs()))
    {
        assert!(message.block_metadata.is_empty(), "{message:?}");
        assert!(message.volume_capacity_bytes > 0);
    }

    // Snapshots outlive their volume; deletes are idempotent.
    plugin.ok(
        "DeleteVolume of the snapshotted volume",
        c().delete_volume(csi::DeleteVolumeRequest {
            volume_id: "pvc-src".into(),
            ..Default::default()
        }),
    );
    plugin.ok(
        "GetSnapshot after its volume is deleted",
        c().get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: "snap-2".into(),
            ..Default::default()
        }),
    );
    for snapshot in ["snap-2", "snap-2", "never-existed"] {
        plugin.ok(
            &format!("DeleteSnapshot {snapshot}"),
            c().delete_snapshot(csi::DeleteSnapshotRequest {
                snapshot_id: snapshot.into(),
                ..Default::default()
            }),
        );
    }
    plugin.fails(
        "GetSnapshot after delete",
        Code::NotFound,
        c().get_snapshot(csi::GetSnapshotRequest {
            snapshot_id: "snap-2".into(),
            ..Default::default()
        }),
    );
}

#[test]
fn the_socket_is_replaced_when_stale_and_removed_on_sigterm() {
    let mut plugin = Plugin::start("csi-socket");
    let csi = plugin.csi.take().expect("the CSI process runs");
    // SAFETY: sending a signal to a child process this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(csi.pid(), libc::SIGTERM) }, 0);
    let mut csi = csi;
    let status = wait_until(STOP_TIMEOUT, "the CSI plugin to exit after SIGTERM", || {
        csi.child
            .try_wait()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "still running".to_owned())
    });
    assert!(status.success(), "exit status {status:?}\n{}", csi.log());
    assert!(
        !plugin.csi_socket.exists(),
        "the socket is left behind after SIGTERM\n{}",
        csi.log()
    );

    // A socket file nobody listens on, as a killed plugin leaves it.
    drop(std::os::unix::net::UnixListener::bind(&plugin.csi_socket).expect("bind a stale socket"));
    assert!(plugin.csi_socket.exists());
    let log = plugin.dir.join("csi-restarted.log");
    plugin.csi = Some(start_csi(
        &plugin.csi_socket,
        &plugin.dir.join("api.sock"),
        &log,
    ));
    let channel = wait_until(
        START_TIMEOUT,
        "the restarted plugin to accept connections",
        || unix_channel(&plugin.runtime, &plugin.csi_socket),
    );
    plugin.identity = IdentityClient::new(channel);
    plugin.wait_ready();

    // A second plugin refuses to take over a live socket.
    let second = plugin.dir.join("csi-second.log");
    let mut refused = start_csi(&plugin.csi_socket, &plugin.dir.join("api.sock"), &second);
    let status = wait_until(STOP_TIMEOUT, "the second plugin to give up", || {
        refused
            .child
            .try_wait()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "still running".to_owned())
    });
    assert!(!status.success());
    assert!(
        refused.log().contains("another process"),
        "{}",
        refused.log()
    );
    plugin.wait_ready();
}

#[test]
fn probe_is_not_ready_without_the_block_storage_api_and_node_mode_needs_a_node_id() {
    let dir = TestDir::new("csi-probe");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let socket = dir.join("csi.sock");
    let csi = start_csi(
        &socket,
        &dir.join("nothing-listens.sock"),
        &dir.join("csi.log"),
    );
    let channel = wait_until(START_TIMEOUT, "the CSI socket", || {
        unix_channel(&runtime, &socket)
    });
    let probe = runtime
        .block_on(IdentityClient::new(channel).probe(csi::ProbeRequest {}))
        .unwrap_or_else(|s| panic!("Probe: {s:?}\n{}", csi.log()))
        .into_inner();
    assert_eq!(probe.ready, Some(false));

    let output = Command::new(csi_binary())
        .args([
            "--mode",
            "node",
            "--endpoint",
            "unix:///tmp/unused-blockgate-node.sock",
        ])
        .output()
        .expect("run blockgate-csi --mode node");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("node-id"), "{stderr}");
}
