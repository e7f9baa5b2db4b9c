//! Which requests reach the device: pure checks of a decoded request against what the
//! handshake agreed and the export's current size, in the order the spec's error rules imply.
//! No I/O, no state.

use crate::server::ExportInfo;
use crate::wire::{self, Command, Request};

/// The largest payload (and so the largest `max_block`) a session accepts: 2^25 bytes, the
/// size the spec says a client may always send without being taken for an attacker. It bounds
/// the memory one request can pin.
pub(crate) const MAX_PAYLOAD: u32 = 1 << 25;

/// Block size constraints as advertised and enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BlockSizes {
    pub(crate) minimum: u32,
    pub(crate) preferred: u32,
    pub(crate) maximum: u32,
}

/// An export's block sizes break the spec's rules, so it cannot be offered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidBlockSizes {
    #[error("minimum block size {minimum} is not a power of two from 1 to 65536")]
    Minimum { minimum: u32 },
    #[error("preferred block size {preferred} is not a power of two of at least {floor}")]
    Preferred { preferred: u32, floor: u32 },
    #[error("maximum block size {maximum} is not a multiple of the minimum block size {minimum}")]
    MaximumNotMultiple { maximum: u32, minimum: u32 },
    #[error(
        "maximum block size {maximum} is smaller than both the preferred block size {preferred} and the export size {size}"
    )]
    MaximumTooSmall {
        maximum: u32,
        preferred: u32,
        size: u64,
    },
}

impl BlockSizes {
    /// Checks an export's constraints against the spec ("Block size constraints") and clamps
    /// the maximum to [`MAX_PAYLOAD`].
    pub(crate) fn from_info(info: &ExportInfo) -> Result<BlockSizes, InvalidBlockSizes> {
        let minimum = info.min_block;
        if !minimum.is_power_of_two() || minimum > 1 << 16 {
            return Err(InvalidBlockSizes::Minimum { minimum });
        }
        let preferred = info.preferred_block;
        let floor = minimum.max(512);
        if !preferred.is_power_of_two() || preferred < floor {
            return Err(InvalidBlockSizes::Preferred { preferred, floor });
        }
        // MAX_PAYLOAD is a multiple of every valid minimum, so clamping keeps the rules.
        let maximum = info.max_block.min(MAX_PAYLOAD);
        if maximum == 0 || !maximum.is_multiple_of(minimum) {
            return Err(InvalidBlockSizes::MaximumNotMultiple { maximum, minimum });
        }
        if u64::from(maximum) < u64::from(preferred).min(info.size) {
            return Err(InvalidBlockSizes::MaximumTooSmall {
                maximum,
                preferred,
                size: info.size,
            });
        }
        Ok(BlockSizes {
            minimum,
            preferred,
            maximum,
        })
    }
}

/// What the device is asked to do for an admitted request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Work {
    Read {
        offset: u64,
        length: u32,
    },
    Write {
        offset: u64,
        fua: bool,
    },
    Flush,
    Trim {
        offset: u64,
        length: u32,
        fua: bool,
    },
    WriteZeroes {
        offset: u64,
        length: u32,
        fua: bool,
        no_hole: bool,
    },
    /// A valid request of length zero: the spec leaves its behaviour open, so it succeeds
    /// without touching the device (a read replies with no data).
    Nothing,
}

