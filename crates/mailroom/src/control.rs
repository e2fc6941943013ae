//! A local control socket (`data_dir/control.sock`) through which
//! `mailroom queue` commands tell a running server what they changed in
//! the store, so its in-memory schedule follows without polling.
//!
//! One line per connection: `schedule <message-id>`; the answer is `ok N`
//! (recipients scheduled) or `error <text>`. The socket is created mode
//! 0600: only the server's user can steer it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use mailroom_core::MessageId;
use mailroom_delivery::engine::Engine;
use mailroom_store::SqliteStore;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{debug, warn};

pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("control.sock")
}

/// Binds the socket (replacing a stale one from an earlier run).
pub fn bind(data_dir: &Path) -> std::io::Result<UnixListener> {
    let path = socket_path(data_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(&path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves control requests until the task is dropped.
pub async fn serve(listener: UnixListener, engine: Engine<SqliteStore>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let engine = engine.clone();
        tokio::spawn(async move {
            if let Err(err) = handle(stream, engine).await {
                debug!(error = %err, "control connection failed");
            }
        });
    }
}

async fn handle(stream: UnixStream, engine: Engine<SqliteStore>) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(read.take(256));
    tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no request"))??;
    let answer = match line.trim().split_once(' ') {
        Some(("schedule", id)) => match id.parse::<MessageId>() {
            Ok(id) => {
                let result = tokio::task::spawn_blocking(move || engine.reschedule(&id)).await;
                match result {
                    Ok(Ok(n)) => format!("ok {n}\n"),
                    Ok(Err(err)) => {
                        warn!(error = %err, "control: cannot reschedule");
                        format!("error {err}\n")
                    }
                    Err(_) => "error internal\n".to_owned(),
                }
            }
            Err(_) => "error not a message id\n".to_owned(),
        },
        _ => "error unknown request\n".to_owned(),
    };
    write.write_all(answer.as_bytes()).await?;
    write.shutdown().await
}

/// Tells a running server to reschedule `id`. `Ok(false)` when no server is
/// listening (nothing to tell: the next start loads the queue anyway).
pub fn notify(data_dir: &Path, id: &MessageId) -> anyhow::Result<bool> {
    use std::io::{BufRead, Write};
    let path = socket_path(data_dir);
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(false);
        }
        Err(e) => return Err(e.into()),
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(format!("schedule {id}\n").as_bytes())?;
    let mut answer = String::new();
    std::io::BufReader::new(stream).read_line(&mut answer)?;
    anyhow::ensure!(
        answer.starts_with("ok"),
        "the server refused: {}",
        answer.trim()
    );
    Ok(true)
}
