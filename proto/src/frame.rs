//! Framing: a 4-byte big-endian length, then one bincode-encoded message.
//!
//! [`encode`] and [`decode`] are the only place the codec is named, so it
//! can be swapped (postcard is the candidate) without touching a daemon.
//! Decoding enforces [`MAX_FRAME`], rejects trailing bytes (like OpenSMTPD's
//! `m_end()`), and never panics on any input.
//!
//! Every read names the largest frame the current state allows (a hello is
//! a few bytes, a body chunk 64 KiB), and the length is checked against it
//! before anything is allocated. [`FrameReader`] buffers reads without
//! holding a large buffer while the connection is idle.

use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::Error;

/// Largest frame body, in bytes. Message bodies travel in chunks of
/// [`CHUNK_SIZE`], well under it.
pub const MAX_FRAME: usize = 1 << 20;

/// Size of the message-body chunks smtpd sends to queued.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// Largest `Hello` frame (it is a few bytes).
pub const MAX_HELLO_FRAME: usize = 64;

/// Largest frame carrying a body chunk: the chunk plus its few bytes of
/// framing.
pub const MAX_CHUNK_FRAME: usize = CHUNK_SIZE + 64;

/// Largest frame of any other request or reply between daemons: addresses
/// are at most 256 characters, failure texts 1 KiB.
pub const MAX_SMALL_FRAME: usize = 8 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_big_endian()
        .with_limit::<MAX_FRAME>()
}

/// Encodes one message into a whole frame (length prefix included).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, Error> {
    let mut out = vec![0u8; 4];
    bincode::serde::encode_into_std_write(msg, &mut out, config())
        .map_err(|e| Error::Encode(e.to_string()))?;
    let len = out.len() - 4;
    if len > MAX_FRAME {
        return Err(Error::FrameTooLarge { len });
    }
    out[..4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// Decodes one frame body (without the length prefix).
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, Error> {
    if body.len() > MAX_FRAME {
        return Err(Error::FrameTooLarge { len: body.len() });
    }
    let (msg, used) = bincode::serde::decode_from_slice(body, config())
        .map_err(|e| Error::Decode(e.to_string()))?;
    if used != body.len() {
        return Err(Error::TrailingBytes {
            extra: body.len() - used,
        });
    }
    Ok(msg)
}

/// Parses a length prefix, refusing frames over `max` (and over
/// [`MAX_FRAME`]) before any allocation.
pub fn body_len(prefix: [u8; 4], max: usize) -> Result<usize, Error> {
    let len = u32::from_be_bytes(prefix) as usize;
    if len > max.min(MAX_FRAME) {
        return Err(Error::FrameTooLarge { len });
    }
    Ok(len)
}

/// Reads one frame of at most [`MAX_FRAME`] bytes; see [`read_frame_max`].
pub async fn read_frame<R, T>(r: &mut R) -> Result<Option<T>, Error>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_max(r, MAX_FRAME).await
}

/// Reads one frame of at most `max` bytes, unbuffered. `Ok(None)` is a
/// clean end of stream between frames; an end in the middle of a frame is
/// [`Error::Truncated`].
pub async fn read_frame_max<R, T>(r: &mut R, max: usize) -> Result<Option<T>, Error>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut prefix = [0u8; 4];
    let got = read_full(r, &mut prefix).await?;
    if got == 0 {
        return Ok(None);
    }
    if got < 4 {
        return Err(Error::Truncated { expected: 4, got });
    }
    let len = body_len(prefix, max)?;
    let mut body = vec![0u8; len];
    let got = read_full(r, &mut body).await?;
    if got < len {
        return Err(Error::Truncated { expected: len, got });
    }
    decode(&body).map(Some)
}

