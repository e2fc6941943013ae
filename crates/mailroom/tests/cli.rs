//! The command line: `config check`, `hash-password`, `queue list|show`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use std::time::Duration;

use common::{LOCAL_DOMAIN, Role, Setup, Smtp, Tls, cli, poll};
use mailroom_store::{RecipientState, Store};

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
}

fn assert_fails(out: &Output) {
    assert!(
        !out.status.success(),
        "expected a failure\nstdout:\n{}",
        stdout(out)
    );
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write the config");
    path
}

fn good_config(dir: &Path) -> PathBuf {
    let text = format!(
        r#"hostname = "mx.cli.test"
data_dir = {data:?}
local_domains = ["{LOCAL_DOMAIN}"]

[smtp]
max_recipients = 50

[[smtp.users]]
username = "app"
password_hash = "{hash}"

[[smtp.listeners]]
addr = "127.0.0.1:2999"
role = "submission"
tls = "starttls"
"#,
        data = dir.join("data").display().to_string(),
        hash = common::password_hash(),
    );
    write_config(dir, "good.toml", &text)
}

fn check(path: &Path, env: &[(&str, &str)]) -> Output {
    cli(
        &["config", "check", path.to_str().expect("UTF-8 path")],
        env,
        None,
    )
}

#[test]
fn config_check_prints_the_effective_config_with_secrets_masked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = good_config(dir.path());
    let out = check(&path, &[]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(
        text.starts_with(&format!("# {}: valid", path.display())),
        "{text}"
    );
    assert!(text.contains("password_hash = \"********\""), "{text}");
    assert!(!text.contains("argon2"), "the hash leaked:\n{text}");
    assert!(text.contains("username = \"app\""), "{text}");
    assert!(text.contains("hostname = \"mx.cli.test\""), "{text}");
    assert!(text.contains("max_recipients = 50"), "{text}");
    // Defaults are filled in.
    assert!(text.contains("max_message_size = 26214400"), "{text}");
    assert!(text.contains("addr = \"127.0.0.1:2999\""), "{text}");
}

#[test]
fn config_check_applies_environment_overrides() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = good_config(dir.path());
    let out = check(&path, &[("MAILROOM_SMTP__MAX_RECIPIENTS", "7")]);
    assert_ok(&out);
    let text = stdout(&out);
    assert!(text.contains("max_recipients = 7"), "{text}");
    assert!(!text.contains("max_recipients = 50"), "{text}");

    // A bad value from the environment names the variable and the key.
    let out = check(&path, &[("MAILROOM_SMTP__DATA_TIMEOUT", "soon")]);
    assert_fails(&out);
    let err = stderr(&out);
    assert!(
        err.contains("MAILROOM_SMTP__DATA_TIMEOUT") && err.contains("smtp.data_timeout"),
        "{err}"
    );
}

#[test]
fn config_check_rejects_an_unknown_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_config(dir.path(), "typo.toml", "[smtp]\nmax_recipientz = 5\n");
    let out = check(&path, &[]);
    assert_fails(&out);
    let err = stderr(&out);
    assert!(
        err.contains("max_recipientz") && err.contains(&path.display().to_string()),
        "{err}"
    );
    assert!(stdout(&out).is_empty());
}

#[test]
fn config_check_rejects_bad_values() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, key) in [
        ("[smtp]\nmax_recipients = \"many\"\n", "smtp.max_recipients"),
        ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients"),
        (
            "[smtp]\ncommand_timeout = \"soon\"\n",
            "smtp.command_timeout",
        ),
        (
            "[[smtp.listeners]]\naddr = \"127.0.0.1:2525\"\nrole = \"relay\"\n",
            "smtp.listeners[0].role",
        ),
        (
            "[[smtp.users]]\nusername = \"app\"\npassword_hash = \"plaintext\"\n",
            "smtp.users[0].password_hash",
        ),
    ] {
        let path = write_config(dir.path(), "bad.toml", text);
        let out = check(&path, &[]);
        assert_fails(&out);
        let err = stderr(&out);
        assert!(
            err.contains(&format!("key `{key}`")) && err.contains(&path.display().to_string()),
            "for {text:?}: {err}"
        );
        assert!(
            !err.contains("plaintext"),
            "a secret value in the error: {err}"
        );
    }
}

#[test]
fn config_check_of_a_missing_file_fails() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("absent.toml");
    let out = check(&path, &[]);
    assert_fails(&out);
    assert!(
        stderr(&out).contains(&path.display().to_string()),
        "{}",
        stderr(&out)
    );
}

