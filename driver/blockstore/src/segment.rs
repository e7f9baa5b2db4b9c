//! Segments: the immutable objects that carry a volume's written data.
//!
//! ```text
//! header (64 bytes)   magic, version, entry count, epoch, seq, volume size, data start,
//!                     index crc32c, header crc32c
//! index               one 32-byte entry per run: volume offset, length, object offset, kind
//! frames              each data run split into frames of up to FRAME_SIZE bytes, every frame
//!                     followed by the crc32c of its bytes
//! ```
//!
//! Runs are sorted by volume offset and never overlap: a segment is the net effect of one
//! write-log file. A zero run (trim, write-zeroes) has no frames. Because frames have a fixed
//! size inside a run, the object range of any byte range of a run is computable, so a reader
//! fetches only the frames it needs with one ranged GET and verifies each of them.

use bytes::Bytes;

use crate::keys::Name;
use crate::{DecodeError, read_u32, read_u64};

pub const MAGIC: [u8; 8] = *b"BGSEG\0\0\x01";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
pub const INDEX_ENTRY_LEN: usize = 32;
/// Decoded bytes per frame; the unit of verification and of a ranged read.
pub const FRAME_SIZE: u64 = 64 * 1024;
const CRC_LEN: u64 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    Data,
    Zero,
}

/// One entry of a segment's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub volume_offset: u64,
    pub length: u64,
    pub kind: RunKind,
    /// Where the run's first frame starts in the object (0 for zero runs).
    pub object_offset: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub name: Name,
    pub volume_size: u64,
    pub entry_count: u32,
    pub data_start: u64,
    index_crc: u32,
}

impl SegmentHeader {
    /// Bytes of header and index, the prefix a reader fetches to learn the runs.
    pub fn index_end(&self) -> u64 {
        self.data_start
    }
}

/// Where some volume bytes live inside a data run of a segment: the unit the extent map
/// stores. `segment` indexes the map's segment table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunLocation {
    pub segment: u32,
    pub run_offset: u64,
    pub run_length: u64,
    /// Offset into the run's decoded bytes of the first byte this location describes.
    pub skip: u64,
}

impl RunLocation {
    /// The same location `by` bytes further on.
    pub fn advance(self, by: u64) -> RunLocation {
        RunLocation {
            skip: self.skip + by,
            ..self
        }
    }

    /// The object byte range holding decoded bytes `[skip, skip + length)` of this run,
    /// whole frames with their checksums.
    pub fn object_range(&self, length: u64) -> std::ops::Range<u64> {
        let first = self.skip / FRAME_SIZE;
        let last = (self.skip + length.max(1) - 1) / FRAME_SIZE;
        let start = self.run_offset + first * (FRAME_SIZE + CRC_LEN);
        let last_len = (self.run_length - last * FRAME_SIZE).min(FRAME_SIZE);
        let end = self.run_offset + last * (FRAME_SIZE + CRC_LEN) + last_len + CRC_LEN;
        start..end
    }

    /// Verifies the frames in `fetched` (the bytes of [`Self::object_range`]`(out.len())`)
    /// and copies the requested decoded bytes into `out`.
    pub fn decode(&self, fetched: &[u8], out: &mut [u8]) -> Result<(), DecodeError> {
        let length = out.len() as u64;
        if length == 0 {
            return Ok(());
        }
        let range = self.object_range(length);
        if fetched.len() as u64 != range.end - range.start {
            return Err(DecodeError::Truncated {
                needed: range.end - range.start,
                actual: fetched.len() as u64,
            });
        }
        let first = self.skip / FRAME_SIZE;
        let mut frame = first;
        let mut at = 0usize;
        let mut written = 0usize;
        while written < out.len() {
            let frame_len = usize_of((self.run_length - frame * FRAME_SIZE).min(FRAME_SIZE));
            let data = &fetched[at..at + frame_len];
            let stored = read_u32(fetched, at + frame_len);
            let computed = crc32c::crc32c(data);
            if stored != computed {
                return Err(DecodeError::ChecksumMismatch {
                    what: "segment frame",
                    stored,
                    computed,
                });
            }
            let frame_start = frame * FRAME_SIZE;
            let from = usize_of((self.skip + written as u64).saturating_sub(frame_start));
            let take = (frame_len - from).min(out.len() - written);
            out[written..written + take].copy_from_slice(&data[from..from + take]);
            written += take;
            at += frame_len + 4;
            frame += 1;
        }
        Ok(())
    }
}

