//! The transmission phase: one reader that decodes requests and starts each admitted one as its
//! own task (at most `max_in_flight` at once), and one writer that sends the replies as they
//! complete, in whatever order, writing those that are ready together.
//!
//! Flush ordering. The spec asks that a FLUSH reply cover every write the server replied to
//! before it processed the FLUSH. A reply is queued only after its device call returned, and a
//! FLUSH reaches the device only after it was read from the socket, which the client sent only
//! after it had those replies; so every covered write has completed at the device before
//! [`BlockDevice::flush`] is called, and the device's own contract ("make durable every write
//! that completed before this call") is enough. Writes still in flight when the FLUSH arrives
//! are not covered, as in the spec and the kernel's `REQ_PREFLUSH`. The session needs no
//! barrier of its own, and reads and writes keep running concurrently with a flush.
//!
//! Ending. On `NBD_CMD_DISC` or a hang-up the reader stops, every request already handed to the
//! device is finished and its reply flushed, then the socket is shut down. On a protocol
//! violation or socket error the device calls are still finished (a write is never cancelled
//! half-way) but no further replies are sent.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{JoinError, JoinSet};
use tracing::Instrument;

use super::admission::{self, MAX_PAYLOAD, Work};
use super::{BlockDevice, NegotiatedExport, ServeOptions, SessionError};
use crate::wire::{self, Command, RequestFrame};

/// Initial size of the receive buffer; many small requests are read in one system call.
pub(super) const READ_BUFFER_CAPACITY: usize = 256 * 1024;
/// Write payloads smaller than this are copied out of the receive buffer, so that a device
/// keeping one does not pin the whole buffer; larger ones are handed over without a copy.
const COPY_PAYLOAD_BELOW: usize = 64 * 1024;
/// Replies written in one batch stop growing past this many bytes.
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Read data smaller than this is copied next to its reply header; larger data is written
/// from its own buffer.
const COPY_READ_DATA_BELOW: usize = 4096;
const MAX_IO_SLICES: usize = 64;

/// A finished request on its way to the writer, holding its in-flight permit until written.
struct Reply {
    cookie: u64,
    outcome: Result<Option<Bytes>, u32>,
    permit: OwnedSemaphorePermit,
}

/// The promise of exactly one reply for a request. Dropping it unsent (the device call
/// panicked) replies `NBD_EIO`, so the client is never left waiting.
struct PendingReply {
    cookie: u64,
    replies: UnboundedSender<Reply>,
    permit: Option<OwnedSemaphorePermit>,
}

impl PendingReply {
    fn send(mut self, outcome: Result<Option<Bytes>, u32>) {
        if let Some(permit) = self.permit.take() {
            // The writer is gone only when the session is ending without further replies.
            let _ = self.replies.send(Reply {
                cookie: self.cookie,
                outcome,
                permit,
            });
        }
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            let _ = self.replies.send(Reply {
                cookie: self.cookie,
                outcome: Err(wire::NBD_EIO),
                permit,
            });
        }
    }
}

/// How the reader stopped without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    Disconnect,
    HungUp,
}

