//! The NBD wire format, sans-IO: the protocol's constants and pure encoders and decoders over
//! byte buffers, server side (what a server sends and what it must parse).
//!
//! Decoders take whatever bytes have arrived so far and either decode one whole message, say
//! that more bytes are needed, or return a typed error. They never panic, whatever the input,
//! and never read past the buffer they are given. Encoders append to any [`BufMut`]; those that
//! take strings check them first and write nothing when they are not valid NBD strings.
//!
//! This module never does I/O and never decides policy (which export exists, which commands an
//! export allows): that belongs to the session in [`crate::server`].
//!
//! Names follow the protocol specification (`doc/proto.md` of the reference implementation),
//! so they can be looked up there; all integers are big-endian on the wire.

use bytes::BufMut;

// ---------------------------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------------------------

/// `NBDMAGIC`, the first eight bytes the server sends (`INIT_PASSWD`).
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle greeting's second magic, and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply in fixed newstyle negotiation.
pub const NBD_REP_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request (compact headers).
pub const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (never sent by this server: structured replies are not
/// negotiated).
pub const NBD_STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// ---------------------------------------------------------------------------------------------
// Handshake flags (16 bits, server) and client flags (32 bits)
// ---------------------------------------------------------------------------------------------

/// The server supports fixed newstyle negotiation.
pub const NBD_FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_NO_ZEROES: u16 = 1 << 1;

/// The client speaks fixed newstyle negotiation.
pub const NBD_FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client asks the server to omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const NBD_FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// The handshake flags this server sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 = NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES;

// ---------------------------------------------------------------------------------------------
// Transmission flags (16 bits)
// ---------------------------------------------------------------------------------------------

pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_RESIZE: u16 = 1 << 9;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------------
// Option types (32 bits)
// ---------------------------------------------------------------------------------------------

pub const NBD_OPT_EXPORT_NAME: u32 = 1;
pub const NBD_OPT_ABORT: u32 = 2;
pub const NBD_OPT_LIST: u32 = 3;
pub const NBD_OPT_PEEK_EXPORT: u32 = 4;
pub const NBD_OPT_STARTTLS: u32 = 5;
pub const NBD_OPT_INFO: u32 = 6;
pub const NBD_OPT_GO: u32 = 7;
pub const NBD_OPT_STRUCTURED_REPLY: u32 = 8;
pub const NBD_OPT_LIST_META_CONTEXT: u32 = 9;
pub const NBD_OPT_SET_META_CONTEXT: u32 = 10;
pub const NBD_OPT_EXTENDED_HEADERS: u32 = 11;

// ---------------------------------------------------------------------------------------------
// Option reply types (32 bits); errors have bit 31 set
// ---------------------------------------------------------------------------------------------

pub const NBD_REP_ACK: u32 = 1;
pub const NBD_REP_SERVER: u32 = 2;
pub const NBD_REP_INFO: u32 = 3;
pub const NBD_REP_META_CONTEXT: u32 = 4;
/// Bit 31: set on every error reply type.
pub const NBD_REP_FLAG_ERROR: u32 = 1 << 31;
pub const NBD_REP_ERR_UNSUP: u32 = NBD_REP_FLAG_ERROR | 1;
pub const NBD_REP_ERR_POLICY: u32 = NBD_REP_FLAG_ERROR | 2;
pub const NBD_REP_ERR_INVALID: u32 = NBD_REP_FLAG_ERROR | 3;
pub const NBD_REP_ERR_PLATFORM: u32 = NBD_REP_FLAG_ERROR | 4;
pub const NBD_REP_ERR_TLS_REQD: u32 = NBD_REP_FLAG_ERROR | 5;
pub const NBD_REP_ERR_UNKNOWN: u32 = NBD_REP_FLAG_ERROR | 6;
pub const NBD_REP_ERR_SHUTDOWN: u32 = NBD_REP_FLAG_ERROR | 7;
pub const NBD_REP_ERR_BLOCK_SIZE_REQD: u32 = NBD_REP_FLAG_ERROR | 8;
pub const NBD_REP_ERR_TOO_BIG: u32 = NBD_REP_FLAG_ERROR | 9;

// ---------------------------------------------------------------------------------------------
// Information types for NBD_OPT_INFO / NBD_OPT_GO (16 bits)
// ---------------------------------------------------------------------------------------------

pub const NBD_INFO_EXPORT: u16 = 0;
pub const NBD_INFO_NAME: u16 = 1;
pub const NBD_INFO_DESCRIPTION: u16 = 2;
pub const NBD_INFO_BLOCK_SIZE: u16 = 3;

// ---------------------------------------------------------------------------------------------
// Command types and command flags (16 bits each)
// ---------------------------------------------------------------------------------------------

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;
pub const NBD_CMD_TRIM: u16 = 4;
pub const NBD_CMD_CACHE: u16 = 5;
pub const NBD_CMD_WRITE_ZEROES: u16 = 6;
pub const NBD_CMD_BLOCK_STATUS: u16 = 7;
pub const NBD_CMD_RESIZE: u16 = 8;

pub const NBD_CMD_FLAG_FUA: u16 = 1 << 0;
pub const NBD_CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const NBD_CMD_FLAG_DF: u16 = 1 << 2;
pub const NBD_CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const NBD_CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Only meaningful with extended headers, which this server never negotiates.
pub const NBD_CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;
/// Every command flag the protocol defines.
pub const KNOWN_COMMAND_FLAGS: u16 = NBD_CMD_FLAG_FUA
    | NBD_CMD_FLAG_NO_HOLE
    | NBD_CMD_FLAG_DF
    | NBD_CMD_FLAG_REQ_ONE
    | NBD_CMD_FLAG_FAST_ZERO
    | NBD_CMD_FLAG_PAYLOAD_LEN;

// ---------------------------------------------------------------------------------------------
// Error values of the reply's error field (32 bits)
// ---------------------------------------------------------------------------------------------

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

// ---------------------------------------------------------------------------------------------
// Message sizes and limits
// ---------------------------------------------------------------------------------------------

/// `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub const SERVER_GREETING_LEN: usize = 18;
pub const CLIENT_FLAGS_LEN: usize = 4;
/// `IHAVEOPT`, option, payload length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Magic, option, reply type, payload length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Magic, command flags, type, cookie, offset, length.
pub const REQUEST_HEADER_LEN: usize = 28;
/// Magic, error, cookie.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// The reserved zeroes after the `NBD_OPT_EXPORT_NAME` reply, unless `NO_ZEROES` was agreed.
pub const EXPORT_NAME_REPLY_ZEROES: usize = 124;
/// The spec's hard limit for any string (export names, descriptions, error messages).
pub const MAX_STRING_LEN: usize = 4096;
/// The largest option payload this server reads; every option it understands fits in a small
/// fraction of it, so anything bigger is answered with `NBD_REP_ERR_TOO_BIG` after skipping it.
pub const MAX_OPTION_PAYLOAD: u32 = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Decoding results
// ---------------------------------------------------------------------------------------------

/// The result of decoding a variable-length message from the front of a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<T> {
    /// One whole message, taken from the first `consumed` bytes of the buffer.
    Complete { value: T, consumed: usize },
    /// The buffer holds only part of a message: at least `needed` bytes, counted from the
    /// start of the buffer, are required before decoding can make progress.
    Incomplete { needed: usize },
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    let bytes = buf.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes(bytes.try_into().ok()?))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    let bytes = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes(bytes.try_into().ok()?))
}

fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    let bytes = buf.get(at..at.checked_add(8)?)?;
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

// ---------------------------------------------------------------------------------------------
// Greeting and client flags
// ---------------------------------------------------------------------------------------------

/// Appends the newstyle greeting: `NBDMAGIC`, `IHAVEOPT` and the handshake flags.
pub fn encode_server_greeting(buf: &mut impl BufMut, handshake_flags: u16) {
    buf.put_u64(NBDMAGIC);
    buf.put_u64(IHAVEOPT);
    buf.put_u16(handshake_flags);
}

/// The client's answer to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    pub fixed_newstyle: bool,
    pub no_zeroes: bool,
}

/// The client flags are not acceptable; the spec requires the server to drop the connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("client flags {flags:#010x} include bits this server did not offer")]
pub struct UnknownClientFlags {
    pub flags: u32,
}

/// Decodes the 32-bit client flags; `Ok(None)` until four bytes are there.
pub fn decode_client_flags(buf: &[u8]) -> Result<Option<ClientFlags>, UnknownClientFlags> {
    let Some(flags) = read_u32(buf, 0) else {
        return Ok(None);
    };
    if flags & !(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES) != 0 {
        return Err(UnknownClientFlags { flags });
    }
    Ok(Some(ClientFlags {
        fixed_newstyle: flags & NBD_FLAG_C_FIXED_NEWSTYLE != 0,
        no_zeroes: flags & NBD_FLAG_C_NO_ZEROES != 0,
    }))
}

// ---------------------------------------------------------------------------------------------
// Options
// ---------------------------------------------------------------------------------------------

/// An option whose framing could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionFrameError {
    /// Not an option at all: the stream cannot be resynchronised, so the session must end.
    #[error("option magic {magic:#018x} is not IHAVEOPT")]
    BadMagic { magic: u64 },
    /// Well framed but larger than the limit: the session may skip
    /// [`OptionFrameError::skip_len`] bytes and answer `NBD_REP_ERR_TOO_BIG`.
    #[error("option {option} carries {length} bytes, more than the {limit} accepted")]
    TooLarge {
        option: u32,
        length: u32,
        limit: u32,
    },
}

impl OptionFrameError {
    /// For [`OptionFrameError::TooLarge`], how many bytes (header included) the whole option
    /// takes on the wire.
    pub fn skip_len(&self) -> Option<u64> {
        match self {
            OptionFrameError::BadMagic { .. } => None,
            OptionFrameError::TooLarge { length, .. } => {
                Some(OPTION_HEADER_LEN as u64 + u64::from(*length))
            }
        }
    }
}

/// One option request: its code and what it asked for, or why its payload is invalid (which the
/// server answers with `NBD_REP_ERR_INVALID` and carries on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionRequest {
    pub option: u32,
    pub parsed: Result<ClientOption, InvalidOption>,
}

