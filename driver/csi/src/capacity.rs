//! Turning a CSI capacity range into a volume size the block-storage API accepts.
//!
//! Every volume size is a multiple of ServiceInfo.volume_block_size: a required size is
//! rounded up to it, a limit alone is rounded down. The result must lie within the range and
//! not above ServiceInfo.max_volume_size, else the request is OUT_OF_RANGE.

use blockgate_proto::csi::v1::CapacityRange;

/// The size of a volume created without a capacity range.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapacityError {
    #[error("capacity range has a negative size (required {required}, limit {limit})")]
    Negative { required: i64, limit: i64 },
    #[error("capacity range limit {limit} is below its required size {required}")]
    LimitBelowRequired { required: u64, limit: u64 },
    #[error(
        "required size {required} rounded up to the volume block size {block} is {rounded}, \
         above the limit {limit}"
    )]
    RoundedAboveLimit {
        required: u64,
        block: u64,
        rounded: u64,
        limit: u64,
    },
    #[error("capacity limit {limit} is smaller than one volume block ({block} bytes)")]
    LimitBelowBlock { limit: u64, block: u64 },
    #[error("size {size} is above the largest volume blockgate creates ({max} bytes)")]
    AboveMaximum { size: u64, max: u64 },
}

/// The limits the block-storage API reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub volume_block_size: u64,
    pub max_volume_size: u64,
}

/// The range in bytes; zero means unset for either end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub required: u64,
    pub limit: u64,
}

impl Range {
    pub fn from_csi(range: &CapacityRange) -> Result<Range, CapacityError> {
        let negative = || CapacityError::Negative {
            required: range.required_bytes,
            limit: range.limit_bytes,
        };
        let required = u64::try_from(range.required_bytes).map_err(|_| negative())?;
        let limit = u64::try_from(range.limit_bytes).map_err(|_| negative())?;
        if limit != 0 && limit < required {
            return Err(CapacityError::LimitBelowRequired { required, limit });
        }
        Ok(Range { required, limit })
    }

    /// Whether a volume of `size` bytes satisfies the range.
    pub fn admits(&self, size: u64) -> bool {
        size >= self.required && (self.limit == 0 || size <= self.limit)
    }
}

/// The size for `range`, or `default` (clamped to a limit) when neither end is set.
pub fn size_for(range: Range, default: u64, limits: Limits) -> Result<u64, CapacityError> {
    let block = limits.volume_block_size.max(1);
    let size = if range.required > 0 {
        let rounded = range.required.div_ceil(block).checked_mul(block).ok_or(
            CapacityError::AboveMaximum {
                size: range.required,
                max: limits.max_volume_size,
            },
        )?;
        if range.limit != 0 && rounded > range.limit {
            return Err(CapacityError::RoundedAboveLimit {
                required: range.required,
                block,
                rounded,
                limit: range.limit,
            });
        }
        rounded
    } else if range.limit > 0 {
        let floor = range.limit / block * block;
        if floor == 0 {
            return Err(CapacityError::LimitBelowBlock {
                limit: range.limit,
                block,
            });
        }
        floor.min(default.div_ceil(block).saturating_mul(block))
    } else {
        default.div_ceil(block).saturating_mul(block)
    };
    if size > limits.max_volume_size {
        return Err(CapacityError::AboveMaximum {
            size,
            max: limits.max_volume_size,
        });
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        volume_block_size: 4096,
        max_volume_size: 1 << 40,
    };

    fn range(required: u64, limit: u64) -> Range {
        Range { required, limit }
    }

    #[test]
    fn required_sizes_round_up_to_the_volume_block() {
        assert_eq!(size_for(range(1, 0), DEFAULT_VOLUME_SIZE, LIMITS), Ok(4096));
        assert_eq!(
            size_for(range(4096, 0), DEFAULT_VOLUME_SIZE, LIMITS),
            Ok(4096)
        );
        assert_eq!(
            size_for(range(4097, 0), DEFAULT_VOLUME_SIZE, LIMITS),
            Ok(8192)
        );
        assert_eq!(
            size_for(range(4097, 8192), DEFAULT_VOLUME_SIZE, LIMITS),
            Ok(8192)
        );
    }

    #[test]
    fn absent_range_takes_the_default_and_a_lone_limit_rounds_down() {
        assert_eq!(
            size_for(range(0, 0), DEFAULT_VOLUME_SIZE, LIMITS),
            Ok(DEFAULT_VOLUME_SIZE)
        );
        assert_eq!(
            size_for(range(0, 10_000), DEFAULT_VOLUME_SIZE, LIMITS),
            Ok(8192)
        );
        assert_eq!(
            size_for(range(0, 1 << 32), DEFAULT_VOLUME_SIZE, LIMITS),
            Ok(DEFAULT_VOLUME_SIZE)
        );
        assert_eq!(
            size_for(range(0, 100), DEFAULT_VOLUME_SIZE, LIMITS),
            Err(CapacityError::LimitBelowBlock {
                limit: 100,
                block: 4096
            })
        );
    }

    #[test]
    fn impossible_ranges_are_out_of_range() {
        assert!(matches!(
            size_for(range(4097, 5000), DEFAULT_VOLUME_SIZE, LIMITS),
            Err(CapacityError::RoundedAboveLimit { rounded: 8192, .. })
        ));
        assert!(matches!(
            size_for(range((1 << 40) + 1, 0), DEFAULT_VOLUME_SIZE, LIMITS),
            Err(CapacityError::AboveMaximum { .. })
        ));
        assert!(matches!(
            size_for(range(u64::MAX, 0), DEFAULT_VOLUME_SIZE, LIMITS),
            Err(CapacityError::AboveMaximum { .. })
        ));
        assert_eq!(
            Range::from_csi(&CapacityRange {
                required_bytes: 10,
                limit_bytes: 5
            }),
            Err(CapacityError::LimitBelowRequired {
                required: 10,
                limit: 5
            })
        );
        assert!(matches!(
            Range::from_csi(&CapacityRange {
                required_bytes: -1,
                limit_bytes: 0
            }),
            Err(CapacityError::Negative { .. })
        ));
    }

    #[test]
    fn ranges_admit_sizes_within_them() {
        assert!(range(0, 0).admits(1));
        assert!(range(10, 0).admits(10));
        assert!(!range(10, 0).admits(9));
        assert!(range(10, 20).admits(20));
        assert!(!range(10, 20).admits(21));
    }
}