/// Decides what to do with a well-formed request, or which NBD error to reply with.
/// `current_size` is asked only for commands that address a range.
///
/// The order follows the spec: unadvertised commands and flags are `EINVAL`; writes, trims
/// and write-zeroes on a read-only export `EPERM`; lengths over the maximum block size (trim
/// excepted: the spec bounds only reads, writes, cache and write-zeroes) or misaligned to the
/// minimum block size `EINVAL`; ranges past the end `EINVAL` for read and trim and `ENOSPC` for
/// write and write-zeroes.
pub(crate) fn admit(
    request: &Request,
    transmission_flags: u16,
    block_sizes: &BlockSizes,
    current_size: impl FnOnce() -> u64,
) -> Result<Work, u32> {
    let advertised = |flag: u16| transmission_flags & flag != 0;
    let command = request.command;
    let supported = match command {
        Command::Read | Command::Write => true,
        Command::Flush => advertised(wire::NBD_FLAG_SEND_FLUSH),
        Command::Trim => advertised(wire::NBD_FLAG_SEND_TRIM),
        Command::WriteZeroes => advertised(wire::NBD_FLAG_SEND_WRITE_ZEROES),
        // DISC never gets here; the rest are never advertised.
        Command::Disc | Command::Cache | Command::BlockStatus | Command::Resize => false,
    };
    if !supported {
        return Err(wire::NBD_EINVAL);
    }
    let flags = request.flags;
    // DF needs structured replies and FAST_ZERO needs NBD_FLAG_SEND_FAST_ZERO: neither is
    // ever negotiated.
    if (flags.fua() && !advertised(wire::NBD_FLAG_SEND_FUA)) || flags.df() || flags.fast_zero() {
        return Err(wire::NBD_EINVAL);
    }
    if command == Command::Flush {
        // Offset and length are reserved and MUST be zero.
        if request.offset != 0 || request.length != 0 {
            return Err(wire::NBD_EINVAL);
        }
        return Ok(Work::Flush);
    }
    let writes = matches!(
        command,
        Command::Write | Command::Trim | Command::WriteZeroes
    );
    if writes && advertised(wire::NBD_FLAG_READ_ONLY) {
        return Err(wire::NBD_EPERM);
    }
    let (offset, length) = (request.offset, request.length);
    if command != Command::Trim && length > block_sizes.maximum {
        return Err(wire::NBD_EINVAL);
    }
    let minimum = u64::from(block_sizes.minimum);
    if !offset.is_multiple_of(minimum) || !u64::from(length).is_multiple_of(minimum) {
        return Err(wire::NBD_EINVAL);
    }
    let size = current_size();
    if offset
        .checked_add(u64::from(length))
        .is_none_or(|end| end > size)
    {
        return Err(match command {
            Command::Write | Command::WriteZeroes => wire::NBD_ENOSPC,
            _ => wire::NBD_EINVAL,
        });
    }
    if length == 0 {
        return Ok(Work::Nothing);
    }
    let fua = flags.fua();
    Ok(match command {
        Command::Read => Work::Read { offset, length },
        Command::Write => Work::Write { offset, fua },
        Command::Trim => Work::Trim {
            offset,
            length,
            fua,
        },
        Command::WriteZeroes => Work::WriteZeroes {
            offset,
            length,
            fua,
            no_hole: flags.no_hole(),
        },
        Command::Flush
        | Command::Disc
        | Command::Cache
        | Command::BlockStatus
        | Command::Resize => return Err(wire::NBD_EINVAL),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{
        NBD_CMD_FLAG_DF, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_FLAG_FUA, NBD_CMD_FLAG_NO_HOLE,
        NBD_EINVAL, NBD_ENOSPC, NBD_EPERM, decode_request,
    };

    const SIZE: u64 = 1 << 20;

    fn info() -> ExportInfo {
        ExportInfo {
            name: "vol".into(),
            description: String::new(),
            size: SIZE,
            read_only: false,
            min_block: 512,
            preferred_block: 4096,
            max_block: 1 << 16,
            can_flush: true,
            can_fua: true,
            can_trim: true,
            can_write_zeroes: true,
            can_multi_conn: true,
        }
    }

    fn request(command: u16, flags: u16, offset: u64, length: u32) -> Request {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&wire::NBD_REQUEST_MAGIC.to_be_bytes());
        bytes.extend_from_slice(&flags.to_be_bytes());
        bytes.extend_from_slice(&command.to_be_bytes());
        bytes.extend_from_slice(&1u64.to_be_bytes());
        bytes.extend_from_slice(&offset.to_be_bytes());
        bytes.extend_from_slice(&length.to_be_bytes());
        decode_request(&bytes).unwrap().unwrap().request.unwrap()
    }

    fn check(
        info: &ExportInfo,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
    ) -> Result<Work, u32> {
        let sizes = BlockSizes::from_info(info).unwrap();
        admit(
            &request(command, flags, offset, length),
            info.transmission_flags(),
            &sizes,
            || info.size,
        )
    }

    #[test]
    fn in_range_requests_are_admitted() {
        let info = info();
        assert_eq!(
            check(&info, wire::NBD_CMD_READ, 0, 0, 4096),
            Ok(Work::Read {
                offset: 0,
                length: 4096
            })
        );
        assert_eq!(
            check(
                &info,
                wire::NBD_CMD_WRITE,
                NBD_CMD_FLAG_FUA,
                SIZE - 512,
                512
            ),
            Ok(Work::Write {
                offset: SIZE - 512,
                fua: true
            })
        );
        assert_eq!(check(&info, wire::NBD_CMD_FLUSH, 0, 0, 0), Ok(Work::Flush));
        assert_eq!(
            check(&info, wire::NBD_CMD_TRIM, 0, 0, 1 << 20),
            Ok(Work::Trim {
                offset: 0,
                length: 1 << 20,
                fua: false
            }),
            "trim is not bounded by the maximum block size"
        );
        assert_eq!(
            check(
                &info,
                wire::NBD_CMD_WRITE_ZEROES,
                NBD_CMD_FLAG_NO_HOLE,
                512,
                512
            ),
            Ok(Work::WriteZeroes {
                offset: 512,
                length: 512,
                fua: false,
                no_hole: true
            })
        );
        // FUA is accepted (and ignored) on commands that write nothing.
        assert_eq!(
            check(&info, wire::NBD_CMD_READ, NBD_CMD_FLAG_FUA, 0, 512),
            Ok(Work::Read {
                offset: 0,
                length: 512
            })
        );
        assert_eq!(
            check(&info, wire::NBD_CMD_FLUSH, NBD_CMD_FLAG_FUA, 0, 0),
            Ok(Work::Flush)
        );
    }

    #[test]
    fn out_of_range_follows_the_spec_error_values() {
        let info = info();
        assert_eq!(
            check(&info, wire::NBD_CMD_READ, 0, SIZE, 512),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            check(&info, wire::NBD_CMD_TRIM, 0, SIZE - 512, 1024),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            check(&info, wire::NBD_CMD_WRITE, 0, SIZE, 512),
            Err(NBD_ENOSPC)
        );
        assert_eq!(
            check(&info, wire::NBD_CMD_WRITE_ZEROES, 0, SIZE - 512, 1024),
            Err(NBD_ENOSPC)
        );
        // offset + length overflowing u64.
        let top = u64::MAX - 511;
        assert_eq!(
            check(&info, wire::NBD_CMD_READ, 0, top, 1024),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            check(&info, wire::NBD_CMD_WRITE, 0, top, 1024),
            Err(NBD_ENOSPC)
        );
    }

    #[test]
    fn zero_length_is_a_no_op_inside_the_export() {
        let info = info();
        for command in [
            wire::NBD_CMD_READ,
            wire::NBD_CMD_WRITE,
            wire::NBD_CMD_TRIM,
            wire::NBD_CMD_WRITE_ZEROES,
        ] {
            assert_eq!(check(&info, command, 0, 4096, 0), Ok(Work::Nothing));
            assert_eq!(check(&info, command, 0, SIZE, 0), Ok(Work::Nothing));
            assert!(check(&info, command, 0, SIZE + 512, 0).is_err());
        }
    }

    #[test]
    fn limits_alignment_and_read_only() {
        let info = info();
        assert_eq!(
            check(&info, wire::NBD_CMD_READ, 0, 0, (1 << 16) + 512),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            check(&info, wire::NBD_CMD_WRITE, 0, 0, (1 << 16) + 512),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            check(&info, wire::NBD_CMD_READ, 0, 100, 512),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            check(&info, wire::NBD_CMD_WRITE, 0, 0, 100),
            Err(NBD_EINVAL)
        );
        let read_only = ExportInfo {
            read_only: true,
            ..info.clone()
        };
        for command in [
            wire::NBD_CMD_WRITE,
            wire::NBD_CMD_TRIM,
            wire::NBD_CMD_WRITE_ZEROES,
        ] {
            assert_eq!(check(&read_only, command, 0, 0, 512), Err(NBD_EPERM));
        }
        assert!(check(&read_only, wire::NBD_CMD_READ, 0, 0, 512).is_ok());
        assert!(check(&read_only, wire::NBD_CMD_FLUSH, 0, 0, 0).is_ok());
    }

    #[test]
    fn unadvertised_commands_and_flags_are_invalid() {
        let bare = ExportInfo {
            can_flush: false,
            can_fua: false,
            can_trim: false,
            can_write_zeroes: false,
            ..info()
        };
        assert_eq!(check(&bare, wire::NBD_CMD_FLUSH, 0, 0, 0), Err(NBD_EINVAL));
        assert_eq!(check(&bare, wire::NBD_CMD_TRIM, 0, 0, 512), Err(NBD_EINVAL));
        assert_eq!(
            check(&bare, wire::NBD_CMD_WRITE_ZEROES, 0, 0, 512),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            check(&bare, wire::NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 0, 512),
            Err(NBD_EINVAL)
        );
        let info = info();
        assert_eq!(
            check(&info, wire::NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 512),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            check(
                &info,
                wire::NBD_CMD_WRITE_ZEROES,
                NBD_CMD_FLAG_FAST_ZERO,
                0,
                512
            ),
            Err(NBD_EINVAL)
        );
        for command in [
            wire::NBD_CMD_CACHE,
            wire::NBD_CMD_BLOCK_STATUS,
            wire::NBD_CMD_RESIZE,
        ] {
            assert_eq!(check(&info, command, 0, 0, 512), Err(NBD_EINVAL));
        }
        assert_eq!(
            check(&info, wire::NBD_CMD_FLUSH, 0, 512, 0),
            Err(NBD_EINVAL)
        );
        assert_eq!(
            check(&info, wire::NBD_CMD_FLUSH, 0, 0, 512),
            Err(NBD_EINVAL)
        );
    }

    #[test]
    fn the_export_size_is_read_per_request() {
        let info = info();
        let sizes = BlockSizes::from_info(&info).unwrap();
        let grown = || 2 * SIZE;
        assert!(
            admit(
                &request(wire::NBD_CMD_WRITE, 0, SIZE, 512),
                info.transmission_flags(),
                &sizes,
                grown
            )
            .is_ok()
        );
    }

    #[test]
    fn block_sizes_are_checked_and_clamped() {
        let ok = BlockSizes::from_info(&ExportInfo {
            max_block: u32::MAX,
            ..info()
        })
        .unwrap();
        assert_eq!(ok.maximum, MAX_PAYLOAD);
        let one = BlockSizes::from_info(&ExportInfo {
            min_block: 1,
            preferred_block: 512,
            max_block: 1000,
            ..info()
        })
        .unwrap();
        assert_eq!((one.minimum, one.preferred, one.maximum), (1, 512, 1000));
        for (min, preferred, max) in [
            (0, 4096, 65536),
            (3, 4096, 65536),
            (1 << 17, 1 << 17, 1 << 20),
            (512, 256, 65536),
            (512, 3000, 65536),
            (4096, 2048, 65536),
            (512, 4096, 1000),
            (512, 4096, 0),
            (512, 4096, 1024),
        ] {
            let info = ExportInfo {
                min_block: min,
                preferred_block: preferred,
                max_block: max,
                ..info()
            };
            assert!(
                BlockSizes::from_info(&info).is_err(),
                "{min} {preferred} {max}"
            );
        }
        // A maximum below the preferred size is fine when the export is smaller still.
        let tiny = ExportInfo {
            size: 1024,
            max_block: 1024,
            ..info()
        };
        assert!(BlockSizes::from_info(&tiny).is_ok());
    }
}
