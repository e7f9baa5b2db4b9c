//! Test fakes for the node service: an in-memory host (devices, a mount table, command
//! failures on demand) and an in-process gateway node API served on a temporary unix socket.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use blockgate_proto::gateway::v1 as gw;
use gw::node_gateway_server::{NodeGateway, NodeGatewayServer};
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::host::{FsStats, FsType, HostError, HostOps};
use crate::mount::{MountEntry, Signature, mount_at};

/// The block size the fake statvfs reports.
pub const FAKE_FS_BLOCK: u64 = 4096;

#[derive(Debug, Clone)]
pub struct FakeDevice {
    pub size: u64,
    pub signature: Signature,
    pub number: (u32, u32),
}

#[derive(Debug, Default)]
pub struct FakeHostState {
    pub devices: HashMap<PathBuf, FakeDevice>,
    pub mounts: Vec<MountEntry>,
    /// Every mutating command, spelled like the real one.
    pub commands: Vec<String>,
    /// The next mount fails with this message.
    pub fail_next_mount: Option<String>,
    /// Unmounting these fails as busy.
    pub busy: HashSet<PathBuf>,
    next_mount_id: u32,
}

/// An in-memory host: cheap to clone, clones share state.
#[derive(Debug, Clone, Default)]
pub struct FakeHost {
    state: Arc<Mutex<FakeHostState>>,
}

impl FakeHost {
    pub fn state(&self) -> MutexGuard<'_, FakeHostState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn add_device(&self, path: &Path, size: u64) {
        let mut state = self.state();
        let minor = u32::try_from(state.devices.len()).unwrap_or(0) * 32;
        state.devices.entry(path.to_owned()).or_insert(FakeDevice {
            size,
            signature: Signature::Empty,
            number: (43, minor),
        });
    }

    pub fn set_signature(&self, path: &Path, signature: Signature) {
        if let Some(device) = self.state().devices.get_mut(path) {
            device.signature = signature;
        }
    }

    pub fn set_size(&self, path: &Path, size: u64) {
        if let Some(device) = self.state().devices.get_mut(path) {
            device.size = size;
        }
    }

    pub fn commands(&self) -> Vec<String> {
        self.state().commands.clone()
    }

    pub fn mounted_at(&self, path: &Path) -> Option<MountEntry> {
        mount_at(&self.state().mounts, path).cloned()
    }

    pub fn mount_count(&self) -> usize {
        self.state().mounts.len()
    }

    fn device(&self, device: &Path) -> Result<FakeDevice, HostError> {
        self.state()
            .devices
            .get(device)
            .cloned()
            .ok_or_else(|| HostError::Read {
                path: device.to_owned(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            })
    }
}

fn failed(command: String, stderr: &str) -> HostError {
    HostError::Command {
        command,
        status: "exit status: 32".to_owned(),
        stderr: stderr.to_owned(),
    }
}

impl HostOps for FakeHost {
    fn probe_signature(&self, device: &Path) -> Result<Signature, HostError> {
        Ok(self.device(device)?.signature)
    }

    fn format(&self, device: &Path, fs_type: FsType) -> Result<(), HostError> {
        let command = format!("mkfs.{} {}", fs_type.as_str(), device.display());
        let mut state = self.state();
        state.commands.push(command.clone());
        let Some(found) = state.devices.get_mut(device) else {
            return Err(failed(command, "no such device"));
        };
        if found.signature != Signature::Empty {
            // The node service must never get here.
            return Err(failed(
                command,
                "the fake refuses to format over a signature",
            ));
        }
        found.signature = Signature::Filesystem(fs_type.as_str().to_owned());
        Ok(())
    }

    fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs_type: FsType,
        options: &[String],
    ) -> Result<(), HostError> {
        let command = format!(
            "mount -t {} -o {} {} {}",
            fs_type.as_str(),
            options.join(","),
            device.display(),
            target.display()
        );
        let number = self.device(device)?.number;
        let mut state = self.state();
        state.commands.push(command.clone());
        if let Some(stderr) = state.fail_next_mount.take() {
            return Err(failed(command, &stderr));
        }
        state.next_mount_id += 1;
        let entry = MountEntry {
            mount_id: 100 + state.next_mount_id,
            parent_id: 1,
            major: number.0,
            minor: number.1,
            root: "/".into(),
            mount_point: target.to_owned(),
            mount_options: vec![
                if options.iter().any(|o| o == "ro") {
                    "ro"
                } else {
                    "rw"
                }
                .to_owned(),
            ],
            fs_type: fs_type.as_str().to_owned(),
            source: device.display().to_string(),
            super_options: options.to_vec(),
        };
        state.mounts.push(entry);
        Ok(())
    }

    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), HostError> {
        let command = format!(
            "mount --bind{} {} {}",
            if read_only { " -o ro" } else { "" },
            source.display(),
            target.display()
        );
        let device = self.state().devices.get(source).cloned();
        let mut state = self.state();
        state.commands.push(command.clone());
        let mut entry = match device {
            Some(_) => MountEntry {
                mount_id: 0,
                parent_id: 1,
                major: 0,
                minor: 5,
                root: Path::new("/").join(source.file_name().unwrap_or_default()),
                mount_point: target.to_owned(),
                mount_options: Vec::new(),
                fs_type: "devtmpfs".to_owned(),
                source: "udev".to_owned(),
                super_options: vec!["rw".to_owned()],
            },
            None => match mount_at(&state.mounts, source) {
                Some(entry) => entry.clone(),
                None => return Err(failed(command, "the fake binds only mounts and devices")),
            },
        };
        state.next_mount_id += 1;
        entry.mount_id = 100 + state.next_mount_id;
        entry.mount_point = target.to_owned();
        entry.mount_options = vec![if read_only { "ro" } else { "rw" }.to_owned()];
        state.mounts.push(entry);
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), HostError> {
        let command = format!("umount {}", target.display());
        let mut state = self.state();
        state.commands.push(command.clone());
        if state.busy.contains(target) {
            return Err(HostError::Busy {
                path: target.to_owned(),
                command,
                stderr: "target is busy".to_owned(),
            });
        }
        match state
            .mounts
            .iter()
            .rposition(|entry| entry.mount_point == target)
        {
            Some(index) => {
                state.mounts.remove(index);
                Ok(())
            }
            None => Err(failed(command, "not mounted")),
        }
    }

    fn mounts(&self) -> Result<Vec<MountEntry>, HostError> {
        Ok(self.state().mounts.clone())
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        path.to_owned()
    }

    fn device_number(&self, device: &Path) -> Result<(u32, u32), HostError> {
        Ok(self.device(device)?.number)
    }

    fn device_size(&self, device: &Path) -> Result<u64, HostError> {
        Ok(self.device(device)?.size)
    }

    fn resize_fs(
        &self,
        fs_type: FsType,
        device: &Path,
        mount_point: &Path,
    ) -> Result<(), HostError> {
        let command = match fs_type {
            FsType::Ext4 => format!("resize2fs {}", device.display()),
            FsType::Xfs => format!("xfs_growfs {}", mount_point.display()),
        };
        self.state().commands.push(command);
        Ok(())
    }

    fn statvfs(&self, path: &Path) -> Result<FsStats, HostError> {
        let state = self.state();
        let entry = mount_at(&state.mounts, path).ok_or_else(|| HostError::Read {
            path: path.to_owned(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        let size = state
            .devices
            .get(Path::new(&entry.source))
            .map_or(0, |device| device.size);
        let total = size / FAKE_FS_BLOCK;
        Ok(FsStats {
            total_bytes: total * FAKE_FS_BLOCK,
            available_bytes: total / 2 * FAKE_FS_BLOCK,
            used_bytes: total / 4 * FAKE_FS_BLOCK,
            total_inodes: 1000,
            free_inodes: 900,
            used_inodes: 100,
        })
    }
}

#[derive(Debug, Default)]
pub struct FakeGatewayState {
    /// Volumes in the bucket and their sizes.
    pub volumes: BTreeMap<String, u64>,
    pub attachments: BTreeMap<String, gw::Attachment>,
    /// Devices handed out, per volume, kept across detaches so filesystems persist.
    pub devices: BTreeMap<String, String>,
    pub fenced: HashSet<String>,
    /// The next DetachVolume fails with this.
    pub detach_error: Option<Status>,
    /// GetVolumeStats fails with this.
    pub stats_error: Option<Status>,
    pub calls: Vec<String>,
}

/// The gateway's node API over in-memory volumes; attaching creates a device on the fake host.
#[derive(Debug, Clone)]
pub struct FakeGateway {
    state: Arc<Mutex<FakeGatewayState>>,
    host: FakeHost,
}

impl FakeGateway {
    pub fn new(host: FakeHost) -> FakeGateway {
        FakeGateway {
            state: Arc::default(),
            host,
        }
    }

    pub fn state(&self) -> MutexGuard<'_, FakeGatewayState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn add_volume(&self, id: &str, size: u64) {
        self.state().volumes.insert(id.to_owned(), size);
    }

    /// Serves the API on `socket` until the task is dropped or aborted.
    pub fn serve(&self, socket: &Path) -> tokio::task::JoinHandle<()> {
        let listener = UnixListener::bind(socket).expect("bind the fake gateway socket");
        let service = NodeGatewayServer::new(self.clone());
        tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(UnixListenerStream::new(listener))
                .await;
        })
    }
}

