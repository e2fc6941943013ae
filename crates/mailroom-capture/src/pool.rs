//! The worker pool: long-running processes that each captured message is
//! handed to, over their stdin/stdout, in the jsonl or goridge codec.
//!
//! A worker is borrowed for one message and given back at once. The pool
//! holds at most `num_workers` processes and no queue of its own: when all
//! are busy, the SMTP session waiting on [`WorkerPool::handle`] waits too,
//! which is the backpressure (the client sees a slow `250`, never a
//! growing buffer). A worker that crashes, times out or breaks the protocol
//! is killed; the next message starts a fresh one.

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailroom_core::Receipt;
use mailroom_core::config::{CaptureWorkers, WorkerCodec};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::goridge::{self, Frame};

/// Why a message could not be handed to a worker; the client gets `451`.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("cannot start the worker: {0}")]
    Spawn(std::io::Error),
    #[error("no worker became free within allocate_timeout")]
    AllocateTimeout,
    #[error("the worker did not answer within exec_timeout")]
    ExecTimeout,
    #[error("the worker stopped: {0}")]
    Crashed(String),
    #[error("the worker broke the protocol: {0}")]
    Protocol(String),
    #[error("the pool is shut down")]
    Closed,
}

/// A pool of worker processes; cheap to clone.
#[derive(Clone)]
pub struct WorkerPool {
    inner: Arc<Inner>,
}

struct Inner {
    settings: CaptureWorkers,
    idle: Mutex<Vec<Worker>>,
    /// One permit per process the pool may run.
    permits: Semaphore,
}

impl WorkerPool {
    /// Starts `num_workers` processes, so a broken command shows at start
    /// rather than on the first message.
    pub async fn start(settings: CaptureWorkers) -> Result<Self, WorkerError> {
        let mut idle = Vec::with_capacity(settings.num_workers);
        for _ in 0..settings.num_workers {
            let worker = tokio::time::timeout(settings.allocate_timeout, Worker::spawn(&settings))
                .await
                .map_err(|_| WorkerError::AllocateTimeout)??;
            idle.push(worker);
        }
        Ok(WorkerPool {
            inner: Arc::new(Inner {
                permits: Semaphore::new(settings.num_workers),
                idle: Mutex::new(idle),
                settings,
            }),
        })
    }

    /// Hands one event (compact JSON, no newline) to a worker and returns
    /// what the session should do next. An error reply from the worker is
    /// logged and counts as `Continue`: the message was received.
    pub async fn handle(&self, event: &[u8]) -> Result<Receipt, WorkerError> {
        let settings = &self.inner.settings;
        let _permit = tokio::time::timeout(settings.allocate_timeout, self.inner.permits.acquire())
            .await
            .map_err(|_| WorkerError::AllocateTimeout)?
            .map_err(|_| WorkerError::Closed)?;
        let mut worker = match self.take_idle() {
            Some(worker) => worker,
            None => tokio::time::timeout(settings.allocate_timeout, Worker::spawn(settings))
                .await
                .map_err(|_| WorkerError::AllocateTimeout)??,
        };
        let result = match tokio::time::timeout(settings.exec_timeout, worker.exec(event)).await {
            Ok(result) => result,
            Err(_) => Err(WorkerError::ExecTimeout),
        };
        match result {
            Ok(answer) => {
                worker.jobs += 1;
                let spent = settings.max_jobs > 0 && worker.jobs >= settings.max_jobs;
                if spent || answer.stop {
                    debug!(pid = worker.pid, jobs = worker.jobs, "replacing worker");
                    tokio::spawn(worker.stop(settings.destroy_timeout));
                } else {
                    self.lock().push(worker);
                }
                Ok(answer.receipt)
            }
            Err(err) => {
                warn!(pid = worker.pid, error = %err, "worker failed; it is replaced");
                worker.kill().await;
                Err(err)
            }
        }
    }

    /// Stops every idle worker (each within `destroy_timeout`) and refuses
    /// new work.
    pub async fn shutdown(&self) {
        self.inner.permits.close();
        let idle: Vec<Worker> = self.lock().drain(..).collect();
        let timeout = self.inner.settings.destroy_timeout;
        let stops: Vec<_> = idle
            .into_iter()
            .map(|w| tokio::spawn(w.stop(timeout)))
            .collect();
        for stop in stops {
            let _ = stop.await;
        }
    }

