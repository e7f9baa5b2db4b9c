//! Control of the Linux kernel's NBD driver through its generic-netlink family `nbd`
//! (`include/uapi/linux/nbd-netlink.h`): connect a device to sockets the caller serves,
//! reconfigure it with new sockets after a restart, disconnect it, read its status.
//!
//! Messages are built and parsed here without I/O (the encoders and [`parse`] work on byte
//! buffers and never panic on any input); [`NbdNetlink`] is the small blocking client that
//! sends them over a `NETLINK_GENERIC` socket. Nothing here shells out to `nbd-client`.
//!
//! Kernel semantics this relies on (`drivers/block/nbd.c`, Linux 5.10 to 6.12):
//! - `NBD_CMD_CONNECT` without `NBD_ATTR_INDEX` takes an unconfigured device or adds a new
//!   one, and answers with a message carrying `NBD_ATTR_INDEX` before the acknowledgement.
//!   With an index, a configured device is `EBUSY`. Size and sockets are required.
//! - `NBD_CMD_RECONFIGURE` needs a configured device (else `EINVAL`), the same backend
//!   identifier the device was connected with, and puts each socket in place of a dead
//!   connection; it also takes `NBD_ATTR_SIZE_BYTES` and resizes the device online.
//! - `NBD_CMD_STATUS` answers with one message holding `NBD_ATTR_DEVICE_LIST`; an unknown
//!   index gives an empty list.
//! - `NBD_CMD_DISCONNECT` of an unconfigured device succeeds; of an unknown index, `EINVAL`.
//!
//! Netlink attributes are in host byte order; this module is Linux-only in practice, and
//! builds anywhere (the client fails cleanly where netlink does not exist).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// The generic-netlink family the `nbd` module registers.
pub const FAMILY_NAME: &str = "nbd";
const FAMILY_VERSION: u8 = 1;

// linux/netlink.h
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLA_F_NESTED: u16 = 1 << 15;
const NLA_TYPE_MASK: u16 = !(NLA_F_NESTED | (1 << 14));
const HEADER_LEN: usize = 16;
const GENL_HEADER_LEN: usize = 4;

// linux/genetlink.h
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// linux/nbd-netlink.h
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_CMD_STATUS: u8 = 5;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_CLIENT_FLAGS: u16 = 6;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_ATTR_DEVICE_LIST: u16 = 9;
const NBD_ATTR_BACKEND_IDENTIFIER: u16 = 10;
const NBD_DEVICE_ITEM: u16 = 1;
const NBD_DEVICE_INDEX: u16 = 1;
const NBD_DEVICE_CONNECTED: u16 = 2;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// `NBD_CFLAG_DESTROY_ON_DISCONNECT`: the device goes away when disconnected.
pub const CLIENT_FLAG_DESTROY_ON_DISCONNECT: u64 = 1 << 0;
/// `NBD_CFLAG_DISCONNECT_ON_CLOSE`: disconnect when the last opener closes the device.
pub const CLIENT_FLAG_DISCONNECT_ON_CLOSE: u64 = 1 << 1;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("the kernel has no generic-netlink family \"nbd\": load the nbd module (modprobe nbd)")]
    NoNbdFamily,
    #[error("the kernel refused {operation}: {source}")]
    Refused {
        operation: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed netlink message: {0}")]
    Malformed(String),
    #[error("the kernel's reply to {0} lacks the expected attribute")]
    MissingAttribute(&'static str),
}

/// What to connect a device with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    /// A device index (`/dev/nbd<index>`), or `None` for the kernel to pick a free one.
    pub index: Option<u32>,
    pub size: u64,
    pub block_size: u64,
    /// The NBD transmission flags of the export (`NBD_FLAG_*`).
    pub server_flags: u64,
    pub client_flags: u64,
    /// Seconds before a request is timed out (0: the kernel's default).
    pub timeout_seconds: u64,
    /// Seconds the kernel keeps a device whose connections all died, waiting for a
    /// reconfigure with new sockets, before failing its requests.
    pub dead_connection_timeout_seconds: u64,
    /// One socket per connection (several for multi-queue).
    pub sockets: Vec<RawFd>,
    /// Shown in `/sys/block/nbdN/backend`; lets a restarted gateway find its devices.
    pub backend: Option<String>,
}

