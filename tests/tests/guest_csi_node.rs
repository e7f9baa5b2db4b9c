//! The CSI node plugin on a real kernel: `blockgate-csi --mode node` stages, publishes,
//! expands and unstages volumes as `/dev/nbdN` devices of `blockgate-gateway`, with
//! `blockgate-csi --mode controller` and `blockgate-blockstore` handing out the writer epochs,
//! inside the test guest (`scripts/guest/`, QEMU/TCG with Linux 6.12), since the host kernel
//! has no nbd.
//!
//! On the host, [`csi_node_and_gateway_in_a_real_kernel`] packs this test executable, the
//! three binaries and `tests/guest/*.sh` into a job and boots the guest once; the job
//! (`tests/guest/csi_node_job.sh`) runs the gateway-level `node_attach.sh`, then
//! [`scenarios_in_the_guest`] in this executable, then the fio comparison (`fio.sh`). Outside
//! the guest, [`scenarios_in_the_guest`] does nothing. See docs/guest-tests.md.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blockgate_e2e::binary::{blockstore_binary, csi_binary, gateway_binary};
use blockgate_e2e::content::pattern;
use blockgate_e2e::guest::{
    GuestJob, GuestRun, Process, in_guest, unix_channel, why_the_guest_cannot_run, workspace_dir,
};
use blockgate_e2e::wait_until;
use blockgate_proto::csi::v1 as csi;
use csi::controller_client::ControllerClient;
use csi::identity_client::IdentityClient;
use csi::node_client::NodeClient;
use csi::volume_capability::access_mode::Mode;
use csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use tonic::transport::Channel;
use tonic::{Code, Response, Status};

/// The whole guest run: boot, node_attach.sh, the CSI scenarios and about two minutes of fio,
/// under TCG on a busy 2-core machine. run.sh kills the guest after this.
const GUEST_TIMEOUT: Duration = Duration::from_secs(1200);
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long writes may take to resume after the gateway restarts.
const RESUME_TIMEOUT: Duration = Duration::from_secs(180);
const MIB: i64 = 1 << 20;
const VOLUME_SIZE: i64 = 256 * MIB;
const EXPANDED_SIZE: i64 = 512 * MIB;
const EPOCH_KEY: &str = "blockgate.io/epoch";
/// The job's parts, in the order csi_node_job.sh runs them.
const PARTS: [&str; 3] = ["node_attach", "csi_node", "fio"];

// ---------------------------------------------------------------------------------------
// The host side

#[test]
fn csi_node_and_gateway_in_a_real_kernel() {
    if in_guest() {
        return;
    }
    if let Some(reason) = why_the_guest_cannot_run() {
        println!("skipped: {reason}");
        return;
    }
    let job = GuestJob::new("guest-csi-node");
    job.add_executable(gateway_binary(), "blockgate-gateway");
    job.add_executable(csi_binary(), "blockgate-csi");
    job.add_executable(blockstore_binary(), "blockgate-blockstore");
    let this = std::env::current_exe().expect("the path of this test executable");
    job.add_executable(&this, "guest_csi_node");
    let scripts = workspace_dir().join("tests/guest");
    job.add_file(&scripts.join("csi_node_job.sh"), "run.sh");
    job.add_file(&scripts.join("node_attach.sh"), "node_attach.sh");
    job.add_file(&scripts.join("fio.sh"), "fio.sh");

    let run = job.run(GUEST_TIMEOUT);
    println!(
        "guest run: status {:?} after {:.0} s (job {})",
        run.status,
        run.elapsed.as_secs_f64(),
        job.path().display()
    );
    let parts = part_statuses(&run);
    for (name, status, seconds) in &parts {
        println!("  {name:<12} exit {status:>3}  {seconds:>4} s");
    }
    if let Some(table) = fio_table(&run) {
        println!("{table}");
    }
    let failed: Vec<&str> = PARTS
        .iter()
        .copied()
        .filter(|part| {
            !parts
                .iter()
                .any(|(name, status, _)| name == part && *status == 0)
        })
        .collect();
    assert!(
        run.status == Some(0) && failed.is_empty(),
        "the guest job failed (status {:?}; parts not passed: {failed:?}); out/ is in {}\n\
         --- guest console (last 250 lines) ---\n{}",
        run.status,
        run.out.display(),
        run.console_tail(250)
    );
}

