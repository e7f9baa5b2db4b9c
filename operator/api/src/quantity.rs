//! Byte sizes written as Kubernetes quantities (`100Gi`, `500M`, `1.5Ti`).
//!
//! The custom resources keep sizes as the strings the user wrote, so `kubectl get -o yaml`
//! shows them unchanged; this module owns the one accepted syntax (shared with the schema's
//! CEL rule through [`SIZE_REGEX`]) and the conversion to bytes. It accepts a subset of the
//! Kubernetes quantity grammar: no sign, no exponent and no milli suffix, because a negative,
//! scientific or fractional-byte size is always a mistake in a write-log or cache size.

use std::fmt;

/// The size syntax, as an RE2 regular expression for CEL's `matches()` in the CRD schema.
/// [`parse_bytes`] accepts exactly the strings this matches (tests check both agree).
pub const SIZE_REGEX: &str = r"^[0-9]+([.][0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$";

/// Longest size string the schema admits; bounds the cost of the CEL rules that read it.
pub const SIZE_MAX_LENGTH: u32 = 32;

/// Why a size string is not a byte count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuantityError {
    /// The string is not `<digits>[.<digits>][suffix]`.
    #[error(
        "{0:?} is not a size: expected a number with an optional suffix Ki, Mi, Gi, Ti, Pi, Ei, k, M, G, T, P or E (for example 100Gi)"
    )]
    Syntax(String),
    /// The value does not fit in 64 bits of bytes.
    #[error("{0:?} is too large: sizes must be below 16Ei")]
    Overflow(String),
}

/// Parses a size such as `100Gi` or `1.5T` to bytes. A fractional byte count rounds up, as
/// Kubernetes does for quantities (`0.5k` is 500 bytes, `1.0001k` is 1001 bytes).
pub fn parse_bytes(text: &str) -> Result<u64, QuantityError> {
    let syntax = || QuantityError::Syntax(text.to_owned());
    let overflow = || QuantityError::Overflow(text.to_owned());
    if text.len() > SIZE_MAX_LENGTH as usize {
        return Err(syntax());
    }
    let number_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(number_end);
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return Err(syntax()),
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (number, None),
    };
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || fraction.is_some_and(|f| !all_digits(f)) {
        return Err(syntax());
    }
    // Exact arithmetic: digits as an integer mantissa over 10^(fraction digits), times the
    // suffix, rounded up. u128 holds any mantissa of up to 38 digits; longer ones overflow,
    // and the 32-character limit keeps us below that anyway.
    let digits: String = whole
        .chars()
        .chain(fraction.unwrap_or("").chars())
        .collect();
    let mantissa: u128 = digits.parse().map_err(|_| overflow())?;
    let scale_digits = fraction.map_or(0, str::len);
    let scale = u32::try_from(scale_digits)
        .ok()
        .and_then(|d| 10u128.checked_pow(d))
        .ok_or_else(overflow)?;
    let scaled = mantissa.checked_mul(multiplier).ok_or_else(overflow)?;
    let bytes = scaled.div_ceil(scale);
    u64::try_from(bytes).map_err(|_| overflow())
}

/// Formats a byte count the way people read sizes: the largest binary suffix that divides it
/// exactly (`1073741824` is `1Gi`), else plain bytes. Used in messages and status summaries.
pub fn format_bytes(bytes: u64) -> String {
    const SUFFIXES: [(&str, u32); 6] = [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ];
    for (suffix, shift) in SUFFIXES {
        let unit = 1u64 << shift;
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{}{suffix}", bytes / unit);
        }
    }
    bytes.to_string()
}

/// Formats a byte count approximately for people, with one decimal in the largest binary
/// unit it reaches (`1.4Gi`, `512Ki`, `900`). For status columns, not for round trips.
pub fn format_bytes_approximately(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    if bytes < 1024 {
        return bytes.to_string();
    }
    let mut unit = 0;
    let mut scale: u128 = 1024;
    while unit + 1 < UNITS.len() && u128::from(bytes) >= scale * 1024 {
        unit += 1;
        scale *= 1024;
    }
    // Tenths, rounded down, in integer arithmetic: no float casts to truncate.
    let tenths = u128::from(bytes) * 10 / scale;
    let (whole, tenth) = (tenths / 10, tenths % 10);
    if tenth == 0 {
        format!("{whole}{}", UNITS[unit])
    } else {
        format!("{whole}.{tenth}{}", UNITS[unit])
    }
}

/// A size in bytes, for messages: prints as [`format_bytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_bytes(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_suffixes() {
        assert_eq!(parse_bytes("0"), Ok(0));
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("1Ki"), Ok(1024));
        assert_eq!(parse_bytes("100Gi"), Ok(100 << 30));
        assert_eq!(parse_bytes("2Ti"), Ok(2 << 40));
        assert_eq!(parse_bytes("1k"), Ok(1000));
        assert_eq!(parse_bytes("500M"), Ok(500_000_000));
        assert_eq!(parse_bytes("15Ei"), Ok(15 << 60));
    }

    #[test]
    fn fractions_are_exact_and_round_up_to_whole_bytes() {
        assert_eq!(parse_bytes("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_bytes("0.5k"), Ok(500));
        assert_eq!(parse_bytes("1.0001k"), Ok(1001));
        assert_eq!(parse_bytes("0.1"), Ok(1));
        assert_eq!(parse_bytes("1.25Ki"), Ok(1280));
    }

    #[test]
    fn rejects_what_the_schema_rejects() {
        for bad in [
            "", "Gi", "-1Gi", "+1Gi", "1gi", "1GB", "1 Gi", "1.Gi", ".5Gi", "1e9", "100m", "1Gi ",
            "1..5Gi", "0x10",
        ] {
            assert_eq!(
                parse_bytes(bad),
                Err(QuantityError::Syntax(bad.to_owned())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn overflow_is_an_error_not_a_wrap() {
        assert_eq!(
            parse_bytes("16Ei"),
            Err(QuantityError::Overflow("16Ei".to_owned()))
        );
        assert!(matches!(
            parse_bytes("99999999999999999999E"),
            Err(QuantityError::Overflow(_))
        ));
        assert!(matches!(
            parse_bytes("123456789012345678901234567890123"),
            Err(QuantityError::Syntax(_))
        ));
    }

    #[test]
    fn error_message_shows_an_example() {
        let message = parse_bytes("10GB").unwrap_err().to_string();
        assert!(message.contains("\"10GB\" is not a size"), "{message}");
        assert!(message.contains("100Gi"), "{message}");
    }

    #[test]
    fn formats_with_the_largest_exact_binary_suffix() {
        assert_eq!(format_bytes(0), "0");
        assert_eq!(format_bytes(1000), "1000");
        assert_eq!(format_bytes(1024), "1Ki");
        assert_eq!(format_bytes(3 << 29), "1536Mi");
        assert_eq!(Bytes(100 << 30).to_string(), "100Gi");
    }

    #[test]
    fn approximate_format_has_one_decimal() {
        assert_eq!(format_bytes_approximately(900), "900");
        assert_eq!(format_bytes_approximately(1024), "1Ki");
        assert_eq!(format_bytes_approximately(1_500_000), "1.4Mi");
        assert_eq!(format_bytes_approximately(3 << 29), "1.5Gi");
        assert_eq!(format_bytes_approximately(u64::MAX), "15.9Ei");
    }
}
