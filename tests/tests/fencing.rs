//! One writer per volume (DESIGN.md §9.4): when a second gateway takes a volume over from the
//! bucket, the first one — still running, unaware — can no longer change what the volume is.

use std::time::Duration;

use blockgate_e2e::{
    Fill, Gateway, GatewayOptions, NbdClient, TestDir, VolumeModel, wait_until_every,
};

const MIB: u64 = 1 << 20;
const REQUEST: u64 = 256 << 10;

fn connect(gateway: &Gateway, volume: &str) -> NbdClient {
    NbdClient::connect(gateway.nbd_socket(), volume)
        .unwrap_or_else(|e| panic!("connect to {volume}: {e}\n{}", gateway.log_tail()))
}

/// Gateway `old` writes and uploads a volume; gateway `new` (another data directory, same
/// bucket) takes it over. `old` keeps writing — it overwrites the whole volume — and keeps
/// uploading, and runs garbage collection until its grace period has passed; `new` writes
/// too. A third gateway recovering from the bucket sees exactly `new`'s volume, and `old`,
/// restarted, refuses to serve the volume it lost.
///
/// Garbage collection keeps unreferenced segments for a 60 s grace period that the gateway's
/// command line cannot shorten, so this test takes a little over a minute.
#[test]
fn a_fenced_writer_cannot_change_or_collect_the_volume() {
    let dir = TestDir::new("fencing");
    let bucket = dir.join("bucket");
    let options = GatewayOptions::new(dir.join("old"))
        .store_directory(&bucket)
        .volume("vol=8MiB");
    let mut old = options.start();
    let mut old_client = connect(&old, "vol");
    let mut model = VolumeModel::new(8 * MIB);
    model.write(&mut old_client, 0, 8 * MIB, Fill::Pattern(1), REQUEST);
    old_client.flush().expect("flush");
    old.wait_uploaded("vol", Duration::from_secs(60));

    let mut new = options.with_data_dir(dir.join("new")).start();
    let mut new_client = connect(&new, "vol");
    model
        .verify(&mut new_client)
        .expect("the new writer sees the old writer's uploaded data");
    let old_epoch = old.volume_status("vol")["epoch"].as_u64();
    let new_epoch = new.volume_status("vol")["epoch"].as_u64();
    assert!(
        new_epoch > old_epoch,
        "epochs: old {old_epoch:?}, new {new_epoch:?}"
    );

    // The fenced writer does not know: it overwrites everything and uploads it.
    let mut fenced_model = model.clone();
    fenced_model.write(&mut old_client, 0, 8 * MIB, Fill::Pattern(2), REQUEST);
    old_client.flush().expect("flush");
    old.wait_uploaded("vol", Duration::from_secs(60));
    // The current writer changes the first megabyte.
    model.write(&mut new_client, 0, MIB, Fill::Pattern(3), REQUEST);
    new_client.flush().expect("flush");
    new.wait_uploaded("vol", Duration::from_secs(60));

    // The fenced writer collects what its own map no longer references, once the grace
    // period of the first candidates has passed.
    let mut deleted = 0;
    wait_until_every(
        Duration::from_secs(150),
        Duration::from_secs(2),
        "the fenced gateway's garbage collection to finish its grace period",
        || {
            let report = old.admin_ok(&["gc"]);
            deleted += report["deleted_segments"].as_u64().unwrap_or_default();
            if report["waiting_for_grace"] == 0 {
                Ok(())
            } else {
                Err(report.to_string())
            }
        },
    );
    eprintln!("the fenced gateway's garbage collection deleted {deleted} segments");

    // The current writer still reads what it wrote (its cache never held the newest
    // segment: it reads it from the bucket).
    model.verify(&mut new_client).unwrap_or_else(|e| {
        panic!(
            "after the fenced gateway's garbage collection deleted {deleted} segments, the \
             current writer cannot read its own flushed, uploaded data: {e}\n{}",
            new.log_tail()
        )
    });
    new.stop();
    let recovered = options.with_data_dir(dir.join("recovered")).start();
    let mut client = connect(&recovered, "vol");
    model.verify(&mut client).unwrap_or_else(|e| {
        panic!(
            "after a fenced writer's uploads and garbage collection ({deleted} segments \
             deleted), the volume in the bucket is not the current writer's: {e}\n{}",
            recovered.log_tail()
        )
    });
    drop(recovered);

    old.kill();
    old.restart();
    assert!(
        NbdClient::connect(old.nbd_socket(), "vol").is_err(),
        "the fenced gateway serves the volume again after a restart"
    );
}
