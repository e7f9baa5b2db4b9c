//! A small NBD client written from the protocol specification, independent of the gateway's
//! own `blockgate-nbd` crate: fixed newstyle handshake with `NBD_OPT_GO` or `NBD_OPT_LIST`, then
//! simple replies. Blocking, one request at a time, except that a test may send a request and
//! wait for its reply with a timeout (to prove that a write *waits*), and may write raw bytes
//! (to play a broken client).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_WRITE_ZEROES: u16 = 6;

/// NBD error values (the protocol's errno numbers).
pub const NBD_EIO: u32 = 5;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;

#[derive(Debug)]
pub enum NbdError {
    /// The connection failed or the server broke the protocol.
    Io(io::Error),
    /// The server answered the request with this NBD error value.
    Server(u32),
}

impl std::fmt::Display for NbdError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdError::Io(error) => write!(f, "connection error: {error}"),
            NbdError::Server(errno) => write!(f, "server replied with NBD error {errno}"),
        }
    }
}

impl std::error::Error for NbdError {}

impl From<io::Error> for NbdError {
    fn from(error: io::Error) -> Self {
        NbdError::Io(error)
    }
}

fn protocol(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// The header of a simple reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    pub error: u32,
    pub handle: u64,
}

/// One connection in the transmission phase on one export.
#[derive(Debug)]
pub struct NbdClient {
    stream: UnixStream,
    size: u64,
    transmission_flags: u16,
    next_handle: u64,
}

