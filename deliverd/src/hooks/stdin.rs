//! post-data's standard input: the message with LF line ends, as chasquid
//! gave it to its hooks, streamed from the descriptor queued sent, one
//! chunk at a time, so a 50 MB message never sits whole in memory.
//!
//! The file is read with positional reads: its offset may be shared with
//! another holder of the descriptor, and is left alone.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use tokio::io::AsyncWriteExt;
use tokio::process::ChildStdin;

/// Bytes read from the message at a time.
const CHUNK: usize = 64 * 1024;

/// Why feeding stopped early.
#[derive(Debug)]
pub enum FeedError {
    /// The message could not be read: the hook saw only part of it.
    Read(io::Error),
    /// The hook closed its end (it exited, or does not read its input):
    /// not an error, the hook decides without the rest.
    Closed,
}

/// Writes `prefix` (already with LF line ends) and then the message, CRLF
/// turned into LF, to the hook's stdin, and closes it.
pub async fn feed(
    mut stdin: ChildStdin,
    prefix: &[u8],
    message: Arc<File>,
) -> Result<(), FeedError> {
    let closed = |_| FeedError::Closed;
    stdin.write_all(prefix).await.map_err(closed)?;
    let mut lf = ToLf::default();
    let mut offset = 0u64;
    let mut out = Vec::with_capacity(CHUNK);
    loop {
        let file = message.clone();
        let chunk = tokio::task::spawn_blocking(move || read_chunk(&file, offset))
            .await
            .map_err(|e| FeedError::Read(io::Error::other(e)))?
            .map_err(FeedError::Read)?;
        if chunk.is_empty() {
            break;
        }
        offset += chunk.len() as u64;
        out.clear();
        lf.convert(&chunk, &mut out);
        stdin.write_all(&out).await.map_err(closed)?;
    }
    out.clear();
    lf.finish(&mut out);
    stdin.write_all(&out).await.map_err(closed)?;
    stdin.shutdown().await.map_err(closed)
}

fn read_chunk(file: &File, offset: u64) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        match file.read_at(&mut buf, offset) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// CRLF → LF over a stream cut anywhere: a CR at the end of one chunk
/// waits for the next to know whether an LF follows. A CR not followed by
/// LF stays as it is.
#[derive(Debug, Default)]
pub struct ToLf {
    pending_cr: bool,
}

impl ToLf {
    pub fn convert(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut rest = input;
        if self.pending_cr && !rest.is_empty() {
            self.pending_cr = false;
            if rest[0] != b'\n' {
                out.push(b'\r');
            }
        }
        while let Some(i) = rest.iter().position(|&b| b == b'\r') {
            out.extend_from_slice(&rest[..i]);
            match rest.get(i + 1) {
                // The LF is copied with what follows.
                Some(b'\n') => rest = &rest[i + 1..],
                Some(_) => {
                    out.push(b'\r');
                    rest = &rest[i + 1..];
                }
                None => {
                    self.pending_cr = true;
                    return;
                }
            }
        }
        out.extend_from_slice(rest);
    }

    /// Flushes a CR the input ended with.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.pending_cr) {
            out.push(b'\r');
        }
    }
}

/// `text` with CRLF turned into LF, in one go.
pub fn to_lf(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut lf = ToLf::default();
    lf.convert(text, &mut out);
    lf.finish(&mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crlf_becomes_lf_wherever_the_chunks_are_cut() {
        let input = b"a\r\nb\r\r\nc\rd\r\n\r\n\r";
        let want = b"a\nb\r\nc\rd\n\n\r";
        assert_eq!(to_lf(input), want);
        for cut in 0..=input.len() {
            for cut2 in cut..=input.len() {
                let mut lf = ToLf::default();
                let mut out = Vec::new();
                lf.convert(&input[..cut], &mut out);
                lf.convert(&input[cut..cut2], &mut out);
                lf.convert(&input[cut2..], &mut out);
                lf.finish(&mut out);
                assert_eq!(out, want, "cut at {cut} and {cut2}");
            }
        }
    }
}