/// `out/parts.txt`: name, exit status and seconds of each part that finished.
fn part_statuses(run: &GuestRun) -> Vec<(String, i32, u64)> {
    run.out_text("parts.txt")
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            Some((
                fields.next()?.to_owned(),
                fields.next()?.parse().ok()?,
                fields.next()?.parse().ok()?,
            ))
        })
        .collect()
}

/// fio.sh's results as a table, with the blockgate/baseline ratio.
fn fio_table(run: &GuestRun) -> Option<String> {
    let results: serde_json::Value = serde_json::from_str(&run.out_text("fio/fio.json")).ok()?;
    let rows = results["results"].as_array()?;
    let mut table = format!(
        "fio in the guest ({} s per job, {}; loop = baseline over a file on the guest disk)\n\
         {:<14} {:>12} {:>12} {:>12} {:>12} {:>7}\n",
        results["runtime_s"],
        results["size"].as_str().unwrap_or("?"),
        "job",
        "loop IOPS",
        "nbd IOPS",
        "loop MiB/s",
        "nbd MiB/s",
        "nbd/loop"
    );
    for job in ["seqwrite-1m", "randwrite-4k", "randread-4k"] {
        let find = |device: &str| {
            rows.iter()
                .find(|row| row["job"] == job && row["device"] == device)
        };
        let (loop_row, nbd_row) = (find("loop")?, find("nbd")?);
        let number = |row: &serde_json::Value, key: &str| row[key].as_f64().unwrap_or(0.0);
        let ratio = number(nbd_row, "iops") / number(loop_row, "iops").max(f64::MIN_POSITIVE);
        table.push_str(&format!(
            "{job:<14} {:>12.0} {:>12.0} {:>12.2} {:>12.2} {:>7.3}\n",
            number(loop_row, "iops"),
            number(nbd_row, "iops"),
            number(loop_row, "bandwidth_mib_s"),
            number(nbd_row, "bandwidth_mib_s"),
            ratio
        ));
    }
    Some(table)
}

// ---------------------------------------------------------------------------------------
// The guest side

#[test]
fn scenarios_in_the_guest() {
    if !in_guest() {
        println!(
            "not in the test guest: nothing to do (csi_node_and_gateway_in_a_real_kernel runs this there)"
        );
        return;
    }
    let out = PathBuf::from(std::env::var_os("OUT_DIR").unwrap_or_else(|| "out".into()));
    let mut cluster = Cluster::start(Path::new("/var/tmp/guest-csi"), &out);
    let scenarios: [(&str, Scenario); 3] = [
        (
            "mount volume keeps its files across unstage and stage",
            mount_volume_restage,
        ),
        (
            "block volume keeps its bytes across unstage and stage",
            block_volume_restage,
        ),
        (
            "gateway kill -9 under an fsync workload, then expand, a refused second writer, and a move to node-b",
            crash_expand_and_move,
        ),
    ];
    // Every scenario runs (each on its own volume) even when an earlier one failed.
    let mut failed = Vec::new();
    for (name, scenario) in scenarios {
        let started = Instant::now();
        println!("scenario: {name}");
        match std::panic::catch_unwind(AssertUnwindSafe(|| scenario(&mut cluster))) {
            Ok(()) => println!(
                "scenario ok ({:.1} s): {name}",
                started.elapsed().as_secs_f64()
            ),
            Err(_) => {
                println!(
                    "scenario FAILED ({:.1} s): {name}",
                    started.elapsed().as_secs_f64()
                );
                failed.push(name);
            }
        }
    }
    assert!(failed.is_empty(), "failed scenarios: {failed:#?}");
}

/// A scenario; they run in order on one cluster, and may leave volumes for the next.
type Scenario = fn(&mut Cluster);

