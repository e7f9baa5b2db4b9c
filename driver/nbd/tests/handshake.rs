//! The fixed newstyle handshake, driven by a hand-written client over an in-memory duplex.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
mod common;

use std::time::Duration;

use blockgate_nbd::{ServeOptions, SessionError};
use common::*;

fn two_exports() -> std::sync::Arc<MemoryExports> {
    MemoryExports::new(vec![
        MemoryDevice::new(export_info("vol", 1 << 20)),
        MemoryDevice::new(export_info("other", 2 << 20)),
    ])
}

const ALL_FEATURES: u16 = FLAG_HAS_FLAGS
    | FLAG_SEND_FLUSH
    | FLAG_SEND_FUA
    | FLAG_SEND_TRIM
    | FLAG_SEND_WRITE_ZEROES
    | FLAG_CAN_MULTI_CONN;

#[tokio::test]
async fn go_enters_transmission_with_size_flags_and_block_sizes() {
    let (stream, session) = start_session(two_exports(), ServeOptions::default());
    let mut client = Client::fixed_newstyle(stream).await;
    let replies = client.query(OPT_GO, "other", &[INFO_BLOCK_SIZE]).await;
    let export = &replies[0];
    assert_eq!((export.reply, export.info_type()), (REP_INFO, INFO_EXPORT));
    assert_eq!(export.data.len(), 12);
    assert_eq!(export.data[2..10], (2u64 << 20).to_be_bytes());
    assert_eq!(export.data[10..12], ALL_FEATURES.to_be_bytes());
    let sizes = replies
        .iter()
        .find(|reply| reply.reply == REP_INFO && reply.info_type() == INFO_BLOCK_SIZE)
        .expect("block sizes");
    assert_eq!(sizes.data[2..6], 512u32.to_be_bytes());
    assert_eq!(sizes.data[6..10], 4096u32.to_be_bytes());
    assert_eq!(sizes.data[10..14], (1u32 << 20).to_be_bytes());
    assert_eq!(replies.last().unwrap().reply, REP_ACK);
    // No padding after the ACK: the next bytes are the reply to our first request.
    assert_eq!(client.read(0, 512).await, Ok(vec![0; 512]));
    client.request(0, CMD_DISC, 1, 0, 0).await;
    client.expect_closed().await;
    finished(session).await.unwrap();
}

#[tokio::test]
async fn the_empty_name_selects_the_default_export() {
    let (stream, session) = start_session(two_exports(), ServeOptions::default());
    let mut client = Client::fixed_newstyle(stream).await;
    let replies = client.query(OPT_INFO, "", &[INFO_NAME]).await;
    let name = replies
        .iter()
        .find(|reply| reply.reply == REP_INFO && reply.info_type() == INFO_NAME)
        .expect("canonical name");
    assert_eq!(&name.data[2..], b"vol");
    let replies = client.query(OPT_GO, "", &[]).await;
    assert_eq!(replies.last().unwrap().reply, REP_ACK);
    assert_eq!(replies[0].info_type(), INFO_EXPORT);
    assert_eq!(replies[0].data[2..10], (1u64 << 20).to_be_bytes());
    drop(client);
    finished(session).await.unwrap();
}

#[tokio::test]
async fn export_name_sends_size_flags_and_zeroes_unless_no_zeroes() {
    for no_zeroes in [false, true] {
        let (stream, session) = start_session(two_exports(), ServeOptions::default());
        let (mut client, _) = Client::greet(stream).await;
        client.send_flags(if no_zeroes { 0b11 } else { 0b01 }).await;
        client.send_option(OPT_EXPORT_NAME, b"vol").await;
        assert_eq!(client.u64().await, 1 << 20);
        assert_eq!(client.u16().await, ALL_FEATURES);
        if !no_zeroes {
            assert_eq!(client.bytes(124).await, vec![0; 124]);
        }
        client.write(0, 0, &[7; 512]).await;
        assert_eq!(client.read(0, 512).await, Ok(vec![7; 512]));
        client.request(0, CMD_DISC, 1, 0, 0).await;
        client.expect_closed().await;
        finished(session).await.unwrap();
    }
}

