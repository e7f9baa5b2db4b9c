//! Sans-IO parsers for what the node plugin reads from the host: the kernel's mount table
//! (`/proc/self/mountinfo`) and `blkid -p -o export` output.
//!
//! This module only parses bytes; it never runs a command or reads a file (see `host`).

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// One line of `/proc/self/mountinfo` (proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_id: u32,
    pub parent_id: u32,
    /// The `st_dev` of files on this mount: for a block-device filesystem, the device's
    /// major:minor; a bind mount shares it with the mount it was taken from.
    pub major: u32,
    pub minor: u32,
    /// The directory (or file) of the filesystem this mount shows; `/` unless a bind mount
    /// of something below the filesystem's root, e.g. `/nbd0` for a bind of `/dev/nbd0`.
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro`, `nosuid`, ...).
    pub mount_options: Vec<String>,
    pub fs_type: String,
    /// The mount source, e.g. `/dev/nbd0`; `none` or a name for pseudo filesystems.
    pub source: String,
    pub super_options: Vec<String>,
}

impl MountEntry {
    /// Whether this mount is read-only (per mount, as a bind remount sets it).
    pub fn read_only(&self) -> bool {
        self.mount_options.iter().any(|option| option == "ro")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("mountinfo line {line} is malformed: {reason}")]
pub struct MountInfoError {
    pub line: usize,
    pub reason: &'static str,
}

/// Parses the whole of `/proc/self/mountinfo`.
pub fn parse_mountinfo(text: &[u8]) -> Result<Vec<MountEntry>, MountInfoError> {
    text.split(|&byte| byte == b'\n')
        .enumerate()
        .filter(|(_, line)| !line.iter().all(u8::is_ascii_whitespace))
        .map(|(index, line)| {
            parse_line(line).map_err(|reason| MountInfoError {
                line: index + 1,
                reason,
            })
        })
        .collect()
}

fn parse_line(line: &[u8]) -> Result<MountEntry, &'static str> {
    let mut fields = line
        .split(|&byte| byte == b' ')
        .filter(|field| !field.is_empty());
    let mut next = |what: &'static str| fields.next().ok_or(what);
    let mount_id = number(next("no mount id")?).ok_or("bad mount id")?;
    let parent_id = number(next("no parent id")?).ok_or("bad parent id")?;
    let device = next("no major:minor")?;
    let (major, minor) = device
        .iter()
        .position(|&byte| byte == b':')
        .and_then(|colon| Some((number(&device[..colon])?, number(&device[colon + 1..])?)))
        .ok_or("bad major:minor")?;
    let root = path(next("no root")?);
    let mount_point = path(next("no mount point")?);
    let mount_options = options(next("no mount options")?);
    // Optional fields (`shared:1`, `master:2`, ...) up to the `-` separator.
    loop {
        if next("no `-` separator")? == b"-" {
            break;
        }
    }
    let fs_type = text(next("no filesystem type")?);
    let source = text(next("no mount source")?);
    // Old kernels may leave the super options out.
    let super_options = fields.next().map(options).unwrap_or_default();
    Ok(MountEntry {
        mount_id,
        parent_id,
        major,
        minor,
        root,
        mount_point,
        mount_options,
        fs_type,
        source,
        super_options,
    })
}

fn number(field: &[u8]) -> Option<u32> {
    std::str::from_utf8(field).ok()?.parse().ok()
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134`
/// backslash); a backslash not followed by three octal digits stays as it is.
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut index = 0;
    while index < field.len() {
        if field[index] == b'\\'
            && let Some(digits) = field.get(index + 1..index + 4)
            && digits.iter().all(|digit| (b'0'..=b'7').contains(digit))
        {
            let value = digits
                .iter()
                .fold(0u32, |value, digit| value * 8 + u32::from(digit - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                index += 4;
                continue;
            }
        }
        out.push(field[index]);
        index += 1;
    }
    out
}

fn path(field: &[u8]) -> PathBuf {
    PathBuf::from(OsString::from_vec(unescape(field)))
}

fn text(field: &[u8]) -> String {
    String::from_utf8_lossy(&unescape(field)).into_owned()
}

fn options(field: &[u8]) -> Vec<String> {
    text(field).split(',').map(str::to_owned).collect()
}

/// The last (topmost) mount at `mount_point`.
pub fn mount_at<'a>(mounts: &'a [MountEntry], mount_point: &Path) -> Option<&'a MountEntry> {
    mounts
        .iter()
        .rev()
        .find(|entry| entry.mount_point == mount_point)
}

/// What a device holds, as blkid's low-level probe sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signature {
    /// No signature at all: safe to format.
    Empty,
    /// A filesystem of this type (`ext4`, `xfs`, ...).
    Filesystem(String),
    /// Anything else (a partition table, LVM, RAID, LUKS, swap): never formatted over.
    Other(String),
}

impl std::fmt::Display for Signature {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Signature::Empty => formatter.write_str("no signature"),
            Signature::Filesystem(fs_type) => write!(formatter, "a {fs_type} filesystem"),
            Signature::Other(what) => formatter.write_str(what),
        }
    }
}

/// Parses `blkid -p -o export DEVICE` output of a probe that found something (exit 0).
pub fn parse_blkid_export(output: &str) -> Signature {
    let mut fs_type = None;
    let mut usage = None;
    let mut partition_table = None;
    for line in output.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        let value = unescape_blkid(value);
        match key.trim() {
            "TYPE" => fs_type = Some(value),
            "USAGE" => usage = Some(value),
            "PTTYPE" => partition_table = Some(value),
            _ => {}
        }
    }
    match (fs_type, usage, partition_table) {
        (Some(fs_type), Some(usage), _) if usage == "filesystem" => Signature::Filesystem(fs_type),
        (Some(fs_type), None, None) => Signature::Filesystem(fs_type),
        (Some(fs_type), Some(usage), _) => {
            Signature::Other(format!("a {fs_type} ({usage}) signature"))
        }
        (Some(fs_type), None, Some(table)) => Signature::Other(format!(
            "a {fs_type} signature and a {table} partition table"
        )),
        (None, _, Some(table)) => Signature::Other(format!("a {table} partition table")),
        // blkid said it found something but not what: treat it as taken.
        (None, _, None) => Signature::Other("an unidentified signature".to_owned()),
    }
}