/// One node: its gateway (own data directory, shared bucket) and its CSI node plugin.
struct NodeHost {
    id: &'static str,
    data_dir: PathBuf,
    gateway: Option<Process>,
    plugin: Process,
    client: NodeClient<Channel>,
    /// Where this node's volumes are staged and published (kubelet's directories).
    kubelet: PathBuf,
}

/// The block-storage API, the CSI controller, and two nodes on one bucket directory.
struct Cluster {
    runtime: tokio::runtime::Runtime,
    work: PathBuf,
    logs: PathBuf,
    bucket: PathBuf,
    blockstore: Process,
    controller_plugin: Process,
    controller: ControllerClient<Channel>,
    nodes: Vec<NodeHost>,
}

impl Cluster {
    fn start(work: &Path, logs: &Path) -> Cluster {
        let _ = std::fs::remove_dir_all(work);
        let bucket = work.join("bucket");
        std::fs::create_dir_all(&bucket).expect("create the bucket directory");
        std::fs::create_dir_all(logs).expect("create the log directory");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let node_ids = ["node-a", "node-b"];
        let api_socket = work.join("api.sock");
        let mut api_args = vec![
            "serve".to_owned(),
            "--store".to_owned(),
            bucket.display().to_string(),
            "--listen".to_owned(),
            format!("unix://{}", api_socket.display()),
        ];
        for id in node_ids {
            api_args.push("--gateway".to_owned());
            api_args.push(format!(
                "{id}={}",
                work.join(id).join("data/admin.sock").display()
            ));
        }
        let blockstore = Process::spawn(
            "blockgate-blockstore",
            blockstore_binary(),
            &api_args,
            logs.join("blockstore.log"),
        );
        let controller_socket = work.join("controller.sock");
        let controller_plugin = Process::spawn(
            "blockgate-csi controller",
            csi_binary(),
            &[
                "--mode".to_owned(),
                "controller".to_owned(),
                "--endpoint".to_owned(),
                format!("unix://{}", controller_socket.display()),
                "--blockstore".to_owned(),
                format!("unix://{}", api_socket.display()),
            ],
            logs.join("csi-controller.log"),
        );
        let channel = connect_ready(&runtime, &controller_socket, "the CSI controller");
        let mut cluster = Cluster {
            controller: ControllerClient::new(channel),
            runtime,
            work: work.to_path_buf(),
            logs: logs.to_path_buf(),
            bucket,
            blockstore,
            controller_plugin,
            nodes: Vec::new(),
        };
        for id in node_ids {
            let node = cluster.start_node(id);
            cluster.nodes.push(node);
        }
        cluster
    }

    fn start_node(&self, id: &'static str) -> NodeHost {
        let root = self.work.join(id);
        let data_dir = root.join("data");
        let kubelet = root.join("kubelet");
        std::fs::create_dir_all(&kubelet).expect("create the kubelet directory");
        let gateway = self.start_gateway(id, &data_dir);
        let socket = root.join("csi.sock");
        let plugin = Process::spawn(
            &format!("blockgate-csi node {id}"),
            csi_binary(),
            &[
                "--mode".to_owned(),
                "node".to_owned(),
                "--endpoint".to_owned(),
                format!("unix://{}", socket.display()),
                "--node-id".to_owned(),
                id.to_owned(),
                "--gateway".to_owned(),
                format!("unix://{}", data_dir.join("node.sock").display()),
                "--state-dir".to_owned(),
                root.join("csi-state").display().to_string(),
            ],
            self.logs.join(format!("csi-{id}.log")),
        );
        let channel = connect_ready(&self.runtime, &socket, &format!("the CSI node plugin {id}"));
        NodeHost {
            id,
            data_dir,
            gateway: Some(gateway),
            plugin,
            client: NodeClient::new(channel),
            kubelet,
        }
    }

