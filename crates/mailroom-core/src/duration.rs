//! Durations in config files: `"30s"`, `"5m"`, `"1h"`, `"500ms"`, `"2d"`, or
//! a bare number of seconds.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer, de};

/// Parses a human duration; `None` when the text is not one.
pub fn parse(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    if !number.is_finite() || number < 0.0 {
        return None;
    }
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        "d" => number * 86400.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

/// Formats a duration the way [`parse`] reads it back.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        let s = d.as_secs();
        if s != 0 && s.is_multiple_of(3600) {
            format!("{}h", s / 3600)
        } else if s != 0 && s.is_multiple_of(60) {
            format!("{}m", s / 60)
        } else {
            format!("{s}s")
        }
    }
}

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format(*d))
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Seconds(s) => Ok(Duration::from_secs(s)),
        Raw::Text(t) => parse(&t).ok_or_else(|| {
            de::Error::custom(format!(
                "invalid duration {t:?}: expected e.g. \"30s\", \"5m\", \"1h\", \"500ms\""
            ))
        }),
    }
}

/// For `Option<Duration>` fields: the same forms, absent meaning `None`.
pub mod optional {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrap(#[serde(with = "super")] Duration);
        Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for text in ["30s", "5m", "1h", "500ms", "0s"] {
            assert_eq!(format(parse(text).unwrap()), text);
        }
        assert_eq!(parse("2d"), Some(Duration::from_secs(172_800)));
        assert_eq!(parse("12"), Some(Duration::from_secs(12)));
        assert_eq!(parse("soon"), None);
        assert_eq!(parse("-1s"), None);
    }
}