/// Reads the server greeting and sends the client flags.
fn greet(stream: &mut UnixStream) -> io::Result<()> {
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting)?;
    let magic = u64::from_be_bytes(greeting[0..8].try_into().expect("8 bytes"));
    let option_magic = u64::from_be_bytes(greeting[8..16].try_into().expect("8 bytes"));
    let flags = u16::from_be_bytes(greeting[16..18].try_into().expect("2 bytes"));
    if magic != NBDMAGIC || option_magic != IHAVEOPT {
        return Err(protocol(format!(
            "not a newstyle NBD server: {magic:#x} {option_magic:#x}"
        )));
    }
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("server does not offer fixed newstyle".to_string()));
    }
    let client_flags = u32::from(flags & (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
    stream.write_all(&client_flags.to_be_bytes())
}

fn send_option(stream: &mut UnixStream, option: u32, data: &[u8]) -> io::Result<()> {
    let mut message = Vec::with_capacity(16 + data.len());
    message.extend_from_slice(&IHAVEOPT.to_be_bytes());
    message.extend_from_slice(&option.to_be_bytes());
    let length = u32::try_from(data.len()).map_err(|_| protocol("option too long".into()))?;
    message.extend_from_slice(&length.to_be_bytes());
    message.extend_from_slice(data);
    stream.write_all(&message)
}

/// Reads one option reply: its type and data.
fn read_option_reply(stream: &mut UnixStream, option: u32) -> io::Result<(u32, Vec<u8>)> {
    let mut header = [0u8; 20];
    stream.read_exact(&mut header)?;
    let magic = u64::from_be_bytes(header[0..8].try_into().expect("8 bytes"));
    let replied_option = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
    let reply_type = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
    let length = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
    if magic != REPLY_MAGIC || replied_option != option {
        return Err(protocol(format!(
            "bad option reply: magic {magic:#x}, option {replied_option} (sent {option})"
        )));
    }
    if length > 1 << 20 {
        return Err(protocol(format!("option reply of {length} bytes")));
    }
    let mut data = vec![0u8; length as usize];
    stream.read_exact(&mut data)?;
    Ok((reply_type, data))
}

impl NbdClient {
    /// Connects to `export` on the gateway's unix socket with `NBD_OPT_GO`.
    pub fn connect(socket: &Path, export: &str) -> io::Result<NbdClient> {
        let mut stream = UnixStream::connect(socket)?;
        // No request of these tests should take this long; a hang becomes an error.
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        stream.set_write_timeout(Some(Duration::from_secs(120)))?;
        greet(&mut stream)?;
        let name = export.as_bytes();
        let mut data = Vec::new();
        data.extend_from_slice(
            &u32::try_from(name.len())
                .map_err(|_| protocol("export name too long".into()))?
                .to_be_bytes(),
        );
        data.extend_from_slice(name);
        data.extend_from_slice(&0u16.to_be_bytes());
        send_option(&mut stream, OPT_GO, &data)?;
        let mut export_info = None;
        loop {
            let (reply_type, data) = read_option_reply(&mut stream, OPT_GO)?;
            match reply_type {
                REP_ACK => break,
                REP_INFO if data.len() >= 2 => {
                    let info = u16::from_be_bytes([data[0], data[1]]);
                    if info == INFO_EXPORT && data.len() == 12 {
                        let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                        let flags = u16::from_be_bytes([data[10], data[11]]);
                        export_info = Some((size, flags));
                    }
                }
                error if error & REP_FLAG_ERROR != 0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!(
                            "NBD_OPT_GO {export:?} refused ({error:#x}): {}",
                            String::from_utf8_lossy(&data)
                        ),
                    ));
                }
                _ => {}
            }
        }
        let (size, transmission_flags) = export_info
            .ok_or_else(|| protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into()))?;
        Ok(NbdClient {
            stream,
            size,
            transmission_flags,
            next_handle: 1,
        })
    }

    /// The export names the server lists (`NBD_OPT_LIST`).
    pub fn list(socket: &Path) -> io::Result<Vec<String>> {
        let mut stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        greet(&mut stream)?;
        send_option(&mut stream, OPT_LIST, &[])?;
        let mut names = Vec::new();
        loop {
            let (reply_type, data) = read_option_reply(&mut stream, OPT_LIST)?;
            match reply_type {
                REP_ACK => break,
                REP_SERVER if data.len() >= 4 => {
                    let length = u32::from_be_bytes(data[0..4].try_into().expect("4 bytes"));
                    let name = data
                        .get(4..4 + length as usize)
                        .ok_or_else(|| protocol("export name overruns its reply".into()))?;
                    names.push(String::from_utf8_lossy(name).into_owned());
                }
                other => {
                    return Err(protocol(format!(
                        "unexpected NBD_OPT_LIST reply {other:#x}"
                    )));
                }
            }
        }
        send_option(&mut stream, OPT_ABORT, &[])?;
        Ok(names)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// Sends a request (with its payload for a write) without waiting for the reply.
    pub fn send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let mut request = Vec::with_capacity(28 + payload.len());
        request.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        request.extend_from_slice(&flags.to_be_bytes());
        request.extend_from_slice(&command.to_be_bytes());
        request.extend_from_slice(&handle.to_be_bytes());
        request.extend_from_slice(&offset.to_be_bytes());
        request.extend_from_slice(&length.to_be_bytes());
        request.extend_from_slice(payload);
        self.stream.write_all(&request)?;
        Ok(handle)
    }

    /// Waits up to `timeout` for the next reply header; `None` when none started arriving in
    /// that time (the request is still pending and its reply can be awaited again).
    pub fn wait_reply(&mut self, timeout: Duration) -> io::Result<Option<Reply>> {
        let mut header = [0u8; 16];
        self.stream.set_read_timeout(Some(timeout))?;
        let first = loop {
            match self.stream.read(&mut header) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed the connection",
                    ));
                }
                Ok(read) => break read,
                Err(error)
                    if matches!(
                        error.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    self.stream
                        .set_read_timeout(Some(Duration::from_secs(120)))?;
                    return Ok(None);
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        };
        // The rest of a reply that started arriving follows at once.
        self.stream
            .set_read_timeout(Some(Duration::from_secs(120)))?;
        self.stream.read_exact(&mut header[first..])?;
        let magic = u32::from_be_bytes(header[0..4].try_into().expect("4 bytes"));
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(protocol(format!("bad reply magic {magic:#x}")));
        }
        Ok(Some(Reply {
            error: u32::from_be_bytes(header[4..8].try_into().expect("4 bytes")),
            handle: u64::from_be_bytes(header[8..16].try_into().expect("8 bytes")),
        }))
    }

    /// Waits for the reply to `handle` (the only request in flight).
    fn reply(&mut self, handle: u64) -> Result<(), NbdError> {
        let reply = self
            .wait_reply(Duration::from_secs(120))?
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "no reply within 120 s"))?;
        if reply.handle != handle {
            return Err(NbdError::Io(protocol(format!(
                "reply for handle {} while waiting for {handle}",
                reply.handle
            ))));
        }
        if reply.error != 0 {
            return Err(NbdError::Server(reply.error));
        }
        Ok(())
    }

    /// Reads the payload of a successful read reply.
    pub fn read_payload(&mut self, length: u32) -> io::Result<Vec<u8>> {
        let mut data = vec![0u8; length as usize];
        self.stream.read_exact(&mut data)?;
        Ok(data)
    }

    pub fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, NbdError> {
        let handle = self.send(CMD_READ, 0, offset, length, &[])?;
        self.reply(handle)?;
        Ok(self.read_payload(length)?)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        let length = u32::try_from(data.len()).expect("write fits one request");
        let handle = self.send(CMD_WRITE, 0, offset, length, data)?;
        self.reply(handle)
    }

    pub fn write_zeroes(&mut self, offset: u64, length: u32) -> Result<(), NbdError> {
        let handle = self.send(CMD_WRITE_ZEROES, 0, offset, length, &[])?;
        self.reply(handle)
    }

    pub fn flush(&mut self) -> Result<(), NbdError> {
        let handle = self.send(CMD_FLUSH, 0, 0, 0, &[])?;
        self.reply(handle)
    }

    /// Writes raw bytes on the connection, bypassing the protocol.
    pub fn write_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// Ends the session politely (`NBD_CMD_DISC`).
    pub fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 0, 0, 0, &[]);
    }
}