    /// Starts a managed gateway on `data_dir` and waits until its node API answers.
    fn start_gateway(&self, id: &str, data_dir: &Path) -> Process {
        let mut gateway = Process::spawn(
            &format!("blockgate-gateway {id}"),
            gateway_binary(),
            &[
                "serve".to_owned(),
                "--attach-only".to_owned(),
                "--data-dir".to_owned(),
                data_dir.display().to_string(),
                "--store".to_owned(),
                self.bucket.display().to_string(),
                "--no-metrics".to_owned(),
                "--seal-interval-ms".to_owned(),
                "200".to_owned(),
            ],
            self.logs.join(format!("gateway-{id}.log")),
        );
        wait_until(
            START_TIMEOUT,
            &format!("the gateway of {id} to serve its node API"),
            || {
                if let Some(status) = gateway.exited() {
                    panic!(
                        "the gateway of {id} exited at start ({status})\n{}",
                        gateway.log_tail(40)
                    );
                }
                let output = Command::new(gateway_binary())
                    .args(["node", "list", "--data-dir"])
                    .arg(data_dir)
                    .output()
                    .map_err(|e| e.to_string())?;
                if output.status.success() {
                    Ok(())
                } else {
                    Err(String::from_utf8_lossy(&output.stderr).into_owned())
                }
            },
        );
        gateway
    }

