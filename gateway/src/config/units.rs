//! Durations (`"30s"`, `"1h30m"`) and sizes (`"16KiB"`) as a config file writes them,
//! and the serde helpers that read them with their spans.

use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

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

/// Parses `"30s"`, `"250ms"`, `"1h30m"`, `"2d"`, or `"0"`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("expected a duration such as \"30s\", \"500ms\" or \"1h\", got {s:?}");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let d = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86400),
            _ => return Err(bad()),
        };
        total += d;
    }
    Ok(total)
}

/// A size written as `"16KiB"`, `"1MiB"`, `"512B"` or a plain integer of bytes.
pub(super) struct Size(pub(super) u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Either {
            N(u64),
            S(String),
        }
        match Either::deserialize(d)? {
            Either::N(n) => Ok(Size(n)),
            Either::S(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

/// Parses `"16KiB"`, `"1MiB"`, `"10KB"`, `"512B"` or `"512"`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let bad = || format!("expected a size such as \"16KiB\" or \"1MiB\", got {s:?}");
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if split == 0 {
        return Err(bad());
    }
    let n: u64 = t[..split].parse().map_err(|_| bad())?;
    let mult = match t[split..].trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}