/// The options this server understands; everything else is [`ClientOption::Unsupported`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME`: enter transmission on this export, no error reply possible.
    ExportName { name: String },
    /// `NBD_OPT_ABORT` (any payload is ignored, as the spec asks).
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_INFO`.
    Info(ExportQuery),
    /// `NBD_OPT_GO`.
    Go(ExportQuery),
    /// Any other option, known to the protocol or not (`NBD_OPT_STARTTLS`,
    /// `NBD_OPT_STRUCTURED_REPLY`, metadata contexts, ...): answered with `NBD_REP_ERR_UNSUP`.
    Unsupported,
}

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportQuery {
    /// Export name; empty for the default export.
    pub name: String,
    /// `NBD_INFO_*` items the client asked for, unknown ones included (the server ignores them).
    pub info_requests: Vec<u16>,
}

impl ExportQuery {
    pub fn requests(&self, info: u16) -> bool {
        self.info_requests.contains(&info)
    }
}

/// Why an option's payload is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidOption {
    #[error("option takes no data but {length} bytes were sent")]
    UnexpectedData { length: usize },
    #[error("option data is truncated")]
    Truncated,
    #[error("option data has {extra} bytes after its last field")]
    TrailingData { extra: usize },
    #[error("string of {length} bytes is longer than the {MAX_STRING_LEN} allowed")]
    StringTooLong { length: usize },
    #[error("string is not valid UTF-8")]
    StringNotUtf8,
    #[error("string contains a NUL character")]
    StringContainsNul,
}

fn parse_string(bytes: &[u8]) -> Result<String, InvalidOption> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(InvalidOption::StringTooLong {
            length: bytes.len(),
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|_| InvalidOption::StringNotUtf8)?;
    if text.contains('\0') {
        return Err(InvalidOption::StringContainsNul);
    }
    Ok(text.to_owned())
}

fn parse_export_query(payload: &[u8]) -> Result<ExportQuery, InvalidOption> {
    let name_len = read_u32(payload, 0).ok_or(InvalidOption::Truncated)?;
    let name_len = usize::try_from(name_len).map_err(|_| InvalidOption::Truncated)?;
    let name_end = 4usize
        .checked_add(name_len)
        .ok_or(InvalidOption::Truncated)?;
    let name_bytes = payload.get(4..name_end).ok_or(InvalidOption::Truncated)?;
    let count = read_u16(payload, name_end).ok_or(InvalidOption::Truncated)?;
    let list_start = name_end + 2;
    let list_len = usize::from(count) * 2;
    let rest = payload.get(list_start..).ok_or(InvalidOption::Truncated)?;
    if rest.len() < list_len {
        return Err(InvalidOption::Truncated);
    }
    if rest.len() > list_len {
        return Err(InvalidOption::TrailingData {
            extra: rest.len() - list_len,
        });
    }
    let name = parse_string(name_bytes)?;
    let info_requests = rest
        .chunks_exact(2)
        .map(|pair| u16::from_be_bytes([pair[0], pair[1]]))
        .collect();
    Ok(ExportQuery {
        name,
        info_requests,
    })
}

/// Parses an option's payload (the bytes after its 16-byte header).
pub fn parse_option(option: u32, payload: &[u8]) -> Result<ClientOption, InvalidOption> {
    match option {
        NBD_OPT_EXPORT_NAME => Ok(ClientOption::ExportName {
            name: parse_string(payload)?,
        }),
        NBD_OPT_ABORT => Ok(ClientOption::Abort),
        NBD_OPT_LIST if payload.is_empty() => Ok(ClientOption::List),
        NBD_OPT_LIST => Err(InvalidOption::UnexpectedData {
            length: payload.len(),
        }),
        NBD_OPT_INFO => parse_export_query(payload).map(ClientOption::Info),
        NBD_OPT_GO => parse_export_query(payload).map(ClientOption::Go),
        _ => Ok(ClientOption::Unsupported),
    }
}

/// Decodes one option (header and payload) from the front of `buf`, refusing payloads larger
/// than `max_payload` before they are read.
pub fn decode_option(
    buf: &[u8],
    max_payload: u32,
) -> Result<Decoded<OptionRequest>, OptionFrameError> {
    let Some(magic) = read_u64(buf, 0) else {
        return Ok(Decoded::Incomplete {
            needed: OPTION_HEADER_LEN,
        });
    };
    if magic != IHAVEOPT {
        return Err(OptionFrameError::BadMagic { magic });
    }
    let (Some(option), Some(length)) = (read_u32(buf, 8), read_u32(buf, 12)) else {
        return Ok(Decoded::Incomplete {
            needed: OPTION_HEADER_LEN,
        });
    };
    let too_large = OptionFrameError::TooLarge {
        option,
        length,
        limit: max_payload,
    };
    if length > max_payload {
        return Err(too_large);
    }
    // Only a 16-bit target could fail here; the payload is then too large for it anyway.
    let total = usize::try_from(length)
        .ok()
        .and_then(|length| OPTION_HEADER_LEN.checked_add(length))
        .ok_or(too_large)?;
    let Some(payload) = buf.get(OPTION_HEADER_LEN..total) else {
        return Ok(Decoded::Incomplete { needed: total });
    };
    Ok(Decoded::Complete {
        value: OptionRequest {
            option,
            parsed: parse_option(option, payload),
        },
        consumed: total,
    })
}

// ---------------------------------------------------------------------------------------------
// Option replies
// ---------------------------------------------------------------------------------------------

/// A string the server was asked to send is not a valid NBD string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("string of {length} bytes is longer than the {MAX_STRING_LEN} allowed")]
    StringTooLong { length: usize },
    #[error("string contains a NUL character")]
    StringContainsNul,
}

/// Checks that `text` is a valid NBD string and returns its length for a length field.
fn string_len(text: &str) -> Result<u32, EncodeError> {
    if text.contains('\0') {
        return Err(EncodeError::StringContainsNul);
    }
    match u32::try_from(text.len()) {
        Ok(length) if text.len() <= MAX_STRING_LEN => Ok(length),
        _ => Err(EncodeError::StringTooLong { length: text.len() }),
    }
}

/// Appends an option reply header; `length` bytes of reply data must follow.
pub fn encode_option_reply_header(buf: &mut impl BufMut, option: u32, reply: u32, length: u32) {
    buf.put_u64(NBD_REP_MAGIC);
    buf.put_u32(option);
    buf.put_u32(reply);
    buf.put_u32(length);
}

/// Appends `NBD_REP_ACK`.
pub fn encode_option_ack(buf: &mut impl BufMut, option: u32) {
    encode_option_reply_header(buf, option, NBD_REP_ACK, 0);
}

/// Appends an error reply (`reply` should have [`NBD_REP_FLAG_ERROR`] set) with an optional
/// human-readable message.
pub fn encode_option_error(
    buf: &mut impl BufMut,
    option: u32,
    reply: u32,
    message: &str,
) -> Result<(), EncodeError> {
    let length = string_len(message)?;
    encode_option_reply_header(buf, option, reply, length);
    buf.put_slice(message.as_bytes());
    Ok(())
}

/// Appends `NBD_REP_SERVER` for `NBD_OPT_LIST`: the export name, then its description as the
/// optional human-readable details.
pub fn encode_option_server(
    buf: &mut impl BufMut,
    option: u32,
    name: &str,
    description: &str,
) -> Result<(), EncodeError> {
    let name_len = string_len(name)?;
    let description_len = string_len(description)?;
    // Both strings are at most 4096 bytes, so this cannot overflow.
    encode_option_reply_header(buf, option, NBD_REP_SERVER, 4 + name_len + description_len);
    buf.put_u32(name_len);
    buf.put_slice(name.as_bytes());
    buf.put_slice(description.as_bytes());
    Ok(())
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_EXPORT`: export size and transmission flags.
pub fn encode_info_export(buf: &mut impl BufMut, option: u32, size: u64, transmission_flags: u16) {
    encode_option_reply_header(buf, option, NBD_REP_INFO, 12);
    buf.put_u16(NBD_INFO_EXPORT);
    buf.put_u64(size);
    buf.put_u16(transmission_flags);
}

