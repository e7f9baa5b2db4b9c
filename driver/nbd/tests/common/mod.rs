//! Test fixtures: an in-memory block device and export catalogue, and a minimal NBD client
//! written from the spec independently of the crate's own encoders.

#![allow(dead_code)] // each test binary uses a different part of this module
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use blockgate_nbd::{BlockDevice, ExportInfo, Exports, IoError, ServeOptions, SessionError};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

// The protocol's numbers, spelled out here rather than taken from the crate under test.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const FLAG_FUA: u16 = 1;
pub const FLAG_NO_HOLE: u16 = 2;

pub const FLAG_HAS_FLAGS: u16 = 1;
pub const FLAG_READ_ONLY: u16 = 2;
pub const FLAG_SEND_FLUSH: u16 = 4;
pub const FLAG_SEND_FUA: u16 = 8;
pub const FLAG_SEND_TRIM: u16 = 32;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 64;
pub const FLAG_CAN_MULTI_CONN: u16 = 256;

pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

/// An export description with typical defaults: 1 MiB, 512-byte sectors, 4 KiB preferred,
/// 1 MiB maximum, every feature on.
pub fn export_info(name: &str, size: u64) -> ExportInfo {
    ExportInfo {
        name: name.to_owned(),
        description: format!("test export {name}"),
        size,
        read_only: false,
        min_block: 512,
        preferred_block: 4096,
        max_block: 1 << 20,
        can_flush: true,
        can_fua: true,
        can_trim: true,
        can_write_zeroes: true,
        can_multi_conn: true,
    }
}

/// Holds device calls at one offset until the test releases them.
#[derive(Debug)]
pub struct Gate {
    offset: u64,
    entered: Semaphore,
    released: Semaphore,
}

impl Gate {
    pub fn at(offset: u64) -> Arc<Gate> {
        Arc::new(Gate {
            offset,
            entered: Semaphore::new(0),
            released: Semaphore::new(0),
        })
    }

    /// Waits until a device call is being held at the gate.
    pub async fn entered(&self) {
        self.entered.acquire().await.unwrap().forget();
    }

    pub fn release(&self) {
        self.released.add_permits(1);
    }

    async fn pass(&self, offset: u64) {
        if offset == self.offset {
            self.entered.add_permits(1);
            self.released.acquire().await.unwrap().forget();
        }
    }
}

#[derive(Debug, Default)]
pub struct Counters {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub fua: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub no_hole: AtomicU64,
}

impl Counters {
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::SeqCst)
    }
}

/// A block device in memory: a `Vec<u8>` under a mutex, with counters, gates and faults.
#[derive(Debug)]
pub struct MemoryDevice {
    info: Mutex<ExportInfo>,
    data: Mutex<Vec<u8>>,
    pub counters: Counters,
    read_gate: Mutex<Option<Arc<Gate>>>,
    write_gate: Mutex<Option<Arc<Gate>>>,
    fail_writes_with_no_space: AtomicBool,
    short_reads: AtomicBool,
    panic_on_flush: AtomicBool,
    /// One permit per read that reached the device.
    reads_started: Semaphore,
}