#[tokio::test]
async fn list_names_every_export_then_acks() {
    let (stream, session) = start_session(two_exports(), ServeOptions::default());
    let mut client = Client::fixed_newstyle(stream).await;
    client.send_option(OPT_LIST, b"").await;
    let mut names = Vec::new();
    loop {
        let reply = client.option_reply().await;
        assert_eq!(reply.option, OPT_LIST);
        if reply.reply == REP_ACK {
            break;
        }
        assert_eq!(reply.reply, REP_SERVER);
        let length =
            usize::try_from(u32::from_be_bytes(reply.data[..4].try_into().unwrap())).unwrap();
        let name = String::from_utf8(reply.data[4..4 + length].to_vec()).unwrap();
        let details = String::from_utf8(reply.data[4 + length..].to_vec()).unwrap();
        assert_eq!(details, format!("test export {name}"));
        names.push(name);
    }
    assert_eq!(names, ["vol", "other"]);
    // LIST takes no data; with data it is invalid, and negotiation goes on.
    client.send_option(OPT_LIST, b"junk").await;
    assert_eq!(client.option_reply().await.reply, REP_ERR_INVALID);
    client.send_option(OPT_ABORT, b"").await;
    assert_eq!(client.option_reply().await.reply, REP_ACK);
    client.expect_closed().await;
    finished(session).await.unwrap();
}

#[tokio::test]
async fn info_answers_requested_items_and_leaves_negotiation_open() {
    let (stream, session) = start_session(two_exports(), ServeOptions::default());
    let mut client = Client::fixed_newstyle(stream).await;
    let replies = client
        .query(
            OPT_INFO,
            "vol",
            &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION, 0x7777],
        )
        .await;
    let infos: Vec<(u16, Vec<u8>)> = replies
        .iter()
        .filter(|reply| reply.reply == REP_INFO)
        .map(|reply| (reply.info_type(), reply.data[2..].to_vec()))
        .collect();
    let mut expected_sizes = Vec::new();
    for value in [512u32, 4096, 1 << 20] {
        expected_sizes.extend_from_slice(&value.to_be_bytes());
    }
    let mut expected_export = (1u64 << 20).to_be_bytes().to_vec();
    expected_export.extend_from_slice(&ALL_FEATURES.to_be_bytes());
    assert_eq!(
        infos,
        vec![
            (INFO_EXPORT, expected_export),
            (INFO_NAME, b"vol".to_vec()),
            (INFO_DESCRIPTION, b"test export vol".to_vec()),
            (INFO_BLOCK_SIZE, expected_sizes),
        ]
    );
    assert_eq!(replies.last().unwrap().reply, REP_ACK);
    // Still negotiating: GO works after INFO.
    let replies = client.query(OPT_GO, "vol", &[]).await;
    assert_eq!(replies.last().unwrap().reply, REP_ACK);
    client.request(0, CMD_DISC, 1, 0, 0).await;
    finished(session).await.unwrap();
}

#[tokio::test]
async fn unknown_exports_are_refused_without_ending_negotiation() {
    let (stream, session) = start_session(two_exports(), ServeOptions::default());
    let mut client = Client::fixed_newstyle(stream).await;
    for option in [OPT_INFO, OPT_GO] {
        let replies = client.query(option, "missing", &[INFO_BLOCK_SIZE]).await;
        assert_eq!(replies.len(), 1, "no NBD_REP_INFO for an unknown export");
        assert_eq!(replies[0].reply, REP_ERR_UNKNOWN);
    }
    let replies = client.query(OPT_GO, "vol", &[]).await;
    assert_eq!(replies.last().unwrap().reply, REP_ACK);
    drop(client);
    finished(session).await.unwrap();
}

#[tokio::test]
async fn export_name_for_an_unknown_export_ends_the_session() {
    let (stream, session) = start_session(two_exports(), ServeOptions::default());
    let mut client = Client::fixed_newstyle(stream).await;
    client.send_option(OPT_EXPORT_NAME, b"missing").await;
    client.expect_closed().await;
    assert!(matches!(
        finished(session).await,
        Err(SessionError::UnknownExport { name }) if name == "missing"
    ));
}

#[tokio::test]
async fn abort_is_acknowledged_and_closes_cleanly() {
    let (stream, session) = start_session(two_exports(), ServeOptions::default());
    let mut client = Client::fixed_newstyle(stream).await;
    client.send_option(OPT_ABORT, b"").await;
    let reply = client.option_reply().await;
    assert_eq!((reply.option, reply.reply), (OPT_ABORT, REP_ACK));
    client.expect_closed().await;
    finished(session).await.unwrap();
}

#[tokio::test]
async fn unsupported_options_get_err_unsup() {
    let (stream, session) = start_session(two_exports(), ServeOptions::default());
    let mut client = Client::fixed_newstyle(stream).await;
    for option in [OPT_STRUCTURED_REPLY, OPT_STARTTLS, 9, 10, 11, 4242] {
        client.send_option(option, b"").await;
        let reply = client.option_reply().await;
        assert_eq!((reply.option, reply.reply), (option, REP_ERR_UNSUP));
    }
    // Malformed GO payloads are invalid, not fatal.
    client.send_option(OPT_GO, &[0, 0, 0, 9, b'x']).await;
    assert_eq!(client.option_reply().await.reply, REP_ERR_INVALID);
    let replies = client.query(OPT_GO, "vol", &[]).await;
    assert_eq!(replies.last().unwrap().reply, REP_ACK);
    drop(client);
    finished(session).await.unwrap();
}

