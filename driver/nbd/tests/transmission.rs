//! The transmission phase, driven by a hand-written client over an in-memory duplex against an
//! in-memory device.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
mod common;

use std::collections::HashMap;
use std::sync::Arc;

use blockgate_nbd::{ServeOptions, SessionError};
use common::*;
use proptest::prelude::*;
use tokio::io::DuplexStream;

const SIZE: u64 = 1 << 20;

async fn connected(
    info: blockgate_nbd::ExportInfo,
) -> (
    Client<DuplexStream>,
    Arc<MemoryDevice>,
    tokio::task::JoinHandle<Result<(), SessionError>>,
) {
    let name = info.name.clone();
    let (exports, device) = MemoryExports::single(info);
    let (stream, session) = start_session(exports, ServeOptions::default());
    let (client, _, _) = Client::connect(stream, &name).await;
    (client, device, session)
}

async fn disconnect(
    mut client: Client<DuplexStream>,
    session: tokio::task::JoinHandle<Result<(), SessionError>>,
) {
    client.request(0, CMD_DISC, 0, 0, 0).await;
    client.expect_closed().await;
    finished(session).await.unwrap();
}

fn pattern(seed: u8, length: usize) -> Vec<u8> {
    (0..length)
        .map(|i| seed.wrapping_add(u8::try_from(i % 251).unwrap()))
        .collect()
}

#[tokio::test]
async fn read_write_flush_trim_and_write_zeroes_round_trip() {
    let (mut client, device, session) = connected(export_info("vol", SIZE)).await;
    let data = pattern(3, 8192);
    assert_eq!(client.write(0, 4096, &data).await, 0);
    assert_eq!(client.read(4096, 8192).await, Ok(data.clone()));
    assert_eq!(device.contents()[4096..12288], data[..]);

    assert_eq!(client.call(0, CMD_FLUSH, 0, 0).await, 0);
    assert_eq!(Counters::get(&device.counters.flushes), 1);

    assert_eq!(client.call(0, CMD_TRIM, 4096, 4096).await, 0);
    assert_eq!(Counters::get(&device.counters.trims), 1);
    assert_eq!(client.read(4096, 4096).await, Ok(vec![0; 4096]));

    assert_eq!(
        client
            .call(FLAG_NO_HOLE, CMD_WRITE_ZEROES, 8192, 4096)
            .await,
        0
    );
    assert_eq!(Counters::get(&device.counters.zeroes), 1);
    assert_eq!(Counters::get(&device.counters.no_hole), 1);
    assert_eq!(client.read(4096, 8192).await, Ok(vec![0; 8192]));

    // The last sector of the export is reachable.
    assert_eq!(client.write(0, SIZE - 512, &[9; 512]).await, 0);
    assert_eq!(client.read(SIZE - 512, 512).await, Ok(vec![9; 512]));
    disconnect(client, session).await;
}

#[tokio::test]
async fn fua_reaches_the_device() {
    let (mut client, device, session) = connected(export_info("vol", SIZE)).await;
    assert_eq!(client.write(FLAG_FUA, 0, &[1; 512]).await, 0);
    assert_eq!(client.call(FLAG_FUA, CMD_TRIM, 512, 512).await, 0);
    assert_eq!(client.call(FLAG_FUA, CMD_WRITE_ZEROES, 1024, 512).await, 0);
    assert_eq!(client.write(0, 0, &[2; 512]).await, 0);
    assert_eq!(Counters::get(&device.counters.fua), 3);
    // FUA is accepted on commands that write nothing, as the spec requires.
    assert_eq!(client.call(FLAG_FUA, CMD_FLUSH, 0, 0).await, 0);
    client.request(FLAG_FUA, CMD_READ, 5, 0, 512).await;
    assert_eq!(client.reply().await, (0, 5));
    assert_eq!(client.bytes(512).await, vec![2; 512]);
    disconnect(client, session).await;
}

