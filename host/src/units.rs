//! Parsing of sizes (`64MiB`, `1g`, `4096`) and durations (`500ms`, `2s`, `1m`)
//! as users type them on the command line and in configuration.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnitError {
    #[error("invalid size {0:?}: expected a number of bytes with an optional unit (B, KiB, MiB, GiB, K, M, G), e.g. 64MiB")]
    Size(String),
    #[error("size {0:?} is too large: sizes go up to {max} bytes (16 EiB), and a memory limit up to the host's maximum (1GiB unless config.toml sets limits.max_memory)", max = u64::MAX)]
    SizeTooLarge(String),
    #[error("duration {0:?} is too large: durations go up to {max} ms", max = u64::MAX)]
    DurationTooLarge(String),
    #[error(
        "invalid duration {0:?}: expected a number with a unit (ms, s, m, h), e.g. 500ms or 2s"
    )]
    Duration(String),
}

/// Splits `"64MiB"` into `(64, "mib")`; the number is `None` when it has
/// too many digits for a u64.
fn split(input: &str) -> Option<(Option<u64>, String)> {
    let s = input.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return None;
    }
    let n = s[..digits].parse().ok();
    Some((n, s[digits..].trim().to_ascii_lowercase()))
}

/// Parses a byte size. Binary multiples are used for both `M` and `MiB`,
/// because memory limits are about pages, not disk marketing units.
pub fn parse_size(input: &str) -> Result<u64, UnitError> {
    let err = || UnitError::Size(input.to_string());
    let (n, unit) = split(input).ok_or_else(err)?;
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(err()),
    };
    n.and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| UnitError::SizeTooLarge(input.to_string()))
}

/// Parses a duration; a unit is required so that `5` is never misread.
pub fn parse_duration(input: &str) -> Result<std::time::Duration, UnitError> {
    use std::time::Duration;
    let err = || UnitError::Duration(input.to_string());
    let (n, unit) = split(input).ok_or_else(err)?;
    let mult: u64 = match unit.as_str() {
        "ms" => 1,
        "s" => 1_000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        _ => return Err(err()),
    };
    let ms = n
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| UnitError::DurationTooLarge(input.to_string()))?;
    Ok(Duration::from_millis(ms))
}

/// Formats a byte count the way [`parse_size`] reads it back.
pub fn format_size(bytes: u64) -> String {
    for (mult, unit) in [(1u64 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")] {
        if bytes >= mult && bytes.is_multiple_of(mult) {
            return format!("{}{unit}", bytes / mult);
        }
    }
    format!("{bytes}B")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("64m"), Ok(64 << 20));
        assert_eq!(parse_size(" 1 GiB "), Ok(1 << 30));
        assert_eq!(parse_size("2k"), Ok(2048));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("-1").is_err());
        assert_eq!(
            parse_size("99999999999999999999G"),
            Err(UnitError::SizeTooLarge("99999999999999999999G".into()))
        );
        // Just past u64::MAX once multiplied, and just inside.
        assert_eq!(
            parse_size("17179869184GiB"),
            Err(UnitError::SizeTooLarge("17179869184GiB".into()))
        );
        assert_eq!(parse_size("17179869183GiB"), Ok(17179869183 << 30));
        let text = UnitError::SizeTooLarge("17179869184GiB".into()).to_string();
        assert!(
            text.contains("too large") && text.contains("1GiB"),
            "{text}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("1.5s").is_err());
        assert_eq!(
            parse_duration("18446744073709552h"),
            Err(UnitError::DurationTooLarge("18446744073709552h".into()))
        );
    }

    #[test]
    fn size_round_trip() {
        for n in [1, 1023, 1024, 64 << 20, 3 << 30, (1 << 20) + 1] {
            assert_eq!(parse_size(&format_size(n)), Ok(n));
        }
    }
}