#[test]
fn hash_password_reads_stdin() {
    let out = cli(&["hash-password"], &[], Some(b"s3cret\n"));
    assert_ok(&out);
    let text = stdout(&out);
    let hash = text.trim_end();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(mailroom_smtp::auth::verify_password(hash, "s3cret"));
    assert!(!mailroom_smtp::auth::verify_password(hash, "s3cret\n"));

    let out = cli(&["hash-password"], &[], Some(b""));
    assert_fails(&out);
}

#[test]
fn queue_list_and_show() {
    let mut server = Setup::new().listener(Role::Mx, Tls::None).start();
    let config = server.config_path.to_str().expect("UTF-8 path").to_owned();
    let mut c = Smtp::connect(server.addr(0));
    c.ehlo();
    let data = b"From: <a@client.test>\r\nSubject: cli test\r\n\r\nthe body line\r\n";
    let id = c.send_mail(
        "a@client.test",
        &[&format!("b@{LOCAL_DOMAIN}"), &format!("c@{LOCAL_DOMAIN}")],
        data,
    );
    c.cmd("QUIT", "221");
    let size = server.message(&id).size;

    // While the server runs (WAL) and after it stopped.
    for running in [true, false] {
        if !running {
            server.stop_ok();
        }
        let out = cli(&["queue", "list", "--config", &config], &[], None);
        assert_ok(&out);
        let list = stdout(&out);
        let line = list
            .lines()
            .find(|l| l.starts_with(&id))
            .unwrap_or_else(|| panic!("{id} not listed:\n{list}"));
        // ... STATE RCPTS SIZE FROM, counted from the end of the line.
        let columns: Vec<&str> = line.split_whitespace().rev().take(4).collect();
        assert_eq!(
            columns[..3],
            ["<a@client.test>", &size.to_string(), "2"][..],
            "{line}"
        );
        // Local-domain mail is kept in the store: delivered once the
        // delivery engine has seen it, which may be a moment after the 250.
        assert!(["queued", "delivered"].contains(&columns[3]), "{line}");

        let out = cli(&["queue", "show", &id, "--config", &config], &[], None);
        assert_ok(&out);
        let show = stdout(&out);
        for expected in [
            format!("id:           {id}"),
            "reverse-path: <a@client.test>".to_owned(),
            "body:         7bit".to_owned(),
            format!("  <b@{LOCAL_DOMAIN}>  "),
            format!("  <c@{LOCAL_DOMAIN}>  "),
            "attempts=0".to_owned(),
            "helo=client.test".to_owned(),
            "Received: from client.test ([127.0.0.1])".to_owned(),
            "Subject: cli test".to_owned(),
        ] {
            assert!(show.contains(&expected), "missing {expected:?}:\n{show}");
        }
        assert!(!show.contains("the body line"), "headers only:\n{show}");

        let out = cli(
            &["queue", "show", &id, "--content", "--config", &config],
            &[],
            None,
        );
        assert_ok(&out);
        assert!(stdout(&out).contains("the body line"));
    }

    let missing = "01900000-0000-7000-8000-000000000000";
    let out = cli(&["queue", "show", missing, "--config", &config], &[], None);
    assert_fails(&out);
    assert!(stderr(&out).contains(missing), "{}", stderr(&out));

    let out = cli(
        &["queue", "show", "not-an-id", "--config", &config],
        &[],
        None,
    );
    assert_fails(&out);
}

#[test]
fn queue_list_received_column_is_iso_and_aligned() {
    let mut server = Setup::new().listener(Role::Mx, Tls::None).start();
    let config = server.config_path.to_str().expect("UTF-8 path").to_owned();
    let mut c = Smtp::connect(server.addr(0));
    c.ehlo();
    let id = c.send_mail(
        "a@client.test",
        &[&format!("b@{LOCAL_DOMAIN}")],
        b"Subject: columns\r\n\r\nx\r\n",
    );
    server.stop_ok();
    let out = cli(&["queue", "list", "--config", &config], &[], None);
    assert_ok(&out);
    let list = stdout(&out);
    let mut lines = list.lines();
    let header = lines.next().expect("a header line");
    let line = lines.find(|l| l.starts_with(&id)).expect("the message");
    // `2026-11-21 09:30:00` right after the id and two spaces.
    let received = &line[38..57];
    let shape: String = received
        .chars()
        .map(|c| if c.is_ascii_digit() { '9' } else { c })
        .collect();
    assert_eq!(shape, "9999-99-99 99:99:99", "{line}");
    // Every column starts where its heading does.
    for heading in ["STATE", "RCPTS", "FROM"] {
        let at = header.find(heading).expect("heading");
        assert_eq!(
            &line[at - 2..at],
            "  ",
            "column {heading} misaligned:\n{header}\n{line}"
        );
    }
}

