//! `nbd-load`: a small NBD load generator that keeps an exact flush cadence at any queue depth.
//!
//! fio's `--fsync=N` with `ioengine=nbd` at iodepth > 1 sends a FLUSH after almost every write
//! (see BENCHMARKS.md), so "4K random writes at QD32 with a flush every 32 writes" cannot be
//! asked of fio. This client keeps `--iodepth` requests in flight on one connection and sends
//! exactly one FLUSH after every `--flush-every` writes (the FLUSH takes a queue slot like fio's
//! sync requests do). It speaks the fixed-newstyle handshake with `NBD_OPT_GO` and simple
//! replies only, so it works against any NBD server (blockgate, qemu-nbd, nbdkit).
//!
//! Prints one JSON object: operations, flushes, IOPS, MiB/s and latency percentiles.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, ValueEnum};
use rand::{Rng, RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::Semaphore;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Pattern {
    Randwrite,
    Randread,
    Write,
    Read,
}

#[derive(Debug, Parser)]
#[command(
    name = "nbd-load",
    about = "NBD load generator with an exact flush cadence at any queue depth, as JSON"
)]
struct Args {
    /// The server's unix socket.
    #[arg(long)]
    socket: PathBuf,
    /// Export name.
    #[arg(long, default_value = "")]
    export: String,
    #[arg(long, value_enum, default_value = "randwrite")]
    pattern: Pattern,
    /// Request size in bytes.
    #[arg(long, default_value_t = 4096)]
    block_size: u32,
    /// Requests in flight (flushes included).
    #[arg(long, default_value_t = 32)]
    iodepth: usize,
    /// Send one FLUSH after every N writes (0: never).
    #[arg(long, default_value_t = 0)]
    flush_every: u64,
    /// Bytes of the export to use, from offset 0 (default: all of it).
    #[arg(long)]
    region: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, default_value_t = 20.0)]
    runtime: f64,
    /// Stop after this many reads or writes (whichever of this and --runtime comes first).
    #[arg(long)]
    max_ops: Option<u64>,
    /// Seed for offsets and data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Data,
    Flush,
}