    fn node(&self, id: &str) -> &NodeHost {
        self.nodes
            .iter()
            .find(|node| node.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    fn node_mut(&mut self, id: &str) -> &mut NodeHost {
        self.nodes
            .iter_mut()
            .find(|node| node.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// The tail of every process's log (the full logs are in the job's out/csi_node/).
    fn logs(&self) -> String {
        let mut text = vec![
            self.blockstore.log_tail(30),
            self.controller_plugin.log_tail(30),
        ];
        for node in &self.nodes {
            if let Some(gateway) = &node.gateway {
                text.push(gateway.log_tail(30));
            }
            text.push(node.plugin.log_tail(30));
        }
        text.join("\n")
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

    fn create_volume(&self, name: &str, capability: csi::VolumeCapability) -> String {
        let mut controller = self.controller.clone();
        self.ok(
            &format!("CreateVolume {name}"),
            controller.create_volume(csi::CreateVolumeRequest {
                name: name.to_owned(),
                capacity_range: Some(csi::CapacityRange {
                    required_bytes: VOLUME_SIZE,
                    limit_bytes: 0,
                }),
                volume_capabilities: vec![capability],
                parameters: HashMap::from([("mode".to_owned(), "cached".to_owned())]),
                ..Default::default()
            }),
        )
        .volume
        .unwrap_or_else(|| panic!("CreateVolume {name} returned no volume"))
        .volume_id
    }

    /// ControllerPublishVolume: the publish context, with the writer epoch.
    fn controller_publish(
        &self,
        volume: &str,
        node: &str,
        capability: &csi::VolumeCapability,
    ) -> HashMap<String, String> {
        let mut controller = self.controller.clone();
        let context = self
            .ok(
                &format!("ControllerPublishVolume {volume} to {node}"),
                controller.controller_publish_volume(publish_request(volume, node, capability)),
            )
            .publish_context;
        assert!(
            context.contains_key(EPOCH_KEY),
            "ControllerPublishVolume {volume} to {node} gave no epoch: {context:?}"
        );
        context
    }

    fn controller_unpublish(&self, volume: &str, node: &str) {
        let mut controller = self.controller.clone();
        self.ok(
            &format!("ControllerUnpublishVolume {volume} from {node}"),
            controller.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
                volume_id: volume.to_owned(),
                node_id: node.to_owned(),
                ..Default::default()
            }),
        );
    }

    /// Where kubelet would stage `volume` on `node`, and publish it for one pod.
    fn paths(&self, node: &str, volume: &str) -> (PathBuf, PathBuf) {
        let kubelet = &self.node(node).kubelet;
        let staging = kubelet.join("staging").join(volume);
        let pod = kubelet.join("pods/uid-1").join(volume);
        std::fs::create_dir_all(&staging).expect("create the staging directory");
        std::fs::create_dir_all(&pod).expect("create the pod's volume directory");
        (staging, pod.join("mount"))
    }

    /// NodeStageVolume then NodePublishVolume; the published target.
    fn stage_and_publish(
        &self,
        node: &str,
        volume: &str,
        context: &HashMap<String, String>,
        capability: &csi::VolumeCapability,
    ) -> PathBuf {
        let (staging, target) = self.paths(node, volume);
        let mut client = self.node(node).client.clone();
        self.ok(
            &format!("NodeStageVolume {volume} on {node}"),
            client.node_stage_volume(csi::NodeStageVolumeRequest {
                volume_id: volume.to_owned(),
                publish_context: context.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(capability.clone()),
                ..Default::default()
            }),
        );
        self.ok(
            &format!("NodePublishVolume {volume} on {node}"),
            client.node_publish_volume(csi::NodePublishVolumeRequest {
                volume_id: volume.to_owned(),
                publish_context: context.clone(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(capability.clone()),
                readonly: false,
                ..Default::default()
            }),
        );
        target
    }

    /// NodeUnpublishVolume then NodeUnstageVolume.
    fn unpublish_and_unstage(&self, node: &str, volume: &str) {
        let (staging, target) = self.paths(node, volume);
        let mut client = self.node(node).client.clone();
        self.ok(
            &format!("NodeUnpublishVolume {volume} on {node}"),
            client.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
                volume_id: volume.to_owned(),
                target_path: target.display().to_string(),
            }),
        );
        self.ok(
            &format!("NodeUnstageVolume {volume} on {node}"),
            client.node_unstage_volume(csi::NodeUnstageVolumeRequest {
                volume_id: volume.to_owned(),
                staging_target_path: staging.display().to_string(),
            }),
        );
        assert!(
            mount_source(&staging).is_none() && mount_source(&target).is_none(),
            "{volume} is still mounted on {node} after unstage"
        );
    }

    /// NodeGetVolumeStats' bytes total, after checking the volume's condition is normal.
    fn bytes_total(&self, node: &str, volume: &str, target: &Path) -> i64 {
        let mut client = self.node(node).client.clone();
        let stats = self.ok(
            &format!("NodeGetVolumeStats {volume} on {node}"),
            client.node_get_volume_stats(csi::NodeGetVolumeStatsRequest {
                volume_id: volume.to_owned(),
                volume_path: target.display().to_string(),
                ..Default::default()
            }),
        );
        if let Some(condition) = &stats.volume_condition {
            assert!(
                !condition.abnormal,
                "{volume} on {node} is abnormal: {}",
                condition.message
            );
        }
        stats
            .usage
            .iter()
            .find(|usage| usage.unit == i32::from(csi::volume_usage::Unit::Bytes))
            .unwrap_or_else(|| panic!("NodeGetVolumeStats {volume} has no bytes usage: {stats:?}"))
            .total
    }
}

/// Connects to a CSI socket and waits for Probe to say ready.
fn connect_ready(runtime: &tokio::runtime::Runtime, socket: &Path, what: &str) -> Channel {
    let channel = wait_until(
        START_TIMEOUT,
        &format!("{what} to accept connections"),
        || unix_channel(runtime, socket),
    );
    let mut identity = IdentityClient::new(channel.clone());
    wait_until(
        START_TIMEOUT,
        &format!("{what} to be ready"),
        || match runtime.block_on(identity.probe(csi::ProbeRequest {})) {
            Ok(response) if response.get_ref().ready != Some(false) => Ok(()),
            Ok(response) => Err(format!("{:?}", response.get_ref())),
            Err(status) => Err(format!("{status:?}")),
        },
    );
    channel
}

fn mount_capability() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".to_owned(),
            ..Default::default()
        })),
    }
}

fn block_capability() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter.into(),
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn publish_request(
    volume: &str,
    node: &str,
    capability: &csi::VolumeCapability,
) -> csi::ControllerPublishVolumeRequest {
    csi::ControllerPublishVolumeRequest {
        volume_id: volume.to_owned(),
        node_id: node.to_owned(),
        volume_capability: Some(capability.clone()),
        readonly: false,
        ..Default::default()
    }
}

fn epoch(context: &HashMap<String, String>) -> u64 {
    context[EPOCH_KEY]
        .parse()
        .unwrap_or_else(|_| panic!("epoch {:?} is not a number", context[EPOCH_KEY]))
}