#[test]
fn queue_control_while_the_server_runs() {
    use base64::Engine as _;
    // Everything not local goes to a relay that refuses connections, so a
    // remote recipient stays deferred until an operator acts.
    let server = Setup::new()
        .listener(Role::Mx, Tls::None)
        .smtp("allow_insecure_auth = true")
        .user()
        .toml(
            "[delivery]\nretry_initial = \"1h\"\nretry_max = \"1h\"\n\n[[delivery.routes]]\ndomain = \"*\"\nrelay = \"127.0.0.1:1\"\ntls = \"none\"",
        )
        .start();
    let config = server.config_path.to_str().expect("UTF-8 path").to_owned();
    let mut c = Smtp::connect(server.addr(0));
    c.ehlo();
    let token = base64::engine::general_purpose::STANDARD.encode(format!(
        "\0{}\0{}",
        common::USER,
        common::PASSWORD
    ));
    c.cmd(&format!("AUTH PLAIN {token}"), "235");
    let id = c.send_mail(
        &format!("sender@{LOCAL_DOMAIN}"),
        &["someone@remote.test"],
        b"Subject: control\r\n\r\nbody\r\n",
    );
    c.cmd("QUIT", "221");
    let message_id: mailroom_core::MessageId = id.parse().expect("id");
    let state = || {
        server
            .store()
            .get(&message_id)
            .expect("read")
            .expect("stored")
            .recipients[0]
            .state
    };
    let wait_for = |want: RecipientState| {
        poll(Duration::from_secs(10), || (state() == want).then_some(()))
            .unwrap_or_else(|| panic!("never {want:?}; now {:?}\n{}", state(), server.log()))
    };
    wait_for(RecipientState::Deferred);

    let run = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--config", &config]);
        let out = cli(&all, &[], None);
        assert_ok(&out);
        stdout(&out)
    };
    assert!(run(&["queue", "hold", &id]).contains("1 recipient(s) held"));
    wait_for(RecipientState::Held);
    assert!(run(&["queue", "list", "--state", "held"]).contains(&id));
    assert!(run(&["queue", "release", &id]).contains("1 recipient(s) released"));
    // Released means tried at once: the relay still refuses, so another
    // attempt is recorded and the recipient is deferred again.
    poll(Duration::from_secs(10), || {
        (server
            .store()
            .attempts(&message_id)
            .expect("attempts")
            .len()
            >= 2)
            .then_some(())
    })
    .expect("a second attempt after release");
    wait_for(RecipientState::Deferred);
    assert!(run(&["queue", "retry", "--all"]).contains("1 recipient(s) of 1 message(s)"));
    poll(Duration::from_secs(10), || {
        (server
            .store()
            .attempts(&message_id)
            .expect("attempts")
            .len()
            >= 3)
            .then_some(())
    })
    .expect("a third attempt after retry");

    let out = run(&["queue", "bounce", &id]);
    assert!(out.contains("1 recipient(s) bounced; DSN"), "{out}");
    wait_for(RecipientState::Failed);
    // The DSN went to the (local) sender and is kept in the store.
    let dsn = poll(Duration::from_secs(10), || {
        server
            .store()
            .list(&mailroom_store::ListQuery::default())
            .expect("list")
            .into_iter()
            .find(|m| m.reverse_path.is_none() && m.state == RecipientState::Delivered)
    })
    .expect("a delivered DSN");
    let dsn = server.message(&dsn.id.to_string());
    let text = String::from_utf8_lossy(&dsn.content);
    assert!(text.contains("report-type=delivery-status"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; someone@remote.test"),
        "{text}"
    );

    assert!(run(&["queue", "delete", &id]).contains("deleted"));
    assert!(server.store().get(&message_id).expect("read").is_none());
    assert_fails(&cli(
        &["queue", "show", &id, "--config", &config],
        &[],
        None,
    ));
    assert_fails(&cli(&["queue", "retry", "--config", &config], &[], None));
}
