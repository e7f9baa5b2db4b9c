//! kill -9 in the middle of a write workload: every write acknowledged before the last
//! completed flush reads back intact after a restart; later writes may be there or not, but a
//! block never holds anything other than one of the writes made to it (DESIGN.md §9.1).

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use blockgate_e2e::content::crash_block::{self, Found};
use blockgate_e2e::tools::python_command;
use blockgate_e2e::{GatewayOptions, NbdClient, TestDir, wait_until};

/// Blocks the workload writes over (8 MiB), so it overwrites each of them several times.
const BLOCKS: u64 = 2048;
const FLUSH_EVERY: u64 = 32;

/// What one run of `python/crash_workload.py` reported.
#[derive(Debug, Default)]
struct Progress {
    connected: bool,
    /// Writes numbered below this completed before a completed flush.
    flushed: Option<u64>,
    /// The write (or flush) in progress when the connection failed.
    failed_at: Option<u64>,
    lines: Vec<String>,
}

/// A running workload process on one volume.
struct Workload {
    volume: String,
    first: u64,
    child: Child,
    progress: Arc<Mutex<Progress>>,
}

impl Workload {
    fn start(uri: &str, volume: &str, first: u64) -> Workload {
        let mut child = python_command("crash_workload.py")
            .args([
                uri,
                &first.to_string(),
                &BLOCKS.to_string(),
                &FLUSH_EVERY.to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start python3 crash_workload.py");
        let stdout = child.stdout.take().expect("piped");
        let progress = Arc::new(Mutex::new(Progress::default()));
        let shared = progress.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut progress = shared.lock().expect("progress lock");
                if line == "connected" {
                    progress.connected = true;
                } else if let Some(count) = line.strip_prefix("flushed ") {
                    progress.flushed = count.parse().ok();
                } else if let Some(rest) = line.strip_prefix("failed at ") {
                    progress.failed_at = rest.split(':').next().and_then(|n| n.parse().ok());
                }
                progress.lines.push(line);
            }
        });
        Workload {
            volume: volume.to_string(),
            first,
            child,
            progress,
        }
    }

    fn flushed(&self) -> u64 {
        self.progress
            .lock()
            .expect("progress lock")
            .flushed
            .unwrap_or(self.first)
    }

    /// Waits for the workload to notice the dead gateway and exit; returns (flushed,
    /// failed_at).
    fn finish(mut self) -> (u64, u64) {
        let status = wait_until(
            Duration::from_secs(60),
            &format!("the workload on {} to exit", self.volume),
            || match self.child.try_wait() {
                Ok(Some(status)) => Ok(status),
                other => Err(format!("{other:?}")),
            },
        );
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            use std::io::Read;
            let _ = pipe.read_to_string(&mut stderr);
        }
        // The reader thread may still be taking the last line.
        let failed_at = wait_until(Duration::from_secs(10), "the workload's last line", || {
            let progress = self.progress.lock().expect("progress lock");
            progress
                .failed_at
                .ok_or_else(|| format!("{status}; output {:?}; stderr {stderr}", progress.lines))
        });
        assert_eq!(
            status.code(),
            Some(3),
            "the workload on {} should end by a failed request: stderr {stderr}",
            self.volume
        );
        (self.flushed(), failed_at)
    }
}

/// Everything known about the writes made to one volume across crashes.
#[derive(Debug, Default)]
struct History {
    /// Write numbers that completed before a completed flush.
    flushed: Vec<std::ops::Range<u64>>,
    /// Write numbers that may have reached the gateway.
    issued: Vec<std::ops::RangeInclusive<u64>>,
    /// The write each block held when read after a restart: that is durable now (replay
    /// synced it), so a later crash must not take the block back past it.
    durable: Vec<Option<u64>>,
}

impl History {
    /// The newest flushed write to each block: what must at least be there.
    fn required(&self) -> Vec<Option<u64>> {
        let mut required = self.durable.clone();
        required.resize(usize::try_from(BLOCKS).expect("fits"), None);
        for range in &self.flushed {
            for write in range.clone() {
                let block = usize::try_from(crash_block::block_of(write, BLOCKS)).expect("fits");
                required[block] = Some(required[block].map_or(write, |r: u64| r.max(write)));
            }
        }
        required
    }

    fn was_issued(&self, write: u64) -> bool {
        self.issued.iter().any(|range| range.contains(&write))
    }

    /// The newest write-zeroes issued to each block.
    fn latest_zeroes(&self) -> Vec<Option<u64>> {
        let mut latest = vec![None; usize::try_from(BLOCKS).expect("fits")];
        for range in &self.issued {
            for write in range.clone().filter(|w| crash_block::zeroes(*w)) {
                let block = usize::try_from(crash_block::block_of(write, BLOCKS)).expect("fits");
                latest[block] = Some(latest[block].map_or(write, |l: u64| l.max(write)));
            }
        }
        latest
    }

