//! A whole session over an in-memory duplex, the client side made from the fuzzer's bytes. The
//! first byte picks how: the bytes as they are (handshake included); a valid handshake
//! (`NBD_OPT_GO` on the default export) then the bytes; or a valid handshake then well-framed
//! requests whose fields come from the bytes, so the fuzzer spends its time on request
//! validation. The session may fail, but must not panic or hang, and the device must only ever
//! see requests inside the export and its block sizes.

#![no_main]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use blockgate_nbd::{BlockDevice, ExportInfo, Exports, IoError, ServeOptions};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 1 << 20;
const MIN_BLOCK: u32 = 512;
const MAX_BLOCK: u32 = 64 * 1024;

struct Device {
    data: Mutex<Vec<u8>>,
}

impl Device {
    fn check(&self, offset: u64, length: u32, max: bool) -> std::ops::Range<usize> {
        assert!(length > 0, "zero-length request reached the device");
        assert!(
            !max || length <= MAX_BLOCK,
            "oversized request reached the device"
        );
        assert_eq!(offset % u64::from(MIN_BLOCK), 0, "misaligned offset");
        assert_eq!(length % MIN_BLOCK, 0, "misaligned length");
        let end = offset
            .checked_add(u64::from(length))
            .expect("overflowing range");
        assert!(end <= SIZE, "request past the end reached the device");
        usize::try_from(offset).unwrap()..usize::try_from(end).unwrap()
    }
}

#[async_trait]
impl BlockDevice for Device {
    fn info(&self) -> ExportInfo {
        ExportInfo {
            name: "fuzz".into(),
            description: "fuzzed export".into(),
            size: SIZE,
            read_only: false,
            min_block: MIN_BLOCK,
            preferred_block: 4096,
            max_block: MAX_BLOCK,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_write_zeroes: true,
            can_multi_conn: true,
        }
    }

    async fn read(&self, offset: u64, length: u32) -> Result<Bytes, IoError> {
        let range = self.check(offset, length, true);
        Ok(Bytes::copy_from_slice(&self.data.lock().unwrap()[range]))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), IoError> {
        let range = self.check(offset, u32::try_from(data.len()).unwrap(), true);
        self.data.lock().unwrap()[range].copy_from_slice(&data);
        Ok(())
    }

    async fn flush(&self) -> Result<(), IoError> {
        Ok(())
    }

    async fn trim(&self, offset: u64, length: u32, _fua: bool) -> Result<(), IoError> {
        let range = self.check(offset, length, false);
        self.data.lock().unwrap()[range].fill(0);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        length: u32,
        _fua: bool,
        _no_hole: bool,
    ) -> Result<(), IoError> {
        let range = self.check(offset, length, true);
        self.data.lock().unwrap()[range].fill(0);
        Ok(())
    }
}

struct OneExport(Arc<Device>);

#[async_trait]
impl Exports for OneExport {
    async fn list(&self) -> Vec<ExportInfo> {
        vec![self.0.info()]
    }

    async fn open(&self, name: &str) -> Option<Arc<dyn BlockDevice>> {
        (name.is_empty() || name == "fuzz").then(|| Arc::clone(&self.0) as Arc<dyn BlockDevice>)
    }
}

fn handshake_prefix() -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&3u32.to_be_bytes()); // FIXED_NEWSTYLE | NO_ZEROES
    out.extend_from_slice(b"IHAVEOPT");
    out.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
    out.extend_from_slice(&8u32.to_be_bytes());
    out.extend_from_slice(&0u32.to_be_bytes()); // default export
    out.extend_from_slice(&1u16.to_be_bytes());
    out.extend_from_slice(&3u16.to_be_bytes()); // NBD_INFO_BLOCK_SIZE
    out
}

/// Well-framed requests: each 13-byte chunk gives flags, command, offset and length; writes
/// get a payload of their length (kept under 256 KiB so inputs stay cheap).
fn framed_requests(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in data.chunks_exact(13) {
        let flags = u16::from_be_bytes([chunk[0], chunk[1]]);
        let command = u16::from(chunk[2] % 10);
        let scale = if chunk[3] & 1 == 1 { 512 } else { 1 };
        let offset =
            u64::from(u32::from_be_bytes([chunk[4], chunk[5], chunk[6], chunk[7]])) * scale;
        let mut length =
            u32::from_be_bytes([chunk[8], chunk[9], chunk[10], chunk[11]]) >> (chunk[12] % 32);
        if command == 1 {
            length %= 256 * 1024;
        }
        out.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&command.to_be_bytes());
        out.extend_from_slice(&u64::from(chunk[12]).to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes());
        out.extend_from_slice(&length.to_be_bytes());
        if command == 1 {
            out.resize(out.len() + usize::try_from(length).unwrap(), chunk[0]);
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = Vec::new();
    match mode % 3 {
        0 => input.extend_from_slice(rest),
        1 => {
            input.extend_from_slice(&handshake_prefix());
            input.extend_from_slice(rest);
        }
        _ => {
            input.extend_from_slice(&handshake_prefix());
            input.extend_from_slice(&framed_requests(rest));
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let device = Arc::new(Device {
            data: Mutex::new(vec![0; usize::try_from(SIZE).unwrap()]),
        });
        let exports = Arc::new(OneExport(device));
        let (client, server) = tokio::io::duplex(64 * 1024);
        let options = ServeOptions {
            max_in_flight: 8,
            handshake_timeout: Duration::from_secs(10),
        };
        let session =
            tokio::spawn(async move { blockgate_nbd::serve(server, exports, &options).await });
        let (mut from_server, mut to_server) = tokio::io::split(client);
        let send = async move {
            // The server may close early; that is not a failure.
            let _ = to_server.write_all(&input).await;
            let _ = to_server.shutdown().await;
        };
        let drain = async move {
            let mut sink = Vec::new();
            let _ = from_server.read_to_end(&mut sink).await;
        };
        tokio::join!(send, drain);
        let ended = tokio::time::timeout(Duration::from_secs(30), session)
            .await
            .expect("session hung after the client closed");
        ended.expect("session panicked").ok();
    });
});
