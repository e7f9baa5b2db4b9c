//! Prometheus metrics on a loopback HTTP endpoint (`GET /metrics`).
//!
//! The exposition is rendered from the engine's live counters on each scrape, so there is no
//! registry to keep in sync.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use blockgate_engine::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Gateway-wide counters kept outside the engine.
#[derive(Debug, Default)]
pub struct GatewayCounters {
    pub nbd_connections_active: AtomicU64,
    pub nbd_connections_total: AtomicU64,
    pub nbd_session_errors_total: AtomicU64,
}

pub fn render(engine: &Engine, gateway: &GatewayCounters) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let volumes = engine.volumes();
    // (name, type, help, samples) of each per-volume family.
    type Family<'a> = (&'a str, &'a str, &'a str, Vec<(String, u64)>);
    let mut per_volume: Vec<Family> = Vec::new();
    macro_rules! volume_metric {
        ($name:literal, $kind:literal, $help:literal, |$v:ident, $s:ident| $value:expr) => {
            per_volume.push((
                $name,
                $kind,
                $help,
                volumes
                    .iter()
                    .filter_map(|$v| {
                        $v.status()
                            .ok()
                            .map(|$s| (format!("{{volume=\"{}\"}}", $v.id), $value))
                    })
                    .collect(),
            ));
        };
    }
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    volume_metric!(
        "blockgate_volume_size_bytes",
        "gauge",
        "Volume size.",
        |v, s| s.size
    );
    volume_metric!(
        "blockgate_volume_log_bytes",
        "gauge",
        "Write-log bytes not yet uploaded.",
        |v, s| s.log_bytes
    );
    volume_metric!(
        "blockgate_volume_log_capacity_bytes",
        "gauge",
        "Write-log capacity.",
        |v, s| s.log_capacity
    );
    volume_metric!(
        "blockgate_volume_upload_backlog_segments",
        "gauge",
        "Sealed log files waiting for upload.",
        |v, s| s.upload_backlog_segments as u64
    );
    volume_metric!(
        "blockgate_volume_map_extents",
        "gauge",
        "Extents in the bucket map.",
        |v, s| s.map_extents as u64
    );
    volume_metric!(
        "blockgate_volume_cache_used_bytes",
        "gauge",
        "Read cache in use.",
        |v, s| s.cache_used_bytes
    );
    volume_metric!(
        "blockgate_volume_cache_hits_total",
        "counter",
        "Read cache hits.",
        |v, s| s.cache_hits
    );
    volume_metric!(
        "blockgate_volume_cache_misses_total",
        "counter",
        "Read cache misses.",
        |v, s| s.cache_misses
    );
    volume_metric!(
        "blockgate_volume_hydrated",
        "gauge",
        "1 when the local copy of a stored volume is complete.",
        |v, s| u64::from(s.hydrated)
    );
    volume_metric!(
        "blockgate_volume_writer_epoch",
        "gauge",
        "Writer epoch this gateway holds the volume with.",
        |v, s| s.epoch
    );
    volume_metric!(
        "blockgate_volume_fenced",
        "gauge",
        "1 when a newer writer holds the volume: this gateway uploads nothing and refuses requests.",
        |v, s| u64::from(s.fenced)
    );
    volume_metric!(
        "blockgate_volume_reads_total",
        "counter",
        "Read requests.",
        |v, _s| load(&v.counters.reads)
    );
    volume_metric!(
        "blockgate_volume_read_bytes_total",
        "counter",
        "Bytes read.",
        |v, _s| load(&v.counters.read_bytes)
    );
    volume_metric!(
        "blockgate_volume_read_errors_total",
        "counter",
        "Reads that failed.",
        |v, _s| load(&v.counters.read_errors)
    );
    volume_metric!(
        "blockgate_volume_writes_total",
        "counter",
        "Write requests.",
        |v, _s| load(&v.counters.writes)
    );
    volume_metric!(
        "blockgate_volume_write_bytes_total",
        "counter",
        "Bytes written.",
        |v, _s| load(&v.counters.write_bytes)
    );
    volume_metric!(
        "blockgate_volume_flushes_total",
        "counter",
        "Flush requests.",
        |v, _s| load(&v.counters.flushes)
    );
    volume_metric!(
        "blockgate_volume_trims_total",
        "counter",
        "Trim and write-zeroes requests.",
        |v, _s| load(&v.counters.trims)
    );
    volume_metric!(
        "blockgate_volume_log_full_waits_total",
        "counter",
        "Writes that waited for log space.",
        |v, _s| load(&v.counters.log_full_waits)
    );
    volume_metric!(
        "blockgate_volume_segments_uploaded_total",
        "counter",
        "Segments uploaded.",
        |v, _s| load(&v.counters.segments_uploaded)
    );
    volume_metric!(
        "blockgate_volume_uploaded_bytes_total",
        "counter",
        "Segment bytes uploaded.",
        |v, _s| load(&v.counters.bytes_uploaded)
    );
    volume_metric!(
        "blockgate_volume_upload_errors_total",
        "counter",
        "Failed segment uploads (retried).",
        |v, _s| load(&v.counters.upload_errors)
    );
    for (name, kind, help, samples) in &per_volume {
        family(name, kind, help, samples);
    }
    family(
        "blockgate_gateway_volumes",
        "gauge",
        "Volumes open.",
        &[(String::new(), volumes.len() as u64)],
    );
    family(
        "blockgate_nbd_connections_active",
        "gauge",
        "NBD sessions open.",
        &[(String::new(), load(&gateway.nbd_connections_active))],
    );
    family(
        "blockgate_nbd_connections_total",
        "counter",
        "NBD sessions accepted.",
        &[(String::new(), load(&gateway.nbd_connections_total))],
    );
    family(
        "blockgate_nbd_session_errors_total",
        "counter",
        "NBD sessions ended by an error.",
        &[(String::new(), load(&gateway.nbd_session_errors_total))],
    );
    if let Some(rss) = resident_bytes() {
        family(
            "blockgate_process_resident_memory_bytes",
            "gauge",
            "Resident memory of the gateway.",
            &[(String::new(), rss)],
        );
    }
    out
}

fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Answers `GET /metrics` on `listener` until dropped.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>, gateway: Arc<GatewayCounters>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let engine = engine.clone();
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let mut request = vec![0u8; 4096];
            let Ok(read) = stream.read(&mut request).await else {
                return;
            };
            let head = String::from_utf8_lossy(&request[..read]);
            let (status, body) = if head.starts_with("GET /metrics") {
                ("200 OK", render(&engine, &gateway))
            } else {
                (
                    "404 Not Found",
                    "only /metrics is served here\n".to_string(),
                )
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        });
    }
}
