//! A guest's stderr, kept as its last few KiB. JavaScript and Python runtimes
//! print an uncaught exception there before they trap; the tail goes into
//! the trap error so the user sees the guest's own account of the failure.
//! Writes never fail, so a chatty guest is not punished with a trap.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[derive(Clone)]
pub(super) struct StderrTail {
    buf: Arc<Mutex<VecDeque<u8>>>,
    capacity: usize,
}

impl StderrTail {
    pub(super) fn new(capacity: usize) -> StderrTail {
        StderrTail {
            buf: Arc::new(Mutex::new(VecDeque::new())),
            capacity,
        }
    }

    fn push(&self, bytes: &[u8]) {
        let Ok(mut buf) = self.buf.lock() else { return };
        let bytes = &bytes[bytes.len().saturating_sub(self.capacity)..];
        let overflow = (buf.len() + bytes.len()).saturating_sub(self.capacity);
        buf.drain(..overflow);
        buf.extend(bytes);
    }

    /// Forgets what was captured (a kept instance starts its next task).
    pub(super) fn clear(&self) {
        if let Ok(mut buf) = self.buf.lock() {
            buf.clear();
        }
    }

    /// The captured text, trimmed; `None` when the guest wrote nothing.
    pub(super) fn text(&self) -> Option<String> {
        let buf = self.buf.lock().ok()?;
        let (a, b) = buf.as_slices();
        let text = String::from_utf8_lossy(&[a, b].concat()).trim().to_string();
        (!text.is_empty()).then_some(text)
    }
}

impl IsTerminal for StderrTail {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for StderrTail {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for StderrTail {
    async fn ready(&mut self) {}
}

impl OutputStream for StderrTail {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for StderrTail {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.push(buf);
        std::task::Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_bytes() {
        let tail = StderrTail::new(8);
        assert_eq!(tail.text(), None);
        tail.push(b"hello ");
        tail.push(b"world");
        assert_eq!(tail.text().as_deref(), Some("lo world"));
        tail.push(b"0123456789abc");
        assert_eq!(tail.text().as_deref(), Some("56789abc"));
    }
}