#[derive(Debug, Default)]
struct Completed {
    data_latencies_ns: Vec<u64>,
    flushes: u64,
    flush_latency_ns_total: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.block_size > 0, "--block-size must be positive");
    let stream = UnixStream::connect(&args.socket)
        .await
        .with_context(|| format!("cannot connect to {}", args.socket.display()))?;
    let (read_half, mut write_half) = stream.into_split();
    let mut reader = BufReader::with_capacity(1 << 20, read_half);
    let export_size = handshake(&mut reader, &mut write_half, &args.export).await?;

    let block = u64::from(args.block_size);
    let region = args.region.unwrap_or(export_size).min(export_size);
    let blocks = region / block;
    ensure!(blocks > 0, "the region holds no whole block");
    let writes = matches!(args.pattern, Pattern::Randwrite | Pattern::Write);
    let command = if writes { CMD_WRITE } else { CMD_READ };
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let mut payload = vec![0u8; usize::try_from(block)?];
    rng.fill_bytes(&mut payload);

    let iodepth = args.iodepth.max(1);
    let slots = Arc::new(Semaphore::new(iodepth));
    let pending: Arc<Mutex<HashMap<u64, (Kind, Instant)>>> = Arc::default();
    let block_size = args.block_size;

    let reader_task = {
        let slots = slots.clone();
        let pending = pending.clone();
        tokio::spawn(async move {
            let mut completed = Completed::default();
            let mut sink = vec![0u8; usize::try_from(block_size)?];
            loop {
                let mut header = [0u8; 16];
                if let Err(error) = reader.read_exact(&mut header).await {
                    if error.kind() == std::io::ErrorKind::UnexpectedEof {
                        return Ok::<_, anyhow::Error>(completed);
                    }
                    return Err(error).context("reading a reply");
                }
                let magic = u32::from_be_bytes(header[0..4].try_into()?);
                let error = u32::from_be_bytes(header[4..8].try_into()?);
                let cookie = u64::from_be_bytes(header[8..16].try_into()?);
                ensure!(magic == SIMPLE_REPLY_MAGIC, "bad reply magic {magic:#x}");
                ensure!(error == 0, "request {cookie} failed with NBD error {error}");
                let Some((kind, started)) = pending.lock().ok().and_then(|mut p| p.remove(&cookie))
                else {
                    bail!("reply to unknown request {cookie}");
                };
                let latency = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
                match kind {
                    Kind::Data => {
                        if command == CMD_READ {
                            reader.read_exact(&mut sink).await.context("reading data")?;
                        }
                        completed.data_latencies_ns.push(latency);
                    }
                    Kind::Flush => {
                        completed.flushes += 1;
                        completed.flush_latency_ns_total += latency;
                    }
                }
                slots.add_permits(1);
            }
        })
    };

    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(args.runtime.max(0.0));
    let max_ops = args.max_ops.unwrap_or(u64::MAX);
    let mut issued: u64 = 0;
    let mut since_flush: u64 = 0;
    let mut cookie: u64 = 0;
    let mut next_block: u64 = 0;
    let mut request = Vec::with_capacity(28 + payload.len());
    while issued < max_ops && Instant::now() < deadline {
        slots.acquire().await?.forget();
        let (kind, kind_code, offset, length) =
            if writes && args.flush_every > 0 && since_flush >= args.flush_every {
                since_flush = 0;
                (Kind::Flush, CMD_FLUSH, 0, 0)
            } else {
                let index = match args.pattern {
                    Pattern::Randwrite | Pattern::Randread => rng.gen_range(0..blocks),
                    Pattern::Write | Pattern::Read => {
                        let index = next_block;
                        next_block = (next_block + 1) % blocks;
                        index
                    }
                };
                issued += 1;
                since_flush += 1;
                (Kind::Data, command, index * block, block_size)
            };
        cookie += 1;
        request.clear();
        request.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        request.extend_from_slice(&0u16.to_be_bytes());
        request.extend_from_slice(&kind_code.to_be_bytes());
        request.extend_from_slice(&cookie.to_be_bytes());
        request.extend_from_slice(&offset.to_be_bytes());
        request.extend_from_slice(&length.to_be_bytes());
        if kind_code == CMD_WRITE {
            request.extend_from_slice(&payload);
        }
        if let Ok(mut pending) = pending.lock() {
            pending.insert(cookie, (kind, Instant::now()));
        }
        write_half
            .write_all(&request)
            .await
            .context("sending a request")?;
    }
    // Wait for every request in flight, then say goodbye; the server then closes.
    let _all = slots
        .acquire_many(u32::try_from(iodepth).unwrap_or(u32::MAX))
        .await?;
    let elapsed = started.elapsed().as_secs_f64();
    request.clear();
    request.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    request.extend_from_slice(&0u16.to_be_bytes());
    request.extend_from_slice(&CMD_DISC.to_be_bytes());
    request.extend_from_slice(&[0u8; 20]);
    write_half.write_all(&request).await?;
    write_half.shutdown().await?;
    let mut completed = reader_task.await??;

    let ops = completed.data_latencies_ns.len() as u64;
    completed.data_latencies_ns.sort_unstable();
    let percentile = |p: f64| -> f64 {
        let latencies = &completed.data_latencies_ns;
        if latencies.is_empty() {
            return 0.0;
        }
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let index = ((latencies.len() - 1) as f64 * p).round() as usize;
        latencies[index] as f64 / 1000.0
    };
    let mean_us = if ops == 0 {
        0.0
    } else {
        completed.data_latencies_ns.iter().sum::<u64>() as f64 / ops as f64 / 1000.0
    };
    let report = serde_json::json!({
        "pattern": format!("{:?}", args.pattern).to_lowercase(),
        "export": args.export,
        "export_size": export_size,
        "region": region,
        "block_size": block_size,
        "iodepth": iodepth,
        "flush_every": args.flush_every,
        "seconds": elapsed,
        "ops": ops,
        "flushes": completed.flushes,
        "iops": ops as f64 / elapsed,
        "mib_per_second": (ops * block) as f64 / f64::from(1u32 << 20) / elapsed,
        "latency_us": {
            "mean": mean_us,
            "p50": percentile(0.50),
            "p99": percentile(0.99),
            "max": percentile(1.0),
        },
        "flush_latency_us_mean": if completed.flushes == 0 {
            0.0
        } else {
            completed.flush_latency_ns_total as f64 / completed.flushes as f64 / 1000.0
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Fixed-newstyle handshake with `NBD_OPT_GO`; returns the export size.
async fn handshake<R, W>(reader: &mut R, writer: &mut W, export: &str) -> anyhow::Result<u64>
where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let magic = reader.read_u64().await.context("reading the greeting")?;
    let option_magic = reader.read_u64().await?;
    ensure!(
        magic == NBDMAGIC && option_magic == IHAVEOPT,
        "not a newstyle NBD server"
    );
    let server_flags = reader.read_u16().await?;
    ensure!(
        server_flags & FLAG_FIXED_NEWSTYLE != 0,
        "the server does not speak fixed newstyle"
    );
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 });
    writer.write_u32(client_flags).await?;

    let name = export.as_bytes();
    let name_length = u32::try_from(name.len()).context("export name too long")?;
    writer.write_u64(IHAVEOPT).await?;
    writer.write_u32(OPT_GO).await?;
    writer.write_u32(4 + name_length + 2).await?;
    writer.write_u32(name_length).await?;
    writer.write_all(name).await?;
    writer.write_u16(0).await?;
    writer.flush().await?;

    let mut size = None;
    loop {
        let magic = reader.read_u64().await.context("reading an option reply")?;
        ensure!(
            magic == OPTION_REPLY_MAGIC,
            "bad option reply magic {magic:#x}"
        );
        let _option = reader.read_u32().await?;
        let reply = reader.read_u32().await?;
        let length = reader.read_u32().await?;
        let mut data = vec![0u8; usize::try_from(length)?];
        reader.read_exact(&mut data).await?;
        if reply & REP_FLAG_ERROR != 0 {
            bail!(
                "the server refused export {export:?} (reply {reply:#x}): {}",
                String::from_utf8_lossy(&data)
            );
        }
        match reply {
            REP_INFO
                if data.len() >= 12 && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
            {
                size = Some(u64::from_be_bytes(data[2..10].try_into()?));
            }
            REP_ACK => break,
            _ => {}
        }
    }
    size.context("the server sent no export size")
}
