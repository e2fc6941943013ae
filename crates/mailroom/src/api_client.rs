//! `mailroom account|key|send`: the HTTP API from the command line.
//!
//! A small blocking HTTP/1.1 client over plain TCP: the API listens on
//! loopback or behind a TLS-terminating proxy the operator runs, and this
//! is an operator's tool, so `http://` is all it speaks.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{Context, bail};
use mailroom_core::config::Config;
use serde_json::{Value, json};

use crate::{AccountCommand, ApiTarget, KeyCommand, SendArgs};

/// Where the API is and which key to use.
struct Target {
    /// `host:port`.
    addr: String,
    key: String,
}

impl Target {
    fn resolve(config: &Config, target: &ApiTarget, admin: bool) -> anyhow::Result<Self> {
        let addr = match &target.url {
            Some(url) => {
                let rest = url.strip_prefix("http://").with_context(|| {
                    format!("--url {url}: only http:// is supported (use a local address)")
                })?;
                rest.trim_end_matches('/').to_owned()
            }
            None => config
                .http
                .addr
                .context("no --url and no http.addr in the config")?
                .to_string(),
        };
        let key = match (&target.key, &config.http.admin_key) {
            (Some(key), _) => key.clone(),
            (None, Some(admin_key)) => admin_key.clone(),
            (None, None) if admin => {
                bail!("no --key and no http.admin_key in the config (or MAILROOM_HTTP__ADMIN_KEY)")
            }
            (None, None) => bail!("no --key given"),
        };
        Ok(Target { addr, key })
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let mut stream = TcpStream::connect(&self.addr)
            .with_context(|| format!("cannot connect to the API at {}", self.addr))?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
             Authorization: Bearer {}\r\nContent-Length: {}\r\n",
            self.addr,
            self.key,
            body.len()
        );
        if !body.is_empty() {
            request.push_str("Content-Type: application/json\r\n");
        }
        request.push_str("\r\n");
        request.push_str(&body);
        stream.write_all(request.as_bytes())?;
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw)?;
        let (status, body) = parse(&raw)?;
        let value: Value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).with_context(|| {
                format!(
                    "the API answered {status} with: {}",
                    String::from_utf8_lossy(&body)
                )
            })?
        };
        if status >= 400 {
            let error = &value["error"];
            bail!(
                "{status} {}: {}{}",
                error["code"].as_str().unwrap_or("error"),
                error["message"].as_str().unwrap_or(""),
                error["field"]
                    .as_str()
                    .map(|f| format!(" (field {f})"))
                    .unwrap_or_default()
            );
        }
        Ok(value)
    }
}

/// Status and body of an HTTP/1.1 response (chunked or not).
fn parse(raw: &[u8]) -> anyhow::Result<(u16, Vec<u8>)> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("the API's answer is not HTTP")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("the API's answer has no status")?;
    let chunked = head.lines().any(|l| {
        l.split_once(':').is_some_and(|(n, v)| {
            n.trim().eq_ignore_ascii_case("transfer-encoding")
                && v.trim().eq_ignore_ascii_case("chunked")
        })
    });
    let mut body = raw[end + 4..].to_vec();
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(pos) = rest.windows(2).position(|w| w == b"\r\n") {
            let size_text = String::from_utf8_lossy(&rest[..pos]);
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .context("bad chunk in the API's answer")?;
            if size == 0 || rest.len() < pos + 2 + size {
                break;
            }
            out.extend_from_slice(&rest[pos + 2..pos + 2 + size]);
            rest = &rest[(pos + 4 + size).min(rest.len())..];
        }
        body = out;
    }
    Ok((status, body))
}

fn print(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

pub fn account(config: &Config, target: &ApiTarget, command: AccountCommand) -> anyhow::Result<()> {
    let api = Target::resolve(config, target, true)?;
    match command {
        AccountCommand::Create {
            name,
            contact,
            domain,
            messages_per_minute,
            recipients_per_day,
        } => print(&api.call(
            "POST",
            "/api/v1/accounts",
            Some(&json!({
                "name": name,
                "contact": contact,
                "allowed_sender_domains": domain,
                "limits": {
                    "messages_per_minute": messages_per_minute,
                    "recipients_per_day": recipients_per_day,
                },
            })),
        )?),
        AccountCommand::List => {
            let list = api.call("GET", "/api/v1/accounts", None)?;
            println!("{:<36}  {:<10}  {:<24}  DOMAINS", "ID", "STATUS", "NAME");
            for a in list["data"].as_array().into_iter().flatten() {
                let domains: Vec<&str> = a["allowed_sender_domains"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                println!(
                    "{:<36}  {:<10}  {:<24}  {}",
                    a["id"].as_str().unwrap_or(""),
                    a["status"].as_str().unwrap_or(""),
                    a["name"].as_str().unwrap_or(""),
                    if domains.is_empty() {
                        "(any)".to_owned()
                    } else {
                        domains.join(", ")
                    }
                );
            }
            Ok(())
        }
    }
}

pub fn key(config: &Config, target: &ApiTarget, command: KeyCommand) -> anyhow::Result<()> {
    let api = Target::resolve(config, target, true)?;
    match command {
        KeyCommand::Create { account, name } => {
            let key = api.call(
                "POST",
                &format!("/api/v1/accounts/{account}/keys"),
                Some(&json!({"name": name})),
            )?;
            eprintln!("store the secret now: it is not shown again");
            print(&key)
        }
        KeyCommand::Revoke { account, key_id } => {
            api.call(
                "DELETE",
                &format!("/api/v1/accounts/{account}/keys/{key_id}"),
                None,
            )?;
            println!("revoked {key_id}");
            Ok(())
        }
    }
}

pub fn send(config: &Config, target: &ApiTarget, args: SendArgs) -> anyhow::Result<()> {
    let api = Target::resolve(config, target, false)?;
    let read = |path: &Option<std::path::PathBuf>| -> anyhow::Result<Option<String>> {
        path.as_ref()
            .map(|p| {
                std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))
            })
            .transpose()
    };
    let text = match (args.text, read(&args.text_file)?) {
        (Some(t), _) => Some(t),
        (None, file) => file,
    };
    let html = read(&args.html_file)?;
    let body = json!({
        "from": args.from,
        "to": args.to,
        "cc": (!args.cc.is_empty()).then_some(&args.cc),
        "bcc": (!args.bcc.is_empty()).then_some(&args.bcc),
        "subject": args.subject,
        "text": text,
        "html": html,
        "tags": args.tag,
    });
    // Absent fields, not nulls: the API treats them alike, but the request
    // stays what a person would write.
    let body = match body {
        Value::Object(map) => {
            Value::Object(map.into_iter().filter(|(_, v)| !v.is_null()).collect())
        }
        other => other,
    };
    print(&api.call("POST", "/api/v1/messages", Some(&body))?)
}
