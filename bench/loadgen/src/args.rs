//! A small command-line reader: `--name value` pairs and `--flag`s.
//!
//! The load generator has a handful of options per subcommand, so a hand
//! parser keeps the build small; every option is looked up by name once and
//! anything left over is an error, so a typo never passes silently.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};

/// The options after the subcommand name, not yet interpreted.
pub struct Args {
    values: HashMap<String, String>,
    flags: Vec<String>,
}

impl Args {
    /// Splits `--name value` and `--name=value` pairs; names listed in
    /// `flags` take no value.
    pub fn parse(raw: impl IntoIterator<Item = String>, flags: &[&str]) -> Result<Args> {
        let mut values = HashMap::new();
        let mut seen_flags = Vec::new();
        let mut raw = raw.into_iter();
        while let Some(arg) = raw.next() {
            let Some(name) = arg.strip_prefix("--") else {
                bail!("unexpected argument {arg:?} (options look like --name value)");
            };
            let (name, inline) = match name.split_once('=') {
                Some((n, v)) => (n.to_string(), Some(v.to_string())),
                None => (name.to_string(), None),
            };
            if flags.contains(&name.as_str()) {
                if inline.is_some() {
                    bail!("--{name} takes no value");
                }
                seen_flags.push(name);
                continue;
            }
            let value = match inline {
                Some(v) => v,
                None => raw
                    .next()
                    .ok_or_else(|| anyhow!("--{name} needs a value"))?,
            };
            if values.insert(name.clone(), value).is_some() {
                bail!("--{name} given twice");
            }
        }
        Ok(Args {
            values,
            flags: seen_flags,
        })
    }

    /// Takes an option and parses it, or returns `default` when absent.
    pub fn get<T>(&mut self, name: &str, default: T) -> Result<T>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        match self.values.remove(name) {
            None => Ok(default),
            Some(text) => text.parse().map_err(|e| anyhow!("--{name} {text:?}: {e}")),
        }
    }

    /// Takes an option that must be present.
    pub fn required<T>(&mut self, name: &str) -> Result<T>
    where
        T: FromStr,
        T::Err: std::fmt::Display,
    {
        let text = self
            .values
            .remove(name)
            .ok_or_else(|| anyhow!("--{name} is required"))?;
        text.parse().map_err(|e| anyhow!("--{name} {text:?}: {e}"))
    }

    /// Takes an optional string option.
    pub fn optional(&mut self, name: &str) -> Option<String> {
        self.values.remove(name)
    }

    /// Takes a duration option (`10s`, `500ms`, `2m`, or bare seconds).
    pub fn duration(&mut self, name: &str, default: Duration) -> Result<Duration> {
        match self.values.remove(name) {
            None => Ok(default),
            Some(text) => parse_duration(&text).with_context(|| format!("--{name}")),
        }
    }

    /// True when the flag was given.
    pub fn flag(&mut self, name: &str) -> bool {
        let before = self.flags.len();
        self.flags.retain(|f| f != name);
        self.flags.len() != before
    }

    /// Fails if any option was not taken by the subcommand.
    pub fn finish(self) -> Result<()> {
        let mut left: Vec<_> = self.values.into_keys().chain(self.flags).collect();
        left.sort();
        match left.first() {
            None => Ok(()),
            Some(name) => bail!("unknown option --{name}"),
        }
    }
}

/// Reads `10s`, `500ms`, `2m`, `1h` or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| anyhow!("{text:?} is not a duration (try 10s, 500ms, 2m)"))?;
    let seconds = match unit {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        _ => bail!("{text:?}: unknown unit {unit:?} (use ms, s, m or h)"),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| anyhow!("{text:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str], flags: &[&str]) -> Result<Args> {
        Args::parse(list.iter().map(|s| s.to_string()), flags)
    }

    #[test]
    fn values_flags_and_leftovers() -> Result<()> {
        let mut a = args(&["--connections", "10", "--hold=2s", "--quiet"], &["quiet"])?;
        assert_eq!(a.get("connections", 1usize)?, 10);
        assert_eq!(a.duration("hold", Duration::ZERO)?, Duration::from_secs(2));
        assert!(a.flag("quiet"));
        assert_eq!(a.get("sources", 7u32)?, 7);
        a.finish()?;

        let a = args(&["--typo", "1"], &[])?;
        assert!(a.finish().is_err());
        assert!(args(&["--addr"], &[]).is_err());
        assert!(args(&["stray"], &[]).is_err());
        Ok(())
    }

    #[test]
    fn durations() -> Result<()> {
        assert_eq!(parse_duration("500ms")?, Duration::from_millis(500));
        assert_eq!(parse_duration("1.5")?, Duration::from_millis(1500));
        assert_eq!(parse_duration("2m")?, Duration::from_secs(120));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        Ok(())
    }
}