/// A device as `NBD_CMD_STATUS` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStatus {
    pub index: u32,
    /// The device has a configuration (`config_refs > 0` in the kernel): it is connected, or
    /// its connections died and it waits (up to the dead-connection timeout, and after it,
    /// failing requests) for a reconfigure or a disconnect. Not whether a socket is alive.
    pub connected: bool,
}

/// One netlink attribute being built.
struct Attributes {
    bytes: Vec<u8>,
}

impl Attributes {
    fn new() -> Attributes {
        Attributes { bytes: Vec::new() }
    }

    fn put(&mut self, kind: u16, payload: &[u8]) {
        let length = u16::try_from(4 + payload.len()).unwrap_or(u16::MAX);
        self.bytes.extend_from_slice(&length.to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(payload);
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn u32(&mut self, kind: u16, value: u32) {
        self.put(kind, &value.to_ne_bytes());
    }

    fn u64(&mut self, kind: u16, value: u64) {
        self.put(kind, &value.to_ne_bytes());
    }

    fn string(&mut self, kind: u16, value: &str) {
        let mut payload = value.as_bytes().to_vec();
        payload.push(0);
        self.put(kind, &payload);
    }

    fn nested(&mut self, kind: u16, inner: Attributes) {
        self.put(kind | NLA_F_NESTED, &inner.bytes);
    }
}

fn message(
    family: u16,
    flags: u16,
    seq: u32,
    command: u8,
    version: u8,
    attributes: Attributes,
) -> Vec<u8> {
    let length = HEADER_LEN + GENL_HEADER_LEN + attributes.bytes.len();
    let mut out = Vec::with_capacity(length);
    out.extend_from_slice(&u32::try_from(length).unwrap_or(u32::MAX).to_ne_bytes());
    out.extend_from_slice(&family.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(command);
    out.push(version);
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&attributes.bytes);
    out
}

/// `CTRL_CMD_GETFAMILY` for `name`.
pub fn encode_get_family(seq: u32, name: &str) -> Vec<u8> {
    let mut attributes = Attributes::new();
    attributes.string(CTRL_ATTR_FAMILY_NAME, name);
    message(
        GENL_ID_CTRL,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        CTRL_CMD_GETFAMILY,
        1,
        attributes,
    )
}

fn socket_list(sockets: &[RawFd]) -> Attributes {
    let mut list = Attributes::new();
    for socket in sockets {
        let mut item = Attributes::new();
        item.u32(NBD_SOCK_FD, u32::try_from(*socket).unwrap_or(u32::MAX));
        list.nested(NBD_SOCK_ITEM, item);
    }
    list
}

/// `NBD_CMD_CONNECT`.
pub fn encode_connect(family: u16, seq: u32, request: &ConnectRequest) -> Vec<u8> {
    let mut attributes = Attributes::new();
    if let Some(index) = request.index {
        attributes.u32(NBD_ATTR_INDEX, index);
    }
    attributes.u64(NBD_ATTR_SIZE_BYTES, request.size);
    attributes.u64(NBD_ATTR_BLOCK_SIZE_BYTES, request.block_size);
    attributes.u64(NBD_ATTR_SERVER_FLAGS, request.server_flags);
    attributes.u64(NBD_ATTR_CLIENT_FLAGS, request.client_flags);
    if request.timeout_seconds > 0 {
        attributes.u64(NBD_ATTR_TIMEOUT, request.timeout_seconds);
    }
    if request.dead_connection_timeout_seconds > 0 {
        attributes.u64(
            NBD_ATTR_DEAD_CONN_TIMEOUT,
            request.dead_connection_timeout_seconds,
        );
    }
    if let Some(backend) = &request.backend {
        attributes.string(NBD_ATTR_BACKEND_IDENTIFIER, backend);
    }
    attributes.nested(NBD_ATTR_SOCKETS, socket_list(&request.sockets));
    message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_CONNECT,
        FAMILY_VERSION,
        attributes,
    )
}

/// What to change of a connected device with `NBD_CMD_RECONFIGURE`.
///
/// Linux (since 5.10, `drivers/block/nbd.c`) refuses to reconfigure a device that was
/// connected with a backend identifier unless the same identifier is given again ("must
/// specify backend"), so `backend` must repeat what [`ConnectRequest::backend`] said.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconfigureRequest {
    pub index: u32,
    pub backend: Option<String>,
    /// A new size: the kernel resizes the device online (`nbd_genl_size_set`, then
    /// `set_capacity_and_notify`), so a mounted file system can grow into it.
    pub size: Option<u64>,
    /// Sockets replacing dead connections. The kernel puts each in the place of a connection
    /// marked dead and silently drops (closes) the rest when none is dead (`-ENOSPC`, which it
    /// reports as success).
    pub sockets: Vec<RawFd>,
}

