//! Reading the configuration: a TOML file (YAML or JSON by extension), then
//! `MAILROOM_SECTION__KEY=value` environment overrides, then validation.
//! Every error names the key and where its value came from.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use mailroom_core::config::Config;
use serde_json::{Map, Value};

/// Environment variables starting with this override config keys.
pub const ENV_PREFIX: &str = "MAILROOM_";

/// A configuration that cannot be used, and why.
#[derive(Debug)]
pub struct ConfigError {
    /// The file, or "environment", or "defaults".
    pub source: String,
    /// Dotted key path, when one is to blame.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}: key `{key}`: {}", self.source, self.message),
            None => write!(f, "{}: {}", self.source, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Loads `path` (or the embedded defaults when `None`), applies the
/// `MAILROOM_*` variables from `env`, and validates the result.
pub fn load(
    path: Option<&Path>,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigError> {
    let source = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "defaults".into());
    // Start from the defaults so an environment override can reach into a
    // default value (say the first default listener's address).
    let mut value = serde_json::to_value(Config::default()).map_err(|e| ConfigError {
        source: "defaults".into(),
        key: None,
        message: e.to_string(),
    })?;
    if let Some(path) = path {
        merge(&mut value, read_file(path)?);
    }
    let overridden = apply_env(&mut value, env)?;
    let config: Config = serde_path_to_error::deserialize(value).map_err(|err| {
        let key = err.path().to_string();
        let origin = overridden
            .get(&key)
            .map(|var| format!("environment variable {var}"))
            .unwrap_or_else(|| source.clone());
        ConfigError {
            source: origin,
            key: (key != ".").then_some(key),
            message: err.into_inner().to_string(),
        }
    })?;
    config.validate().map_err(|err| {
        let origin = overridden
            .get(&err.key)
            .map(|var| format!("environment variable {var}"))
            .unwrap_or_else(|| source.clone());
        ConfigError {
            source: origin,
            key: Some(err.key),
            message: err.message,
        }
    })?;
    Ok(config)
}

/// Lays `top` over `base`: tables merge key by key, anything else
/// (lists included) replaces.
fn merge(base: &mut Value, top: Value) {
    match (base, top) {
        (Value::Object(base), Value::Object(top)) => {
            for (key, value) in top {
                match base.get_mut(&key) {
                    Some(existing) => merge(existing, value),
                    None => {
                        base.insert(key, value);
                    }
                }
            }
        }
        (base, top) => *base = top,
    }
}

fn read_file(path: &Path) -> Result<Value, ConfigError> {
    let error = |message: String| ConfigError {
        source: path.display().to_string(),
        key: None,
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| error(format!("cannot read: {e}")))?;
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let value: Value = match extension.as_deref() {
        Some("yaml" | "yml") => {
            serde_yaml::from_str(&text).map_err(|e| error(format!("invalid YAML: {e}")))?
        }
        Some("json") => {
            serde_json::from_str(&text).map_err(|e| error(format!("invalid JSON: {e}")))?
        }
        _ => toml::from_str(&text).map_err(|e| error(format!("invalid TOML: {e}")))?,
    };
    match value {
        Value::Object(_) => Ok(value),
        Value::Null => Ok(Value::Object(Map::new())),
        _ => Err(error("the top level must be a table of keys".into())),
    }
}

/// Applies `MAILROOM_A__B__C=value` as `a.b.c = value`; a numeric segment
/// indexes an array (`MAILROOM_SMTP__LISTENERS__0__ADDR`). Values are read
/// as TOML literals when they parse as one (numbers, booleans, arrays),
/// otherwise as strings. Returns which key each variable set.
fn apply_env(
    root: &mut Value,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<HashMap<String, String>, ConfigError> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX) && k.len() > ENV_PREFIX.len())
        .collect();
    vars.sort();
    let mut overridden = HashMap::new();
    for (var, raw) in vars {
        let segments: Vec<String> = var[ENV_PREFIX.len()..]
            .split("__")
            .map(str::to_ascii_lowercase)
            .collect();
        if segments.iter().any(String::is_empty) {
            return Err(ConfigError {
                source: format!("environment variable {var}"),
                key: None,
                message: "empty key segment (use `__` between keys)".into(),
            });
        }
        set_path(root, &segments, parse_env_value(&raw)).map_err(|message| ConfigError {
            source: format!("environment variable {var}"),
            key: Some(segments.join(".")),
            message,
        })?;
        overridden.insert(display_path(&segments), var);
    }
    Ok(overridden)
}