#[tokio::test]
async fn out_of_range_requests_get_errors_and_the_session_continues() {
    let (mut client, device, session) = connected(export_info("vol", SIZE)).await;
    assert_eq!(client.read(SIZE, 512).await, Err(EINVAL));
    assert_eq!(client.read(SIZE - 512, 1024).await, Err(EINVAL));
    assert_eq!(client.read(u64::MAX - 511, 1024).await, Err(EINVAL));
    assert_eq!(client.call(0, CMD_TRIM, SIZE, 512).await, EINVAL);
    // Writes past the end are ENOSPC, and their payload is consumed.
    assert_eq!(client.write(0, SIZE - 512, &[5; 1024]).await, ENOSPC);
    assert_eq!(client.write(0, u64::MAX - 511, &[5; 1024]).await, ENOSPC);
    assert_eq!(client.call(0, CMD_WRITE_ZEROES, SIZE, 512).await, ENOSPC);
    assert_eq!(Counters::get(&device.counters.writes), 0);
    assert_eq!(Counters::get(&device.counters.reads), 0);
    assert_eq!(client.write(0, 0, &[6; 512]).await, 0);
    assert_eq!(client.read(0, 512).await, Ok(vec![6; 512]));
    assert_eq!(
        device.contents()[usize::try_from(SIZE).unwrap() - 512..],
        [0; 512]
    );
    disconnect(client, session).await;
}

#[tokio::test]
async fn invalid_requests_get_einval_and_write_payloads_are_consumed() {
    let (mut client, device, session) = connected(export_info("vol", SIZE)).await;
    // Unknown command, unadvertised command, unknown and misplaced flags.
    assert_eq!(client.call(0, 99, 0, 512).await, EINVAL);
    assert_eq!(client.call(0, CMD_CACHE, 0, 512).await, EINVAL);
    assert_eq!(client.call(1 << 12, CMD_READ, 0, 512).await, EINVAL);
    assert_eq!(client.write(FLAG_NO_HOLE, 0, &[1; 512]).await, EINVAL);
    // Misaligned to the 512-byte minimum block size.
    assert_eq!(client.read(100, 512).await, Err(EINVAL));
    assert_eq!(client.write(0, 0, &[1; 100]).await, EINVAL);
    // Longer than the 1 MiB maximum block size: refused, payload skipped.
    assert_eq!(client.write(0, 0, &vec![1; 2 << 20]).await, EINVAL);
    assert_eq!(client.read(0, 2 << 20).await, Err(EINVAL));
    assert_eq!(client.call(0, CMD_WRITE_ZEROES, 0, 2 << 20).await, EINVAL);
    // Flush's offset and length are reserved.
    assert_eq!(client.call(0, CMD_FLUSH, 512, 0).await, EINVAL);
    assert_eq!(Counters::get(&device.counters.writes), 0);
    assert_eq!(Counters::get(&device.counters.flushes), 0);
    // And the stream is still in step.
    assert_eq!(client.write(0, 0, &[4; 1024]).await, 0);
    assert_eq!(client.read(0, 1024).await, Ok(vec![4; 1024]));
    disconnect(client, session).await;
}

#[tokio::test]
async fn unadvertised_features_are_refused() {
    let mut info = export_info("bare", SIZE);
    info.can_flush = false;
    info.can_fua = false;
    info.can_trim = false;
    info.can_write_zeroes = false;
    let (mut client, device, session) = connected(info).await;
    assert_eq!(client.call(0, CMD_FLUSH, 0, 0).await, EINVAL);
    assert_eq!(client.call(0, CMD_TRIM, 0, 512).await, EINVAL);
    assert_eq!(client.call(0, CMD_WRITE_ZEROES, 0, 512).await, EINVAL);
    assert_eq!(client.write(FLAG_FUA, 0, &[1; 512]).await, EINVAL);
    assert_eq!(Counters::get(&device.counters.writes), 0);
    disconnect(client, session).await;
}

#[tokio::test]
async fn read_only_exports_refuse_writes_with_eperm() {
    let mut info = export_info("ro", SIZE);
    info.read_only = true;
    let (mut client, device, session) = connected(info).await;
    device.fill(0, &[8; 512]);
    assert_eq!(client.write(0, 0, &[1; 512]).await, EPERM);
    assert_eq!(client.call(0, CMD_TRIM, 0, 512).await, EPERM);
    assert_eq!(client.call(0, CMD_WRITE_ZEROES, 0, 512).await, EPERM);
    assert_eq!(client.read(0, 512).await, Ok(vec![8; 512]));
    assert_eq!(client.call(0, CMD_FLUSH, 0, 0).await, 0);
    assert_eq!(Counters::get(&device.counters.writes), 0);
    disconnect(client, session).await;
}