impl MemoryDevice {
    pub fn new(info: ExportInfo) -> Arc<MemoryDevice> {
        let size = usize::try_from(info.size).unwrap();
        Arc::new(MemoryDevice {
            info: Mutex::new(info),
            data: Mutex::new(vec![0; size]),
            counters: Counters::default(),
            read_gate: Mutex::new(None),
            write_gate: Mutex::new(None),
            fail_writes_with_no_space: AtomicBool::new(false),
            short_reads: AtomicBool::new(false),
            panic_on_flush: AtomicBool::new(false),
            reads_started: Semaphore::new(0),
        })
    }

    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().unwrap().clone()
    }

    pub fn fill(&self, offset: usize, bytes: &[u8]) {
        self.data.lock().unwrap()[offset..offset + bytes.len()].copy_from_slice(bytes);
    }

    pub fn grow(&self, size: u64) {
        self.data
            .lock()
            .unwrap()
            .resize(usize::try_from(size).unwrap(), 0);
        self.info.lock().unwrap().size = size;
    }

    pub fn hold_reads(&self, gate: &Arc<Gate>) {
        *self.read_gate.lock().unwrap() = Some(Arc::clone(gate));
    }

    pub fn hold_writes(&self, gate: &Arc<Gate>) {
        *self.write_gate.lock().unwrap() = Some(Arc::clone(gate));
    }

    pub fn fail_writes_with_no_space(&self) {
        self.fail_writes_with_no_space.store(true, Ordering::SeqCst);
    }

    pub fn return_short_reads(&self) {
        self.short_reads.store(true, Ordering::SeqCst);
    }

    /// Waits until `count` more reads have reached the device.
    pub async fn reads_started(&self, count: u32) {
        self.reads_started
            .acquire_many(count)
            .await
            .unwrap()
            .forget();
    }

    pub fn panic_on_flush(&self) {
        self.panic_on_flush.store(true, Ordering::SeqCst);
    }

    fn range(&self, offset: u64, length: u32) -> Result<std::ops::Range<usize>, IoError> {
        let start = usize::try_from(offset).map_err(|e| IoError::Invalid(e.to_string()))?;
        let end = start + usize::try_from(length).unwrap();
        if end > self.data.lock().unwrap().len() {
            // The session must never let this through.
            return Err(IoError::Invalid(format!("{start}..{end} is out of range")));
        }
        Ok(start..end)
    }
}

#[async_trait]
impl BlockDevice for MemoryDevice {
    fn info(&self) -> ExportInfo {
        self.info.lock().unwrap().clone()
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, IoError> {
        self.counters.reads.fetch_add(1, Ordering::SeqCst);
        self.reads_started.add_permits(1);
        let gate = self.read_gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.pass(offset).await;
        }
        let range = self.range(offset, length)?;
        let mut data = self.data.lock().unwrap()[range].to_vec();
        if self.short_reads.load(Ordering::SeqCst) {
            data.pop();
        }
        Ok(Bytes::from(data))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), IoError> {
        self.counters.writes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.counters.fua.fetch_add(1, Ordering::SeqCst);
        }
        let gate = self.write_gate.lock().unwrap().clone();
        if let Some(gate) = gate {
            gate.pass(offset).await;
        }
        if self.fail_writes_with_no_space.load(Ordering::SeqCst) {
            return Err(IoError::NoSpace("write log full".into()));
        }
        let range = self.range(offset, u32::try_from(data.len()).unwrap())?;
        self.data.lock().unwrap()[range].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), IoError> {
        if self.panic_on_flush.load(Ordering::SeqCst) {
            panic!("flush exploded");
        }
        self.counters.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u32, fua: bool) -> Result<(), IoError> {
        self.counters.trims.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.counters.fua.fetch_add(1, Ordering::SeqCst);
        }
        // Trimmed ranges read back as zeroes here, which the spec allows.
        let range = self.range(offset, length)?;
        self.data.lock().unwrap()[range].fill(0);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
    ) -> Result<(), IoError> {
        self.counters.zeroes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.counters.fua.fetch_add(1, Ordering::SeqCst);
        }
        if no_hole {
            self.counters.no_hole.fetch_add(1, Ordering::SeqCst);
        }
        let range = self.range(offset, length)?;
        self.data.lock().unwrap()[range].fill(0);
        Ok(())
    }
}

/// Exports backed by memory devices; the first one is also the default export "".
#[derive(Debug)]
pub struct MemoryExports {
    pub devices: Vec<Arc<MemoryDevice>>,
}

impl MemoryExports {
    pub fn new(devices: Vec<Arc<MemoryDevice>>) -> Arc<MemoryExports> {
        Arc::new(MemoryExports { devices })
    }

