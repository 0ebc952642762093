//! Durations (`"30s"`, `"1h30m"`) and sizes (`"16KiB"`) as a config file writes them, and
//! the serde helpers that read them with their spans. Both are parsed with saturating
//! arithmetic and refused past an upper bound, so no value in a file can overflow where
//! the gateway uses it.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Longest duration a config may give: 365 days. The gateway adds durations to
/// `Instant`s, which panics on overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86_400);

/// Largest size a config may give: 1 TiB. Each size field has a far smaller range of its
/// own; this bound only keeps unit multiplication and the conversion to `usize` exact.
pub const MAX_SIZE: u64 = 1 << 40;

/// A duration or size that could not be read; each holds the value as written
/// (quoted when it was a string).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    /// Not a duration.
    #[error("expected a duration such as \"30s\", \"500ms\" or \"1h\", got {0}")]
    Duration(String),
    /// A duration longer than [`MAX_DURATION`].
    #[error("must be at most {max}d, got {0}", max = MAX_DURATION.as_secs() / 86_400)]
    DurationTooLong(String),
    /// Not a size.
    #[error("expected a size such as \"16KiB\" or \"1MiB\", got {0}")]
    Size(String),
    /// A size larger than [`MAX_SIZE`].
    #[error("must be at most {max}TiB, got {0}", max = MAX_SIZE >> 40)]
    SizeTooLarge(String),
}

/// A duration written as `"30s"`, `"500ms"`, `"1h30m"`, remembering where it was written.
pub(super) struct Dur {
    pub(super) value: Duration,
    pub(super) span: std::ops::Range<usize>,
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<String>::deserialize(d)?;
        let value = parse_duration(s.get_ref()).map_err(serde::de::Error::custom)?;
        Ok(Dur {
            value,
            span: s.span(),
        })
    }
}

/// Parses `"30s"`, `"250ms"`, `"1h30m"`, `"2d"`, or `"0"`: whole numbers, each followed by
/// `ms`, `s`, `m`, `h` or `d`, adding up to at most [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, UnitError> {
    let bad = || UnitError::Duration(format!("{s:?}"));
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    // Milliseconds, the smallest unit; saturates, so a huge value is too long, not wrapped.
    let mut total_ms: u64 = 0;
    while !rest.is_empty() {
        let (n, after) = leading_number(rest).ok_or_else(bad)?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let unit_ms: u64 = match &after[..unit_len] {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(bad()),
        };
        total_ms = total_ms.saturating_add(n.saturating_mul(unit_ms));
        rest = &after[unit_len..];
    }
    let total = Duration::from_millis(total_ms);
    if total > MAX_DURATION {
        return Err(UnitError::DurationTooLong(format!("{s:?}")));
    }
    Ok(total)
}

/// A size written as `"16KiB"`, `"1MiB"`, `"512B"` or a plain integer of bytes.
pub(super) struct Size(pub(super) u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size such as \"16KiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Size, E> {
                if n > MAX_SIZE {
                    return Err(E::custom(UnitError::SizeTooLarge(n.to_string())));
                }
                Ok(Size(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Size, E> {
                let n = u64::try_from(n).map_err(|_| E::custom(UnitError::Size(n.to_string())))?;
                self.visit_u64(n)
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Size, E> {
                parse_size(s).map(Size).map_err(E::custom)
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// Parses `"16KiB"`, `"1MiB"`, `"10KB"`, `"512B"` or `"512"`: a whole number of bytes, at
/// most [`MAX_SIZE`].
pub fn parse_size(s: &str) -> Result<u64, UnitError> {
    let bad = || UnitError::Size(format!("{s:?}"));
    let (n, unit) = leading_number(s.trim()).ok_or_else(bad)?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        _ => return Err(bad()),
    };
    let bytes = n.saturating_mul(mult);
    if bytes > MAX_SIZE {
        return Err(UnitError::SizeTooLarge(format!("{s:?}")));
    }
    Ok(bytes)
}

/// Splits the ASCII digits at the start of `s` off as a number (saturating at
/// `u64::MAX`) and returns it with the rest; `None` when `s` does not start with a digit.
fn leading_number(s: &str) -> Option<(u64, &str)> {
    let len = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if len == 0 {
        return None;
    }
    let n = s[..len].bytes().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    });
    Some((n, &s[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(2 * 86_400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("365d"), Ok(MAX_DURATION));
        assert!(matches!(parse_duration("5"), Err(UnitError::Duration(_))));
        assert!(matches!(parse_duration("s"), Err(UnitError::Duration(_))));
        assert!(matches!(parse_duration(""), Err(UnitError::Duration(_))));
        assert!(matches!(
            parse_duration("1h 30m"),
            Err(UnitError::Duration(_))
        ));
    }

    #[test]
    fn durations_past_the_bound_are_refused_naming_it() {
        for s in [
            // Overflowed `Duration` addition (a panic before).
            "18446744073709551615s1s",
            // Overflowed `n * 3600` (wrapped silently before).
            "9999999999999999h",
            "18446744073709551615ms",
            // More digits than a u64 holds.
            "99999999999999999999999s",
            "365d1ms",
            "8761h",
        ] {
            let e = parse_duration(s).unwrap_err();
            assert_eq!(e, UnitError::DurationTooLong(format!("{s:?}")));
            assert_eq!(e.to_string(), format!("must be at most 365d, got {s:?}"));
        }
        // A malformed duration is malformed, however large its numbers.
        assert!(matches!(
            parse_duration("99999999999999999999999s junk"),
            Err(UnitError::Duration(_))
        ));
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("16KiB"), Ok(16_384));
        assert_eq!(parse_size("2MB"), Ok(2_000_000));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("1 GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1TiB"), Ok(MAX_SIZE));
        assert!(matches!(parse_size("lots"), Err(UnitError::Size(_))));
        assert!(matches!(parse_size("-1"), Err(UnitError::Size(_))));
        assert!(matches!(parse_size("1PiB"), Err(UnitError::Size(_))));
    }

    #[test]
    fn sizes_past_the_bound_are_refused_naming_it() {
        for s in [
            "2TiB",
            "1100GB",
            "99999999999999999GiB",
            "1099511627777",
            "99999999999999999999999",
        ] {
            let e = parse_size(s).unwrap_err();
            assert_eq!(e, UnitError::SizeTooLarge(format!("{s:?}")));
            assert_eq!(e.to_string(), format!("must be at most 1TiB, got {s:?}"));
        }
    }
}