/// Reads until `buf` is full or EOF; returns how much was read.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> Result<usize, Error> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Reads frames through a buffer that grows to the frame being read and is
/// given back once the connection has nothing buffered, so an idle
/// connection holds at most [`FrameReader::IDLE_CAPACITY`] bytes.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Start of unread data in `buf`.
    start: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Buffer kept between frames; anything larger is freed.
    pub const IDLE_CAPACITY: usize = 4096;

    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            start: 0,
        }
    }

    /// Reads one frame of at most `max` bytes. `Ok(None)` is a clean end of
    /// stream between frames.
    pub async fn read<T: DeserializeOwned>(&mut self, max: usize) -> Result<Option<T>, Error> {
        if !self.fill(4).await? {
            let got = self.available();
            return if got == 0 {
                Ok(None)
            } else {
                Err(Error::Truncated { expected: 4, got })
            };
        }
        let mut prefix = [0u8; 4];
        prefix.copy_from_slice(&self.buf[self.start..self.start + 4]);
        let len = body_len(prefix, max)?;
        if !self.fill(4 + len).await? {
            return Err(Error::Truncated {
                expected: len,
                got: self.available() - 4,
            });
        }
        let msg = decode(&self.buf[self.start + 4..self.start + 4 + len]);
        self.start += 4 + len;
        // Give a large buffer back once what is left fits a small one, so
        // a peer that always leaves part of a frame buffered cannot keep
        // the large one.
        let left = self.available();
        if self.buf.capacity() > Self::IDLE_CAPACITY && left <= Self::IDLE_CAPACITY {
            let rest = self.buf[self.start..].to_vec();
            self.buf = rest;
            self.start = 0;
        } else if left == 0 {
            self.buf.clear();
            self.start = 0;
        }
        msg.map(Some)
    }

    /// Whether bytes of a next frame are already buffered.
    pub fn has_buffered(&self) -> bool {
        self.available() > 0
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }

    fn available(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Reads until `n` bytes are buffered; false on EOF before that.
    async fn fill(&mut self, n: usize) -> Result<bool, Error> {
        while self.available() < n {
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let want = n - self.buf.len();
            self.buf.reserve(want.max(Self::IDLE_CAPACITY));
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// Writes one frame and flushes it.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), Error>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let bytes = encode(msg)?;
    w.write_all(&bytes).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::submit::{SubmitReply, SubmitRequest};

    #[test]
    fn round_trip() {
        let msg = SubmitRequest::Rcpt {
            to: "ann@example.org".into(),
        };
        let bytes = encode(&msg).unwrap();
        let back: SubmitRequest = decode(&bytes[4..]).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn chunks_fit_in_a_frame() {
        let msg = SubmitRequest::DataChunk(vec![0xAB; CHUNK_SIZE]);
        let bytes = encode(&msg).unwrap();
        assert!(bytes.len() < MAX_FRAME);
        assert!(bytes.len() < CHUNK_SIZE + 16, "bytes are encoded compactly");
    }

    #[test]
    fn oversize_messages_are_refused() {
        let msg = SubmitRequest::DataChunk(vec![0; MAX_FRAME + 1]);
        assert!(matches!(
            encode(&msg),
            Err(Error::Encode(_) | Error::FrameTooLarge { .. })
        ));
        assert!(matches!(
            body_len((MAX_FRAME as u32 + 1).to_be_bytes(), usize::MAX),
            Err(Error::FrameTooLarge { .. })
        ));
        // The limit of the state wins when it is smaller.
        assert!(matches!(
            body_len(65u32.to_be_bytes(), MAX_HELLO_FRAME),
            Err(Error::FrameTooLarge { len: 65 })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        // A deterministic pseudo-random sweep over short and long garbage.
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..2000 {
            let buf: Vec<u8> = (0..len % 97)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = decode::<SubmitRequest>(&buf);
            let _ = decode::<SubmitReply>(&buf);
            let _ = decode::<crate::deliver::ToDeliverd>(&buf);
            let _ = decode::<crate::monitor::MonitorMessage>(&buf);
        }
        // A huge announced vector length must fail, not allocate.
        let evil = [0x09, 0xFC, 0xFF, 0xFF, 0xFF, 0xFF];
        assert!(decode::<SubmitRequest>(&evil).is_err());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&SubmitRequest::Rset).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode::<SubmitRequest>(&bytes[4..]),
            Err(Error::TrailingBytes { extra: 1 })
        ));
    }

    #[tokio::test]
    async fn truncated_frames() {
        let full = encode(&SubmitRequest::Mail {
            from: "a@b".into(),
            ehlo: String::new(),
            server_name: String::new(),
            spf: None,
        })
        .unwrap();
        for cut in 1..full.len() {
            let mut r = &full[..cut];
            let res = read_frame::<_, SubmitRequest>(&mut r).await;
            assert!(
                matches!(res, Err(Error::Truncated { .. })),
                "cut at {cut}: {res:?}"
            );
        }
        let mut empty: &[u8] = &[];
        assert!(
            read_frame::<_, SubmitRequest>(&mut empty)
                .await
                .unwrap()
                .is_none()
        );
        let mut whole = &full[..];
        assert!(
            read_frame::<_, SubmitRequest>(&mut whole)
                .await
                .unwrap()
                .is_some()
        );
    }

    #[tokio::test]
    async fn frame_reader_reads_pipelined_frames_and_frees_its_buffer() {
        let mut wire = Vec::new();
        for i in 0..5u8 {
            wire.extend(encode(&SubmitRequest::DataChunk(vec![i; 10_000])).unwrap());
        }
        wire.extend(encode(&SubmitRequest::Rset).unwrap());
        let mut r = FrameReader::new(&wire[..]);
        for i in 0..5u8 {
            let msg: SubmitRequest = r.read(MAX_CHUNK_FRAME).await.unwrap().unwrap();
            assert_eq!(msg, SubmitRequest::DataChunk(vec![i; 10_000]));
        }
        let msg: SubmitRequest = r.read(MAX_SMALL_FRAME).await.unwrap().unwrap();
        assert_eq!(msg, SubmitRequest::Rset);
        assert!(r.buf.capacity() <= FrameReader::<&[u8]>::IDLE_CAPACITY);
        assert!(r.read::<SubmitRequest>(16).await.unwrap().is_none());
        // A frame over the state's limit is refused from its prefix alone.
        let big = encode(&SubmitRequest::DataChunk(vec![0; 100])).unwrap();
        let mut r = FrameReader::new(&big[..8]);
        assert!(matches!(
            r.read::<SubmitRequest>(MAX_HELLO_FRAME).await,
            Err(Error::FrameTooLarge { .. })
        ));
        // A cut inside a frame is a truncation, not a clean end.
        let mut r = FrameReader::new(&big[..big.len() - 1]);
        assert!(matches!(
            r.read::<SubmitRequest>(MAX_CHUNK_FRAME).await,
            Err(Error::Truncated { .. })
        ));
    }

    #[tokio::test]
    async fn a_partial_frame_left_buffered_does_not_keep_a_large_buffer() {
        let mut wire = encode(&SubmitRequest::DataChunk(vec![7; 60_000])).unwrap();
        // The start of another frame arrives with the big one.
        wire.extend_from_slice(&encode(&SubmitRequest::Rset).unwrap()[..3]);
        let mut r = FrameReader::new(&wire[..]);
        // As after an earlier large frame: room for more than one frame,
        // so the read takes the start of the next one too.
        r.buf.reserve(100_000);
        let _: SubmitRequest = r.read(MAX_CHUNK_FRAME).await.unwrap().unwrap();
        assert!(r.has_buffered());
        assert!(r.buf.capacity() <= FrameReader::<&[u8]>::IDLE_CAPACITY);
    }

    #[tokio::test]
    async fn oversize_prefix_is_refused_before_reading() {
        let mut r: &[u8] = &[0xFF, 0xFF, 0xFF, 0xFF];
        assert!(matches!(
            read_frame::<_, SubmitRequest>(&mut r).await,
            Err(Error::FrameTooLarge { .. })
        ));
    }
}