fn encode_info_string(
    buf: &mut impl BufMut,
    option: u32,
    info: u16,
    text: &str,
) -> Result<(), EncodeError> {
    let length = string_len(text)?;
    encode_option_reply_header(buf, option, NBD_REP_INFO, 2 + length);
    buf.put_u16(info);
    buf.put_slice(text.as_bytes());
    Ok(())
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_NAME`: the export's canonical name.
pub fn encode_info_name(buf: &mut impl BufMut, option: u32, name: &str) -> Result<(), EncodeError> {
    encode_info_string(buf, option, NBD_INFO_NAME, name)
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_DESCRIPTION`.
pub fn encode_info_description(
    buf: &mut impl BufMut,
    option: u32,
    description: &str,
) -> Result<(), EncodeError> {
    encode_info_string(buf, option, NBD_INFO_DESCRIPTION, description)
}

/// Appends `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block size.
pub fn encode_info_block_size(
    buf: &mut impl BufMut,
    option: u32,
    minimum: u32,
    preferred: u32,
    maximum: u32,
) {
    encode_option_reply_header(buf, option, NBD_REP_INFO, 14);
    buf.put_u16(NBD_INFO_BLOCK_SIZE);
    buf.put_u32(minimum);
    buf.put_u32(preferred);
    buf.put_u32(maximum);
}

/// Appends the reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and, unless the client
/// negotiated `NBD_FLAG_C_NO_ZEROES`, 124 reserved zero bytes.
pub fn encode_export_name_reply(
    buf: &mut impl BufMut,
    size: u64,
    transmission_flags: u16,
    no_zeroes: bool,
) {
    buf.put_u64(size);
    buf.put_u16(transmission_flags);
    if !no_zeroes {
        buf.put_bytes(0, EXPORT_NAME_REPLY_ZEROES);
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission requests
// ---------------------------------------------------------------------------------------------

/// The request header's magic is wrong: the stream cannot be resynchronised, so the session
/// must end.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request magic {magic:#010x} is not NBD_REQUEST_MAGIC")]
pub struct BadRequestMagic {
    pub magic: u32,
}

/// The raw fields of a 28-byte request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    /// Opaque to the server (the spec's "handle"); echoed in the reply.
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

impl RequestHeader {
    /// How many payload bytes follow this header on the wire: `length` for `NBD_CMD_WRITE`
    /// (whatever its flags), nothing for any other command, known or not.
    pub fn payload_len(&self) -> u32 {
        if self.command == NBD_CMD_WRITE {
            self.length
        } else {
            0
        }
    }
}

/// Commands defined by the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
    Resize,
}

impl Command {
    pub fn from_wire(command: u16) -> Option<Command> {
        Some(match command {
            NBD_CMD_READ => Command::Read,
            NBD_CMD_WRITE => Command::Write,
            NBD_CMD_DISC => Command::Disc,
            NBD_CMD_FLUSH => Command::Flush,
            NBD_CMD_TRIM => Command::Trim,
            NBD_CMD_CACHE => Command::Cache,
            NBD_CMD_WRITE_ZEROES => Command::WriteZeroes,
            NBD_CMD_BLOCK_STATUS => Command::BlockStatus,
            NBD_CMD_RESIZE => Command::Resize,
            _ => return None,
        })
    }

    pub fn to_wire(self) -> u16 {
        match self {
            Command::Read => NBD_CMD_READ,
            Command::Write => NBD_CMD_WRITE,
            Command::Disc => NBD_CMD_DISC,
            Command::Flush => NBD_CMD_FLUSH,
            Command::Trim => NBD_CMD_TRIM,
            Command::Cache => NBD_CMD_CACHE,
            Command::WriteZeroes => NBD_CMD_WRITE_ZEROES,
            Command::BlockStatus => NBD_CMD_BLOCK_STATUS,
            Command::Resize => NBD_CMD_RESIZE,
        }
    }

    /// The command flags the spec documents as applicable to this command. `FUA` is valid on
    /// every command (when negotiated); `PAYLOAD_LEN` only with extended headers, which this
    /// server never negotiates, so it applies to none.
    pub fn applicable_flags(self) -> u16 {
        NBD_CMD_FLAG_FUA
            | match self {
                Command::Read => NBD_CMD_FLAG_DF,
                Command::WriteZeroes => NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO,
                Command::BlockStatus => NBD_CMD_FLAG_REQ_ONE,
                Command::Write
                | Command::Disc
                | Command::Flush
                | Command::Trim
                | Command::Cache
                | Command::Resize => 0,
            }
    }
}

/// The command flags of a request, already checked against the command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommandFlags(u16);

impl CommandFlags {
    pub fn bits(self) -> u16 {
        self.0
    }
    pub fn fua(self) -> bool {
        self.0 & NBD_CMD_FLAG_FUA != 0
    }
    pub fn no_hole(self) -> bool {
        self.0 & NBD_CMD_FLAG_NO_HOLE != 0
    }
    pub fn df(self) -> bool {
        self.0 & NBD_CMD_FLAG_DF != 0
    }
    pub fn req_one(self) -> bool {
        self.0 & NBD_CMD_FLAG_REQ_ONE != 0
    }
    pub fn fast_zero(self) -> bool {
        self.0 & NBD_CMD_FLAG_FAST_ZERO != 0
    }
}

/// A well-formed request: a known command with flags that apply to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub command: Command,
    pub flags: CommandFlags,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// A request the server must answer with `NBD_EINVAL` (and carry on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("unknown command {command}")]
    UnknownCommand { command: u16 },
    #[error("unknown command flags {flags:#06x}")]
    UnknownFlags { flags: u16 },
    #[error("command flags {flags:#06x} do not apply to {command:?}")]
    FlagNotApplicable { command: Command, flags: u16 },
}

impl RequestError {
    /// The error value to reply with.
    pub fn nbd_error(&self) -> u32 {
        NBD_EINVAL
    }
}

/// A decoded request header: the raw fields (always available, for the cookie and payload
/// length) and the typed request or why it cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestFrame {
    pub header: RequestHeader,
    pub request: Result<Request, RequestError>,
}