fn usize_of(value: u64) -> usize {
    // Frame arithmetic stays below FRAME_SIZE or below an in-memory buffer's length.
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// Builds one segment from runs given in increasing, non-overlapping volume order.
///
/// Frames are written straight into the object's buffer. With [`SegmentBuilder::with_capacity`]
/// and the exact number of runs (see [`count_runs`]), the buffer is allocated once and the
/// header and index are filled in front of the frames at the end, without copying the data.
#[derive(Debug)]
pub struct SegmentBuilder {
    name: Name,
    volume_size: u64,
    runs: Vec<Run>,
    /// `prefix` bytes reserved for the header and index, then the frames.
    out: Vec<u8>,
    prefix: usize,
    /// Decoded bytes of the open data run not yet cut into frames (less than a frame).
    pending: Vec<u8>,
}

impl SegmentBuilder {
    pub fn new(name: Name, volume_size: u64) -> SegmentBuilder {
        SegmentBuilder::with_capacity(name, volume_size, 0, 0)
    }

    /// A builder for a segment of `runs` runs carrying `data_bytes` bytes of data in all.
    pub fn with_capacity(
        name: Name,
        volume_size: u64,
        runs: usize,
        data_bytes: u64,
    ) -> SegmentBuilder {
        let prefix = HEADER_LEN + runs * INDEX_ENTRY_LEN;
        let frames = usize_of(stored_length(data_bytes)) + runs * usize_of(CRC_LEN);
        let mut out = Vec::with_capacity(prefix.saturating_add(frames));
        out.resize(prefix, 0);
        SegmentBuilder {
            name,
            volume_size,
            runs: Vec::with_capacity(runs),
            out,
            prefix,
            pending: Vec::new(),
        }
    }

    fn frames_len(&self) -> u64 {
        (self.out.len() - self.prefix) as u64
    }

    /// Appends data at `volume_offset`; joins the previous run when it is data that ends
    /// exactly here.
    pub fn add_data(&mut self, volume_offset: u64, mut data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let joins = self.runs.last().is_some_and(|last| {
            last.kind == RunKind::Data && last.volume_offset + last.length == volume_offset
        });
        if joins {
            if let Some(last) = self.runs.last_mut() {
                last.length += data.len() as u64;
            }
        } else {
            self.cut_pending();
            self.runs.push(Run {
                volume_offset,
                length: data.len() as u64,
                kind: RunKind::Data,
                object_offset: self.frames_len(),
            });
        }
        let frame = usize_of(FRAME_SIZE);
        if !self.pending.is_empty() {
            let take = (frame - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() < frame {
                return;
            }
            let full = std::mem::take(&mut self.pending);
            self.push_frame(&full);
            self.pending = full;
            self.pending.clear();
        }
        let whole = data.len() / frame * frame;
        for chunk in data[..whole].chunks(frame) {
            self.push_frame(chunk);
        }
        self.pending.extend_from_slice(&data[whole..]);
    }

    pub fn add_zero(&mut self, volume_offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        self.cut_pending();
        match self.runs.last_mut() {
            Some(last)
                if last.kind == RunKind::Zero
                    && last.volume_offset + last.length == volume_offset =>
            {
                last.length += length;
            }
            _ => self.runs.push(Run {
                volume_offset,
                length,
                kind: RunKind::Zero,
                object_offset: 0,
            }),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    fn cut_pending(&mut self) {
        if !self.pending.is_empty() {
            let pending = std::mem::take(&mut self.pending);
            self.push_frame(&pending);
            self.pending = pending;
            self.pending.clear();
        }
    }

    fn push_frame(&mut self, data: &[u8]) {
        self.out.extend_from_slice(data);
        self.out
            .extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    }

    /// Encodes the segment. Returns the object and its runs with absolute object offsets.
    pub fn finish(mut self) -> (Bytes, Vec<Run>) {
        self.cut_pending();
        let data_start = (HEADER_LEN + self.runs.len() * INDEX_ENTRY_LEN) as u64;
        let mut index = Vec::with_capacity(self.runs.len() * INDEX_ENTRY_LEN);
        for run in &mut self.runs {
            if run.kind == RunKind::Data {
                run.object_offset += data_start;
            }
            index.extend_from_slice(&run.volume_offset.to_le_bytes());
            index.extend_from_slice(&run.length.to_le_bytes());
            index.extend_from_slice(&run.object_offset.to_le_bytes());
            index.push(match run.kind {
                RunKind::Data => 0,
                RunKind::Zero => 1,
            });
            index.extend_from_slice(&[0u8; 7]);
        }
        let index_crc = crc32c::crc32c(&index);
        let entry_count = u32::try_from(self.runs.len()).unwrap_or(u32::MAX);
        let mut header = [0u8; HEADER_LEN];
        header[0..8].copy_from_slice(&MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&entry_count.to_le_bytes());
        header[16..24].copy_from_slice(&self.name.epoch.to_le_bytes());
        header[24..32].copy_from_slice(&self.name.seq.to_le_bytes());
        header[32..40].copy_from_slice(&self.volume_size.to_le_bytes());
        header[40..48].copy_from_slice(&data_start.to_le_bytes());
        header[48..52].copy_from_slice(&index_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&header[..60]);
        header[60..64].copy_from_slice(&header_crc.to_le_bytes());
        let out = if usize_of(data_start) == self.prefix {
            // The reserved prefix fits exactly: fill it in, the frames stay where they are.
            let mut out = self.out;
            out[..HEADER_LEN].copy_from_slice(&header);
            out[HEADER_LEN..self.prefix].copy_from_slice(&index);
            out
        } else {
            let frames = &self.out[self.prefix..];
            let mut out = Vec::with_capacity(usize_of(data_start) + frames.len());
            out.extend_from_slice(&header);
            out.extend_from_slice(&index);
            out.extend_from_slice(frames);
            out
        };
        (Bytes::from(out), self.runs)
    }
}

/// The number of runs a [`SegmentBuilder`] makes of extents `(volume offset, length, is
/// data)` given in increasing volume order: adjacent extents of one kind join.
pub fn count_runs(extents: impl IntoIterator<Item = (u64, u64, bool)>) -> usize {
    let mut count = 0;
    let mut last: Option<(u64, bool)> = None;
    for (offset, length, data) in extents {
        if length == 0 {
            continue;
        }
        if last != Some((offset, data)) {
            count += 1;
        }
        last = Some((offset + length, data));
    }
    count
}

/// Decodes and verifies the fixed header.
pub fn decode_header(bytes: &[u8]) -> Result<SegmentHeader, DecodeError> {
    if bytes.len() < HEADER_LEN {
        return Err(DecodeError::Truncated {
            needed: HEADER_LEN as u64,
            actual: bytes.len() as u64,
        });
    }
    if bytes[0..8] != MAGIC {
        return Err(DecodeError::BadMagic { what: "segment" });
    }
    let stored = read_u32(bytes, 60);
    let computed = crc32c::crc32c(&bytes[..60]);
    if stored != computed {
        return Err(DecodeError::ChecksumMismatch {
            what: "segment header",
            stored,
            computed,
        });
    }
    let version = read_u32(bytes, 8);
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion {
            what: "segment",
            version,
        });
    }
    let header = SegmentHeader {
        entry_count: read_u32(bytes, 12),
        name: Name {
            epoch: read_u64(bytes, 16),
            seq: read_u64(bytes, 24),
        },
        volume_size: read_u64(bytes, 32),
        data_start: read_u64(bytes, 40),
        index_crc: read_u32(bytes, 48),
    };
    let expected = HEADER_LEN as u64 + u64::from(header.entry_count) * INDEX_ENTRY_LEN as u64;
    if header.data_start != expected {
        return Err(DecodeError::Malformed {
            what: "segment header",
            reason: format!(
                "data starts at {} but {} index entries end at {expected}",
                header.data_start, header.entry_count
            ),
        });
    }
    Ok(header)
}

/// Decodes and verifies the index; `bytes` starts at the beginning of the object and holds
/// at least `header.index_end()` bytes.
pub fn decode_index(header: &SegmentHeader, bytes: &[u8]) -> Result<Vec<Run>, DecodeError> {
    let end = usize_of(header.index_end());
    if bytes.len() < end {
        return Err(DecodeError::Truncated {
            needed: end as u64,
            actual: bytes.len() as u64,
        });
    }
    let index = &bytes[HEADER_LEN..end];
    let computed = crc32c::crc32c(index);
    if computed != header.index_crc {
        return Err(DecodeError::ChecksumMismatch {
            what: "segment index",
            stored: header.index_crc,
            computed,
        });
    }
    let mut runs = Vec::with_capacity(index.len() / INDEX_ENTRY_LEN);
    let mut previous_end = 0u64;
    for entry in index.chunks_exact(INDEX_ENTRY_LEN) {
        let run = Run {
            volume_offset: read_u64(entry, 0),
            length: read_u64(entry, 8),
            object_offset: read_u64(entry, 16),
            kind: match entry[24] {
                0 => RunKind::Data,
                1 => RunKind::Zero,
                other => {
                    return Err(DecodeError::Malformed {
                        what: "segment index",
                        reason: format!("unknown run kind {other}"),
                    });
                }
            },
        };
        let run_end = run.volume_offset.checked_add(run.length);
        if run.length == 0 || run.volume_offset < previous_end || run_end.is_none() {
            return Err(DecodeError::Malformed {
                what: "segment index",
                reason: "runs empty, overlapping or out of order".to_string(),
            });
        }
        previous_end = run_end.unwrap_or(u64::MAX);
        runs.push(run);
    }
    Ok(runs)
}

/// The stored size of a data run of `length` decoded bytes.
pub fn stored_length(length: u64) -> u64 {
    length + length.div_ceil(FRAME_SIZE) * CRC_LEN
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn name() -> Name {
        Name { epoch: 3, seq: 7 }
    }

    fn read_back(
        object: &[u8],
        run: &Run,
        skip: u64,
        length: usize,
    ) -> Result<Vec<u8>, DecodeError> {
        let location = RunLocation {
            segment: 0,
            run_offset: run.object_offset,
            run_length: run.length,
            skip,
        };
        let range = location.object_range(length as u64);
        let mut out = vec![0u8; length];
        let range = usize::try_from(range.start).unwrap()..usize::try_from(range.end).unwrap();
        location.decode(&object[range], &mut out)?;
        Ok(out)
    }

    #[test]
    fn round_trip_with_joined_runs_and_zero_runs() {
        let mut builder = SegmentBuilder::new(name(), 1 << 30);
        let a: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        builder.add_data(4096, &a[..70_000]);
        builder.add_data(4096 + 70_000, &a[70_000..]);
        builder.add_zero(1 << 20, 8192);
        builder.add_data(2 << 20, b"tail");
        let (object, runs) = builder.finish();
        assert_eq!(runs.len(), 3);
        let header = decode_header(&object).unwrap();
        assert_eq!(header.name, name());
        assert_eq!(decode_index(&header, &object).unwrap(), runs);
        assert_eq!(read_back(&object, &runs[0], 0, a.len()).unwrap(), a);
        assert_eq!(
            read_back(&object, &runs[0], 65_530, 20).unwrap(),
            &a[65_530..65_550]
        );
        assert_eq!(read_back(&object, &runs[2], 1, 3).unwrap(), b"ail");
        assert_eq!(
            object.len() as u64,
            header.data_start + stored_length(a.len() as u64) + stored_length(4)
        );
    }

    #[test]
    fn a_flipped_data_byte_is_a_checksum_error() {
        let mut builder = SegmentBuilder::new(name(), 1 << 20);
        builder.add_data(0, &[7u8; 10_000]);
        let (object, runs) = builder.finish();
        let mut bad = object.to_vec();
        bad[usize::try_from(runs[0].object_offset).unwrap() + 5000] ^= 1;
        assert!(matches!(
            read_back(&bad, &runs[0], 4096, 4096),
            Err(DecodeError::ChecksumMismatch { .. })
        ));
    }

    #[test]
    fn a_flipped_header_or_index_byte_is_detected() {
        let mut builder = SegmentBuilder::new(name(), 1 << 20);
        builder.add_data(0, &[7u8; 100]);
        let (object, _) = builder.finish();
        for position in [3usize, 20, HEADER_LEN + 2] {
            let mut bad = object.to_vec();
            bad[position] ^= 0x40;
            let result = decode_header(&bad).and_then(|h| decode_index(&h, &bad));
            assert!(result.is_err(), "flip at {position} went unnoticed");
        }
    }

    proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(header) = decode_header(&bytes) {
                let _ = decode_index(&header, &bytes);
            }
        }

        #[test]
        fn any_sub_range_reads_back(len in 1usize..300_000, skip_frac in 0.0f64..1.0, take_frac in 0.0f64..1.0) {
            let data: Vec<u8> = (0..len).map(|i| u8::try_from(i * 31 % 256).unwrap()).collect();
            let mut builder = SegmentBuilder::new(name(), 1 << 30);
            builder.add_data(0, &data);
            let (object, runs) = builder.finish();
            // Fractions of a length below 300 000: no truncation.
            #[allow(clippy::cast_possible_truncation)]
            let skip = ((len - 1) as f64 * skip_frac) as usize;
            #[allow(clippy::cast_possible_truncation)]
            let take = 1 + ((len - skip - 1) as f64 * take_frac) as usize;
            let got = read_back(&object, &runs[0], skip as u64, take).unwrap();
            prop_assert_eq!(&got[..], &data[skip..skip + take]);
        }

        /// A builder sized with `count_runs` (frames written in place) makes exactly the
        /// object a growing builder makes, and the count is the number of runs.
        #[test]
        fn sized_builder_makes_the_same_object(
            extents in proptest::collection::vec((0u64..3, 1usize..150_000, any::<bool>()), 0..12),
            wrong_count in any::<bool>(),
        ) {
            // Extents in increasing order: each starts 0, 1 or 2 bytes after the previous
            // one ends (0: adjacent, so runs of one kind join).
            let mut at = 0u64;
            let mut plan = Vec::new();
            for (gap, length, data) in extents {
                at += gap;
                plan.push((at, length as u64, data));
                at += length as u64;
            }
            let count = count_runs(plan.iter().copied());
            let data_bytes: u64 = plan.iter().filter(|e| e.2).map(|e| e.1).sum();
            // A wrong count still gives the right object (the slow path).
            let reserved = if wrong_count { count + 1 } else { count };
            let mut grown = SegmentBuilder::new(name(), 1 << 40);
            let mut sized = SegmentBuilder::with_capacity(name(), 1 << 40, reserved, data_bytes);
            for (offset, length, data) in &plan {
                if *data {
                    let bytes: Vec<u8> = (0..*length).map(|i| u8::try_from((offset + i) % 251).unwrap()).collect();
                    grown.add_data(*offset, &bytes);
                    sized.add_data(*offset, &bytes);
                } else {
                    grown.add_zero(*offset, *length);
                    sized.add_zero(*offset, *length);
                }
            }
            let (grown, grown_runs) = grown.finish();
            let (sized, sized_runs) = sized.finish();
            prop_assert_eq!(grown_runs.len(), count);
            prop_assert_eq!(&grown_runs, &sized_runs);
            prop_assert!(grown == sized);
        }
    }
}