#[tokio::test]
async fn zero_length_requests_succeed_without_touching_the_device() {
    let (mut client, device, session) = connected(export_info("vol", SIZE)).await;
    assert_eq!(client.read(4096, 0).await, Ok(vec![]));
    assert_eq!(client.write(0, 4096, &[]).await, 0);
    assert_eq!(client.call(0, CMD_TRIM, SIZE, 0).await, 0);
    assert_eq!(Counters::get(&device.counters.reads), 0);
    assert_eq!(Counters::get(&device.counters.writes), 0);
    assert_eq!(Counters::get(&device.counters.trims), 0);
    disconnect(client, session).await;
}

#[tokio::test]
async fn a_grown_volume_is_usable_without_reconnecting() {
    let (mut client, device, session) = connected(export_info("vol", SIZE)).await;
    assert_eq!(client.write(0, SIZE, &[1; 512]).await, ENOSPC);
    device.grow(2 * SIZE);
    assert_eq!(client.write(0, SIZE, &[1; 512]).await, 0);
    assert_eq!(client.read(SIZE, 512).await, Ok(vec![1; 512]));
    disconnect(client, session).await;
}

#[tokio::test]
async fn device_errors_map_to_nbd_errors() {
    let (mut client, device, session) = connected(export_info("vol", SIZE)).await;
    device.fail_writes_with_no_space();
    assert_eq!(client.write(0, 0, &[1; 512]).await, ENOSPC);
    device.return_short_reads();
    // A short read becomes EIO with no payload, so the stream stays in step.
    assert_eq!(client.read(0, 512).await, Err(EIO));
    device.panic_on_flush();
    assert_eq!(client.call(0, CMD_FLUSH, 0, 0).await, EIO);
    assert_eq!(client.call(0, CMD_TRIM, 0, 512).await, 0);
    disconnect(client, session).await;
}

#[tokio::test]
async fn a_garbage_request_magic_closes_only_that_session() {
    let (exports, device) = MemoryExports::single(export_info("vol", SIZE));
    let (first_stream, first_session) =
        start_session(Arc::clone(&exports), ServeOptions::default());
    let (second_stream, second_session) = start_session(exports, ServeOptions::default());
    let (mut first, _, _) = Client::connect(first_stream, "vol").await;
    let (mut second, _, _) = Client::connect(second_stream, "vol").await;

    assert_eq!(first.write(0, 0, &[3; 512]).await, 0);
    first.send(b"this is not an NBD request header").await;
    first.expect_closed().await;
    assert!(matches!(
        finished(first_session).await,
        Err(SessionError::BadRequest(_))
    ));

    assert_eq!(second.read(0, 512).await, Ok(vec![3; 512]));
    assert_eq!(second.write(0, 512, &[4; 512]).await, 0);
    assert_eq!(device.contents()[512..1024], [4; 512]);
    disconnect(second, second_session).await;
}

#[tokio::test]
async fn pipelined_requests_are_answered_out_of_order() {
    let (mut client, device, session) = connected(export_info("vol", SIZE)).await;
    device.fill(0, &[1; 4096]);
    device.fill(4096, &[2; 4096]);
    let gate = Gate::at(0);
    device.hold_reads(&gate);

    client.request(0, CMD_READ, 100, 0, 4096).await;
    client.request(0, CMD_READ, 200, 4096, 4096).await;
    gate.entered().await;
    // The first read is held at the device; the second one overtakes it.
    assert_eq!(client.reply().await, (0, 200));
    assert_eq!(client.bytes(4096).await, vec![2; 4096]);
    gate.release();
    assert_eq!(client.reply().await, (0, 100));
    assert_eq!(client.bytes(4096).await, vec![1; 4096]);
    disconnect(client, session).await;
}