#[tokio::test]
async fn oversized_options_are_skipped_and_refused() {
    let (stream, session) = start_session(two_exports(), ServeOptions::default());
    let mut client = Client::fixed_newstyle(stream).await;
    client.send_option(OPT_GO, &vec![0xee; 70 * 1024]).await;
    let reply = client.option_reply().await;
    assert_eq!((reply.option, reply.reply), (OPT_GO, REP_ERR_TOO_BIG));
    let replies = client.query(OPT_GO, "vol", &[]).await;
    assert_eq!(replies.last().unwrap().reply, REP_ACK);
    drop(client);
    finished(session).await.unwrap();
}

#[tokio::test]
async fn an_oversized_export_name_ends_the_session() {
    let (stream, session) = start_session(two_exports(), ServeOptions::default());
    let mut client = Client::fixed_newstyle(stream).await;
    // Only the header: the server must not wait for 70 KiB it will never use.
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
    header.extend_from_slice(&(70u32 * 1024).to_be_bytes());
    client.send(&header).await;
    client.expect_closed().await;
    assert!(matches!(
        finished(session).await,
        Err(SessionError::BadOption(_))
    ));
}

#[tokio::test]
async fn clients_without_fixed_newstyle_or_with_unknown_flags_are_dropped() {
    for (flags, fixed_newstyle_missing) in [(0u32, true), (0b101, false), (0x8000_0001, false)] {
        let (stream, session) = start_session(two_exports(), ServeOptions::default());
        let (mut client, _) = Client::greet(stream).await;
        client.send_flags(flags).await;
        client.expect_closed().await;
        let result = finished(session).await;
        if fixed_newstyle_missing {
            assert!(
                matches!(result, Err(SessionError::NotFixedNewstyle)),
                "{result:?}"
            );
        } else {
            assert!(
                matches!(result, Err(SessionError::ClientFlags(_))),
                "{result:?}"
            );
        }
    }
}

#[tokio::test]
async fn a_bad_option_magic_ends_the_session() {
    let (stream, session) = start_session(two_exports(), ServeOptions::default());
    let mut client = Client::fixed_newstyle(stream).await;
    client.send(b"GET / HTTP/1.1\r\n\r\n").await;
    client.expect_closed().await;
    assert!(matches!(
        finished(session).await,
        Err(SessionError::BadOption(_))
    ));
}

#[tokio::test]
async fn a_stalled_handshake_times_out() {
    let options = ServeOptions {
        handshake_timeout: Duration::from_millis(200),
        ..ServeOptions::default()
    };
    let (stream, session) = start_session(two_exports(), options);
    let mut client = Client::fixed_newstyle(stream).await;
    // Half an option, then silence.
    client.send(&IHAVEOPT.to_be_bytes()).await;
    let result = finished(session).await;
    assert!(
        matches!(result, Err(SessionError::HandshakeTimeout(_))),
        "{result:?}"
    );
    client.expect_closed().await;
}

#[tokio::test]
async fn hanging_up_between_options_is_not_an_error() {
    let (stream, session) = start_session(two_exports(), ServeOptions::default());
    let mut client = Client::fixed_newstyle(stream).await;
    client.send_option(OPT_LIST, b"").await;
    while client.option_reply().await.reply != REP_ACK {}
    drop(client);
    finished(session).await.unwrap();
}

#[tokio::test]
async fn exports_with_invalid_block_sizes_are_not_offered() {
    let mut info = export_info("odd", 1 << 20);
    info.min_block = 3;
    let (exports, _) = MemoryExports::single(info);
    let (stream, session) = start_session(std::sync::Arc::clone(&exports), ServeOptions::default());
    let mut client = Client::fixed_newstyle(stream).await;
    let replies = client.query(OPT_GO, "odd", &[INFO_BLOCK_SIZE]).await;
    assert_eq!(replies.len(), 1);
    assert_eq!(replies[0].reply, REP_ERR_UNKNOWN);
    client.send_option(OPT_EXPORT_NAME, b"odd").await;
    client.expect_closed().await;
    assert!(matches!(
        finished(session).await,
        Err(SessionError::MisconfiguredExport { .. })
    ));
}

#[tokio::test]
async fn read_only_exports_say_so() {
    let mut info = export_info("ro", 1 << 20);
    info.read_only = true;
    info.can_trim = false;
    info.can_multi_conn = false;
    let (exports, _) = MemoryExports::single(info);
    let (stream, session) = start_session(exports, ServeOptions::default());
    let (client, _, flags) = Client::connect(stream, "ro").await;
    assert_eq!(
        flags,
        FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_WRITE_ZEROES
    );
    drop(client);
    finished(session).await.unwrap();
}