/// blkid's export format backslash-escapes shell-special characters.
fn unescape_blkid(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.chars();
    while let Some(char) = chars.next() {
        if char == '\\'
            && let Some(escaped) = chars.next()
        {
            out.push(escaped);
            continue;
        }
        out.push(char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw,errors=remount-ro
25 22 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4010000k,mode=755
830 22 43:0 / /var/lib/kubelet/plugins/kubernetes.io/csi/blockgate.csi.io/abc/globalmount rw,relatime shared:400 - ext4 /dev/nbd0 rw
831 22 43:0 / /var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/pvc\\0401/mount ro,relatime shared:400 - ext4 /dev/nbd0 rw
840 22 0:5 /nbd1 /var/lib/kubelet/pods/uid/volumeDevices/kubernetes.io~csi/pvc-2 rw,nosuid master:2 - devtmpfs udev rw,mode=755
841 22 0:45 /data /srv/with\\011tab\\012newline\\134slash rw - tmpfs none rw
";

    #[test]
    fn mountinfo_lines_parse_with_escapes_and_bind_roots() {
        let mounts = parse_mountinfo(MOUNTINFO.as_bytes()).expect("parses");
        assert_eq!(mounts.len(), 6);
        let root = &mounts[0];
        assert_eq!(
            (root.mount_id, root.parent_id, root.major, root.minor),
            (22, 1, 8, 1)
        );
        assert_eq!(root.source, "/dev/sda1");
        assert_eq!(root.super_options, vec!["rw", "errors=remount-ro"]);

        let published = &mounts[3];
        assert_eq!(
            published.mount_point,
            Path::new("/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/pvc 1/mount")
        );
        assert!(published.read_only());
        assert!(!mounts[2].read_only());
        assert_eq!(
            (published.major, published.minor),
            (mounts[2].major, mounts[2].minor)
        );

        let block = &mounts[4];
        assert_eq!(block.root, Path::new("/nbd1"));
        assert_eq!(block.fs_type, "devtmpfs");
        assert_eq!(block.mount_options, vec!["rw", "nosuid"]);

        assert_eq!(
            mounts[5].mount_point,
            Path::new("/srv/with\ttab\nnewline\\slash")
        );
        assert_eq!(mounts[5].root, Path::new("/data"));
    }

    #[test]
    fn the_topmost_mount_at_a_path_wins() {
        let mut mounts = parse_mountinfo(MOUNTINFO.as_bytes()).expect("parses");
        let mut over = mounts[2].clone();
        over.mount_id = 900;
        over.source = "/dev/nbd7".into();
        mounts.push(over);
        let top = mount_at(
            &mounts,
            Path::new(
                "/var/lib/kubelet/plugins/kubernetes.io/csi/blockgate.csi.io/abc/globalmount",
            ),
        )
        .expect("mounted");
        assert_eq!(top.source, "/dev/nbd7");
        assert!(mount_at(&mounts, Path::new("/nowhere")).is_none());
    }

    #[test]
    fn malformed_mountinfo_is_an_error_naming_the_line() {
        let error = parse_mountinfo(
            b"22 1 8:1 / / rw shared:1 - ext4 /dev/sda1 rw\n23 22 x / /a rw - ext4 /dev/b rw\n",
        )
        .expect_err("bad major:minor");
        assert_eq!(error.line, 2);
        assert!(parse_mountinfo(b"22 1 8:1 / / rw shared:1 ext4 /dev/sda1 rw\n").is_err());
        assert_eq!(parse_mountinfo(b"\n").expect("empty"), vec![]);
    }

    #[test]
    fn escapes_that_are_not_octal_stay() {
        assert_eq!(unescape(b"a\\040b"), b"a b");
        assert_eq!(unescape(b"a\\09b\\"), b"a\\09b\\");
        assert_eq!(unescape(b"\\777"), b"\\777");
    }

    #[test]
    fn blkid_output_tells_filesystems_from_other_signatures() {
        assert_eq!(
            parse_blkid_export(
                "DEVNAME=/dev/nbd0\nUUID=1b2c\nVERSION=1.0\nBLOCK_SIZE=4096\nTYPE=ext4\nUSAGE=filesystem\n"
            ),
            Signature::Filesystem("ext4".into())
        );
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/nbd0\nTYPE=xfs\n"),
            Signature::Filesystem("xfs".into())
        );
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/nbd0\nPTUUID=abc\nPTTYPE=gpt\n"),
            Signature::Other("a gpt partition table".into())
        );
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/nbd0\nVERSION=2\nTYPE=crypto_LUKS\nUSAGE=crypto\n"),
            Signature::Other("a crypto_LUKS (crypto) signature".into())
        );
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/nbd0\nTYPE=swap\nUSAGE=other\n"),
            Signature::Other("a swap (other) signature".into())
        );
        assert_eq!(
            parse_blkid_export(
                "DEVNAME=/dev/nbd0\nLABEL=my\\ data\nTYPE=ext\\$4\nUSAGE=filesystem"
            ),
            Signature::Filesystem("ext$4".into())
        );
        assert_eq!(
            parse_blkid_export("DEVNAME=/dev/nbd0\n"),
            Signature::Other("an unidentified signature".into())
        );
    }
}