/// `NBD_CMD_RECONFIGURE`: new sockets for dead connections, and/or a new size.
pub fn encode_reconfigure(family: u16, seq: u32, request: &ReconfigureRequest) -> Vec<u8> {
    let mut attributes = Attributes::new();
    attributes.u32(NBD_ATTR_INDEX, request.index);
    if let Some(backend) = &request.backend {
        attributes.string(NBD_ATTR_BACKEND_IDENTIFIER, backend);
    }
    if let Some(size) = request.size {
        attributes.u64(NBD_ATTR_SIZE_BYTES, size);
    }
    if !request.sockets.is_empty() {
        attributes.nested(NBD_ATTR_SOCKETS, socket_list(&request.sockets));
    }
    message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_RECONFIGURE,
        FAMILY_VERSION,
        attributes,
    )
}

/// `NBD_CMD_DISCONNECT`.
pub fn encode_disconnect(family: u16, seq: u32, index: u32) -> Vec<u8> {
    let mut attributes = Attributes::new();
    attributes.u32(NBD_ATTR_INDEX, index);
    message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_DISCONNECT,
        FAMILY_VERSION,
        attributes,
    )
}

/// `NBD_CMD_STATUS`, of one device or of all.
pub fn encode_status(family: u16, seq: u32, index: Option<u32>) -> Vec<u8> {
    let mut attributes = Attributes::new();
    if let Some(index) = index {
        attributes.u32(NBD_ATTR_INDEX, index);
    }
    message(
        family,
        NLM_F_REQUEST | NLM_F_ACK,
        seq,
        NBD_CMD_STATUS,
        FAMILY_VERSION,
        attributes,
    )
}

/// A parsed attribute: its type (without flags) and payload.
pub type Attribute = (u16, Vec<u8>);

/// One parsed netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// An error (negative errno) or, with 0, the acknowledgement of a request.
    Error {
        seq: u32,
        errno: i32,
    },
    Done {
        seq: u32,
    },
    /// A generic-netlink message: its command and top-level attributes.
    Generic {
        seq: u32,
        command: u8,
        attributes: Vec<Attribute>,
    },
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// The attributes in `bytes`, as (type without flags, payload).
pub fn parse_attributes(bytes: &[u8]) -> Result<Vec<Attribute>, NetlinkError> {
    let mut attributes = Vec::new();
    let mut at = 0;
    while at + 4 <= bytes.len() {
        let length = usize::from(read_u16(bytes, at).unwrap_or(0));
        let kind = read_u16(bytes, at + 2).unwrap_or(0) & NLA_TYPE_MASK;
        if length < 4 || at + length > bytes.len() {
            return Err(NetlinkError::Malformed(format!(
                "attribute of length {length} at {at} in {} bytes",
                bytes.len()
            )));
        }
        attributes.push((kind, bytes[at + 4..at + length].to_vec()));
        at += length.div_ceil(4) * 4;
    }
    Ok(attributes)
}

