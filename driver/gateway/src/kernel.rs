//! The kernel side of an attachment: block devices (`/dev/nbdN`) whose requests arrive on
//! sockets this gateway serves.
//!
//! [`KernelDevices`] is the gateway's own view of what it needs from the kernel; the node
//! service is written against it. [`NetlinkDevices`] is the real one (the `nbd`
//! generic-netlink family); tests use an in-memory kernel that serves as an NBD client on the
//! sockets it is given. This module never touches volume data and never decides policy
//! (which device to keep, when to disconnect): that is the node service's.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;

use async_trait::async_trait;
use blockgate_nbd::netlink::{ConnectRequest, NbdNetlink, NetlinkError, ReconfigureRequest};

/// How a device is set up, apart from its sockets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    pub size: u64,
    pub block_size: u32,
    /// The export's NBD transmission flags.
    pub server_flags: u16,
    /// Seconds before the kernel gives up on one request and drops its connection; 0: never
    /// (a request may legitimately wait on a full write log).
    pub request_timeout_seconds: u64,
    /// Seconds the kernel holds requests while every connection is dead, waiting for a
    /// reconfigure (a restarted gateway), before failing them.
    pub dead_connection_timeout_seconds: u64,
    /// `blockgate:<volume>`: shown in `/sys/block/nbdN/backend`, and repeated on reconfigure.
    pub backend: String,
}