/// The source of the mount at `path` (from /proc/self/mountinfo), if something is mounted there.
fn mount_source(path: &Path) -> Option<String> {
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    let wanted = path.display().to_string();
    mountinfo.lines().rev().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mount_point = before.split_whitespace().nth(4)?;
        (mount_point == wanted).then(|| after.split_whitespace().nth(1).unwrap_or("").to_owned())
    })
}

/// Runs a command; panics with its output unless it succeeds.
fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{program} {args:?} failed ({}):\n{text}",
        output.status
    );
    text
}

/// The contents of test file `index` of a set: its own pattern, of a size that varies.
fn file_contents(seed: u64, index: u64) -> Vec<u8> {
    let length = usize::try_from(4096 + (index % 7) * 12_288).expect("small length");
    pattern(seed.wrapping_mul(1_000_003).wrapping_add(index), 0, length)
}

fn write_file_durably(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(contents)?;
    file.sync_all()?;
    // The directory entry too: a file that fsync acknowledged must be found after a crash.
    std::fs::File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
}

fn check_file(path: &Path, expected: &[u8]) -> Result<(), String> {
    let mut found = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut file| file.read_to_end(&mut found))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if found != expected {
        return Err(format!(
            "{}: {} bytes, differing from the {} written",
            path.display(),
            found.len(),
            expected.len()
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Scenarios

fn mount_volume_restage(cluster: &mut Cluster) {
    let capability = mount_capability();
    let volume = cluster.create_volume("pvc-mount", capability.clone());
    let context = cluster.controller_publish(&volume, "node-a", &capability);
    let target = cluster.stage_and_publish("node-a", &volume, &context, &capability);
    let (staging, _) = cluster.paths("node-a", &volume);
    let device = mount_source(&staging).expect("the staging path is mounted");
    assert!(device.starts_with("/dev/nbd"), "staged from {device}");
    let files = target.join("files");
    std::fs::create_dir(&files).expect("mkdir through the mount");
    for index in 0..16 {
        std::fs::write(files.join(index.to_string()), file_contents(1, index))
            .expect("write a file through the mount");
    }
    run("sync", &["-f", &target.display().to_string()]);
    cluster.unpublish_and_unstage("node-a", &volume);

    let target = cluster.stage_and_publish("node-a", &volume, &context, &capability);
    for index in 0..16 {
        check_file(
            &target.join("files").join(index.to_string()),
            &file_contents(1, index),
        )
        .unwrap_or_else(|e| panic!("after unstage and stage: {e}"));
    }
    cluster.unpublish_and_unstage("node-a", &volume);
    cluster.controller_unpublish(&volume, "node-a");
}

fn block_volume_restage(cluster: &mut Cluster) {
    let capability = block_capability();
    let volume = cluster.create_volume("pvc-block", capability.clone());
    let context = cluster.controller_publish(&volume, "node-a", &capability);
    let target = cluster.stage_and_publish("node-a", &volume, &context, &capability);
    assert!(
        mount_source(&target).is_some(),
        "the block target {} is not bound to the device",
        target.display()
    );
    let offset = 4 * MIB as u64;
    let data = pattern(7, offset, 1 << 20);
    {
        let mut device = std::fs::OpenOptions::new()
            .write(true)
            .open(&target)
            .expect("open the published device");
        std::io::Seek::seek(&mut device, std::io::SeekFrom::Start(offset)).expect("seek");
        device.write_all(&data).expect("write the device");
        device.sync_all().expect("fsync the device");
    }
    cluster.unpublish_and_unstage("node-a", &volume);

    let target = cluster.stage_and_publish("node-a", &volume, &context, &capability);
    // O_DIRECT, so the bytes come from the gateway and not from a page cache.
    let read = Command::new("dd")
        .arg(format!("if={}", target.display()))
        .args(["bs=1M", "skip=4", "count=1", "iflag=direct", "status=none"])
        .output()
        .expect("run dd");
    assert!(
        read.status.success(),
        "dd: {}",
        String::from_utf8_lossy(&read.stderr)
    );
    assert!(
        read.stdout == data,
        "the block volume's bytes changed across unstage and stage"
    );
    cluster.unpublish_and_unstage("node-a", &volume);
    cluster.controller_unpublish(&volume, "node-a");
}

/// Files written through the mount, each fsynced (file and directory) before it counts as
/// acknowledged.
struct Workload {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<AtomicU64>,
    thread: JoinHandle<Result<(), String>>,
}

const WORKLOAD_SEED: u64 = 99;

impl Workload {
    fn start(dir: PathBuf) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(AtomicU64::new(0));
        let thread = std::thread::spawn({
            let (stop, acknowledged) = (stop.clone(), acknowledged.clone());
            move || {
                let mut index = 0;
                while !stop.load(Ordering::SeqCst) {
                    write_file_durably(
                        &dir.join(index.to_string()),
                        &file_contents(WORKLOAD_SEED, index),
                    )
                    .map_err(|e| format!("file {index}: {e}"))?;
                    index += 1;
                    acknowledged.store(index, Ordering::SeqCst);
                }
                Ok(())
            }
        });
        Workload {
            stop,
            acknowledged,
            thread,
        }
    }

    fn acknowledged(&self) -> u64 {
        self.acknowledged.load(Ordering::SeqCst)
    }

    /// Waits until `count` files are acknowledged; the workload must not fail meanwhile.
    fn wait_for(&self, count: u64, timeout: Duration, what: &str) {
        wait_until(timeout, what, || {
            if self.thread.is_finished() {
                panic!(
                    "the workload stopped (an I/O error under the mount?) at {}",
                    self.acknowledged()
                );
            }
            let now = self.acknowledged();
            if now >= count {
                Ok(())
            } else {
                Err(format!("{now} of {count} acknowledged"))
            }
        });
    }

    /// Stops it; the number of files acknowledged.
    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        match self.thread.join() {
            Ok(Ok(())) => self.acknowledged.load(Ordering::SeqCst),
            Ok(Err(error)) => panic!("the workload failed: {error}"),
            Err(_) => panic!("the workload panicked"),
        }
    }
}

fn crash_expand_and_move(cluster: &mut Cluster) {
    let capability = mount_capability();
    let volume = cluster.create_volume("pvc-data", capability.clone());
    let context = cluster.controller_publish(&volume, "node-a", &capability);
    let first_epoch = epoch(&context);
    let target = cluster.stage_and_publish("node-a", &volume, &context, &capability);
    let (staging, _) = cluster.paths("node-a", &volume);
    let device = mount_source(&staging).expect("the staging path is mounted");
    let before = pattern(3, 0, 8 << 20);
    write_file_durably(&target.join("before"), &before).expect("write before the crash");

    // kill -9 under the workload; the restarted gateway takes the device back.
    let records = target.join("records");
    std::fs::create_dir(&records).expect("mkdir through the mount");
    let workload = Workload::start(records.clone());
    workload.wait_for(20, START_TIMEOUT, "the workload to get going");
    let data_dir = cluster.node("node-a").data_dir.clone();
    let mut gateway = cluster
        .node_mut("node-a")
        .gateway
        .take()
        .expect("node-a's gateway runs");
    gateway.kill();
    let at_kill = workload.acknowledged();
    println!("gateway of node-a killed with SIGKILL after {at_kill} acknowledged files");
    drop(gateway);
    let restarted = cluster.start_gateway("node-a", &data_dir);
    cluster.node_mut("node-a").gateway = Some(restarted);
    println!("gateway of node-a restarted");
    workload.wait_for(
        at_kill + 20,
        RESUME_TIMEOUT,
        "writes to resume after the restart",
    );
    assert_eq!(
        mount_source(&staging).as_deref(),
        Some(device.as_str()),
        "the staging mount changed across the gateway restart"
    );
    let acknowledged = workload.finish();
    println!("{acknowledged} files acknowledged in all ({at_kill} before the kill)");
    let total = cluster.bytes_total("node-a", &volume, &target);
    cluster.unpublish_and_unstage("node-a", &volume);

    // fsck needs the device without a mount: stage it as a block volume for that. Published
    // again first, so this scenario does not depend on a re-stage with the same epoch (the
    // restage scenarios check that).
    cluster.controller_unpublish(&volume, "node-a");
    let context = cluster.controller_publish(&volume, "node-a", &capability);
    let block = block_capability();
    let device_file = cluster.stage_and_publish("node-a", &volume, &context, &block);
    run("fsck.ext4", &["-fn", &device_file.display().to_string()]);
    cluster.unpublish_and_unstage("node-a", &volume);
    cluster.controller_unpublish(&volume, "node-a");
    let context = cluster.controller_publish(&volume, "node-a", &capability);
    let target = cluster.stage_and_publish("node-a", &volume, &context, &capability);
    check_file(&target.join("before"), &before).unwrap_or_else(|e| panic!("after the crash: {e}"));
    for index in 0..acknowledged {
        check_file(
            &records.join(index.to_string()),
            &file_contents(WORKLOAD_SEED, index),
        )
        .unwrap_or_else(|e| panic!("acknowledged file {index} of {acknowledged}: {e}"));
    }

    // Online expansion: the controller grows the volume through its gateway, the node the
    // filesystem.
    let mut controller = cluster.controller.clone();
    let expanded = cluster.ok(
        "ControllerExpandVolume",
        controller.controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: volume.clone(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: EXPANDED_SIZE,
                limit_bytes: 0,
            }),
            volume_capability: Some(capability.clone()),
            ..Default::default()
        }),
    );
    assert!(expanded.capacity_bytes >= EXPANDED_SIZE, "{expanded:?}");
    assert!(
        expanded.node_expansion_required,
        "a mounted volume needs the node: {expanded:?}"
    );
    let mut node = cluster.node("node-a").client.clone();
    let (staging, _) = cluster.paths("node-a", &volume);
    cluster.ok(
        "NodeExpandVolume",
        node.node_expand_volume(csi::NodeExpandVolumeRequest {
            volume_id: volume.clone(),
            volume_path: target.display().to_string(),
            capacity_range: Some(csi::CapacityRange {
                required_bytes: EXPANDED_SIZE,
                limit_bytes: 0,
            }),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(capability.clone()),
            ..Default::default()
        }),
    );
    let grown = cluster.bytes_total("node-a", &volume, &target);
    println!("bytes total {total} before, {grown} after expansion to {EXPANDED_SIZE}");
    assert!(
        grown > total + (EXPANDED_SIZE - VOLUME_SIZE) / 2,
        "NodeGetVolumeStats says {grown} bytes after the expansion, {total} before"
    );

    // One writer: node-b cannot publish it while node-a holds it.
    let mut controller = cluster.controller.clone();
    cluster.fails(
        "ControllerPublishVolume to node-b while node-a holds it",
        Code::FailedPrecondition,
        controller.controller_publish_volume(publish_request(&volume, "node-b", &capability)),
    );

    // Detach from node-a, attach on node-b (its own gateway state): the same files.
    cluster.unpublish_and_unstage("node-a", &volume);
    cluster.controller_unpublish(&volume, "node-a");
    let context = cluster.controller_publish(&volume, "node-b", &capability);
    assert!(
        epoch(&context) > first_epoch,
        "node-b got epoch {} after node-a's {first_epoch}",
        epoch(&context)
    );
    let target = cluster.stage_and_publish("node-b", &volume, &context, &capability);
    check_file(&target.join("before"), &before).unwrap_or_else(|e| panic!("on node-b: {e}"));
    for index in 0..acknowledged {
        check_file(
            &target.join("records").join(index.to_string()),
            &file_contents(WORKLOAD_SEED, index),
        )
        .unwrap_or_else(|e| panic!("on node-b, acknowledged file {index}: {e}"));
    }
    let on_b = cluster.bytes_total("node-b", &volume, &target);
    assert_eq!(
        on_b, grown,
        "node-b sees another filesystem size than node-a did"
    );
    cluster.unpublish_and_unstage("node-b", &volume);
    cluster.controller_unpublish(&volume, "node-b");
}