pub(super) async fn run<S>(
    stream: S,
    mut received: BytesMut,
    export: NegotiatedExport,
    options: &ServeOptions,
) -> Result<(), SessionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut reader, writer) = tokio::io::split(stream);
    let (replies, reply_queue) = mpsc::unbounded_channel();
    let mut writer_task = tokio::spawn(write_replies(writer, reply_queue).in_current_span());
    // The queue is unbounded, but every reply in it holds one of these permits.
    let permits = Arc::new(Semaphore::new(
        options.max_in_flight.clamp(1, Semaphore::MAX_PERMITS),
    ));
    let mut in_flight = JoinSet::new();

    let ending = loop {
        while let Some(finished) = in_flight.try_join_next() {
            note_task_end(finished);
        }
        let permit = tokio::select! {
            biased;
            result = &mut writer_task => break Err(writer_stopped(result)),
            permit = Arc::clone(&permits).acquire_owned() => match permit {
                Ok(permit) => permit,
                // The semaphore is never closed.
                Err(_) => break Ok(Ending::HungUp),
            },
        };
        let next = tokio::select! {
            biased;
            result = &mut writer_task => break Err(writer_stopped(result)),
            next = read_request(&mut reader, &mut received) => next,
        };
        let (frame, payload) = match next {
            Ok(Some(next)) => next,
            Ok(None) => break Ok(Ending::HungUp),
            Err(error) => break Err(error),
        };
        if let Ok(request) = &frame.request
            && request.command == Command::Disc
        {
            break Ok(Ending::Disconnect);
        }
        let reply = PendingReply {
            cookie: frame.header.cookie,
            replies: replies.clone(),
            permit: Some(permit),
        };
        let request = match frame.request {
            Ok(request) => request,
            Err(error) => {
                tracing::debug!(cookie = frame.header.cookie, %error, "request rejected");
                reply.send(Err(error.nbd_error()));
                continue;
            }
        };
        let device = &export.device;
        match admission::admit(
            &request,
            export.transmission_flags,
            &export.block_sizes,
            || device.info().size,
        ) {
            Err(error) => {
                tracing::debug!(?request, error, "request refused");
                reply.send(Err(error));
            }
            Ok(Work::Nothing) => reply.send(Ok(None)),
            Ok(work) => {
                let span = tracing::debug_span!(
                    "nbd_request",
                    command = ?request.command,
                    cookie = request.cookie
                );
                let task = execute(Arc::clone(device), work, payload, reply);
                in_flight.spawn(task.instrument(span));
            }
        }
    };

    // Requests already handed to the device always run to completion.
    while let Some(finished) = in_flight.join_next().await {
        note_task_end(finished);
    }
    drop(replies);
    match ending {
        Ok(ending) => {
            // The writer is still running: it stopping first ends the loop with an error.
            match writer_task.await {
                Ok(Ok(())) => {
                    tracing::debug!(?ending, "session ended");
                    Ok(())
                }
                // A client that hung up cannot be told anything more.
                Ok(Err(error)) if ending == Ending::HungUp => {
                    tracing::debug!(%error, "replies undelivered after hang-up");
                    Ok(())
                }
                Ok(Err(error)) => Err(SessionError::Socket(error)),
                Err(join_error) => Err(SessionError::ReplyWriter(join_error)),
            }
        }
        Err(error) => {
            writer_task.abort();
            Err(error)
        }
    }
}

/// The error to end with when the writer stopped while the reader was still running.
fn writer_stopped(result: Result<std::io::Result<()>, JoinError>) -> SessionError {
    match result {
        Ok(Err(error)) => SessionError::Socket(error),
        Err(join_error) => SessionError::ReplyWriter(join_error),
        // The writer ends cleanly only after every sender is gone, and the reader holds one.
        Ok(Ok(())) => SessionError::Socket(std::io::ErrorKind::BrokenPipe.into()),
    }
}

fn note_task_end(finished: Result<(), JoinError>) {
    if let Err(join_error) = finished {
        tracing::error!(error = %join_error, "request task failed; replied EIO");
    }
}

/// Reads one request and its payload. `Ok(None)` when the client closed the connection between
/// requests. Cancel-safe: partial progress stays in `received`.
async fn read_request<R: AsyncRead + Unpin>(
    reader: &mut R,
    received: &mut BytesMut,
) -> Result<Option<(RequestFrame, Bytes)>, SessionError> {
    let limit = usize::try_from(MAX_PAYLOAD).unwrap_or(usize::MAX);
    loop {
        let needed = match wire::decode_request(received).map_err(SessionError::BadRequest)? {
            None => wire::REQUEST_HEADER_LEN,
            Some(frame) => {
                let length = frame.header.payload_len();
                let payload_len = usize::try_from(length)
                    .ok()
                    .filter(|payload_len| *payload_len <= limit)
                    .ok_or(SessionError::WritePayloadTooLarge { length, limit })?;
                let total = wire::REQUEST_HEADER_LEN + payload_len;
                if received.len() >= total {
                    received.advance(wire::REQUEST_HEADER_LEN);
                    let payload = if payload_len < COPY_PAYLOAD_BELOW {
                        let payload = Bytes::copy_from_slice(&received[..payload_len]);
                        received.advance(payload_len);
                        payload
                    } else {
                        received.split_to(payload_len).freeze()
                    };
                    return Ok(Some((frame, payload)));
                }
                total
            }
        };
        received.reserve((needed - received.len()).max(COPY_PAYLOAD_BELOW));
        if reader.read_buf(received).await? == 0 {
            return if received.is_empty() {
                Ok(None)
            } else {
                Err(SessionError::UnexpectedEof)
            };
        }
    }
}