/// Every message in a datagram.
pub fn parse(datagram: &[u8]) -> Result<Vec<Message>, NetlinkError> {
    let mut messages = Vec::new();
    let mut at = 0;
    while at + HEADER_LEN <= datagram.len() {
        let length = usize::try_from(read_u32(datagram, at).unwrap_or(0)).unwrap_or(0);
        let kind = read_u16(datagram, at + 4).unwrap_or(0);
        let seq = read_u32(datagram, at + 8).unwrap_or(0);
        if length < HEADER_LEN || at + length > datagram.len() {
            return Err(NetlinkError::Malformed(format!(
                "message of length {length} at {at} in {} bytes",
                datagram.len()
            )));
        }
        let body = &datagram[at + HEADER_LEN..at + length];
        let parsed = match kind {
            NLMSG_ERROR => {
                let code = read_u32(body, 0)
                    .ok_or_else(|| NetlinkError::Malformed("short error message".to_string()))?;
                Message::Error {
                    seq,
                    errno: i32::from_ne_bytes(code.to_ne_bytes()),
                }
            }
            NLMSG_DONE => Message::Done { seq },
            _ => {
                if body.len() < GENL_HEADER_LEN {
                    return Err(NetlinkError::Malformed("short generic message".to_string()));
                }
                Message::Generic {
                    seq,
                    command: body[0],
                    attributes: parse_attributes(&body[GENL_HEADER_LEN..])?,
                }
            }
        };
        messages.push(parsed);
        at += length.div_ceil(4) * 4;
    }
    Ok(messages)
}

fn attribute(attributes: &[Attribute], kind: u16) -> Option<&[u8]> {
    attributes
        .iter()
        .find(|(k, _)| *k == kind)
        .map(|(_, payload)| payload.as_slice())
}

/// The devices in an `NBD_CMD_STATUS` reply's attributes.
pub fn parse_device_list(attributes: &[Attribute]) -> Result<Vec<DeviceStatus>, NetlinkError> {
    let Some(list) = attribute(attributes, NBD_ATTR_DEVICE_LIST) else {
        return Ok(Vec::new());
    };
    let mut devices = Vec::new();
    for (kind, item) in parse_attributes(list)? {
        if kind != NBD_DEVICE_ITEM {
            continue;
        }
        let fields = parse_attributes(&item)?;
        let index = attribute(&fields, NBD_DEVICE_INDEX)
            .and_then(|p| read_u32(p, 0))
            .ok_or(NetlinkError::MissingAttribute(
                "NBD_CMD_STATUS (device index)",
            ))?;
        let connected = attribute(&fields, NBD_DEVICE_CONNECTED)
            .and_then(|p| p.first().copied())
            .is_some_and(|c| c != 0);
        devices.push(DeviceStatus { index, connected });
    }
    Ok(devices)
}

/// A blocking client of the kernel's `nbd` generic-netlink family.
#[derive(Debug)]
pub struct NbdNetlink {
    socket: OwnedFd,
    family: u16,
    seq: u32,
}

