//! The session's read buffer, held only while the client sends in bulk.
//!
//! An idle session waits for its next command with most of its memory in
//! its read buffer: 4 KiB a connection with tokio's `BufReader`, half of
//! what a session costs. Here a read lands in a small buffer inside the
//! session itself, which holds any ordinary command line (and a pipelined
//! MAIL, RCPT and DATA); only a read that fills it, a sign that more is
//! waiting (DATA, a long line), moves reads to a heap buffer, which is
//! given back once a read no longer fills it. Between commands a session
//! holds no heap buffer at all.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncBufRead, AsyncRead, ReadBuf};

/// Reads between commands: a command line (at most 512 bytes by RFC 5321)
/// and a few pipelined ones.
const SMALL: usize = 512;
/// Reads while the client sends in bulk.
const BULK: usize = 16 * 1024;

pub struct LazyReader<S> {
    inner: S,
    small: [u8; SMALL],
    /// Empty unless in use.
    bulk: Vec<u8>,
    /// Unread data: `pos..filled` of `bulk` if it is in use, else of
    /// `small`.
    pos: usize,
    filled: usize,
    /// The last read filled its buffer: more is probably waiting.
    more: bool,
}

impl<S> LazyReader<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            small: [0; SMALL],
            bulk: Vec::new(),
            pos: 0,
            filled: 0,
            more: false,
        }
    }

    /// What was read and not consumed yet.
    pub fn buffer(&self) -> &[u8] {
        let buf = if self.bulk.is_empty() {
            &self.small[..]
        } else {
            &self.bulk[..]
        };
        &buf[self.pos..self.filled]
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The stream, and whatever was buffered is dropped (STARTTLS checks
    /// there is none first).
    pub fn into_inner(self) -> S {
        self.inner
    }

    /// Heap bytes held now (tests).
    #[cfg(test)]
    fn held(&self) -> usize {
        self.bulk.capacity()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for LazyReader<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        dst: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let buf = ready!(self.as_mut().poll_fill_buf(cx))?;
        let n = buf.len().min(dst.remaining());
        dst.put_slice(&buf[..n]);
        self.consume(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + Unpin> AsyncBufRead for LazyReader<S> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<&[u8]>> {
        let this = self.get_mut();
        if this.pos >= this.filled {
            this.pos = 0;
            this.filled = 0;
            if this.more {
                if this.bulk.is_empty() {
                    this.bulk = vec![0; BULK];
                }
            } else {
                // Drained by a read that did not fill its buffer: idle, or
                // about to be. The heap buffer goes back.
                this.bulk = Vec::new();
            }
            let (polled, n, cap) = {
                let buf: &mut [u8] = if this.bulk.is_empty() {
                    &mut this.small
                } else {
                    &mut this.bulk
                };
                let cap = buf.len();
                let mut rb = ReadBuf::new(buf);
                let polled = Pin::new(&mut this.inner).poll_read(cx, &mut rb);
                (polled, rb.filled().len(), cap)
            };
            match polled {
                Poll::Pending => {
                    // Nothing to read after all: the session waits without
                    // the heap buffer (found by review: a read that exactly
                    // filled the small one used to leave 16 KiB held).
                    this.bulk = Vec::new();
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            this.more = n == cap;
            this.filled = n;
        }
        Poll::Ready(Ok(this.buffer()))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let this = self.get_mut();
        this.pos = (this.pos + amt).min(this.filled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

    /// Everything read through it, consumed `step` bytes at a time.
    async fn drain(r: &mut LazyReader<tokio::io::DuplexStream>, step: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let buf = r.fill_buf().await.unwrap();
            if buf.is_empty() {
                return out;
            }
            let n = buf.len().min(step);
            out.extend_from_slice(&buf[..n]);
            r.consume(n);
        }
    }

    #[tokio::test]
    async fn bytes_come_out_as_they_went_in_whatever_the_sizes() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for step in [1, 7, 512, 5000, 100_000] {
            let (mut w, r) = tokio::io::duplex(64 * 1024);
            let mut r = LazyReader::new(r);
            let sent = data.clone();
            let writer = tokio::spawn(async move {
                w.write_all(&sent).await.unwrap();
            });
            let got = drain(&mut r, step).await;
            writer.await.unwrap();
            assert_eq!(got, data, "step {step}");
        }
    }

    #[tokio::test]
    async fn commands_use_no_heap_and_bulk_gives_it_back() {
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        let mut r = LazyReader::new(r);
        w.write_all(b"EHLO client.example\r\n").await.unwrap();
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).await.unwrap();
        assert_eq!(line, b"EHLO client.example\r\n");
        assert_eq!(r.held(), 0, "a command line needs no heap buffer");
        // Bulk: reads move to the heap buffer while they fill theirs.
        w.write_all(&vec![b'x'; 40_000]).await.unwrap();
        let mut got = 0;
        let mut peak = 0;
        while got < 40_000 {
            let n = r.fill_buf().await.unwrap().len();
            peak = peak.max(r.held());
            r.consume(n);
            got += n;
        }
        assert_eq!(peak, BULK);
        // Then idle again: the next read that does not fill the buffer
        // gives it back.
        w.write_all(b"QUIT\r\n").await.unwrap();
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).await.unwrap();
        assert_eq!(line, b"QUIT\r\n");
        w.write_all(b"NOOP\r\n").await.unwrap();
        line.clear();
        r.read_until(b'\n', &mut line).await.unwrap();
        assert_eq!(r.held(), 0);
    }

    /// Found by review: a client that sends exactly a small buffer's worth
    /// and then waits must not leave the session holding the heap buffer.
    #[tokio::test]
    async fn a_read_that_fills_the_small_buffer_then_silence_holds_nothing() {
        let (mut w, r) = tokio::io::duplex(64 * 1024);
        let mut r = LazyReader::new(r);
        w.write_all(&[b'N'; SMALL]).await.unwrap();
        let n = r.fill_buf().await.unwrap().len();
        assert_eq!(n, SMALL);
        r.consume(n);
        // The next read would go to the heap buffer; nothing is there.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(Pin::new(&mut r).poll_fill_buf(&mut cx).is_pending());
        assert_eq!(r.held(), 0);
        // And it reads on once the client does.
        w.write_all(b"QUIT\r\n").await.unwrap();
        assert_eq!(r.fill_buf().await.unwrap(), b"QUIT\r\n");
    }
}