    pub fn single(info: ExportInfo) -> (Arc<MemoryExports>, Arc<MemoryDevice>) {
        let device = MemoryDevice::new(info);
        (MemoryExports::new(vec![Arc::clone(&device)]), device)
    }
}

#[async_trait]
impl Exports for MemoryExports {
    async fn list(&self) -> Vec<ExportInfo> {
        self.devices.iter().map(|device| device.info()).collect()
    }

    async fn open(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        let device = if name.is_empty() {
            self.devices.first()
        } else {
            self.devices
                .iter()
                .find(|device| device.info().name == name)
        }?;
        Some(Arc::clone(device) as Arc<dyn BlockDevice>)
    }
}

/// Starts a session over an in-memory duplex; returns the client's end and the session task.
pub fn start_session(
    exports: Arc<MemoryExports>,
    options: ServeOptions,
) -> (DuplexStream, JoinHandle<Result<(), SessionError>>) {
    let (client, server) = tokio::io::duplex(4 << 20);
    let session =
        tokio::spawn(async move { blockgate_nbd::serve(server, exports, &options).await });
    (client, session)
}

/// Upper bound for anything a test waits on; a hang fails the test instead of stalling CI.
pub const DEADLINE: Duration = Duration::from_secs(20);

pub async fn finished(session: JoinHandle<Result<(), SessionError>>) -> Result<(), SessionError> {
    tokio::time::timeout(DEADLINE, session)
        .await
        .expect("session did not end")
        .expect("session task panicked")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub reply: u32,
    pub data: Vec<u8>,
}

impl OptionReply {
    pub fn info_type(&self) -> u16 {
        u16::from_be_bytes([self.data[0], self.data[1]])
    }
}

