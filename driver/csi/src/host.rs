//! What the node service does to the host: probe, format, mount, unmount, measure.
//!
//! [`HostOps`] is owned by the node service; [`LinuxHost`] runs the real commands (always as
//! an argument vector, never through a shell) and reads `/proc/self/mountinfo` and sysfs.
//! Tests use an in-memory fake. This module never decides anything: whether to format,
//! mount or unmount is the node service's call.

use std::ffi::OsStr;
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::mount::{self, MountEntry, MountInfoError, Signature};

/// Filesystems the node plugin creates and grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    Ext4,
    Xfs,
}

impl FsType {
    /// The plugin's filesystem for a requested `fs_type` (empty means ext4).
    pub fn parse(fs_type: &str) -> Option<FsType> {
        match fs_type {
            "" | "ext4" => Some(FsType::Ext4),
            "xfs" => Some(FsType::Xfs),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
        }
    }
}

/// Space and inodes of a mounted filesystem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FsStats {
    pub total_bytes: u64,
    pub available_bytes: u64,
    pub used_bytes: u64,
    pub total_inodes: u64,
    pub free_inodes: u64,
    pub used_inodes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot run {program} (is it installed in the plugin's image?)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("{path} is busy: `{command}` says {stderr}")]
    Busy {
        path: PathBuf,
        command: String,
        stderr: String,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse {path}")]
    MountInfo {
        path: PathBuf,
        #[source]
        source: MountInfoError,
    },
    #[error("cannot parse the size of {device} from {text:?}")]
    Size { device: PathBuf, text: String },
    #[error("a host operation panicked")]
    Panicked,
}

/// The host operations the node service needs. Implementations are blocking; the node
/// service runs them on the blocking pool.
pub trait HostOps: Send + Sync + 'static {
    /// What signature, if any, `device` carries.
    fn probe_signature(&self, device: &Path) -> Result<Signature, HostError>;
    /// Creates a filesystem on a device that has no signature.
    fn format(&self, device: &Path, fs_type: FsType) -> Result<(), HostError>;
    /// `mount -t fs_type -o options device target`.
    fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs_type: FsType,
        options: &[String],
    ) -> Result<(), HostError>;
    /// Binds `source` (a directory or a device node) onto `target`, read-only if asked.
    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), HostError>;
    /// Unmounts the topmost mount at `target`.
    fn unmount(&self, target: &Path) -> Result<(), HostError>;
    /// The mount table of this process's mount namespace.
    fn mounts(&self) -> Result<Vec<MountEntry>, HostError>;
    /// `path` as the mount table spells it (symlinks resolved); `path` itself if it cannot be.
    fn resolve(&self, path: &Path) -> PathBuf;
    /// The device number (major, minor) of a block device node.
    fn device_number(&self, device: &Path) -> Result<(u32, u32), HostError>;
    /// The size of a block device in bytes.
    fn device_size(&self, device: &Path) -> Result<u64, HostError>;
    /// Grows the filesystem on `device`, mounted at `mount_point`, to the device's size.
    fn resize_fs(
        &self,
        fs_type: FsType,
        device: &Path,
        mount_point: &Path,
    ) -> Result<(), HostError>;
    fn statvfs(&self, path: &Path) -> Result<FsStats, HostError>;
}

/// The real host: util-linux, e2fsprogs, xfsprogs, procfs and sysfs.
#[derive(Debug, Default)]
pub struct LinuxHost;

const MOUNTINFO: &str = "/proc/self/mountinfo";

/// The output of a command that ran.
struct Output {
    success: bool,
    code: Option<i32>,
    stdout: String,
    stderr: String,
    status: String,
}

fn run(program: &str, args: &[&OsStr]) -> Result<Output, HostError> {
    tracing::debug!(program, ?args, "running");
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(|source| HostError::Spawn {
            program: program.to_owned(),
            source,
        })?;
    Ok(Output {
        success: output.status.success(),
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        status: output.status.to_string(),
    })
}