    /// An idle worker that is still running; dead ones are dropped here.
    fn take_idle(&self) -> Option<Worker> {
        let mut idle = self.lock();
        while let Some(mut worker) = idle.pop() {
            match worker.child.try_wait() {
                Ok(None) => return Some(worker),
                Ok(Some(status)) => info!(pid = worker.pid, %status, "idle worker exited"),
                Err(err) => warn!(pid = worker.pid, error = %err, "cannot check worker"),
            }
        }
        None
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Worker>> {
        self.inner.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What a worker said about one message.
struct Answer {
    receipt: Receipt,
    /// The worker asked to be stopped (RoadRunner's `{"stop":true}`).
    stop: bool,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    codec: WorkerCodec,
    pid: u32,
    jobs: u64,
}

/// Longest reply line a jsonl worker may send.
const MAX_LINE: u64 = 64 * 1024;

impl Worker {
    async fn spawn(settings: &CaptureWorkers) -> Result<Worker, WorkerError> {
        let (program, args) = settings
            .command
            .split_first()
            .ok_or_else(|| WorkerError::Spawn(std::io::Error::other("no command")))?;
        let mut child = Command::new(program)
            .args(args)
            // What RoadRunner sets, so its PHP worker picks the pipes relay.
            .env("RR_RELAY", "pipes")
            .env("RR_MODE", "capture")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(WorkerError::Spawn)?;
        let pid = child.id().unwrap_or(0);
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(WorkerError::Spawn(std::io::Error::other("no pipes")));
        };
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                info!(target: "mailroom_capture::worker", pid, "{line}");
            }
        });
        let mut worker = Worker {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            codec: settings.codec,
            pid,
            jobs: 0,
        };
        if worker.codec == WorkerCodec::Goridge {
            worker.handshake().await?;
        }
        debug!(pid, codec = ?settings.codec, "worker started");
        Ok(worker)
    }

    /// RoadRunner's start: we send our pid in a control frame, the worker
    /// answers with its own, which must be the process we started.
    async fn handshake(&mut self) -> Result<(), WorkerError> {
        let hello = format!(r#"{{"pid":{}}}"#, std::process::id());
        Frame::control(hello.as_bytes())
            .write_to(&mut self.stdin)
            .await
            .map_err(|e| WorkerError::Crashed(e.to_string()))?;
        let frame = self.read_frame().await?;
        if frame.flags & goridge::CONTROL == 0 {
            return Err(WorkerError::Protocol(
                "expected the pid control frame".into(),
            ));
        }
        #[derive(serde::Deserialize)]
        struct Pid {
            pid: u32,
        }
        let answer: Pid = serde_json::from_slice(&frame.payload)
            .map_err(|e| WorkerError::Protocol(format!("pid frame: {e}")))?;
        if answer.pid != self.pid {
            return Err(WorkerError::Protocol(format!(
                "worker says pid {}, started {}",
                answer.pid, self.pid
            )));
        }
        Ok(())
    }

    async fn exec(&mut self, event: &[u8]) -> Result<Answer, WorkerError> {
        let gone = |e: std::io::Error| WorkerError::Crashed(e.to_string());
        match self.codec {
            WorkerCodec::Jsonl => {
                let mut line = Vec::with_capacity(event.len() + 1);
                line.extend_from_slice(event);
                line.push(b'\n');
                self.stdin.write_all(&line).await.map_err(gone)?;
                self.stdin.flush().await.map_err(gone)?;
                let mut reply = String::new();
                let n = (&mut self.stdout)
                    .take(MAX_LINE)
                    .read_line(&mut reply)
                    .await
                    .map_err(gone)?;
                if n == 0 {
                    return Err(WorkerError::Crashed("stdout closed".into()));
                }
                Ok(self.verdict(reply.trim().as_bytes()))
            }
            WorkerCodec::Goridge => {
                Frame::task(event, b"")
                    .write_to(&mut self.stdin)
                    .await
                    .map_err(gone)?;
                let frame = self.read_frame().await?;
                if frame.flags & goridge::ERROR != 0 {
                    warn!(
                        pid = self.pid,
                        error = %String::from_utf8_lossy(&frame.payload),
                        "worker replied with an error; the message is accepted"
                    );
                    return Ok(Answer {
                        receipt: Receipt::Continue,
                        stop: false,
                    });
                }
                let (context, body) = frame.split();
                if is_stop(context) {
                    return Ok(Answer {
                        receipt: Receipt::Continue,
                        stop: true,
                    });
                }
                let text = if body.is_empty() { context } else { body };
                Ok(self.verdict(text.trim_ascii()))
            }
        }
    }

    async fn read_frame(&mut self) -> Result<Frame, WorkerError> {
        Frame::read_from(&mut self.stdout)
            .await
            .map_err(|e| match e {
                goridge::FrameError::Io(e) => WorkerError::Crashed(e.to_string()),
                other => WorkerError::Protocol(other.to_string()),
            })
    }

    fn verdict(&self, text: &[u8]) -> Answer {
        let receipt = if text.eq_ignore_ascii_case(b"CONTINUE") {
            Receipt::Continue
        } else if text.eq_ignore_ascii_case(b"CLOSE") {
            Receipt::Close
        } else {
            warn!(
                pid = self.pid,
                reply = %String::from_utf8_lossy(&text[..text.len().min(200)]),
                "worker replied neither CONTINUE nor CLOSE; the message is accepted"
            );
            Receipt::Continue
        };
        Answer {
            receipt,
            stop: false,
        }
    }

    /// Asks the worker to stop (EOF for jsonl, RoadRunner's stop frame for
    /// goridge); kills it after `timeout`.
    async fn stop(mut self, timeout: Duration) {
        if self.codec == WorkerCodec::Goridge {
            let _ = Frame::control(br#"{"stop":true}"#)
                .write_to(&mut self.stdin)
                .await;
        }
        drop(self.stdin);
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => debug!(pid = self.pid, %status, "worker stopped"),
            _ => {
                warn!(
                    pid = self.pid,
                    "worker did not stop within destroy_timeout; killed"
                );
                let _ = self.child.kill().await;
            }
        }
    }

    async fn kill(mut self) {
        let _ = self.child.kill().await;
    }
}

fn is_stop(context: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Stop {
        #[serde(default)]
        stop: bool,
    }
    serde_json::from_slice::<Stop>(context).is_ok_and(|s| s.stop)
}