async fn execute(device: Arc<dyn BlockDevice>, work: Work, payload: Bytes, reply: PendingReply) {
    let outcome = match work {
        Work::Read { offset, length } => match device.read(offset, length).await {
            Ok(data) if usize::try_from(length) == Ok(data.len()) => Ok(Some(data)),
            Ok(data) => {
                tracing::error!(
                    offset,
                    length,
                    returned = data.len(),
                    "device returned the wrong amount of data"
                );
                Err(wire::NBD_EIO)
            }
            Err(error) => Err(device_error(error)),
        },
        Work::Write { offset, fua } => device
            .write(offset, payload, fua)
            .await
            .map(|()| None)
            .map_err(device_error),
        Work::Flush => device.flush().await.map(|()| None).map_err(device_error),
        Work::Trim {
            offset,
            length,
            fua,
        } => device
            .trim(offset, length, fua)
            .await
            .map(|()| None)
            .map_err(device_error),
        Work::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
        } => device
            .write_zeroes(offset, length, fua, no_hole)
            .await
            .map(|()| None)
            .map_err(device_error),
        Work::Nothing => Ok(None),
    };
    reply.send(outcome);
}

fn device_error(error: super::IoError) -> u32 {
    tracing::warn!(%error, "device error");
    error.nbd_error()
}

/// Writes replies as they arrive, batching whatever is ready, until every sender is gone; then
/// shuts the socket down.
async fn write_replies<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut queue: UnboundedReceiver<Reply>,
) -> std::io::Result<()> {
    let mut staged = BytesMut::with_capacity(MAX_BATCH_BYTES);
    let mut chunks: VecDeque<Bytes> = VecDeque::new();
    let mut permits: Vec<OwnedSemaphorePermit> = Vec::new();
    while let Some(first) = queue.recv().await {
        let mut next = Some(first);
        let mut batch_bytes = 0usize;
        while let Some(Reply {
            cookie,
            outcome,
            permit,
        }) = next.take()
        {
            let (error, data) = match outcome {
                Ok(data) => (0, data),
                Err(error) => (error, None),
            };
            wire::encode_simple_reply(&mut staged, error, cookie);
            batch_bytes += wire::SIMPLE_REPLY_LEN;
            if let Some(data) = data {
                batch_bytes += data.len();
                if data.len() < COPY_READ_DATA_BELOW {
                    staged.extend_from_slice(&data);
                } else {
                    chunks.push_back(staged.split().freeze());
                    chunks.push_back(data);
                }
            }
            permits.push(permit);
            if batch_bytes < MAX_BATCH_BYTES {
                next = queue.try_recv().ok();
            }
        }
        if !staged.is_empty() {
            chunks.push_back(staged.split().freeze());
        }
        write_chunks(&mut writer, &mut chunks).await?;
        writer.flush().await?;
        // Only now are these requests no longer in flight.
        permits.clear();
    }
    writer.shutdown().await
}

async fn write_chunks<W: AsyncWrite + Unpin>(
    writer: &mut W,
    chunks: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    chunks.retain(|chunk| !chunk.is_empty());
    while let Some(front) = chunks.front() {
        let written = if writer.is_write_vectored() && chunks.len() > 1 {
            let mut slices = [IoSlice::new(&[]); MAX_IO_SLICES];
            let mut count = 0;
            for (slot, chunk) in slices.iter_mut().zip(chunks.iter()) {
                *slot = IoSlice::new(chunk);
                count += 1;
            }
            writer.write_vectored(&slices[..count]).await?
        } else {
            writer.write(front).await?
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        consume(chunks, written);
    }
    Ok(())
}

/// Drops `written` bytes from the front of `chunks`.
fn consume(chunks: &mut VecDeque<Bytes>, mut written: usize) {
    while written > 0 {
        let Some(front) = chunks.front_mut() else {
            return;
        };
        if front.len() <= written {
            written -= front.len();
            chunks.pop_front();
        } else {
            front.advance(written);
            written = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consume_walks_across_chunks() {
        let mut chunks: VecDeque<Bytes> = [&b"abc"[..], b"de", b"fghi"]
            .into_iter()
            .map(Bytes::from_static)
            .collect();
        consume(&mut chunks, 4);
        assert_eq!(
            chunks,
            [Bytes::from_static(b"e"), Bytes::from_static(b"fghi")]
        );
        consume(&mut chunks, 1);
        assert_eq!(chunks, [Bytes::from_static(b"fghi")]);
        consume(&mut chunks, 10);
        assert!(chunks.is_empty());
    }

    #[tokio::test]
    async fn write_chunks_writes_everything_in_order() {
        let (mut near, mut far) = tokio::io::duplex(7);
        let mut chunks: VecDeque<Bytes> = (0..100u8)
            .map(|i| Bytes::from(vec![i; usize::from(i % 5)]))
            .collect();
        let expected: Vec<u8> = chunks.iter().flat_map(|c| c.to_vec()).collect();
        let reader = tokio::spawn(async move {
            let mut all = Vec::new();
            far.read_to_end(&mut all).await.unwrap();
            all
        });
        write_chunks(&mut near, &mut chunks).await.unwrap();
        drop(near);
        assert_eq!(reader.await.unwrap(), expected);
    }
}