/// The path as serde_path_to_error prints it: `smtp.listeners[0].addr`.
fn display_path(segments: &[String]) -> String {
    let mut out = String::new();
    for s in segments {
        if s.parse::<usize>().is_ok() {
            out.push_str(&format!("[{s}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(s);
        }
    }
    out
}

fn parse_env_value(raw: &str) -> Value {
    #[derive(serde::Deserialize)]
    struct Wrapper {
        v: Value,
    }
    match toml::from_str::<Wrapper>(&format!("v = {raw}")) {
        Ok(w) => w.v,
        Err(_) => Value::String(raw.to_owned()),
    }
}

fn set_path(node: &mut Value, segments: &[String], value: Value) -> Result<(), String> {
    let Some((first, rest)) = segments.split_first() else {
        *node = value;
        return Ok(());
    };
    if let Ok(index) = first.parse::<usize>() {
        if node.is_null() {
            *node = Value::Array(Vec::new());
        }
        let Value::Array(items) = node else {
            return Err(format!("`{first}` indexes a value that is not a list"));
        };
        if index > items.len() {
            return Err(format!(
                "list index {index} skips entries (the list has {})",
                items.len()
            ));
        }
        if index == items.len() {
            items.push(if rest.is_empty() {
                Value::Null
            } else {
                Value::Object(Map::new())
            });
        }
        return set_path(&mut items[index], rest, value);
    }
    if node.is_null() {
        *node = Value::Object(Map::new());
    }
    let Value::Object(map) = node else {
        return Err(format!(
            "`{first}` is set inside a value that is not a table"
        ));
    };
    let child = map.entry(first.clone()).or_insert(Value::Null);
    set_path(child, rest, value)
}

/// The effective configuration as TOML, with secrets replaced by `********`.
pub fn render_masked(config: &Config) -> Result<String, String> {
    let mut value = serde_json::to_value(config).map_err(|e| e.to_string())?;
    mask(&mut value);
    toml::to_string_pretty(&value).map_err(|e| e.to_string())
}

const SECRET_KEYS: &[&str] = &[
    "password",
    "password_hash",
    "admin_key",
    "secret",
    "api_key",
];

fn mask(value: &mut Value) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if SECRET_KEYS.contains(&key.as_str()) && v.is_string() {
                    *v = Value::String("********".into());
                } else if key == "url" {
                    if let Value::String(url) = v {
                        *url = mask_url_password(url);
                    }
                } else {
                    mask(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(mask),
        _ => {}
    }
}

/// `postgres://user:pw@host/db` → `postgres://user:********@host/db`.
fn mask_url_password(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:********{}",
            &url[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_owned(),
    }
}

/// Where a relative `data_dir` ends up, for messages to the operator.
pub fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_without_a_file() {
        let c = load(None, env(&[])).unwrap();
        assert_eq!(c.smtp.listeners.len(), 3);
        assert_eq!(c.smtp.max_message_size, 26_214_400);
    }

    #[test]
    fn toml_yaml_and_json() {
        let (_d, p) = write(
            "c.toml",
            "hostname = \"mx.example.test\"\n[smtp]\nmax_recipients = 7\ncommand_timeout = \"2m\"\n[[smtp.listeners]]\naddr = \"127.0.0.1:2626\"\nrole = \"mx\"\ntls = \"none\"\n",
        );
        let c = load(Some(&p), env(&[])).unwrap();
        assert_eq!(c.hostname, "mx.example.test");
        assert_eq!(c.smtp.max_recipients, 7);
        assert_eq!(c.smtp.command_timeout.as_secs(), 120);
        assert_eq!(c.smtp.listeners.len(), 1);

        let (_d, p) = write("c.yaml", "smtp:\n  max_recipients: 9\n");
        assert_eq!(load(Some(&p), env(&[])).unwrap().smtp.max_recipients, 9);
        let (_d, p) = write("c.json", "{\"smtp\": {\"max_recipients\": 11}}");
        assert_eq!(load(Some(&p), env(&[])).unwrap().smtp.max_recipients, 11);
    }

    #[test]
    fn environment_overrides() {
        let (_d, p) = write("c.toml", "[smtp]\nmax_message_size = 1000\n");
        let c = load(
            Some(&p),
            env(&[
                ("MAILROOM_SMTP__MAX_MESSAGE_SIZE", "2048"),
                ("MAILROOM_LOCAL_DOMAINS", "[\"a.test\", \"b.test\"]"),
                ("MAILROOM_SMTP__LISTENERS__0__ADDR", "127.0.0.1:3025"),
                ("MAILROOM_HOSTNAME", "env.test"),
                ("UNRELATED", "x"),
            ]),
        )
        .unwrap();
        assert_eq!(c.smtp.max_message_size, 2048);
        assert_eq!(c.local_domains, vec!["a.test", "b.test"]);
        assert_eq!(c.smtp.listeners[0].addr.port(), 3025);
        assert_eq!(c.hostname, "env.test");
    }

    #[test]
    fn errors_name_the_key_and_the_file() {
        let (_d, p) = write("bad.toml", "[smtp]\nmax_message_sise = 10\n");
        let e = load(Some(&p), env(&[])).unwrap_err().to_string();
        assert!(
            e.contains("bad.toml") && e.contains("max_message_sise"),
            "{e}"
        );

        let (_d, p) = write("bad.toml", "[smtp]\nmax_recipients = \"many\"\n");
        let e = load(Some(&p), env(&[])).unwrap_err().to_string();
        assert!(e.contains("bad.toml: key `smtp.max_recipients`"), "{e}");

        let (_d, p) = write("bad.toml", "[smtp]\nmax_recipients = 0\n");
        let e = load(Some(&p), env(&[])).unwrap_err().to_string();
        assert!(
            e.contains("bad.toml: key `smtp.max_recipients`: must be greater than 0"),
            "{e}"
        );

        let e = load(None, env(&[("MAILROOM_SMTP__DATA_TIMEOUT", "soon")]))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("environment variable MAILROOM_SMTP__DATA_TIMEOUT: key `smtp.data_timeout`"),
            "{e}"
        );

        let (_d, p) = write("bad.toml", "[smtp\n");
        let e = load(Some(&p), env(&[])).unwrap_err().to_string();
        assert!(e.contains("bad.toml: invalid TOML"), "{e}");
    }

    #[test]
    fn secrets_are_masked() {
        let mut c = Config::default();
        c.smtp.users.push(mailroom_core::config::SmtpUser {
            username: "app".into(),
            password_hash: "$argon2id$v=19$secret".into(),
        });
        c.store.url = Some("postgres://u:hunter2@db/mail".into());
        let text = render_masked(&c).unwrap();
        assert!(
            !text.contains("argon2id") && !text.contains("hunter2"),
            "{text}"
        );
        assert!(text.contains("username = \"app\""));
        assert!(text.contains("postgres://u:********@db/mail"));
    }
}