impl NbdNetlink {
    /// Opens a netlink socket and resolves the `nbd` family.
    pub fn open() -> Result<NbdNetlink, NetlinkError> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(NetlinkError::Socket(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a descriptor we just created and own.
        let socket = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut client = NbdNetlink {
            socket,
            family: GENL_ID_CTRL,
            seq: 1,
        };
        let seq = client.next_seq();
        let replies = client
            .exchange(
                &encode_get_family(seq, FAMILY_NAME),
                "resolving the nbd family",
            )
            .map_err(|error| match error {
                NetlinkError::Refused { source, .. }
                    if source.raw_os_error() == Some(libc::ENOENT) =>
                {
                    NetlinkError::NoNbdFamily
                }
                other => other,
            })?;
        let family = replies
            .iter()
            .find_map(|attributes| attribute(attributes, CTRL_ATTR_FAMILY_ID))
            .and_then(|p| read_u16(p, 0))
            .ok_or(NetlinkError::MissingAttribute("CTRL_CMD_GETFAMILY"))?;
        client.family = family;
        Ok(client)
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// Sends one request and collects the attributes of its replies until the kernel
    /// acknowledges it (or refuses it).
    fn exchange(
        &mut self,
        request: &[u8],
        operation: &'static str,
    ) -> Result<Vec<Vec<Attribute>>, NetlinkError> {
        let seq = read_u32(request, 8).unwrap_or(0);
        // SAFETY: an all-zero sockaddr_nl is a valid value (the kernel as destination).
        let mut address: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        address.nl_family = u16::try_from(libc::AF_NETLINK).unwrap_or(16);
        // SAFETY: the buffer and address outlive the call; lengths match them.
        let sent = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
                std::ptr::from_ref(&address).cast(),
                u32::try_from(std::mem::size_of::<libc::sockaddr_nl>()).unwrap_or(12),
            )
        };
        if sent < 0 {
            return Err(NetlinkError::Socket(std::io::Error::last_os_error()));
        }
        let mut replies = Vec::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: `buffer` is valid for `buffer.len()` bytes for the duration of the call.
            let received = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if received < 0 {
                let error = std::io::Error::last_os_error();
                if error.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(NetlinkError::Socket(error));
            }
            let received = usize::try_from(received).unwrap_or(0);
            for message in parse(&buffer[..received])? {
                match message {
                    Message::Error { seq: s, errno } if s == seq => {
                        if errno == 0 {
                            return Ok(replies);
                        }
                        return Err(NetlinkError::Refused {
                            operation,
                            source: std::io::Error::from_raw_os_error(-errno),
                        });
                    }
                    Message::Done { seq: s } if s == seq => return Ok(replies),
                    Message::Generic {
                        seq: s, attributes, ..
                    } if s == seq => replies.push(attributes),
                    _ => {}
                }
            }
        }
    }

    /// Connects a device; returns its index (`/dev/nbd<index>`). The sockets stay open in
    /// this process too: close them once the kernel holds them, or keep them, as the caller
    /// prefers (the kernel holds its own references).
    pub fn connect(&mut self, request: &ConnectRequest) -> Result<u32, NetlinkError> {
        let seq = self.next_seq();
        let replies = self.exchange(
            &encode_connect(self.family, seq, request),
            "NBD_CMD_CONNECT",
        )?;
        replies
            .iter()
            .find_map(|attributes| attribute(attributes, NBD_ATTR_INDEX))
            .and_then(|p| read_u32(p, 0))
            .or(request.index)
            .ok_or(NetlinkError::MissingAttribute("NBD_CMD_CONNECT"))
    }

    /// Gives a device new sockets (after the process serving the old ones restarted), and/or
    /// a new size. The kernel accepts this only while the device is configured (connected,
    /// or waiting on dead connections): `EINVAL` otherwise.
    pub fn reconfigure(&mut self, request: &ReconfigureRequest) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        self.exchange(
            &encode_reconfigure(self.family, seq, request),
            "NBD_CMD_RECONFIGURE",
        )
        .map(|_| ())
    }

    /// Sets the size of a connected device online (a reconfigure with only the size).
    pub fn resize(
        &mut self,
        index: u32,
        backend: Option<&str>,
        size: u64,
    ) -> Result<(), NetlinkError> {
        self.reconfigure(&ReconfigureRequest {
            index,
            backend: backend.map(str::to_string),
            size: Some(size),
            sockets: Vec::new(),
        })
    }

    pub fn disconnect(&mut self, index: u32) -> Result<(), NetlinkError> {
        let seq = self.next_seq();
        self.exchange(
            &encode_disconnect(self.family, seq, index),
            "NBD_CMD_DISCONNECT",
        )
        .map(|_| ())
    }

    /// The status of one device, or of every device when `index` is `None`.
    pub fn status(&mut self, index: Option<u32>) -> Result<Vec<DeviceStatus>, NetlinkError> {
        let seq = self.next_seq();
        let replies = self.exchange(&encode_status(self.family, seq, index), "NBD_CMD_STATUS")?;
        let mut devices = Vec::new();
        for attributes in &replies {
            devices.extend(parse_device_list(attributes)?);
        }
        Ok(devices)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic_reply(seq: u32, command: u8, attributes: Attributes) -> Vec<u8> {
        message(0x20, 0, seq, command, 1, attributes)
    }

    #[test]
    fn connect_carries_every_attribute_and_the_sockets_nested() {
        let request = ConnectRequest {
            index: None,
            size: 1 << 30,
            block_size: 4096,
            server_flags: 0x1ed,
            client_flags: CLIENT_FLAG_DISCONNECT_ON_CLOSE,
            timeout_seconds: 30,
            dead_connection_timeout_seconds: 120,
            sockets: vec![7, 9],
            backend: Some("blockgate:vol".into()),
        };
        let bytes = encode_connect(0x22, 5, &request);
        assert_eq!(read_u32(&bytes, 0).unwrap() as usize, bytes.len());
        let messages = parse(&bytes).unwrap();
        let Message::Generic {
            seq,
            command,
            attributes,
        } = &messages[0]
        else {
            panic!("{messages:?}")
        };
        assert_eq!((*seq, *command), (5, NBD_CMD_CONNECT));
        let u64_of =
            |kind| u64::from_ne_bytes(attribute(attributes, kind).unwrap().try_into().unwrap());
        assert_eq!(u64_of(NBD_ATTR_SIZE_BYTES), 1 << 30);
        assert_eq!(u64_of(NBD_ATTR_BLOCK_SIZE_BYTES), 4096);
        assert_eq!(u64_of(NBD_ATTR_SERVER_FLAGS), 0x1ed);
        assert_eq!(u64_of(NBD_ATTR_DEAD_CONN_TIMEOUT), 120);
        assert!(
            attribute(attributes, NBD_ATTR_INDEX).is_none(),
            "the kernel picks"
        );
        assert_eq!(
            attribute(attributes, NBD_ATTR_BACKEND_IDENTIFIER).unwrap(),
            b"blockgate:vol\0"
        );
        let sockets = parse_attributes(attribute(attributes, NBD_ATTR_SOCKETS).unwrap()).unwrap();
        let fds: Vec<u32> = sockets
            .iter()
            .map(|(kind, item)| {
                assert_eq!(*kind, NBD_SOCK_ITEM);
                let fields = parse_attributes(item).unwrap();
                read_u32(attribute(&fields, NBD_SOCK_FD).unwrap(), 0).unwrap()
            })
            .collect();
        assert_eq!(fds, vec![7, 9]);
    }

    #[test]
    fn reconfigure_repeats_the_backend_and_may_resize() {
        let request = ReconfigureRequest {
            index: 3,
            backend: Some("blockgate:vol".into()),
            size: Some(2 << 30),
            sockets: vec![11],
        };
        let Message::Generic {
            command,
            attributes,
            ..
        } = &parse(&encode_reconfigure(0x22, 6, &request)).unwrap()[0]
        else {
            panic!()
        };
        assert_eq!(*command, NBD_CMD_RECONFIGURE);
        assert_eq!(
            read_u32(attribute(attributes, NBD_ATTR_INDEX).unwrap(), 0),
            Some(3)
        );
        assert_eq!(
            attribute(attributes, NBD_ATTR_BACKEND_IDENTIFIER).unwrap(),
            b"blockgate:vol\0"
        );
        assert_eq!(
            attribute(attributes, NBD_ATTR_SIZE_BYTES).unwrap(),
            (2u64 << 30).to_ne_bytes()
        );
        assert!(attribute(attributes, NBD_ATTR_SOCKETS).is_some());

        let resize_only = ReconfigureRequest {
            index: 3,
            size: Some(4096),
            ..ReconfigureRequest::default()
        };
        let Message::Generic { attributes, .. } =
            &parse(&encode_reconfigure(0x22, 7, &resize_only)).unwrap()[0]
        else {
            panic!()
        };
        assert!(
            attribute(attributes, NBD_ATTR_SOCKETS).is_none(),
            "no empty socket list"
        );
        assert!(attribute(attributes, NBD_ATTR_BACKEND_IDENTIFIER).is_none());
    }

    #[test]
    fn connect_reply_carries_the_index() {
        let mut top = Attributes::new();
        top.u32(NBD_ATTR_INDEX, 5);
        let reply = generic_reply(9, NBD_CMD_CONNECT, top);
        let Message::Generic { attributes, .. } = &parse(&reply).unwrap()[0] else {
            panic!()
        };
        assert_eq!(
            attribute(attributes, NBD_ATTR_INDEX).and_then(|p| read_u32(p, 0)),
            Some(5)
        );
    }

    #[test]
    fn status_replies_list_devices() {
        let mut device = Attributes::new();
        device.u32(NBD_DEVICE_INDEX, 3);
        device.put(NBD_DEVICE_CONNECTED, &[1]);
        let mut idle = Attributes::new();
        idle.u32(NBD_DEVICE_INDEX, 4);
        idle.put(NBD_DEVICE_CONNECTED, &[0]);
        let mut list = Attributes::new();
        list.nested(NBD_DEVICE_ITEM, device);
        list.nested(NBD_DEVICE_ITEM, idle);
        let mut top = Attributes::new();
        top.nested(NBD_ATTR_DEVICE_LIST, list);
        let reply = generic_reply(9, NBD_CMD_STATUS, top);
        let Message::Generic { attributes, .. } = &parse(&reply).unwrap()[0] else {
            panic!()
        };
        assert_eq!(
            parse_device_list(attributes).unwrap(),
            vec![
                DeviceStatus {
                    index: 3,
                    connected: true
                },
                DeviceStatus {
                    index: 4,
                    connected: false
                }
            ]
        );
    }

    #[test]
    fn errors_and_acks_parse() {
        let mut ack = Vec::new();
        ack.extend_from_slice(&36u32.to_ne_bytes());
        ack.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        ack.extend_from_slice(&0u16.to_ne_bytes());
        ack.extend_from_slice(&4u32.to_ne_bytes());
        ack.extend_from_slice(&0u32.to_ne_bytes());
        ack.extend_from_slice(&(-16i32).to_ne_bytes());
        ack.extend_from_slice(&[0; 16]);
        assert_eq!(
            parse(&ack).unwrap(),
            vec![Message::Error { seq: 4, errno: -16 }]
        );
    }

    #[test]
    fn garbage_is_an_error_never_a_panic() {
        for length in 0..64 {
            let junk: Vec<u8> = (0..length).map(|i| (i * 37 % 251) as u8).collect();
            let _ = parse(&junk);
            let _ = parse_attributes(&junk);
        }
        let mut lying = encode_disconnect(0x20, 1, 0);
        lying[0] = 200;
        assert!(parse(&lying).is_err());
        let mut bad_attribute = encode_disconnect(0x20, 1, 0);
        let at = HEADER_LEN + GENL_HEADER_LEN;
        bad_attribute[at] = 2;
        assert!(parse(&bad_attribute).is_err());
    }
}