fn command_line(program: &str, args: &[&OsStr]) -> String {
    let mut line = program.to_owned();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

/// Runs a command that must succeed.
fn run_checked(program: &str, args: &[&OsStr]) -> Result<Output, HostError> {
    let output = run(program, args)?;
    if output.success {
        Ok(output)
    } else {
        Err(HostError::Command {
            command: command_line(program, args),
            status: output.status,
            stderr: output.stderr,
        })
    }
}

/// Splits a Linux `dev_t` (glibc's encoding) into major and minor.
fn split_device_number(rdev: u64) -> (u32, u32) {
    let major = ((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff);
    let minor = (rdev & 0xff) | ((rdev >> 12) & !0xff);
    (
        u32::try_from(major).unwrap_or(u32::MAX),
        u32::try_from(minor).unwrap_or(u32::MAX),
    )
}

impl HostOps for LinuxHost {
    fn probe_signature(&self, device: &Path) -> Result<Signature, HostError> {
        let args = [
            OsStr::new("-p"),
            OsStr::new("-o"),
            OsStr::new("export"),
            device.as_os_str(),
        ];
        let output = run("blkid", &args)?;
        match output.code {
            Some(0) => Ok(mount::parse_blkid_export(&output.stdout)),
            // blkid(8): 2 means nothing was found.
            Some(2) => Ok(Signature::Empty),
            // 8: several signatures, ambivalent; certainly not blank.
            Some(8) => Ok(Signature::Other(format!(
                "several conflicting signatures ({})",
                output.stderr
            ))),
            _ => Err(HostError::Command {
                command: command_line("blkid", &args),
                status: output.status,
                stderr: output.stderr,
            }),
        }
    }

    fn format(&self, device: &Path, fs_type: FsType) -> Result<(), HostError> {
        match fs_type {
            // -F: a whole device rather than a partition is what we want.
            FsType::Ext4 => run_checked("mkfs.ext4", &[OsStr::new("-F"), device.as_os_str()]),
            // No -f: mkfs.xfs then refuses a device with a signature, a second guard.
            FsType::Xfs => run_checked("mkfs.xfs", &[device.as_os_str()]),
        }
        .map(drop)
    }

    fn mount(
        &self,
        device: &Path,
        target: &Path,
        fs_type: FsType,
        options: &[String],
    ) -> Result<(), HostError> {
        let joined = options.join(",");
        let mut args = vec![OsStr::new("-t"), OsStr::new(fs_type.as_str())];
        if !joined.is_empty() {
            args.push(OsStr::new("-o"));
            args.push(OsStr::new(&joined));
        }
        args.push(device.as_os_str());
        args.push(target.as_os_str());
        run_checked("mount", &args).map(drop)
    }

    fn bind_mount(&self, source: &Path, target: &Path, read_only: bool) -> Result<(), HostError> {
        run_checked(
            "mount",
            &[OsStr::new("--bind"), source.as_os_str(), target.as_os_str()],
        )?;
        if read_only {
            // A bind takes the source's flags; read-only needs a remount of the bind itself.
            if let Err(error) = run_checked(
                "mount",
                &[
                    OsStr::new("-o"),
                    OsStr::new("remount,bind,ro"),
                    target.as_os_str(),
                ],
            ) {
                if let Err(undo) = self.unmount(target) {
                    tracing::warn!(target = %target.display(), error = %undo, "cannot undo a bind that could not be made read-only");
                }
                return Err(error);
            }
        }
        Ok(())
    }

    fn unmount(&self, target: &Path) -> Result<(), HostError> {
        let args = [target.as_os_str()];
        let output = run("umount", &args)?;
        if output.success {
            return Ok(());
        }
        if output.stderr.contains("busy") {
            return Err(HostError::Busy {
                path: target.to_owned(),
                command: command_line("umount", &args),
                stderr: output.stderr,
            });
        }
        Err(HostError::Command {
            command: command_line("umount", &args),
            status: output.status,
            stderr: output.stderr,
        })
    }

    fn mounts(&self) -> Result<Vec<MountEntry>, HostError> {
        let text = std::fs::read(MOUNTINFO).map_err(|source| HostError::Read {
            path: MOUNTINFO.into(),
            source,
        })?;
        mount::parse_mountinfo(&text).map_err(|source| HostError::MountInfo {
            path: MOUNTINFO.into(),
            source,
        })
    }

    fn resolve(&self, path: &Path) -> PathBuf {
        std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
    }

    fn device_number(&self, device: &Path) -> Result<(u32, u32), HostError> {
        let metadata = std::fs::metadata(device).map_err(|source| HostError::Read {
            path: device.to_owned(),
            source,
        })?;
        Ok(split_device_number(metadata.rdev()))
    }

    fn device_size(&self, device: &Path) -> Result<u64, HostError> {
        // sysfs first: no privileges needed; `size` counts 512-byte sectors.
        let resolved = self.resolve(device);
        if let Some(name) = resolved.file_name() {
            let sysfs = Path::new("/sys/class/block").join(name).join("size");
            match std::fs::read_to_string(&sysfs) {
                Ok(text) => {
                    return text
                        .trim()
                        .parse::<u64>()
                        .ok()
                        .and_then(|sectors| sectors.checked_mul(512))
                        .ok_or(HostError::Size {
                            device: device.to_owned(),
                            text,
                        });
                }
                Err(error) if error.kind() == ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(HostError::Read {
                        path: sysfs,
                        source,
                    });
                }
            }
        }
        let output = run_checked("blockdev", &[OsStr::new("--getsize64"), device.as_os_str()])?;
        output.stdout.trim().parse().map_err(|_| HostError::Size {
            device: device.to_owned(),
            text: output.stdout,
        })
    }

    fn resize_fs(
        &self,
        fs_type: FsType,
        device: &Path,
        mount_point: &Path,
    ) -> Result<(), HostError> {
        match fs_type {
            // resize2fs grows a mounted ext4 online, given the device.
            FsType::Ext4 => run_checked("resize2fs", &[device.as_os_str()]),
            // xfs_growfs works on the mount point only.
            FsType::Xfs => run_checked("xfs_growfs", &[mount_point.as_os_str()]),
        }
        .map(drop)
    }

    fn statvfs(&self, path: &Path) -> Result<FsStats, HostError> {
        use std::os::unix::ffi::OsStrExt;
        let read_error = |source| HostError::Read {
            path: path.to_owned(),
            source,
        };
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|error| read_error(std::io::Error::new(ErrorKind::InvalidInput, error)))?;
        let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `c_path` is a NUL-terminated string that outlives the call, and `stats`
        // points to writable memory of the right size for the kernel to fill.
        let result = unsafe { libc::statvfs(c_path.as_ptr(), stats.as_mut_ptr()) };
        if result != 0 {
            return Err(read_error(std::io::Error::last_os_error()));
        }
        // SAFETY: statvfs returned 0, so it initialised the whole struct.
        let stats = unsafe { stats.assume_init() };
        #[allow(clippy::useless_conversion)] // the field widths differ between targets
        let (fragment, blocks, free, available, files, free_files) = (
            u64::from(stats.f_frsize),
            u64::from(stats.f_blocks),
            u64::from(stats.f_bfree),
            u64::from(stats.f_bavail),
            u64::from(stats.f_files),
            u64::from(stats.f_ffree),
        );
        Ok(FsStats {
            total_bytes: blocks.saturating_mul(fragment),
            available_bytes: available.saturating_mul(fragment),
            used_bytes: blocks.saturating_sub(free).saturating_mul(fragment),
            total_inodes: files,
            free_inodes: free_files,
            used_inodes: files.saturating_sub(free_files),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_numbers_split_like_glibc() {
        // makedev(43, 0) and makedev(259, 70000).
        assert_eq!(split_device_number(0x2b00), (43, 0));
        let big = (259u64 << 8) | (70000u64 & 0xff) | ((70000u64 & !0xff) << 12);
        assert_eq!(split_device_number(big), (259, 70000));
    }

    #[test]
    fn fs_types_default_to_ext4() {
        assert_eq!(FsType::parse(""), Some(FsType::Ext4));
        assert_eq!(FsType::parse("xfs"), Some(FsType::Xfs));
        assert_eq!(FsType::parse("btrfs"), None);
    }

    #[test]
    fn statvfs_and_mountinfo_work_without_privileges() {
        let host = LinuxHost;
        let stats = host.statvfs(Path::new("/")).expect("statvfs /");
        assert!(stats.total_bytes > 0);
        assert!(stats.used_bytes <= stats.total_bytes);
        let mounts = host.mounts().expect("mountinfo");
        assert!(
            mounts
                .iter()
                .any(|entry| entry.mount_point == Path::new("/"))
        );
        assert!(host.statvfs(Path::new("/definitely/not/here")).is_err());
    }
}