#[tokio::test]
async fn many_pipelined_requests_all_get_their_own_reply() {
    let (mut client, _device, session) = connected(export_info("vol", SIZE)).await;
    let count = 256u64;
    let mut burst = Vec::new();
    for cookie in 0..count {
        let seed = u8::try_from(cookie % 200).unwrap();
        let mut request =
            Client::<DuplexStream>::request_bytes(0, CMD_WRITE, cookie, cookie * 4096, 4096);
        request.extend_from_slice(&pattern(seed, 4096));
        burst.extend_from_slice(&request);
    }
    client.send(&burst).await;
    let mut seen = HashMap::new();
    for _ in 0..count {
        let (error, cookie) = client.reply().await;
        assert_eq!(error, 0);
        assert!(
            seen.insert(cookie, ()).is_none(),
            "cookie {cookie} answered twice"
        );
    }
    let mut burst = Vec::new();
    for cookie in 0..count {
        burst.extend_from_slice(&Client::<DuplexStream>::request_bytes(
            0,
            CMD_READ,
            1000 + cookie,
            cookie * 4096,
            4096,
        ));
    }
    client.send(&burst).await;
    for _ in 0..count {
        let (error, cookie) = client.reply().await;
        assert_eq!(error, 0);
        let data = client.bytes(4096).await;
        let seed = u8::try_from((cookie - 1000) % 200).unwrap();
        assert_eq!(data, pattern(seed, 4096), "cookie {cookie}");
    }
    disconnect(client, session).await;
}

#[tokio::test]
async fn disc_finishes_in_flight_writes_before_closing() {
    let (mut client, device, session) = connected(export_info("vol", SIZE)).await;
    let gate = Gate::at(8192);
    device.hold_writes(&gate);
    client.write_request(0, 5, 8192, &[0xcd; 4096]).await;
    client.request(0, CMD_DISC, 6, 0, 0).await;
    gate.entered().await;
    assert!(
        !session.is_finished(),
        "the session waits for the held write"
    );
    gate.release();
    assert_eq!(client.reply().await, (0, 5));
    client.expect_closed().await;
    finished(session).await.unwrap();
    assert_eq!(device.contents()[8192..12288], [0xcd; 4096]);
}

#[tokio::test]
async fn hanging_up_mid_request_is_an_error_but_between_requests_is_not() {
    let (mut client, _device, session) = connected(export_info("vol", SIZE)).await;
    let request = Client::<DuplexStream>::request_bytes(0, CMD_WRITE, 1, 0, 4096);
    client.send(&request).await;
    client.send(&[0; 100]).await;
    drop(client);
    assert!(matches!(
        finished(session).await,
        Err(SessionError::UnexpectedEof)
    ));

    let (mut client, _device, session) = connected(export_info("vol", SIZE)).await;
    assert_eq!(client.write(0, 0, &[1; 512]).await, 0);
    drop(client);
    finished(session).await.unwrap();
}

#[tokio::test]
async fn a_huge_write_payload_closes_the_session() {
    let (mut client, device, session) = connected(export_info("vol", SIZE)).await;
    client.request(0, CMD_WRITE, 1, 0, (32 << 20) + 512).await;
    client.expect_closed().await;
    assert!(matches!(
        finished(session).await,
        Err(SessionError::WritePayloadTooLarge { .. })
    ));
    assert_eq!(Counters::get(&device.counters.writes), 0);
}

#[tokio::test]
async fn one_request_at_a_time_still_serves_a_pipeline() {
    let (exports, _device) = MemoryExports::single(export_info("vol", SIZE));
    let options = ServeOptions {
        max_in_flight: 1,
        ..ServeOptions::default()
    };
    let (stream, session) = start_session(exports, options);
    let (mut client, _, _) = Client::connect(stream, "vol").await;
    let mut burst = Vec::new();
    for cookie in 0..16u64 {
        burst.extend_from_slice(&Client::<DuplexStream>::request_bytes(
            0, CMD_READ, cookie, 0, 512,
        ));
    }
    client.send(&burst).await;
    for expected in 0..16u64 {
        assert_eq!(client.reply().await, (0, expected));
        assert_eq!(client.bytes(512).await, vec![0; 512]);
    }
    disconnect(client, session).await;
}

#[derive(Debug, Clone)]
enum Operation {
    Write {
        sector: u64,
        sectors: u32,
        seed: u8,
        fua: bool,
    },
    Read {
        sector: u64,
        sectors: u32,
    },
    Trim {
        sector: u64,
        sectors: u32,
    },
    Zero {
        sector: u64,
        sectors: u32,
    },
    Flush,
}