/// What the kernel says about one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Configured: connected, or waiting on dead connections for a reconfigure.
    Configured,
    /// The device exists but nothing is connected to it (disconnected, or never used).
    Unconfigured,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("the kernel's nbd driver is not available: load the nbd module (modprobe nbd)")]
    NoNbdModule,
    #[error("no free nbd device")]
    NoFreeDevice,
    /// The kernel refused the request for the device (not configured, backend mismatch, bad
    /// sockets, busy index): `EINVAL`, `EBUSY` and the like.
    #[error("the kernel refused {operation} of nbd{index}")]
    Refused {
        operation: &'static str,
        index: u32,
        #[source]
        source: NetlinkError,
    },
    #[error("the kernel's nbd driver cannot be reached")]
    Netlink(#[source] NetlinkError),
    #[error("writing back /dev/nbd{index} failed")]
    Flush {
        index: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("the netlink task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// The kernel's block devices, as the node service uses them.
///
/// `sockets` are the kernel's ends of socketpairs whose other ends the caller serves; they
/// are consumed (the kernel keeps its own references, this process closes its copies).
#[async_trait]
pub trait KernelDevices: Send + Sync + std::fmt::Debug + 'static {
    /// Connects a device to `sockets`; `index: None` lets the kernel pick a free device.
    async fn connect(
        &self,
        config: &DeviceConfig,
        index: Option<u32>,
        sockets: Vec<OwnedFd>,
    ) -> Result<u32, KernelError>;
    /// Puts `sockets` in the place of dead connections of a configured device.
    async fn reconfigure(
        &self,
        index: u32,
        backend: &str,
        sockets: Vec<OwnedFd>,
    ) -> Result<(), KernelError>;
    /// Sets the size of a configured device; the kernel announces the change at once.
    async fn resize(&self, index: u32, backend: &str, size: u64) -> Result<(), KernelError>;
    async fn disconnect(&self, index: u32) -> Result<(), KernelError>;
    /// `None` when there is no such device.
    async fn status(&self, index: u32) -> Result<Option<DeviceState>, KernelError>;
    /// Writes back what the kernel caches of the device (dirty pages of the block device
    /// itself, if a user above left any) and flushes it.
    async fn flush(&self, index: u32) -> Result<(), KernelError>;
    /// The device node for `index`.
    fn device_path(&self, index: u32) -> PathBuf {
        PathBuf::from(format!("/dev/nbd{index}"))
    }
}

/// The real kernel, through the `nbd` generic-netlink family. A netlink socket is opened per
/// call (cheap, and a module loaded after the gateway started is found).
#[derive(Debug, Default)]
pub struct NetlinkDevices;

fn errno(error: &NetlinkError) -> Option<i32> {
    match error {
        NetlinkError::Refused { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

fn classify(operation: &'static str, index: u32, error: NetlinkError) -> KernelError {
    match error {
        NetlinkError::NoNbdFamily => KernelError::NoNbdModule,
        NetlinkError::Refused { .. } => {
            if matches!(errno(&error), Some(libc::ENOSPC | libc::ENFILE)) {
                KernelError::NoFreeDevice
            } else {
                KernelError::Refused {
                    operation,
                    index,
                    source: error,
                }
            }
        }
        other => KernelError::Netlink(other),
    }
}

async fn with_netlink<T, F>(operation: &'static str, index: u32, call: F) -> Result<T, KernelError>
where
    T: Send + 'static,
    F: FnOnce(&mut NbdNetlink) -> Result<T, NetlinkError> + Send + 'static,
{
    tokio::task::spawn_blocking(move || {
        let mut netlink = NbdNetlink::open().map_err(|e| classify(operation, index, e))?;
        call(&mut netlink).map_err(|e| classify(operation, index, e))
    })
    .await
    .map_err(KernelError::Task)?
}

#[async_trait]
impl KernelDevices for NetlinkDevices {
    async fn connect(
        &self,
        config: &DeviceConfig,
        index: Option<u32>,
        sockets: Vec<OwnedFd>,
    ) -> Result<u32, KernelError> {
        let request = ConnectRequest {
            index,
            size: config.size,
            block_size: u64::from(config.block_size),
            server_flags: u64::from(config.server_flags),
            // Neither DESTROY_ON_DISCONNECT (the device must outlive this process for a
            // restart to reconfigure it) nor DISCONNECT_ON_CLOSE (mkfs, mount and pods open
            // and close the device many times over one attachment).
            client_flags: 0,
            timeout_seconds: config.request_timeout_seconds,
            dead_connection_timeout_seconds: config.dead_connection_timeout_seconds,
            sockets: sockets.iter().map(AsRawFd::as_raw_fd).collect(),
            backend: Some(config.backend.clone()),
        };
        // `sockets` moves into the task so the descriptors stay open until the kernel has
        // taken its references; dropping them afterwards closes only this process's copies.
        with_netlink(
            "NBD_CMD_CONNECT",
            index.unwrap_or(u32::MAX),
            move |netlink| {
                let index = netlink.connect(&request);
                drop(sockets);
                index
            },
        )
        .await
    }

    async fn reconfigure(
        &self,
        index: u32,
        backend: &str,
        sockets: Vec<OwnedFd>,
    ) -> Result<(), KernelError> {
        let request = ReconfigureRequest {
            index,
            backend: Some(backend.to_string()),
            size: None,
            sockets: sockets.iter().map(AsRawFd::as_raw_fd).collect(),
        };
        with_netlink("NBD_CMD_RECONFIGURE", index, move |netlink| {
            let result = netlink.reconfigure(&request);
            drop(sockets);
            result
        })
        .await
    }

    async fn resize(&self, index: u32, backend: &str, size: u64) -> Result<(), KernelError> {
        let backend = backend.to_string();
        with_netlink("NBD_CMD_RECONFIGURE (resize)", index, move |netlink| {
            netlink.resize(index, Some(&backend), size)
        })
        .await
    }

    async fn disconnect(&self, index: u32) -> Result<(), KernelError> {
        with_netlink("NBD_CMD_DISCONNECT", index, move |netlink| {
            netlink.disconnect(index)
        })
        .await
    }

    async fn status(&self, index: u32) -> Result<Option<DeviceState>, KernelError> {
        let devices = with_netlink("NBD_CMD_STATUS", index, move |netlink| {
            netlink.status(Some(index))
        })
        .await?;
        Ok(devices
            .iter()
            .find(|device| device.index == index)
            .map(|device| {
                if device.connected {
                    DeviceState::Configured
                } else {
                    DeviceState::Unconfigured
                }
            }))
    }

    async fn flush(&self, index: u32) -> Result<(), KernelError> {
        let path = self.device_path(index);
        tokio::task::spawn_blocking(move || {
            // fsync of a block device writes back its page cache and sends a flush.
            std::fs::File::open(&path).and_then(|device| device.sync_all())
        })
        .await
        .map_err(KernelError::Task)?
        .map_err(|source| KernelError::Flush { index, source })
    }
}

#[cfg(test)]
pub mod fake {
    //! An in-memory kernel: devices are slots holding the sockets they were given, as
    //! tokio streams the test speaks NBD on (as the kernel would).

    use std::collections::BTreeMap;
    use std::os::fd::OwnedFd;
    use std::sync::{Arc, Mutex};

    use async_trait::async_trait;
    use tokio::net::UnixStream;

    use super::{DeviceConfig, DeviceState, KernelDevices, KernelError};

    #[derive(Debug)]
    pub struct FakeDevice {
        pub config: DeviceConfig,
        pub size: u64,
        pub configured: bool,
        /// Sockets not yet taken by the test.
        pub sockets: Vec<UnixStream>,
        pub reconfigures: usize,
        pub flushes: usize,
    }

    #[derive(Debug, Default)]
    pub struct FakeKernel {
        pub devices: Mutex<BTreeMap<u32, FakeDevice>>,
        /// Refuse everything as a kernel without the nbd module would.
        pub no_module: Mutex<bool>,
        /// Make the next disconnect fail.
        pub fail_disconnect: Mutex<bool>,
    }

    fn stream(fd: OwnedFd) -> UnixStream {
        let std = std::os::unix::net::UnixStream::from(fd);
        std.set_nonblocking(true).unwrap();
        UnixStream::from_std(std).unwrap()
    }

    impl FakeKernel {
        pub fn new() -> Arc<FakeKernel> {
            Arc::new(FakeKernel::default())
        }

        fn check(&self) -> Result<(), KernelError> {
            if *self.no_module.lock().unwrap() {
                return Err(KernelError::NoNbdModule);
            }
            Ok(())
        }

        /// Takes the sockets the kernel currently holds for `index`.
        pub fn take_sockets(&self, index: u32) -> Vec<UnixStream> {
            let mut devices = self.devices.lock().unwrap();
            std::mem::take(&mut devices.get_mut(&index).unwrap().sockets)
        }

        pub fn with<T>(&self, index: u32, f: impl FnOnce(&mut FakeDevice) -> T) -> T {
            f(self.devices.lock().unwrap().get_mut(&index).unwrap())
        }

        /// The device vanishes from the kernel's configuration (an admin disconnected it,
        /// or the node rebooted): its sockets close.
        pub fn forget(&self, index: u32) {
            self.with(index, |device| {
                device.configured = false;
                device.sockets.clear();
            });
        }
    }

    #[async_trait]
    impl KernelDevices for FakeKernel {
        async fn connect(
            &self,
            config: &DeviceConfig,
            index: Option<u32>,
            sockets: Vec<OwnedFd>,
        ) -> Result<u32, KernelError> {
            self.check()?;
            let mut devices = self.devices.lock().unwrap();
            let index = match index {
                Some(index) => {
                    if devices.get(&index).is_some_and(|d| d.configured) {
                        return Err(KernelError::NoFreeDevice);
                    }
                    index
                }
                None => (0..)
                    .find(|i| !devices.get(i).is_some_and(|d| d.configured))
                    .unwrap(),
            };
            devices.insert(
                index,
                FakeDevice {
                    config: config.clone(),
                    size: config.size,
                    configured: true,
                    sockets: sockets.into_iter().map(stream).collect(),
                    reconfigures: 0,
                    flushes: 0,
                },
            );
            Ok(index)
        }

        async fn reconfigure(
            &self,
            index: u32,
            backend: &str,
            sockets: Vec<OwnedFd>,
        ) -> Result<(), KernelError> {
            self.check()?;
            let mut devices = self.devices.lock().unwrap();
            let device = devices.get_mut(&index).filter(|d| d.configured);
            let Some(device) = device.filter(|d| d.config.backend == backend) else {
                return Err(KernelError::Refused {
                    operation: "NBD_CMD_RECONFIGURE",
                    index,
                    source: blockgate_nbd::netlink::NetlinkError::Malformed(
                        "not configured".into(),
                    ),
                });
            };
            device.sockets = sockets.into_iter().map(stream).collect();
            device.reconfigures += 1;
            Ok(())
        }

        async fn resize(&self, index: u32, _backend: &str, size: u64) -> Result<(), KernelError> {
            self.check()?;
            self.with(index, |device| device.size = size);
            Ok(())
        }

        async fn disconnect(&self, index: u32) -> Result<(), KernelError> {
            self.check()?;
            if std::mem::take(&mut *self.fail_disconnect.lock().unwrap()) {
                return Err(KernelError::Netlink(
                    blockgate_nbd::netlink::NetlinkError::Malformed("injected".into()),
                ));
            }
            if let Some(device) = self.devices.lock().unwrap().get_mut(&index) {
                device.configured = false;
                device.sockets.clear();
            }
            Ok(())
        }

        async fn status(&self, index: u32) -> Result<Option<DeviceState>, KernelError> {
            self.check()?;
            Ok(self.devices.lock().unwrap().get(&index).map(|device| {
                if device.configured {
                    DeviceState::Configured
                } else {
                    DeviceState::Unconfigured
                }
            }))
        }

        async fn flush(&self, index: u32) -> Result<(), KernelError> {
            self.check()?;
            if let Some(device) = self.devices.lock().unwrap().get_mut(&index) {
                device.flushes += 1;
            }
            Ok(())
        }
    }
}
