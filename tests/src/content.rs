//! What the tests write and what they expect to read: deterministic pseudo-random bytes keyed
//! by (seed, volume offset), a reference model of a volume's contents, and the self-describing
//! 4 KiB blocks of the crash workload.

use std::io::Write;
use std::path::Path;

use crate::nbd_client::NbdClient;

/// A byte of the pattern `seed` at volume offset `offset`. Any range can be generated or
/// checked independently, so a misplaced block is caught as well as a wrong one.
fn pattern_word(seed: u64, index: u64) -> u64 {
    // splitmix64 of (seed, index)
    let mut z = seed
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(index.wrapping_mul(0xbf58_476d_1ce4_e5b9))
        .wrapping_add(0x94d0_49bb_1331_11eb);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` with pattern `seed` as it lies at volume offset `offset`.
pub fn fill_pattern(seed: u64, offset: u64, out: &mut [u8]) {
    let mut written = 0usize;
    while written < out.len() {
        let position = offset + written as u64;
        let word = pattern_word(seed, position / 8).to_le_bytes();
        let within = usize::try_from(position % 8).expect("< 8");
        let take = (8 - within).min(out.len() - written);
        out[written..written + take].copy_from_slice(&word[within..within + take]);
        written += take;
    }
}

pub fn pattern(seed: u64, offset: u64, length: usize) -> Vec<u8> {
    let mut out = vec![0u8; length];
    fill_pattern(seed, offset, &mut out);
    out
}

/// Writes `length` bytes of pattern `seed` at `offset` to a file (for nbdcopy).
pub fn write_pattern_file(path: &Path, seed: u64, length: u64) {
    let mut file = std::fs::File::create(path).expect("cannot create the pattern file");
    let chunk = 1u64 << 20;
    let mut at = 0;
    while at < length {
        let take = chunk.min(length - at);
        let bytes = pattern(seed, at, usize::try_from(take).expect("chunk fits usize"));
        file.write_all(&bytes)
            .expect("cannot write the pattern file");
        at += take;
    }
    file.sync_all().expect("cannot sync the pattern file");
}

/// What a range of a volume was last written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    Zero,
    Pattern(u64),
}

/// The reference model of a volume: its size and the writes in order; a byte is what the
/// last write covering it wrote, or zero.
#[derive(Debug, Clone)]
pub struct VolumeModel {
    pub size: u64,
    writes: Vec<(u64, u64, Fill)>,
}

impl VolumeModel {
    pub fn new(size: u64) -> VolumeModel {
        VolumeModel {
            size,
            writes: Vec::new(),
        }
    }

    pub fn record(&mut self, offset: u64, length: u64, fill: Fill) {
        assert!(
            offset + length <= self.size,
            "model write {offset}+{length} beyond {}",
            self.size
        );
        self.writes.push((offset, length, fill));
    }

    pub fn grow(&mut self, size: u64) {
        assert!(size >= self.size);
        self.size = size;
    }

    /// The bytes the volume should hold at `[offset, offset + length)`.
    pub fn expected(&self, offset: u64, length: usize) -> Vec<u8> {
        let mut out = vec![0u8; length];
        let end = offset + length as u64;
        for &(write_offset, write_length, fill) in &self.writes {
            let from = write_offset.max(offset);
            let to = (write_offset + write_length).min(end);
            if from >= to {
                continue;
            }
            let start = usize::try_from(from - offset).expect("fits");
            let stop = usize::try_from(to - offset).expect("fits");
            match fill {
                Fill::Zero => out[start..stop].fill(0),
                Fill::Pattern(seed) => fill_pattern(seed, from, &mut out[start..stop]),
            }
        }
        out
    }

    /// Writes `fill` through `client` in requests of at most `request` bytes and records it.
    pub fn write(
        &mut self,
        client: &mut NbdClient,
        offset: u64,
        length: u64,
        fill: Fill,
        request: u64,
    ) {
        let mut at = offset;
        while at < offset + length {
            let take = request.min(offset + length - at);
            match fill {
                Fill::Zero => client
                    .write_zeroes(at, u32::try_from(take).expect("request fits u32"))
                    .unwrap_or_else(|e| panic!("write zeroes at {at}+{take} failed: {e}")),
                Fill::Pattern(seed) => {
                    let data = pattern(seed, at, usize::try_from(take).expect("fits"));
                    client
                        .write(at, &data)
                        .unwrap_or_else(|e| panic!("write at {at}+{take} failed: {e}"));
                }
            }
            at += take;
        }
        self.record(offset, length, fill);
    }

    /// Reads the whole volume through `client` and compares it with the model. The error
    /// names the first differing offset, and what was found there if it is recognisable.
    pub fn verify(&self, client: &mut NbdClient) -> Result<(), String> {
        self.verify_range(client, 0, self.size)
    }

    pub fn verify_range(
        &self,
        client: &mut NbdClient,
        offset: u64,
        length: u64,
    ) -> Result<(), String> {
        let chunk = 1u64 << 20;
        let mut at = offset;
        while at < offset + length {
            let take = chunk.min(offset + length - at);
            let found = client
                .read(at, u32::try_from(take).expect("chunk fits u32"))
                .map_err(|e| format!("read at {at}+{take} failed: {e}"))?;
            let expected = self.expected(at, usize::try_from(take).expect("fits"));
            if let Some(index) = found.iter().zip(&expected).position(|(a, b)| a != b) {
                let position = at + index as u64;
                let differing = found.iter().zip(&expected).filter(|(a, b)| a != b).count();
                return Err(format!(
                    "first difference at offset {position} (found {:#04x}, expected {:#04x}; \
                     {differing} bytes differ in {at}+{take}); found there: {}",
                    found[index],
                    expected[index],
                    self.identify(&found[index..], position)
                ));
            }
            at += take;
        }
        Ok(())
    }

    /// Names the fill that `bytes` (found at `offset`) matches, to tell stale data from
    /// misplaced or garbage data in a failure message.
    fn identify(&self, bytes: &[u8], offset: u64) -> String {
        let probe = &bytes[..bytes.len().min(64)];
        if probe.iter().all(|b| *b == 0) {
            return "zeros".to_string();
        }
        for &(_, _, fill) in self.writes.iter().rev() {
            if let Fill::Pattern(seed) = fill
                && pattern(seed, offset, probe.len()) == probe
            {
                return format!("pattern {seed} (an older or newer write)");
            }
        }
        "bytes of no write made to this offset (garbage or misplaced data)".to_string()
    }
}

/// The crash workload's blocks: 4 KiB, 512 little-endian u64 words: a magic, the write
/// number, the block number, then words derived from both. `python/crash_workload.py` writes
/// them; these functions read them back. Keep the two in step.
pub mod crash_block {
    pub const SIZE: usize = 4096;
    pub const MAGIC: u64 = 0x6267_6372_6173_6821;
    const MULTIPLIER_WRITE: u64 = 0x9e37_79b9_7f4a_7c15;
    const MULTIPLIER_BLOCK: u64 = 0xc2b2_ae3d_27d4_eb4f;
    const MULTIPLIER_WORD: u64 = 0x94d0_49bb_1331_11eb;

    /// The block number write `write` goes to: a stride over `blocks` blocks, so every block
    /// is written and overwritten as the workload goes on.
    pub fn block_of(write: u64, blocks: u64) -> u64 {
        (write * 7919) % blocks
    }

    /// Whether write number `write` zeroes its block (NBD_CMD_WRITE_ZEROES) instead of
    /// writing it.
    pub fn zeroes(write: u64) -> bool {
        write % 10 == 9
    }

    pub fn word(write: u64, block: u64, index: u64) -> u64 {
        (write.wrapping_mul(MULTIPLIER_WRITE) ^ block.wrapping_mul(MULTIPLIER_BLOCK))
            .wrapping_add(index.wrapping_mul(MULTIPLIER_WORD))
    }

    /// What a block read back holds.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Found {
        /// Never written (or the write was lost).
        Zeros,
        /// Intact contents of write number `write`, made to block `block`.
        Write { write: u64, block: u64 },
        /// Anything else: torn, corrupt, or another program's bytes.
        Garbage,
    }

    pub fn decode(bytes: &[u8]) -> Found {
        assert_eq!(bytes.len(), SIZE);
        if bytes.iter().all(|b| *b == 0) {
            return Found::Zeros;
        }
        let words: Vec<u64> = bytes
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
            .collect();
        if words[0] != MAGIC {
            return Found::Garbage;
        }
        let (write, block) = (words[1], words[2]);
        let intact = words
            .iter()
            .enumerate()
            .skip(3)
            .all(|(index, value)| *value == word(write, block, index as u64));
        if intact {
            Found::Write { write, block }
        } else {
            Found::Garbage
        }
    }
}
