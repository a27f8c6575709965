//! The group's VM spec on its way to the replica site: which text to send
//! and when. A session sends the spec's file when it starts, then again
//! whenever its content changes (its BLAKE3 differs from the last one
//! sent); the file is looked at no more often than every
//! [`SpecWatch::INTERVAL`]. The receiver checks the spec and answers
//! (kept or refused): this module only decides what to send, the session
//! core sends it in stream order.
//!
//! A file that cannot be read is logged once per failure cause and tried
//! again at the next look: replication goes on without it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Watches one spec file for one session.
#[derive(Debug)]
pub struct SpecWatch {
    path: PathBuf,
    /// The content hash of the text last handed over in this session.
    sent: Option<blake3::Hash>,
    next_look: Option<Instant>,
    /// The last read failure logged, so a lasting one is logged once.
    failing: Option<String>,
}

impl SpecWatch {
    /// How often the file is looked at.
    pub const INTERVAL: Duration = Duration::from_secs(2);

    /// A watch of `path` for a new session: the first look sends it.
    pub fn new(path: &Path) -> SpecWatch {
        SpecWatch {
            path: path.to_path_buf(),
            sent: None,
            next_look: None,
            failing: None,
        }
    }

    /// The text to send now, if the file is due for a look and its
    /// content is new to this session. `read` reads the file.
    pub fn poll(
        &mut self,
        now: Instant,
        read: impl FnOnce(&Path) -> std::io::Result<String>,
    ) -> Option<String> {
        if self.next_look.is_some_and(|t| now < t) {
            return None;
        }
        self.next_look = Some(now + Self::INTERVAL);
        match read(&self.path) {
            Ok(text) => {
                self.failing = None;
                let hash = blake3::hash(text.as_bytes());
                if self.sent == Some(hash) {
                    return None;
                }
                self.sent = Some(hash);
                Some(text)
            }
            Err(e) => {
                let why = e.to_string();
                if self.failing.as_deref() != Some(why.as_str()) {
                    tracing::warn!(
                        file = %self.path.display(),
                        error = %why,
                        "cannot read the VM spec; the replica keeps the version it has"
                    );
                    self.failing = Some(why);
                }
                None
            }
        }
    }

    /// When the file is looked at next.
    pub fn next_look(&self) -> Option<Instant> {
        self.next_look
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn the_spec_is_sent_first_and_then_only_when_it_changes() {
        let t = Instant::now();
        let mut w = SpecWatch::new(Path::new("/etc/tidemark/vms/web1.toml"));
        let text = |s: &'static str| move |_: &Path| Ok::<_, io::Error>(s.to_string());
        assert_eq!(w.poll(t, text("a")).as_deref(), Some("a"));
        assert_eq!(w.poll(t, text("b")), None, "not due yet");
        let t = t + SpecWatch::INTERVAL;
        assert_eq!(w.poll(t, text("a")), None, "unchanged");
        let t = t + SpecWatch::INTERVAL;
        assert_eq!(
            w.poll(t, |_| Err(io::Error::from(io::ErrorKind::NotFound))),
            None
        );
        let t = t + SpecWatch::INTERVAL;
        assert_eq!(w.poll(t, text("b")).as_deref(), Some("b"));
        assert_eq!(w.next_look(), Some(t + SpecWatch::INTERVAL));
        // A new session sends it again.
        let mut w = SpecWatch::new(Path::new("/etc/tidemark/vms/web1.toml"));
        assert_eq!(w.poll(t, text("b")).as_deref(), Some("b"));
    }
}
