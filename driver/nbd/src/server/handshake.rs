//! Fixed newstyle option haggling, from the greeting to the start of transmission or the
//! client's abort. Transmission is never entered without the client having been told the
//! export's size and flags (the `NBD_OPT_EXPORT_NAME` reply or `NBD_INFO_EXPORT`).

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::admission::BlockSizes;
use super::{Exports, NegotiatedExport, SessionError, fill};
use crate::wire::{self, ClientOption, Decoded, ExportQuery, OptionFrameError};

/// Runs the handshake. `Ok(None)` means the client aborted or went away between messages.
pub(super) async fn negotiate<S>(
    stream: &mut S,
    received: &mut BytesMut,
    exports: &dyn Exports,
) -> Result<Option<NegotiatedExport>, SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = BytesMut::with_capacity(1024);
    wire::encode_server_greeting(&mut out, wire::SERVER_HANDSHAKE_FLAGS);
    send(stream, &mut out).await?;

    if !fill(stream, received, wire::CLIENT_FLAGS_LEN).await? {
        return end_of_stream(received);
    }
    let client = match wire::decode_client_flags(received) {
        Ok(Some(client)) => client,
        Ok(None) => return Err(SessionError::UnexpectedEof),
        Err(unknown) => return Err(SessionError::ClientFlags(unknown)),
    };
    received.advance(wire::CLIENT_FLAGS_LEN);
    if !client.fixed_newstyle {
        return Err(SessionError::NotFixedNewstyle);
    }

    loop {
        let request = match wire::decode_option(received, wire::MAX_OPTION_PAYLOAD) {
            Ok(Decoded::Complete { value, consumed }) => {
                received.advance(consumed);
                value
            }
            Ok(Decoded::Incomplete { needed }) => {
                if !fill(stream, received, needed).await? {
                    return end_of_stream(received);
                }
                continue;
            }
            Err(too_large @ OptionFrameError::TooLarge { option, .. }) => {
                if option == wire::NBD_OPT_EXPORT_NAME {
                    // This option cannot be answered with an error.
                    return Err(SessionError::BadOption(too_large));
                }
                tracing::debug!(error = %too_large, "skipping oversized option");
                skip(stream, received, too_large.skip_len().unwrap_or(0)).await?;
                reply_error(
                    &mut out,
                    option,
                    wire::NBD_REP_ERR_TOO_BIG,
                    "option too large",
                );
                send(stream, &mut out).await?;
                continue;
            }
            Err(bad_magic) => return Err(SessionError::BadOption(bad_magic)),
        };
        let option = request.option;
        let parsed = match request.parsed {
            Ok(parsed) => parsed,
            Err(invalid) if option == wire::NBD_OPT_EXPORT_NAME => {
                return Err(SessionError::InvalidExportName(invalid));
            }
            Err(invalid) => {
                tracing::debug!(option, error = %invalid, "invalid option");
                reply_error(
                    &mut out,
                    option,
                    wire::NBD_REP_ERR_INVALID,
                    &invalid.to_string(),
                );
                send(stream, &mut out).await?;
                continue;
            }
        };
        tracing::debug!(option, "option");
        match parsed {
            ClientOption::Abort => {
                wire::encode_option_ack(&mut out, option);
                // The client may already have hung up, as the spec allows.
                if send(stream, &mut out).await.is_ok() {
                    let _ = stream.shutdown().await;
                }
                return Ok(None);
            }
            ClientOption::List => {
                for export in exports.list().await {
                    if let Err(error) = wire::encode_option_server(
                        &mut out,
                        option,
                        &export.name,
                        &export.description,
                    ) {
                        tracing::warn!(name = %export.name, %error, "export left out of the list");
                    }
                }
                wire::encode_option_ack(&mut out, option);
                send(stream, &mut out).await?;
            }
            ClientOption::Info(query) | ClientOption::Go(query) => {
                let export = answer_query(exports, &query, option, &mut out).await;
                send(stream, &mut out).await?;
                if option == wire::NBD_OPT_GO && export.is_some() {
                    return Ok(export);
                }
            }
            ClientOption::ExportName { name } => {
                let Some(device) = exports.open(&name).await else {
                    return Err(SessionError::UnknownExport { name });
                };
                let info = device.info();
                let block_sizes = BlockSizes::from_info(&info).map_err(|source| {
                    SessionError::MisconfiguredExport {
                        name: info.name.clone(),
                        source,
                    }
                })?;
                let transmission_flags = info.transmission_flags();
                wire::encode_export_name_reply(
                    &mut out,
                    info.size,
                    transmission_flags,
                    client.no_zeroes,
                );
                send(stream, &mut out).await?;
                return Ok(Some(NegotiatedExport {
                    name: info.name,
                    device,
                    transmission_flags,
                    block_sizes,
                }));
            }
            ClientOption::Unsupported => {
                reply_error(
                    &mut out,
                    option,
                    wire::NBD_REP_ERR_UNSUP,
                    "option not supported",
                );
                send(stream, &mut out).await?;
            }
        }
    }
}