/// Decodes the 28-byte request header at the front of `buf` (the `NBD_CMD_WRITE` payload, if
/// any, follows it: see [`RequestHeader::payload_len`]). `Ok(None)` until 28 bytes are there.
pub fn decode_request(buf: &[u8]) -> Result<Option<RequestFrame>, BadRequestMagic> {
    let Some(magic) = read_u32(buf, 0) else {
        return Ok(None);
    };
    if magic != NBD_REQUEST_MAGIC {
        return Err(BadRequestMagic { magic });
    }
    let (Some(flags), Some(command), Some(cookie), Some(offset), Some(length)) = (
        read_u16(buf, 4),
        read_u16(buf, 6),
        read_u64(buf, 8),
        read_u64(buf, 16),
        read_u32(buf, 24),
    ) else {
        return Ok(None);
    };
    let header = RequestHeader {
        flags,
        command,
        cookie,
        offset,
        length,
    };
    Ok(Some(RequestFrame {
        header,
        request: check_request(&header),
    }))
}

fn check_request(header: &RequestHeader) -> Result<Request, RequestError> {
    let command = Command::from_wire(header.command).ok_or(RequestError::UnknownCommand {
        command: header.command,
    })?;
    let unknown = header.flags & !KNOWN_COMMAND_FLAGS;
    if unknown != 0 {
        return Err(RequestError::UnknownFlags { flags: unknown });
    }
    let misplaced = header.flags & !command.applicable_flags();
    if misplaced != 0 {
        return Err(RequestError::FlagNotApplicable {
            command,
            flags: misplaced,
        });
    }
    Ok(Request {
        command,
        flags: CommandFlags(header.flags),
        cookie: header.cookie,
        offset: header.offset,
        length: header.length,
    })
}

// ---------------------------------------------------------------------------------------------
// Simple replies
// ---------------------------------------------------------------------------------------------

