//! One writer per volume (DESIGN.md §9.4): when a second gateway takes a volume over from the
//! bucket, the first one — still running, unaware — finds out at its next upload, refuses
//! every request from then on, and can no longer change what the volume is.

use std::time::Duration;

use blockgate_e2e::content::pattern;
use blockgate_e2e::{
    Fill, Gateway, GatewayOptions, NbdClient, NbdError, TestDir, VolumeModel, wait_until,
};

/// `NBD_EPERM` and `NBD_EIO`: a fenced gateway's answers to writes and to reads.
const NBD_EPERM: u32 = 1;
const NBD_EIO: u32 = 5;

const MIB: u64 = 1 << 20;
const REQUEST: u64 = 256 << 10;

fn connect(gateway: &Gateway, volume: &str) -> NbdClient {
    NbdClient::connect(gateway.nbd_socket(), volume)
        .unwrap_or_else(|e| panic!("connect to {volume}: {e}\n{}", gateway.log_tail()))
}

/// Gateway `old` writes and uploads a volume; gateway `new` (another data directory, same
/// bucket) takes it over. `old` keeps writing until an upload of its log finds the newer
/// epoch: from then on its writes and flushes are refused with `EPERM` and its reads with
/// `EIO`, `volume list` says it is fenced, and its garbage collection leaves the volume alone.
/// `new` writes too. A third gateway recovering from the bucket sees exactly `new`'s volume,
/// and `old`, restarted, refuses to serve the volume it lost.
#[test]
fn a_fenced_writer_is_refused_and_cannot_change_or_collect_the_volume() {
    let dir = TestDir::new("fencing");
    let bucket = dir.join("bucket");
    let options = GatewayOptions::new(dir.join("old"))
        .store_directory(&bucket)
        .gc_grace_seconds(0)
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

    // The fenced writer does not know yet: it overwrites the volume, request by request,
    // until an upload of its log finds the newer epoch and its writes are refused.
    let mut accepted = 0u64;
    let refused = wait_until(
        Duration::from_secs(60),
        "the fenced gateway to refuse a write",
        || {
            let at = (accepted * REQUEST) % (8 * MIB);
            match old_client.write(at, &pattern(2, at, usize::try_from(REQUEST).expect("fits"))) {
                Ok(()) => {
                    accepted += 1;
                    Err(format!("{accepted} writes accepted"))
                }
                Err(error) => Ok(error),
            }
        },
    );
    assert!(
        matches!(refused, NbdError::Server(NBD_EPERM)),
        "a fenced gateway's write failed with {refused}, not EPERM\n{}",
        old.log_tail()
    );
    eprintln!("the fenced gateway accepted {accepted} writes into its log before it knew");
    assert!(matches!(
        old_client.flush(),
        Err(NbdError::Server(NBD_EPERM))
    ));
    assert!(matches!(
        old_client.read(0, 4096),
        Err(NbdError::Server(NBD_EIO))
    ));
    let status = old.volume_status("vol");
    assert_eq!(status["fenced"], true, "{status}");
    assert_eq!(status["epoch"].as_u64(), old_epoch);
    assert_eq!(
        old.metric("blockgate_volume_fenced", "{volume=\"vol\"}"),
        Ok(1.0)
    );

    // The current writer changes the first megabyte.
    model.write(&mut new_client, 0, MIB, Fill::Pattern(3), REQUEST);
    new_client.flush().expect("flush");
    new.wait_uploaded("vol", Duration::from_secs(60));
    assert_eq!(new.volume_status("vol")["fenced"], false);

    // The fenced gateway's garbage collection (no grace period) must not delete what the
    // current writer reads.
    let report = old.admin_ok(&["gc"]);
    let deleted = report["deleted_segments"].as_u64().unwrap_or_default();
    assert_eq!(
        deleted, 0,
        "the fenced gateway collected segments: {report}"
    );

    // The current writer still reads what it wrote.
    model.verify(&mut new_client).unwrap_or_else(|e| {
        panic!(
            "after the fenced gateway's garbage collection, the current writer cannot read \
             its own flushed, uploaded data: {e}\n{}",
            new.log_tail()
        )
    });
    new.stop();
    let recovered = options.with_data_dir(dir.join("recovered")).start();
    let mut client = connect(&recovered, "vol");
    model.verify(&mut client).unwrap_or_else(|e| {
        panic!(
            "after a fenced writer's writes, the volume in the bucket is not the current \
             writer's: {e}\n{}",
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