/// Answers `NBD_OPT_INFO` or `NBD_OPT_GO`: the export's information then `NBD_REP_ACK`, or an
/// error reply. Returns the export when the answer was a success.
async fn answer_query(
    exports: &dyn Exports,
    query: &ExportQuery,
    option: u32,
    out: &mut BytesMut,
) -> Option<NegotiatedExport> {
    let Some(device) = exports.open(&query.name).await else {
        tracing::debug!(name = %query.name, "unknown export");
        reply_error(out, option, wire::NBD_REP_ERR_UNKNOWN, "no such export");
        return None;
    };
    let info = device.info();
    let block_sizes = match BlockSizes::from_info(&info) {
        Ok(block_sizes) => block_sizes,
        Err(error) => {
            tracing::error!(name = %info.name, %error, "export cannot be offered");
            reply_error(
                out,
                option,
                wire::NBD_REP_ERR_UNKNOWN,
                "export is misconfigured",
            );
            return None;
        }
    };
    let transmission_flags = info.transmission_flags();
    wire::encode_info_export(out, option, info.size, transmission_flags);
    if query.requests(wire::NBD_INFO_NAME)
        && let Err(error) = wire::encode_info_name(out, option, &info.name)
    {
        tracing::warn!(%error, "export name left out");
    }
    if query.requests(wire::NBD_INFO_DESCRIPTION)
        && !info.description.is_empty()
        && let Err(error) = wire::encode_info_description(out, option, &info.description)
    {
        tracing::warn!(%error, "export description left out");
    }
    // Sent whether asked for or not (the spec allows unrequested information): the kernel and
    // qemu use it when present, and clients that did not ask ignore it.
    wire::encode_info_block_size(
        out,
        option,
        block_sizes.minimum,
        block_sizes.preferred,
        block_sizes.maximum,
    );
    wire::encode_option_ack(out, option);
    Some(NegotiatedExport {
        name: info.name,
        device,
        transmission_flags,
        block_sizes,
    })
}

fn reply_error(out: &mut BytesMut, option: u32, reply: u32, message: &str) {
    if wire::encode_option_error(out, option, reply, message).is_err() {
        // Only our own short messages get here, so this cannot happen; an empty message is
        // still a valid reply.
        wire::encode_option_reply_header(out, option, reply, 0);
    }
}

async fn send<W: AsyncWrite + Unpin>(stream: &mut W, out: &mut BytesMut) -> std::io::Result<()> {
    stream.write_all(out).await?;
    stream.flush().await?;
    out.clear();
    Ok(())
}

/// Reads and drops `remaining` bytes, taking first what is already buffered.
async fn skip<R: AsyncRead + Unpin>(
    reader: &mut R,
    received: &mut BytesMut,
    mut remaining: u64,
) -> Result<(), SessionError> {
    loop {
        let buffered = u64::try_from(received.len()).unwrap_or(u64::MAX);
        let take = remaining.min(buffered);
        received.advance(usize::try_from(take).unwrap_or(received.len()));
        remaining -= take;
        if remaining == 0 {
            return Ok(());
        }
        received.clear();
        received.reserve(64 * 1024);
        if reader.read_buf(received).await? == 0 {
            return Err(SessionError::UnexpectedEof);
        }
    }
}

/// The client closed its side: cleanly if nothing of a next message had arrived.
fn end_of_stream(received: &BytesMut) -> Result<Option<NegotiatedExport>, SessionError> {
    if received.is_empty() {
        Ok(None)
    } else {
        Err(SessionError::UnexpectedEof)
    }
}
