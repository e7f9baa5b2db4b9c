//! Managed gateways (`serve --attach-only`): volumes move between gateways on one bucket only
//! through `volume attach` / `volume detach` with the writer epochs the control plane hands
//! out. What a user sees: an attached volume is served at once, a detached one is gone from
//! the export list with every write in the bucket, the next gateway serves exactly those
//! bytes, and a stale attach is refused.

use std::time::Duration;

use blockgate_e2e::content::pattern;
use blockgate_e2e::{
    Fill, Gateway, GatewayOptions, NbdClient, NbdError, TestDir, VolumeModel, wait_until,
};
use blockgate_objstore::S3sFsServer;

const MIB: u64 = 1 << 20;
const REQUEST: u64 = 256 << 10;
/// `NBD_EPERM`: a fenced gateway's answer to a write.
const NBD_EPERM: u32 = 1;

fn connect(gateway: &Gateway, volume: &str) -> NbdClient {
    NbdClient::connect(gateway.nbd_socket(), volume)
        .unwrap_or_else(|e| panic!("connect to {volume}: {e}\n{}", gateway.log_tail()))
}

fn attach(gateway: &Gateway, volume: &str, epoch: u64) -> serde_json::Value {
    gateway.admin_ok(&["volume", "attach", volume, "--epoch", &epoch.to_string()])
}

/// The error of an attach that must be refused.
fn refused_attach(gateway: &Gateway, volume: &str, epoch: u64) -> String {
    match gateway.admin(&["volume", "attach", volume, "--epoch", &epoch.to_string()]) {
        Ok(value) => panic!("attach of {volume} with epoch {epoch} was accepted: {value}"),
        Err(error) => error.stderr,
    }
}

/// Moves a volume from gateway A to gateway B and back through attach and detach.
fn volume_moves_between_gateways(a_options: &GatewayOptions, b_options: &GatewayOptions) {
    let a = a_options.start();
    let b = b_options.start();
    // Creation works in managed mode and opens the volume where it is created.
    let created = a.admin_ok(&["volume", "create", "vol", "--size", "8MiB"]);
    assert_eq!(created["epoch"], 1, "{created}");
    assert!(
        b.volume_ids().is_empty(),
        "a managed gateway opened a volume nobody attached to it"
    );
    assert!(
        NbdClient::list(b.nbd_socket())
            .expect("list exports")
            .is_empty()
    );

    let attached = attach(&a, "vol", 2);
    assert_eq!(attached["epoch"], 2, "{attached}");
    assert_eq!(attached["fenced"], false, "{attached}");
    assert_eq!(attached["export_uri"], a.uri("vol"), "{attached}");
    let again = attach(&a, "vol", 2);
    assert_eq!(again["epoch"], 2, "a repeated attach: {again}");

    let mut model = VolumeModel::new(8 * MIB);
    let mut client = connect(&a, "vol");
    model.write(&mut client, 0, 8 * MIB, Fill::Pattern(1), REQUEST);
    model.write(&mut client, MIB, MIB, Fill::Zero, REQUEST);
    client.flush().expect("flush");
    client.disconnect();

    assert_eq!(
        a.admin_ok(&["volume", "detach", "vol"]),
        serde_json::Value::Null
    );
    assert!(a.volume_ids().is_empty(), "detached, yet still listed");
    assert!(
        !NbdClient::list(a.nbd_socket())
            .expect("list exports")
            .contains(&"vol".to_string()),
        "a detached volume is still exported"
    );
    assert!(NbdClient::connect(a.nbd_socket(), "vol").is_err());
    assert!(
        !a.data_dir().join("volumes").join("vol").exists(),
        "the detached volume's local state is still on gateway A"
    );
    // Detach is idempotent.
    assert_eq!(
        a.admin_ok(&["volume", "detach", "vol"]),
        serde_json::Value::Null
    );

    let moved = attach(&b, "vol", 3);
    assert_eq!(moved["epoch"], 3, "{moved}");
    assert!(
        NbdClient::list(b.nbd_socket())
            .expect("list exports")
            .contains(&"vol".to_string()),
        "an attached volume is not exported at once"
    );
    let mut client = connect(&b, "vol");
    model.verify(&mut client).unwrap_or_else(|e| {
        panic!(
            "gateway B does not serve what A wrote before detaching: {e}\n{}",
            b.log_tail()
        )
    });
    model.write(&mut client, 4 * MIB, MIB, Fill::Pattern(2), REQUEST);
    client.flush().expect("flush");
    client.disconnect();

    // Stale attaches are refused, on the old gateway and on the current one.
    for (gateway, epoch) in [(&a, 2), (&b, 2), (&a, 1)] {
        let stderr = refused_attach(gateway, "vol", epoch);
        assert!(
            stderr.contains("failed-precondition") && stderr.contains("epoch"),
            "a stale attach (epoch {epoch}) said: {stderr}"
        );
    }
    assert!(a.volume_ids().is_empty());
    assert_eq!(b.volume_status("vol")["epoch"], 3);

    // And back to A with a newer epoch.
    b.admin_ok(&["volume", "detach", "vol", "--timeout-seconds", "60"]);
    attach(&a, "vol", 4);
    let mut client = connect(&a, "vol");
    model.verify(&mut client).unwrap_or_else(|e| {
        panic!(
            "gateway A does not serve what B wrote before detaching: {e}\n{}",
            a.log_tail()
        )
    });
}