/// A 64 KiB export of 512-byte sectors; ranges may run past the end on purpose.
fn operation() -> impl Strategy<Value = Operation> {
    let range = (0u64..136, 0u32..12);
    prop_oneof![
        (range.clone(), any::<u8>(), any::<bool>()).prop_map(|((sector, sectors), seed, fua)| {
            Operation::Write {
                sector,
                sectors,
                seed,
                fua,
            }
        }),
        range
            .clone()
            .prop_map(|(sector, sectors)| Operation::Read { sector, sectors }),
        range
            .clone()
            .prop_map(|(sector, sectors)| Operation::Trim { sector, sectors }),
        range.prop_map(|(sector, sectors)| Operation::Zero { sector, sectors }),
        Just(Operation::Flush),
    ]
}

/// What a client observes matches a plain byte array, including the errors at the edge.
async fn check_against_model(operations: Vec<Operation>) {
    const MODEL_SIZE: u64 = 128 * 512;
    let (mut client, device, session) = connected(export_info("model", MODEL_SIZE)).await;
    let mut model = vec![0u8; usize::try_from(MODEL_SIZE).unwrap()];
    for operation in operations {
        let span = |sector: u64, sectors: u32| {
            let start = usize::try_from(sector * 512).unwrap();
            let end = start + usize::try_from(sectors).unwrap() * 512;
            (sector * 512, sectors * 512, start..end, end <= model.len())
        };
        match operation {
            Operation::Write {
                sector,
                sectors,
                seed,
                fua,
            } => {
                let (offset, _, range, inside) = span(sector, sectors);
                let data = pattern(seed, range.len());
                let flags = if fua { FLAG_FUA } else { 0 };
                let error = client.write(flags, offset, &data).await;
                if inside {
                    assert_eq!(error, 0);
                    model[range].copy_from_slice(&data);
                } else {
                    assert_eq!(error, ENOSPC);
                }
            }
            Operation::Read { sector, sectors } => {
                let (offset, length, range, inside) = span(sector, sectors);
                let read = client.read(offset, length).await;
                if inside {
                    assert_eq!(read, Ok(model[range].to_vec()));
                } else {
                    assert_eq!(read, Err(EINVAL));
                }
            }
            Operation::Trim { sector, sectors } => {
                let (offset, length, range, inside) = span(sector, sectors);
                let error = client.call(0, CMD_TRIM, offset, length).await;
                if inside {
                    assert_eq!(error, 0);
                    model[range].fill(0);
                } else {
                    assert_eq!(error, EINVAL);
                }
            }
            Operation::Zero { sector, sectors } => {
                let (offset, length, range, inside) = span(sector, sectors);
                let error = client.call(0, CMD_WRITE_ZEROES, offset, length).await;
                if inside {
                    assert_eq!(error, 0);
                    model[range].fill(0);
                } else {
                    assert_eq!(error, ENOSPC);
                }
            }
            Operation::Flush => assert_eq!(client.call(0, CMD_FLUSH, 0, 0).await, 0),
        }
    }
    assert_eq!(device.contents(), model);
    disconnect(client, session).await;
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn sessions_behave_like_a_byte_array(operations in proptest::collection::vec(operation(), 1..40)) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(check_against_model(operations));
    }
}

/// The kernel's NBD driver skips the handshake (netlink told it the size and flags): the
/// session starts in transmission and serves the device it was given.
#[tokio::test]
async fn a_session_can_start_in_transmission_for_the_kernel() {
    let device = MemoryDevice::new(export_info("kernel", SIZE));
    let (stream, server) = tokio::io::duplex(4 << 20);
    let served: Arc<dyn blockgate_nbd::BlockDevice> = device.clone();
    let session = tokio::spawn(async move {
        blockgate_nbd::serve_transmission(server, served, &ServeOptions::default()).await
    });
    let mut client = Client { stream };
    let data = pattern(7, 4096);
    assert_eq!(client.write(FLAG_FUA, 8192, &data).await, 0);
    assert_eq!(client.read(8192, 4096).await, Ok(data.clone()));
    assert_eq!(device.contents()[8192..12288], data[..]);
    assert_eq!(client.call(0, CMD_FLUSH, 0, 0).await, 0);
    // Out of range is the protocol's error, not the end of the session.
    assert_ne!(client.read(SIZE, 512).await, Ok(vec![0; 512]));
    disconnect(client, session).await;
}