#[tonic::async_trait]
impl NodeGateway for FakeGateway {
    async fn attach_volume(
        &self,
        request: Request<gw::AttachVolumeRequest>,
    ) -> Result<Response<gw::Attachment>, Status> {
        let request = request.into_inner();
        let (attachment, new_device) = {
            let mut state = self.state();
            state.calls.push(format!(
                "AttachVolume {} {}",
                request.volume_id, request.epoch
            ));
            let Some(&size) = state.volumes.get(&request.volume_id) else {
                return Err(Status::not_found(format!(
                    "no volume {}",
                    request.volume_id
                )));
            };
            if let Some(existing) = state.attachments.get(&request.volume_id) {
                if !request.readonly && existing.epoch != request.epoch {
                    return Err(Status::failed_precondition("stale epoch"));
                }
                return Ok(Response::new(existing.clone()));
            }
            let next = state.devices.len();
            let device = state
                .devices
                .entry(request.volume_id.clone())
                .or_insert_with(|| format!("/dev/nbd{next}"))
                .clone();
            let attachment = gw::Attachment {
                volume_id: request.volume_id.clone(),
                epoch: request.epoch,
                device_path: device.clone(),
                size_bytes: size,
                block_size: 4096,
                readonly: request.readonly,
                frontend: "nbd".into(),
                connections: 1,
            };
            state
                .attachments
                .insert(request.volume_id.clone(), attachment.clone());
            (attachment, device)
        };
        self.host
            .add_device(Path::new(&new_device), attachment.size_bytes);
        Ok(Response::new(attachment))
    }

    async fn detach_volume(
        &self,
        request: Request<gw::DetachVolumeRequest>,
    ) -> Result<Response<gw::DetachVolumeResponse>, Status> {
        let request = request.into_inner();
        let mut state = self.state();
        state
            .calls
            .push(format!("DetachVolume {}", request.volume_id));
        if let Some(status) = state.detach_error.take() {
            return Err(status);
        }
        state.attachments.remove(&request.volume_id);
        Ok(Response::new(gw::DetachVolumeResponse {}))
    }

    async fn list_attachments(
        &self,
        _request: Request<gw::ListAttachmentsRequest>,
    ) -> Result<Response<gw::ListAttachmentsResponse>, Status> {
        Ok(Response::new(gw::ListAttachmentsResponse {
            attachments: self.state().attachments.values().cloned().collect(),
        }))
    }

    async fn expand_volume(
        &self,
        request: Request<gw::ExpandVolumeRequest>,
    ) -> Result<Response<gw::Attachment>, Status> {
        let request = request.into_inner();
        let attachment = {
            let mut state = self.state();
            state.calls.push(format!(
                "ExpandVolume {} {}",
                request.volume_id, request.size_bytes
            ));
            state
                .volumes
                .insert(request.volume_id.clone(), request.size_bytes);
            let Some(attachment) = state.attachments.get_mut(&request.volume_id) else {
                return Err(Status::not_found("not attached here"));
            };
            attachment.size_bytes = request.size_bytes;
            attachment.clone()
        };
        self.host
            .set_size(Path::new(&attachment.device_path), request.size_bytes);
        Ok(Response::new(attachment))
    }

    async fn get_volume_stats(
        &self,
        request: Request<gw::GetVolumeStatsRequest>,
    ) -> Result<Response<gw::VolumeStats>, Status> {
        let request = request.into_inner();
        let state = self.state();
        if let Some(status) = &state.stats_error {
            return Err(status.clone());
        }
        let Some(attachment) = state.attachments.get(&request.volume_id) else {
            return Err(Status::not_found("not attached here"));
        };
        Ok(Response::new(gw::VolumeStats {
            volume_id: request.volume_id.clone(),
            size_bytes: attachment.size_bytes,
            condition: Some(gw::VolumeCondition::default()),
            epoch: attachment.epoch,
            fenced: state.fenced.contains(&request.volume_id),
            upload_backlog_bytes: 0,
            write_log_bytes: 0,
        }))
    }
}