#[test]
fn a_volume_moves_between_managed_gateways_through_attach_and_detach() {
    let dir = TestDir::new("attach-managed");
    let a = GatewayOptions::new(dir.join("a"))
        .store_directory(dir.join("bucket"))
        .attach_only();
    let b = a.with_data_dir(dir.join("b"));
    volume_moves_between_gateways(&a, &b);
}

#[test]
fn a_volume_moves_between_managed_gateways_on_s3() {
    let dir = TestDir::new("attach-managed-s3");
    let s3 = S3sFsServer::start().expect("s3s-fs must be installed for this test");
    let a = GatewayOptions::new(dir.join("a"))
        .s3(&s3, "managed")
        .attach_only();
    let b = a.with_data_dir(dir.join("b"));
    volume_moves_between_gateways(&a, &b);
}

/// A managed gateway restarted keeps serving what was attached to it (its write log
/// replays), and nothing else; a forced attach elsewhere fences it at its next upload.
#[test]
fn a_restarted_managed_gateway_keeps_its_attachments_until_attached_elsewhere() {
    let dir = TestDir::new("attach-restart");
    let a_options = GatewayOptions::new(dir.join("a"))
        .store_directory(dir.join("bucket"))
        .attach_only();
    let mut a = a_options.start();
    a.admin_ok(&["volume", "create", "vol", "--size", "8MiB"]);
    a.admin_ok(&["volume", "create", "other", "--size", "4MiB"]);
    attach(&a, "vol", 2);
    a.admin_ok(&["volume", "detach", "other"]);
    let mut model = VolumeModel::new(8 * MIB);
    let mut client = connect(&a, "vol");
    model.write(&mut client, 0, 2 * MIB, Fill::Pattern(1), REQUEST);
    client.flush().expect("flush");
    client.disconnect();

    // Killed: whatever was not uploaded is in the write log.
    a.restart();
    assert_eq!(a.exports_at_start(), ["vol".to_string()]);
    assert_eq!(a.volume_status("vol")["epoch"], 2);
    let mut client = connect(&a, "vol");
    model
        .verify(&mut client)
        .expect("the attached volume after a restart");
    a.wait_uploaded("vol", Duration::from_secs(60));

    // The control plane gives up on A and attaches the volume to B (no detach).
    let b = a_options.with_data_dir(dir.join("b")).start();
    attach(&b, "vol", 3);
    let mut b_client = connect(&b, "vol");
    model
        .verify(&mut b_client)
        .expect("B serves what A uploaded");

    // A does not know until its next upload; then it refuses writes.
    let mut accepted = 0u64;
    let refused = wait_until(
        Duration::from_secs(60),
        "gateway A to refuse a write",
        || {
            let at = (accepted * REQUEST) % (8 * MIB);
            match client.write(at, &pattern(9, at, usize::try_from(REQUEST).expect("fits"))) {
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
        "the fenced gateway's write failed with {refused}\n{}",
        a.log_tail()
    );
    assert_eq!(a.volume_status("vol")["fenced"], true);
    // B's volume is what A uploaded before, not what A wrote after B's attach.
    model.verify(&mut b_client).expect("B after A was fenced");
    // The fenced volume detaches at once (what it holds can never be the volume's).
    a.admin_ok(&["volume", "detach", "vol", "--timeout-seconds", "5"]);
    assert!(a.volume_ids().is_empty());
}
