//! A real S3-compatible server (s3s-fs) goes away mid-workload: writes keep landing in the
//! write log, a write that finds the log full waits instead of failing (DESIGN.md §9.6), and
//! when the server is back everything drains to the bucket, from which a gateway with no
//! local state restores every byte (§9.2).

use std::time::Duration;

use blockgate_e2e::content::pattern;
use blockgate_e2e::nbd_client::CMD_WRITE;
use blockgate_e2e::{Fill, GatewayOptions, NbdClient, TestDir, VolumeModel, wait_until};
use blockgate_objstore::S3sFsServer;

const MIB: u64 = 1 << 20;
const SIZE: u64 = 32 * MIB;
const CHUNK: u64 = 256 << 10;
/// How long a write may take before the test calls it waiting: writes that fit in the log
/// take milliseconds.
const WAITING: Duration = Duration::from_secs(3);

#[test]
fn s3_outage_makes_writes_wait_then_drains_and_the_bucket_restores_everything() {
    let dir = TestDir::new("s3-outage");
    let mut s3 = S3sFsServer::start().expect("s3s-fs must be installed for this test");
    let options = GatewayOptions::new(dir.join("data"))
        .s3(&s3, "outage")
        .volume("vol=32MiB")
        .log_capacity("4MiB")
        .segment_size("1MiB")
        .seal_interval_ms(100);
    let mut gateway = options.start();
    let log_bytes = |gateway: &blockgate_e2e::Gateway| {
        gateway.metric("blockgate_volume_log_bytes", "{volume=\"vol\"}")
    };
    let mut client = NbdClient::connect(gateway.nbd_socket(), "vol").expect("connect");
    let mut model = VolumeModel::new(SIZE);

    // S3 up: 8 MiB written and uploaded.
    model.write(&mut client, 0, 8 * MIB, Fill::Pattern(1), CHUNK);
    client.flush().expect("flush");
    gateway.wait_uploaded("vol", Duration::from_secs(60));

    // S3 down: writes go on into the log until it is full; then a write waits.
    s3.stop();
    let mut offset = 8 * MIB;
    let (waiting_handle, waiting_offset) = loop {
        assert!(
            offset < 16 * MIB,
            "8 MiB were accepted during the outage with a 4 MiB write log: nothing waited"
        );
        let data = pattern(2, offset, usize::try_from(CHUNK).expect("fits"));
        let length = u32::try_from(CHUNK).expect("fits");
        let handle = client
            .send(CMD_WRITE, 0, offset, length, &data)
            .expect("send a write");
        match client
            .wait_reply(WAITING)
            .expect("connection during the outage")
        {
            Some(reply) => {
                assert_eq!(reply.handle, handle);
                assert_eq!(
                    reply.error,
                    0,
                    "a write failed during the outage instead of waiting\n{}",
                    gateway.log_tail()
                );
                model.record(offset, CHUNK, Fill::Pattern(2));
                offset += CHUNK;
            }
            None => break (handle, offset),
        }
    };
    let accepted = waiting_offset - 8 * MIB;
    assert!(
        accepted >= 2 * MIB,
        "only {accepted} bytes were accepted into a 4 MiB log before writes waited"
    );
    // Still waiting, not failed, and the state is reported.
    assert!(
        client
            .wait_reply(Duration::from_secs(1))
            .expect("connection while the log is full")
            .is_none(),
        "the waiting write was answered while S3 was still down"
    );
    assert!(gateway.is_running());
    let status = gateway.volume_status("vol");
    assert!(
        status["last_upload_error"].is_string(),
        "the outage is not reported in `volume list`: {status}"
    );
    let full = log_bytes(&gateway).expect("log bytes metric");
    assert!(
        full >= 3.0 * MIB as f64,
        "log holds {full} bytes while writes wait"
    );
    let waits = gateway
        .metric("blockgate_volume_log_full_waits_total", "{volume=\"vol\"}")
        .expect("log-full waits metric");
    assert!(waits >= 1.0, "log_full_waits_total is {waits}");
    // What was written during the outage reads back from the log, on another connection.
    let mut reader = NbdClient::connect(gateway.nbd_socket(), "vol").expect("connect a reader");
    model
        .verify_range(&mut reader, 8 * MIB, accepted)
        .expect("data written during the outage reads back");

    // S3 back: the waiting write completes, and so does the rest of the workload.
    s3.restart().expect("restart s3s-fs");
    let restarted = std::time::Instant::now();
    let reply = client
        .wait_reply(Duration::from_secs(60))
        .expect("connection after S3 came back")
        .unwrap_or_else(|| {
            panic!(
                "the waiting write did not complete within 60 s of S3 coming back\n{}",
                gateway.log_tail()
            )
        });
    assert_eq!((reply.handle, reply.error), (waiting_handle, 0));
    eprintln!(
        "accepted {accepted} bytes during the outage; the waiting write completed {:?} after S3 \
         came back",
        restarted.elapsed()
    );
    model.record(waiting_offset, CHUNK, Fill::Pattern(2));
    let rest = waiting_offset + CHUNK;
    model.write(&mut client, rest, SIZE - rest, Fill::Pattern(3), CHUNK);
    model.write(&mut client, 4 * MIB, MIB, Fill::Zero, CHUNK);
    client.flush().expect("flush");
    wait_until(
        Duration::from_secs(120),
        "blockgate_volume_log_bytes to drain to 0",
        || match log_bytes(&gateway) {
            Ok(0.0) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    let status = gateway.volume_status("vol");
    assert!(
        status["last_upload_error"].is_null(),
        "an upload error is still reported after the log drained: {status}"
    );
    model.verify(&mut client).expect("volume after the outage");

    // Disaster recovery over real S3: no local state, same bucket.
    gateway.kill();
    let fresh = options.with_data_dir(dir.join("fresh")).start();
    let mut client = NbdClient::connect(fresh.nbd_socket(), "vol").expect("connect");
    assert_eq!(client.size(), SIZE);
    model
        .verify(&mut client)
        .expect("volume restored from the bucket alone");
}
