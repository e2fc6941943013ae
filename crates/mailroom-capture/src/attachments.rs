//! Where attachment contents go in an event: inline as base64 (`memory`)
//! or written to files under `temp_dir` (`tempfile`), which keeps large
//! attachments out of the JSON a worker has to read. Files are removed
//! `cleanup_after` they were written, and all of them at shutdown.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use mailroom_core::config::AttachmentMode;
use tracing::{debug, warn};

use crate::event::EventAttachment;
use crate::mime::Part;

/// Stores attachments per the configured mode and remembers what to delete.
pub struct AttachmentStore {
    mode: AttachmentMode,
    dir: PathBuf,
    cleanup_after: Duration,
    /// Per-message directories, oldest first.
    written: Mutex<VecDeque<(Instant, PathBuf)>>,
}

impl AttachmentStore {
    pub fn new(mode: AttachmentMode, dir: PathBuf, cleanup_after: Duration) -> Self {
        AttachmentStore {
            mode,
            dir,
            cleanup_after,
            written: Mutex::new(VecDeque::new()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The event's view of `parts`; in `tempfile` mode writes one file per
    /// part under `temp_dir/<uuid>/`.
    pub(crate) fn store(
        &self,
        uuid: &str,
        parts: &[Part],
    ) -> Result<Vec<EventAttachment>, std::io::Error> {
        let message_dir = self.dir.join(uuid);
        if self.mode == AttachmentMode::Tempfile && !parts.is_empty() {
            std::fs::create_dir_all(&message_dir)?;
            self.lock().push_back((Instant::now(), message_dir.clone()));
        }
        let mut out = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let (content, path) = match self.mode {
                AttachmentMode::Memory => (Some(BASE64.encode(&part.content)), None),
                AttachmentMode::Tempfile => {
                    let name = format!("{i}-{}", safe_name(part.filename.as_deref()));
                    let path = message_dir.join(name);
                    std::fs::write(&path, &part.content)?;
                    (None, Some(path.to_string_lossy().into_owned()))
                }
            };
            out.push(EventAttachment {
                filename: part.filename.clone(),
                content_type: part.content_type.clone(),
                content_id: part.content_id.clone(),
                size: part.content.len(),
                content,
                path,
            });
        }
        Ok(out)
    }

    /// Deletes the files written more than `cleanup_after` ago; returns how
    /// many message directories went.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut written = self.lock();
            while let Some((at, _)) = written.front() {
                if now.duration_since(*at) < self.cleanup_after {
                    break;
                }
                if let Some((_, dir)) = written.pop_front() {
                    expired.push(dir);
                }
            }
        }
        let count = expired.len();
        for dir in expired {
            remove(&dir);
        }
        count
    }

    /// Deletes the files of one message at once (its worker failed, so the
    /// client will send it again and nobody will read these).
    pub fn remove_message(&self, uuid: &str) {
        let dir = self.dir.join(uuid);
        let known = {
            let mut written = self.lock();
            let before = written.len();
            written.retain(|(_, d)| *d != dir);
            before != written.len()
        };
        if known {
            remove(&dir);
        }
    }

    /// Deletes every file this store wrote (at shutdown).
    pub fn remove_all(&self) {
        let all: Vec<_> = self.lock().drain(..).collect();
        for (_, dir) in all {
            remove(&dir);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Instant, PathBuf)>> {
        self.written.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn remove(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => debug!(dir = %dir.display(), "attachments removed"),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => warn!(dir = %dir.display(), error = %err, "cannot remove attachments"),
    }
}

/// A file name that cannot leave its directory or upset a shell: the
/// sender chooses it.
fn safe_name(name: Option<&str>) -> String {
    let cleaned: String = name
        .unwrap_or("part")
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    let cleaned = cleaned.trim_start_matches('.');
    if cleaned.is_empty() {
        "part".into()
    } else {
        cleaned.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(name: &str) -> Part {
        Part {
            filename: Some(name.into()),
            content_type: "application/pdf".into(),
            content_id: None,
            inline: false,
            content: b"%PDF".to_vec(),
        }
    }

    #[test]
    fn names_stay_inside_the_directory() {
        assert_eq!(safe_name(Some("../../etc/passwd")), "_.._etc_passwd");
        assert_eq!(safe_name(Some("...")), "part");
        assert_eq!(safe_name(None), "part");
        assert_eq!(safe_name(Some("Rechnung März.pdf")), "Rechnung_März.pdf");
    }

    #[test]
    fn tempfiles_are_written_then_swept() {
        let tmp = tempfile::tempdir().unwrap();
        let store = AttachmentStore::new(
            AttachmentMode::Tempfile,
            tmp.path().to_path_buf(),
            Duration::ZERO,
        );
        let out = store.store("m1", &[part("r.pdf")]).unwrap();
        let path = PathBuf::from(out[0].path.as_ref().unwrap());
        assert_eq!(std::fs::read(&path).unwrap(), b"%PDF");
        assert!(out[0].content.is_none());
        assert_eq!(store.sweep(), 1);
        assert!(!path.exists());
        assert!(!tmp.path().join("m1").exists());
    }

    #[test]
    fn memory_mode_inlines_base64() {
        let store = AttachmentStore::new(
            AttachmentMode::Memory,
            PathBuf::from("/nonexistent"),
            Duration::ZERO,
        );
        let out = store.store("m1", &[part("r.pdf")]).unwrap();
        assert_eq!(out[0].content.as_deref(), Some("JVBERg=="));
        assert_eq!(out[0].size, 4);
        assert!(out[0].path.is_none());
    }
}