/// A minimal NBD client over any stream.
#[derive(Debug)]
pub struct Client<S> {
    pub stream: S,
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> Client<S> {
    /// Reads the greeting and returns the handshake flags.
    pub async fn greet(stream: S) -> (Client<S>, u16) {
        let mut client = Client { stream };
        assert_eq!(client.u64().await, NBDMAGIC);
        assert_eq!(client.u64().await, IHAVEOPT);
        let flags = client.u16().await;
        (client, flags)
    }

    /// Greets and answers with fixed newstyle and no-zeroes.
    pub async fn fixed_newstyle(stream: S) -> Client<S> {
        let (mut client, flags) = Client::greet(stream).await;
        assert_eq!(flags, 0b11, "server offers FIXED_NEWSTYLE and NO_ZEROES");
        client.send_flags(0b11).await;
        client
    }

    /// Handshake with NBD_OPT_GO on `name`; returns (size, transmission flags).
    pub async fn connect(stream: S, name: &str) -> (Client<S>, u64, u16) {
        let mut client = Client::fixed_newstyle(stream).await;
        let replies = client.query(OPT_GO, name, &[INFO_BLOCK_SIZE]).await;
        let last = replies.last().unwrap();
        assert_eq!(last.reply, REP_ACK, "{replies:?}");
        let export = replies
            .iter()
            .find(|reply| reply.reply == REP_INFO && reply.info_type() == INFO_EXPORT)
            .expect("NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(export.data[2..10].try_into().unwrap());
        let flags = u16::from_be_bytes(export.data[10..12].try_into().unwrap());
        (client, size, flags)
    }

    pub async fn u16(&mut self) -> u16 {
        self.stream.read_u16().await.unwrap()
    }

    pub async fn u32(&mut self) -> u32 {
        self.stream.read_u32().await.unwrap()
    }

    pub async fn u64(&mut self) -> u64 {
        self.stream.read_u64().await.unwrap()
    }

    pub async fn bytes(&mut self, length: usize) -> Vec<u8> {
        let mut out = vec![0; length];
        self.stream.read_exact(&mut out).await.unwrap();
        out
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
        self.stream.flush().await.unwrap();
    }

    pub async fn send_flags(&mut self, flags: u32) {
        self.send(&flags.to_be_bytes()).await;
    }

    pub async fn send_option(&mut self, option: u32, payload: &[u8]) {
        let mut out = Vec::new();
        out.extend_from_slice(&IHAVEOPT.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
        out.extend_from_slice(payload);
        self.send(&out).await;
    }

    pub async fn option_reply(&mut self) -> OptionReply {
        assert_eq!(self.u64().await, REPLY_MAGIC);
        let option = self.u32().await;
        let reply = self.u32().await;
        let length = self.u32().await;
        let data = self.bytes(usize::try_from(length).unwrap()).await;
        OptionReply {
            option,
            reply,
            data,
        }
    }

    /// Sends NBD_OPT_INFO or NBD_OPT_GO and collects replies up to the final one.
    pub async fn query(&mut self, option: u32, name: &str, infos: &[u16]) -> Vec<OptionReply> {
        let mut payload = Vec::new();
        payload.extend_from_slice(&u32::try_from(name.len()).unwrap().to_be_bytes());
        payload.extend_from_slice(name.as_bytes());
        payload.extend_from_slice(&u16::try_from(infos.len()).unwrap().to_be_bytes());
        for info in infos {
            payload.extend_from_slice(&info.to_be_bytes());
        }
        self.send_option(option, &payload).await;
        let mut replies = Vec::new();
        loop {
            let reply = self.option_reply().await;
            assert_eq!(reply.option, option);
            let last = reply.reply != REP_INFO;
            replies.push(reply);
            if last {
                return replies;
            }
        }
    }

    pub fn request_bytes(
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&command.to_be_bytes());
        out.extend_from_slice(&cookie.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        out
    }

    pub async fn request(
        &mut self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        length: u32,
    ) {
        self.send(&Self::request_bytes(flags, command, cookie, offset, length))
            .await;
    }

    pub async fn write_request(&mut self, flags: u16, cookie: u64, offset: u64, data: &[u8]) {
        let mut out = Self::request_bytes(
            flags,
            CMD_WRITE,
            cookie,
            offset,
            u32::try_from(data.len()).unwrap(),
        );
        out.extend_from_slice(data);
        self.send(&out).await;
    }

    /// Reads a simple reply header: (error, cookie).
    pub async fn reply(&mut self) -> (u32, u64) {
        assert_eq!(self.u32().await, SIMPLE_REPLY_MAGIC);
        let error = self.u32().await;
        let cookie = self.u64().await;
        (error, cookie)
    }

    /// One request, one reply: returns the error value.
    pub async fn call(&mut self, flags: u16, command: u16, offset: u64, length: u32) -> u32 {
        self.request(flags, command, 77, offset, length).await;
        let (error, cookie) = self.reply().await;
        assert_eq!(cookie, 77);
        error
    }

    pub async fn write(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        self.write_request(flags, 78, offset, data).await;
        let (error, cookie) = self.reply().await;
        assert_eq!(cookie, 78);
        error
    }

    /// Reads `length` bytes at `offset`: the data, or the error value.
    pub async fn read(&mut self, offset: u64, length: u32) -> Result<Vec<u8>, u32> {
        self.request(0, CMD_READ, 79, offset, length).await;
        let (error, cookie) = self.reply().await;
        assert_eq!(cookie, 79);
        if error != 0 {
            return Err(error);
        }
        Ok(self.bytes(usize::try_from(length).unwrap()).await)
    }

    /// Asserts that the server closed the connection (nothing more to read).
    pub async fn expect_closed(&mut self) {
        let mut rest = Vec::new();
        let read = tokio::time::timeout(DEADLINE, self.stream.read_to_end(&mut rest))
            .await
            .expect("server did not close the connection");
        // A reset is as good as an orderly close here.
        if read.is_ok() {
            assert!(rest.is_empty(), "unexpected bytes before close: {rest:?}");
        }
    }
}