/// Appends a simple reply header; for a successful `NBD_CMD_READ` the data follows it.
pub fn encode_simple_reply(buf: &mut impl BufMut, error: u32, cookie: u64) {
    buf.put_u32(NBD_SIMPLE_REPLY_MAGIC);
    buf.put_u32(error);
    buf.put_u64(cookie);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The client side of a request header, written independently of the decoder.
    fn request_bytes(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&command.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        out
    }

    fn option_bytes(option: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn query_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&u16::try_from(infos.len()).unwrap().to_be_bytes());
        for info in infos {
            out.extend_from_slice(&info.to_be_bytes());
        }
        out
    }

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_flags() {
        let mut buf = Vec::new();
        encode_server_greeting(&mut buf, SERVER_HANDSHAKE_FLAGS);
        assert_eq!(buf.len(), SERVER_GREETING_LEN);
        assert_eq!(&buf[..8], b"NBDMAGIC");
        assert_eq!(&buf[8..16], b"IHAVEOPT");
        assert_eq!(&buf[16..], &[0, 3]);
    }

    #[test]
    fn client_flags_decode_and_reject_unknown_bits() {
        assert_eq!(decode_client_flags(&[0, 0, 0]), Ok(None));
        assert_eq!(
            decode_client_flags(&[0, 0, 0, 3]),
            Ok(Some(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: true
            }))
        );
        assert_eq!(
            decode_client_flags(&[0, 0, 0, 1]),
            Ok(Some(ClientFlags {
                fixed_newstyle: true,
                no_zeroes: false
            }))
        );
        assert_eq!(
            decode_client_flags(&[0x80, 0, 0, 1]),
            Err(UnknownClientFlags { flags: 0x8000_0001 })
        );
    }

    #[test]
    fn option_needs_header_then_payload() {
        let bytes = option_bytes(NBD_OPT_EXPORT_NAME, b"vol");
        for cut in 0..OPTION_HEADER_LEN {
            assert_eq!(
                decode_option(&bytes[..cut], MAX_OPTION_PAYLOAD),
                Ok(Decoded::Incomplete {
                    needed: OPTION_HEADER_LEN
                })
            );
        }
        for cut in OPTION_HEADER_LEN..bytes.len() {
            assert_eq!(
                decode_option(&bytes[..cut], MAX_OPTION_PAYLOAD),
                Ok(Decoded::Incomplete { needed: 19 })
            );
        }
        let mut with_next = bytes.clone();
        with_next.extend_from_slice(b"next option");
        assert_eq!(
            decode_option(&with_next, MAX_OPTION_PAYLOAD),
            Ok(Decoded::Complete {
                value: OptionRequest {
                    option: NBD_OPT_EXPORT_NAME,
                    parsed: Ok(ClientOption::ExportName {
                        name: "vol".to_owned()
                    }),
                },
                consumed: 19,
            })
        );
    }

    #[test]
    fn option_with_bad_magic_is_fatal() {
        let mut bytes = option_bytes(NBD_OPT_LIST, b"");
        bytes[0] ^= 0xff;
        assert!(matches!(
            decode_option(&bytes, MAX_OPTION_PAYLOAD),
            Err(OptionFrameError::BadMagic { .. })
        ));
    }

    #[test]
    fn oversized_option_is_refused_before_its_payload_arrives() {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&IHAVEOPT.to_be_bytes());
        bytes.extend_from_slice(&NBD_OPT_GO.to_be_bytes());
        bytes.extend_from_slice(&u32::MAX.to_be_bytes());
        let err = decode_option(&bytes, MAX_OPTION_PAYLOAD).unwrap_err();
        assert_eq!(
            err,
            OptionFrameError::TooLarge {
                option: NBD_OPT_GO,
                length: u32::MAX,
                limit: MAX_OPTION_PAYLOAD
            }
        );
        assert_eq!(err.skip_len(), Some(16 + u64::from(u32::MAX)));
        // A limit of u32::MAX accepts the header and asks for the (huge) rest without overflow.
        assert_eq!(
            decode_option(&bytes, u32::MAX),
            Ok(Decoded::Incomplete {
                needed: 16 + usize::try_from(u32::MAX).unwrap()
            })
        );
    }

    #[test]
    fn go_and_info_payloads_parse() {
        let payload = query_payload(b"disk", &[NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, 77]);
        let expected = ExportQuery {
            name: "disk".to_owned(),
            info_requests: vec![NBD_INFO_BLOCK_SIZE, NBD_INFO_NAME, 77],
        };
        assert_eq!(
            parse_option(NBD_OPT_GO, &payload),
            Ok(ClientOption::Go(expected.clone()))
        );
        assert_eq!(
            parse_option(NBD_OPT_INFO, &payload),
            Ok(ClientOption::Info(expected))
        );
        assert_eq!(
            parse_option(NBD_OPT_GO, &query_payload(b"", &[])),
            Ok(ClientOption::Go(ExportQuery {
                name: String::new(),
                info_requests: vec![]
            }))
        );
    }

    #[test]
    fn malformed_go_payloads_are_invalid_not_fatal() {
        // Name length larger than the payload.
        let mut payload = query_payload(b"disk", &[]);
        payload[3] = 200;
        assert_eq!(
            parse_option(NBD_OPT_GO, &payload),
            Err(InvalidOption::Truncated)
        );
        // Name length near u32::MAX must not overflow.
        let mut payload = query_payload(b"disk", &[]);
        payload[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_option(NBD_OPT_GO, &payload),
            Err(InvalidOption::Truncated)
        );
        // Fewer info requests than announced, and more bytes than announced.
        let mut payload = query_payload(b"disk", &[1, 2]);
        payload.pop();
        assert_eq!(
            parse_option(NBD_OPT_INFO, &payload),
            Err(InvalidOption::Truncated)
        );
        let mut payload = query_payload(b"disk", &[1]);
        payload.push(0);
        assert_eq!(
            parse_option(NBD_OPT_INFO, &payload),
            Err(InvalidOption::TrailingData { extra: 1 })
        );
        assert_eq!(
            parse_option(NBD_OPT_GO, &[0, 0]),
            Err(InvalidOption::Truncated)
        );
        assert_eq!(
            parse_option(NBD_OPT_GO, &query_payload(&[0xff, 0xfe], &[])),
            Err(InvalidOption::StringNotUtf8)
        );
        assert_eq!(
            parse_option(NBD_OPT_GO, &query_payload(b"a\0b", &[])),
            Err(InvalidOption::StringContainsNul)
        );
        assert_eq!(
            parse_option(NBD_OPT_EXPORT_NAME, &[b'x'; MAX_STRING_LEN + 1]),
            Err(InvalidOption::StringTooLong {
                length: MAX_STRING_LEN + 1
            })
        );
    }

    #[test]
    fn list_abort_and_unknown_options() {
        assert_eq!(parse_option(NBD_OPT_LIST, b""), Ok(ClientOption::List));
        assert_eq!(
            parse_option(NBD_OPT_LIST, b"x"),
            Err(InvalidOption::UnexpectedData { length: 1 })
        );
        assert_eq!(
            parse_option(NBD_OPT_ABORT, b"ignored"),
            Ok(ClientOption::Abort)
        );
        for option in [
            NBD_OPT_PEEK_EXPORT,
            NBD_OPT_STARTTLS,
            NBD_OPT_STRUCTURED_REPLY,
            NBD_OPT_LIST_META_CONTEXT,
            NBD_OPT_SET_META_CONTEXT,
            NBD_OPT_EXTENDED_HEADERS,
            0,
            12345,
            u32::MAX,
        ] {
            assert_eq!(parse_option(option, b"any"), Ok(ClientOption::Unsupported));
        }
    }

    #[test]
    fn option_replies_have_the_documented_layout() {
        let mut buf = Vec::new();
        encode_option_ack(&mut buf, NBD_OPT_ABORT);
        assert_eq!(buf.len(), OPTION_REPLY_HEADER_LEN);
        assert_eq!(buf[..8], NBD_REP_MAGIC.to_be_bytes());
        assert_eq!(buf[8..12], NBD_OPT_ABORT.to_be_bytes());
        assert_eq!(buf[12..16], NBD_REP_ACK.to_be_bytes());
        assert_eq!(buf[16..20], [0, 0, 0, 0]);

        let mut buf = Vec::new();
        encode_option_server(&mut buf, NBD_OPT_LIST, "vol", "a volume").unwrap();
        assert_eq!(buf[12..16], NBD_REP_SERVER.to_be_bytes());
        assert_eq!(buf[16..20], 15u32.to_be_bytes());
        assert_eq!(buf[20..24], 3u32.to_be_bytes());
        assert_eq!(&buf[24..], b"vola volume");

        let mut buf = Vec::new();
        encode_info_export(&mut buf, NBD_OPT_GO, 1 << 40, 0x0105);
        assert_eq!(buf[12..16], NBD_REP_INFO.to_be_bytes());
        assert_eq!(buf[16..20], 12u32.to_be_bytes());
        assert_eq!(buf[20..22], NBD_INFO_EXPORT.to_be_bytes());
        assert_eq!(buf[22..30], (1u64 << 40).to_be_bytes());
        assert_eq!(buf[30..32], 0x0105u16.to_be_bytes());

        let mut buf = Vec::new();
        encode_info_block_size(&mut buf, NBD_OPT_INFO, 512, 4096, 1 << 25);
        assert_eq!(buf[16..20], 14u32.to_be_bytes());
        assert_eq!(buf[20..22], NBD_INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(buf[22..26], 512u32.to_be_bytes());
        assert_eq!(buf[26..30], 4096u32.to_be_bytes());
        assert_eq!(buf[30..34], (1u32 << 25).to_be_bytes());

        let mut buf = Vec::new();
        encode_info_name(&mut buf, NBD_OPT_GO, "vol").unwrap();
        encode_info_description(&mut buf, NBD_OPT_GO, "d").unwrap();
        assert_eq!(buf[16..20], 5u32.to_be_bytes());
        assert_eq!(buf[20..22], NBD_INFO_NAME.to_be_bytes());
        assert_eq!(&buf[22..25], b"vol");
        assert_eq!(buf[25 + 16..25 + 20], 3u32.to_be_bytes());
        assert_eq!(buf[25 + 20..25 + 22], NBD_INFO_DESCRIPTION.to_be_bytes());

        let mut buf = Vec::new();
        encode_option_error(&mut buf, NBD_OPT_GO, NBD_REP_ERR_UNKNOWN, "no such export").unwrap();
        assert_eq!(buf[12..16], (0x8000_0006u32).to_be_bytes());
        assert_eq!(&buf[20..], b"no such export");
    }

    #[test]
    fn invalid_strings_are_not_encoded() {
        let mut buf = Vec::new();
        let long = "x".repeat(MAX_STRING_LEN + 1);
        assert_eq!(
            encode_info_name(&mut buf, NBD_OPT_GO, &long),
            Err(EncodeError::StringTooLong {
                length: MAX_STRING_LEN + 1
            })
        );
        assert_eq!(
            encode_option_server(&mut buf, NBD_OPT_LIST, "ok", "bad\0"),
            Err(EncodeError::StringContainsNul)
        );
        assert_eq!(
            encode_option_error(&mut buf, NBD_OPT_LIST, NBD_REP_ERR_INVALID, &long),
            Err(EncodeError::StringTooLong {
                length: MAX_STRING_LEN + 1
            })
        );
        assert!(buf.is_empty(), "nothing is written for an invalid string");
        let longest = "y".repeat(MAX_STRING_LEN);
        encode_option_server(&mut buf, NBD_OPT_LIST, &longest, &longest).unwrap();
        assert_eq!(buf.len(), OPTION_REPLY_HEADER_LEN + 4 + 2 * MAX_STRING_LEN);
    }

    #[test]
    fn export_name_reply_honours_no_zeroes() {
        let mut buf = Vec::new();
        encode_export_name_reply(&mut buf, 4096, 0x3, false);
        assert_eq!(buf.len(), 8 + 2 + EXPORT_NAME_REPLY_ZEROES);
        assert!(buf[10..].iter().all(|b| *b == 0));
        let mut buf = Vec::new();
        encode_export_name_reply(&mut buf, 4096, 0x3, true);
        assert_eq!(buf, [0, 0, 0, 0, 0, 0, 0x10, 0, 0, 3]);
    }

    #[test]
    fn request_round_trips() {
        let bytes = request_bytes(NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, 0xdead_beef, 1 << 33, 4096);
        for cut in 0..REQUEST_HEADER_LEN {
            assert_eq!(decode_request(&bytes[..cut]), Ok(None));
        }
        let frame = decode_request(&bytes).unwrap().unwrap();
        assert_eq!(frame.header.payload_len(), 4096);
        let request = frame.request.unwrap();
        assert_eq!(request.command, Command::Write);
        assert!(request.flags.fua());
        assert_eq!(request.cookie, 0xdead_beef);
        assert_eq!(request.offset, 1 << 33);
        assert_eq!(request.length, 4096);
    }

    #[test]
    fn request_errors_are_per_request() {
        let frame = decode_request(&request_bytes(0, 99, 7, 0, 512))
            .unwrap()
            .unwrap();
        assert_eq!(
            frame.request,
            Err(RequestError::UnknownCommand { command: 99 })
        );
        assert_eq!(frame.header.payload_len(), 0);
        assert_eq!(frame.header.cookie, 7);

        let frame = decode_request(&request_bytes(1 << 9, NBD_CMD_WRITE, 8, 0, 512))
            .unwrap()
            .unwrap();
        assert_eq!(
            frame.request,
            Err(RequestError::UnknownFlags { flags: 1 << 9 })
        );
        // The payload of a rejected write is still on the wire.
        assert_eq!(frame.header.payload_len(), 512);

        let frame = decode_request(&request_bytes(
            NBD_CMD_FLAG_NO_HOLE,
            NBD_CMD_WRITE,
            9,
            0,
            512,
        ))
        .unwrap()
        .unwrap();
        assert_eq!(
            frame.request,
            Err(RequestError::FlagNotApplicable {
                command: Command::Write,
                flags: NBD_CMD_FLAG_NO_HOLE
            })
        );
        for flags in [
            NBD_CMD_FLAG_FUA,
            NBD_CMD_FLAG_NO_HOLE,
            NBD_CMD_FLAG_FAST_ZERO,
        ] {
            let frame = decode_request(&request_bytes(flags, NBD_CMD_WRITE_ZEROES, 1, 0, 512))
                .unwrap()
                .unwrap();
            assert!(frame.request.is_ok());
        }
        // FUA applies to every command, as the spec requires servers to accept it.
        let frame = decode_request(&request_bytes(NBD_CMD_FLAG_FUA, NBD_CMD_READ, 1, 0, 512))
            .unwrap()
            .unwrap();
        assert!(frame.request.is_ok());
    }

    #[test]
    fn bad_request_magic_is_reported() {
        let mut bytes = request_bytes(0, NBD_CMD_READ, 1, 0, 512);
        bytes[..4].copy_from_slice(b"GET ");
        assert_eq!(
            decode_request(&bytes),
            Err(BadRequestMagic {
                magic: u32::from_be_bytes(*b"GET ")
            })
        );
        // Even a partial header with a wrong magic is already fatal.
        assert!(decode_request(&bytes[..4]).is_err());
    }

    #[test]
    fn simple_reply_layout() {
        let mut buf = Vec::new();
        encode_simple_reply(&mut buf, NBD_ENOSPC, 0x0102_0304_0506_0708);
        assert_eq!(buf.len(), SIMPLE_REPLY_LEN);
        assert_eq!(buf[..4], NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(buf[4..8], 28u32.to_be_bytes());
        assert_eq!(buf[8..], [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn command_codes_round_trip() {
        for code in 0..=u16::MAX {
            if let Some(command) = Command::from_wire(code) {
                assert_eq!(command.to_wire(), code);
            }
        }
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_the_decoders(bytes in proptest::collection::vec(any::<u8>(), 0..512), limit in any::<u32>()) {
            let _ = decode_client_flags(&bytes);
            let _ = decode_request(&bytes);
            let _ = decode_option(&bytes, limit);
            for option in [NBD_OPT_EXPORT_NAME, NBD_OPT_ABORT, NBD_OPT_LIST, NBD_OPT_INFO, NBD_OPT_GO] {
                let _ = parse_option(option, &bytes);
            }
        }

        #[test]
        fn options_with_a_valid_header_never_panic(option in any::<u32>(), payload in proptest::collection::vec(any::<u8>(), 0..256)) {
            let bytes = option_bytes(option, &payload);
            match decode_option(&bytes, MAX_OPTION_PAYLOAD) {
                Ok(Decoded::Complete { value, consumed }) => {
                    prop_assert_eq!(consumed, bytes.len());
                    prop_assert_eq!(value.option, option);
                }
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }

        #[test]
        fn requests_round_trip(flags in any::<u16>(), command in any::<u16>(), cookie in any::<u64>(), offset in any::<u64>(), length in any::<u32>()) {
            let frame = decode_request(&request_bytes(flags, command, cookie, offset, length)).unwrap().unwrap();
            prop_assert_eq!(frame.header, RequestHeader { flags, command, cookie, offset, length });
            if let Ok(request) = frame.request {
                prop_assert_eq!(request.command.to_wire(), command);
                prop_assert_eq!(request.flags.bits(), flags);
                prop_assert_eq!(request.flags.bits() & !request.command.applicable_flags(), 0);
            }
        }

        #[test]
        fn go_queries_round_trip(name in "[a-z0-9/_-]{0,64}", infos in proptest::collection::vec(any::<u16>(), 0..16)) {
            let payload = query_payload(name.as_bytes(), &infos);
            prop_assert_eq!(
                parse_option(NBD_OPT_GO, &payload),
                Ok(ClientOption::Go(ExportQuery { name, info_requests: infos }))
            );
        }
    }
}
