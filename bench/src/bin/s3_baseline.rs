//! `s3-baseline`: the raw throughput of an S3 server through aws-sdk-s3, measured the way the
//! gateway uses it, so that the gateway's upload and cold-read figures have a baseline.
//!
//! PUT phase: `--total-mib` of incompressible data as `--object-mib` objects (the gateway's
//! segment size, one PutObject each), `--concurrency` at once (the gateway's
//! `--upload-concurrency`). GET phase: the same bytes read back with ranged GETs of
//! `--get-range-mib` (the engine's read-ahead), `--concurrency` at once. The objects are
//! deleted afterwards (not timed). Prints one JSON object on stdout.
//!
//! The client is configured like blockgate's `S3Store`: path-style addressing, checksums only
//! when an operation requires them, no checksum algorithm on uploads.

use std::time::Instant;

use anyhow::{Context, bail};
use aws_config::BehaviorVersion;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use clap::Parser;
use futures::stream::{self, StreamExt, TryStreamExt};
use rand::RngCore;

const MIB: u64 = 1 << 20;

#[derive(Debug, Parser)]
#[command(
    name = "s3-baseline",
    about = "Raw aws-sdk-s3 PUT and ranged-GET throughput against one bucket, as JSON"
)]
struct Args {
    /// S3 endpoint URL, e.g. http://127.0.0.1:9000.
    #[arg(long)]
    endpoint: String,
    /// Bucket to write into (must exist).
    #[arg(long)]
    bucket: String,
    #[arg(long, default_value = "us-east-1")]
    region: String,
    #[arg(long, env = "AWS_ACCESS_KEY_ID")]
    access_key: String,
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    secret_key: String,
    /// Bytes to upload and read back, in MiB.
    #[arg(long, default_value_t = 1024)]
    total_mib: u64,
    /// Size of each object (the gateway's segment size), in MiB.
    #[arg(long, default_value_t = 8)]
    object_mib: u64,
    /// Requests in flight (the gateway's upload concurrency).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Size of each ranged GET (the engine's read-ahead), in MiB.
    #[arg(long, default_value_t = 4)]
    get_range_mib: u64,
    /// Key prefix of the objects written (default: `s3-baseline/<random>`).
    #[arg(long)]
    prefix: Option<String>,
    /// Leave the objects in the bucket.
    #[arg(long)]
    keep: bool,
    /// Send PUTs as the gateway does by default: the payload unsigned (`UNSIGNED-PAYLOAD`)
    /// with its CRC32C in `x-amz-checksum-crc32c` for the server to verify. Without it, the
    /// SDK's default: the payload's SHA-256 in the signature.
    #[arg(long)]
    unsigned_payload: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.total_mib == 0 || args.object_mib == 0 || args.get_range_mib == 0 {
        bail!("--total-mib, --object-mib and --get-range-mib must be positive");
    }
    let concurrency = args.concurrency.max(1);
    let object_bytes = args.object_mib * MIB;
    let objects = args.total_mib.div_ceil(args.object_mib);
    let range_bytes = args.get_range_mib.min(args.object_mib) * MIB;
    let prefix = args
        .prefix
        .clone()
        .unwrap_or_else(|| format!("s3-baseline/{:016x}", rand::random::<u64>()));
    let client = client(&args).await;

    let mut data = vec![0u8; usize::try_from(object_bytes).context("--object-mib too large")?];
    rand::thread_rng().fill_bytes(&mut data);
    let data = Bytes::from(data);
    let data_crc32c = base64_crc32c(&data);
    let keys: Vec<String> = (0..objects)
        .map(|index| format!("{prefix}/{index:08}"))
        .collect();

    let started = Instant::now();
    stream::iter(keys.iter())
        .map(|key| {
            let client = &client;
            let data = data.clone();
            let bucket = &args.bucket;
            let unsigned = args.unsigned_payload;
            let data_crc32c = &data_crc32c;
            async move {
                let request = client
                    .put_object()
                    .bucket(bucket)
                    .key(key)
                    .body(ByteStream::from(data));
                let sent = if unsigned {
                    request
                        .checksum_crc32_c(data_crc32c)
                        .customize()
                        .disable_payload_signing()
                        .send()
                        .await
                } else {
                    request.send().await
                };
                sent.with_context(|| format!("PUT {key}")).map(|_| ())
            }
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    let put_seconds = started.elapsed().as_secs_f64();

    let ranges: Vec<(&String, u64, u64)> = keys
        .iter()
        .flat_map(|key| {
            (0..object_bytes)
                .step_by(usize::try_from(range_bytes).unwrap_or(usize::MAX))
                .map(move |start| (key, start, (start + range_bytes).min(object_bytes)))
        })
        .collect();
    let started = Instant::now();
    let fetched: Vec<u64> = stream::iter(ranges.iter())
        .map(|&(key, start, end)| {
            let client = &client;
            let bucket = &args.bucket;
            async move {
                let body = client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .range(format!("bytes={start}-{}", end - 1))
                    .send()
                    .await
                    .with_context(|| format!("GET {key} bytes {start}..{end}"))?
                    .body
                    .collect()
                    .await
                    .with_context(|| format!("GET {key} bytes {start}..{end}: body"))?
                    .into_bytes();
                let length = body.len() as u64;
                if length != end - start {
                    bail!(
                        "GET {key} bytes {start}..{end}: {length} bytes, expected {}",
                        end - start
                    );
                }
                Ok(length)
            }
        })
        .buffer_unordered(concurrency)
        .try_collect()
        .await?;
    let get_seconds = started.elapsed().as_secs_f64();
    let get_bytes: u64 = fetched.iter().sum();

    if !args.keep {
        stream::iter(keys.iter())
            .map(|key| {
                let client = &client;
                let bucket = &args.bucket;
                async move {
                    client
                        .delete_object()
                        .bucket(bucket)
                        .key(key)
                        .send()
                        .await
                        .with_context(|| format!("DELETE {key}"))
                        .map(|_| ())
                }
            })
            .buffer_unordered(concurrency)
            .try_collect::<Vec<()>>()
            .await?;
    }

    let put_bytes = objects * object_bytes;
    let mib_per_second = |bytes: u64, seconds: f64| bytes as f64 / MIB as f64 / seconds.max(1e-9);
    let report = serde_json::json!({
        "endpoint": args.endpoint,
        "bucket": args.bucket,
        "prefix": prefix,
        "concurrency": concurrency,
        "unsigned_payload": args.unsigned_payload,
        "put": {
            "objects": objects,
            "object_bytes": object_bytes,
            "bytes": put_bytes,
            "seconds": put_seconds,
            "mib_per_second": mib_per_second(put_bytes, put_seconds),
        },
        "get": {
            "requests": ranges.len(),
            "range_bytes": range_bytes,
            "bytes": get_bytes,
            "seconds": get_seconds,
            "mib_per_second": mib_per_second(get_bytes, get_seconds),
        },
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// A client set up like blockgate's `S3Store` (see the module docs).
async fn client(args: &Args) -> Client {
    let shared = aws_config::defaults(BehaviorVersion::latest())
        .credentials_provider(Credentials::new(
            &args.access_key,
            &args.secret_key,
            None,
            None,
            "s3-baseline",
        ))
        .region(Region::new(args.region.clone()))
        .endpoint_url(&args.endpoint)
        .load()
        .await;
    let config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .build();
    Client::from_conf(config)
}

/// The `x-amz-checksum-crc32c` value of `data`: its CRC32C, big-endian, in base64.
fn base64_crc32c(data: &[u8]) -> String {
    aws_smithy_types::base64::encode(crc32c::crc32c(data).to_be_bytes())
}
