//! Guest stdout and stderr, as log events of the host.
//!
//! A guest's output is untrusted text: written raw to the host's terminal
//! it could forge host log lines (`ERROR cairn::invoker ...`), move the
//! cursor or hide lines with ANSI escapes. Instead every line becomes one
//! event of target `guest` at INFO (stdout) or WARN (stderr), tagged with
//! the invocation, service, handler and attempt, its text escaped (control
//! characters, including ESC, as `\u{1b}`) and cut at [`MAX_LINE`] bytes.
//! An attempt may log [`MAX_BYTES`] bytes per stream; the rest is dropped
//! with one notice. While a later attempt replays the journal, what the
//! handler prints is not logged again (the attempt that ran those steps
//! logged it). The values of `[guest_env]` marked secret are replaced by
//! `<redacted>` in every line.
//!
//! Lifecycle: [`GuestOutput::for_attempt`] when the instance is made, one
//! [`GuestOutput::stream`] per WASI stream; a partial last line is logged
//! when the instance is dropped.

use crate::records::InvocationRecord;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;

/// Longest line logged; longer lines are cut and marked.
pub const MAX_LINE: usize = 4096;

/// Bytes one attempt may log per stream.
pub const MAX_BYTES: usize = 1024 * 1024;

/// Who is writing: the tags of every line.
#[derive(Clone, Default)]
pub struct GuestOutput {
    invocation: Arc<str>,
    service: Arc<str>,
    handler: Arc<str>,
    attempt: u32,
    /// Set while the handler replays its journal: what it prints then was
    /// logged by the attempt that ran it first.
    replaying: Arc<AtomicBool>,
    /// Values replaced by `<redacted>` in every line (`[guest_env]`
    /// secrets).
    secrets: Arc<[String]>,
    /// The last [`TAIL`] lines of stderr (a trap's panic message is there).
    tail: Arc<Mutex<std::collections::VecDeque<String>>>,
}

/// Lines of stderr kept for [`GuestOutput::panic_message`].
const TAIL: usize = 8;

impl GuestOutput {
    /// The output of an attempt of `record` (untagged while describing),
    /// silent while `replaying` is set.
    pub fn for_attempt(record: Option<&InvocationRecord>, replaying: Arc<AtomicBool>) -> Self {
        match record {
            Some(r) => GuestOutput {
                invocation: r.id.as_str().into(),
                service: r.target.service.as_str().into(),
                handler: r.target.handler.as_str().into(),
                attempt: r.attempts + 1,
                replaying,
                secrets: Arc::new([]),
                tail: Arc::default(),
            },
            None => GuestOutput::default(),
        }
    }

    /// The same output with `secrets` redacted from every line.
    pub fn redacting(self, secrets: Arc<[String]>) -> Self {
        GuestOutput { secrets, ..self }
    }

    /// The WASI stream `name` ("stdout" or "stderr").
    pub fn stream(&self, name: &'static str) -> GuestStream {
        GuestStream {
            tags: self.clone(),
            name,
            state: Arc::default(),
        }
    }

    /// What the guest's panic printed (`panicked at FILE:LINE:COL:` and
    /// the message), if its recent stderr holds one.
    pub fn panic_message(&self) -> Option<String> {
        let tail = self.tail.lock().unwrap();
        let at = tail.iter().rposition(|l| l.contains("panicked at"))?;
        let message: Vec<&str> = tail
            .iter()
            .skip(at + 1)
            .take_while(|l| !l.starts_with("note:"))
            .map(String::as_str)
            .collect();
        let place = tail[at].split("panicked at ").nth(1).unwrap_or_default();
        Some(format!(
            "{} (at {})",
            message.join(" "),
            place.trim_end_matches(':')
        ))
    }

    fn emit(&self, stream: &'static str, line: &str) {
        let line = self.secrets.iter().fold(line.to_string(), |line, secret| {
            line.replace(secret.as_str(), "<redacted>")
        });
        if stream == "stderr" {
            let mut tail = self.tail.lock().unwrap();
            if tail.len() == TAIL {
                tail.pop_front();
            }
            tail.push_back(line.clone());
        }
        if self.replaying.load(Ordering::Relaxed) {
            return;
        }
        let (invocation, service, handler) = (&*self.invocation, &*self.service, &*self.handler);
        let attempt = self.attempt;
        if stream == "stderr" {
            tracing::warn!(target: "guest", invocation, service, handler, attempt, stream, "{line}");
        } else {
            tracing::info!(target: "guest", invocation, service, handler, attempt, stream, "{line}");
        }
    }
}

/// One WASI output stream of a guest.
#[derive(Clone)]
pub struct GuestStream {
    tags: GuestOutput,
    name: &'static str,
    state: Arc<Mutex<LineBuffer>>,
}

#[derive(Default)]
struct LineBuffer {
    partial: Vec<u8>,
    written: usize,
    muted: bool,
}

impl GuestStream {
    fn write(&self, bytes: &[u8]) {
        let mut state = self.state.lock().unwrap();
        if state.muted {
            return;
        }
        state.written += bytes.len();
        if state.written > MAX_BYTES {
            state.muted = true;
            self.tags.emit(
                self.name,
                &format!("[more output of this attempt dropped: over {MAX_BYTES} bytes]"),
            );
            return;
        }
        for &b in bytes {
            if b == b'\n' {
                self.flush_line(&mut state);
            } else if state.partial.len() < MAX_LINE + 1 {
                state.partial.push(b);
            }
        }
    }

    fn flush_line(&self, state: &mut LineBuffer) {
        let line = std::mem::take(&mut state.partial);
        self.tags.emit(self.name, &escape(&line));
    }
}

impl Drop for GuestStream {
    fn drop(&mut self) {
        if Arc::strong_count(&self.state) == 1 {
            let mut state = self.state.lock().unwrap();
            if !state.partial.is_empty() && !state.muted {
                self.flush_line(&mut state);
            }
        }
    }
}

/// Guest bytes as one printable line: invalid UTF-8 replaced, control
/// characters escaped, cut at [`MAX_LINE`] bytes.
pub fn escape(bytes: &[u8]) -> String {
    let cut = bytes.len() > MAX_LINE;
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_LINE)]);
    let mut line: String = text
        .chars()
        .map(|c| match c {
            '\t' => "\t".to_string(),
            c if c.is_control() => c.escape_unicode().to_string(),
            c => c.to_string(),
        })
        .collect();
    if cut {
        line.push_str(" [line cut]");
    }
    line
}

impl wasmtime_wasi::cli::IsTerminal for GuestStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for GuestStream {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl AsyncWrite for GuestStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.write(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_lines_cut() {
        assert_eq!(
            escape(b"\x1b[31mERROR cairn::invoker\r forged"),
            "\\u{1b}[31mERROR cairn::invoker\\u{d} forged"
        );
        assert_eq!(escape(b"caf\xc3\xa9 \xff"), "café \u{fffd}");
        let long = escape(&[b'a'; MAX_LINE + 10]);
        assert!(long.ends_with(" [line cut]") && long.len() == MAX_LINE + 11);
    }
}