    /// Reads every block and checks it against what was flushed (and what was read after an
    /// earlier restart); returns how many blocks hold a write newer than that
    /// (acknowledged-but-unflushed writes that survived).
    fn verify(&mut self, client: &mut NbdClient, volume: &str) -> usize {
        let required = self.required();
        let latest_zeroes = self.latest_zeroes();
        let mut durable = vec![None; usize::try_from(BLOCKS).expect("fits")];
        let mut newer = 0;
        let mut problems = Vec::new();
        let chunk_blocks = 256u64;
        for first_block in (0..BLOCKS).step_by(usize::try_from(chunk_blocks).expect("fits")) {
            let length = u32::try_from(chunk_blocks * crash_block::SIZE as u64).expect("fits");
            let data = client
                .read(first_block * crash_block::SIZE as u64, length)
                .unwrap_or_else(|e| panic!("{volume}: read after restart failed: {e}"));
            for (index, bytes) in data.chunks_exact(crash_block::SIZE).enumerate() {
                let block = first_block + index as u64;
                let needed = required[usize::try_from(block).expect("fits")];
                let problem = match (crash_block::decode(bytes), needed) {
                    (Found::Zeros, None) => None,
                    (Found::Zeros, Some(write))
                        if latest_zeroes[usize::try_from(block).expect("fits")]
                            .is_some_and(|zeroed| zeroed >= write) =>
                    {
                        None
                    }
                    (Found::Zeros, Some(write)) => Some(format!(
                        "block {block} is zeros but write {write} went there and was flushed \
                         (or read back after an earlier restart), and no later write-zeroes"
                    )),
                    (Found::Garbage, _) => Some(format!("block {block} holds garbage")),
                    (
                        Found::Write {
                            write,
                            block: named,
                        },
                        needed,
                    ) => {
                        if named != block
                            || crash_block::block_of(write, BLOCKS) != block
                            || crash_block::zeroes(write)
                        {
                            Some(format!(
                                "block {block} holds write {write}, which was made to block {named}"
                            ))
                        } else if !self.was_issued(write) {
                            Some(format!("block {block} holds write {write}, never issued"))
                        } else if needed.is_some_and(|n| write < n) {
                            Some(format!(
                                "block {block} holds write {write}, older than write {} that was \
                                 flushed or read back after an earlier restart",
                                needed.unwrap_or_default()
                            ))
                        } else {
                            durable[usize::try_from(block).expect("fits")] = Some(write);
                            if needed.is_none_or(|n| write > n) {
                                newer += 1;
                            }
                            None
                        }
                    }
                };
                problems.extend(problem);
            }
        }
        assert!(
            problems.is_empty(),
            "{volume}: {} of {BLOCKS} blocks are wrong after kill -9 and restart; first ones: {:#?}",
            problems.len(),
            &problems[..problems.len().min(20)]
        );
        self.durable = durable;
        newer
    }
}

/// Two rounds on a cached and a stored volume: libnbd clients write numbered blocks and
/// flush every 32 writes while the gateway seals and uploads 1 MiB segments; the gateway is
/// killed with SIGKILL mid-workload, restarted on the same data directory, and every block is
/// checked. The second round crashes a gateway that had itself replayed a log.
#[test]
fn flushed_writes_survive_kill_9_and_restart() {
    let dir = TestDir::new("crash");
    let mut gateway = GatewayOptions::new(dir.join("data"))
        .volume("cached=16MiB")
        .volume("stored=16MiB:stored")
        .seal_interval_ms(100)
        .segment_size("1MiB")
        .start();
    let volumes = ["cached", "stored"];
    let mut histories: Vec<History> = volumes.iter().map(|_| History::default()).collect();
    let mut next_write = vec![0u64; volumes.len()];

    // Kill after this many flushed writes in each round: more than one pass over the blocks,
    // so every block has flushed and overwritten data, some of it uploaded, some in the log.
    for (round, writes_before_kill) in [5000u64, 3000].into_iter().enumerate() {
        let workloads: Vec<Workload> = volumes
            .iter()
            .zip(&next_write)
            .map(|(volume, first)| Workload::start(&gateway.uri(volume), volume, *first))
            .collect();
        wait_until(
            Duration::from_secs(120),
            &format!("round {round}: {writes_before_kill} flushed writes per volume"),
            || {
                let counts: Vec<u64> = workloads.iter().map(|w| w.flushed() - w.first).collect();
                if counts.iter().all(|c| *c >= writes_before_kill) {
                    Ok(())
                } else {
                    Err(format!("{counts:?}"))
                }
            },
        );
        let status = gateway.volume_status("cached");
        assert!(
            status["uploaded_seq"].as_u64().unwrap_or_default() > 0,
            "nothing was uploaded before the crash: {status}"
        );
        gateway.kill();
        for (index, workload) in workloads.into_iter().enumerate() {
            let first = workload.first;
            let (flushed, failed_at) = workload.finish();
            histories[index].flushed.push(first..flushed);
            histories[index].issued.push(first..=failed_at);
            next_write[index] = failed_at + 1;
        }

        gateway.restart();
        for (volume, history) in volumes.iter().zip(&mut histories) {
            let mut client = NbdClient::connect(gateway.nbd_socket(), volume).expect("connect");
            let newer = history.verify(&mut client, volume);
            eprintln!(
                "round {round}, {volume}: flushed up to {:?}, issued up to {:?}; {newer} blocks hold unflushed writes",
                history.flushed.last(),
                history.issued.last()
            );
        }
    }
}
