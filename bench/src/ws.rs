//! A minimal RFC 6455 codec shared by the load generator and the echo backend.
//!
//! Only what the benchmark needs: the opening handshake's key arithmetic, frame encoding
//! with or without a mask, and a buffered reader that yields HTTP heads and whole frames
//! without copying payloads. No fragmentation, no extensions: both ends are ours.

use std::io;

use base64::Engine;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Binary data frame.
pub const OP_BINARY: u8 = 0x2;
/// Close control frame.
pub const OP_CLOSE: u8 = 0x8;
/// Ping control frame.
pub const OP_PING: u8 = 0x9;
/// Pong control frame.
pub const OP_PONG: u8 = 0xA;

/// Largest payload either end accepts; larger frames are a protocol error.
const MAX_PAYLOAD: usize = 16 << 20;
/// The GUID RFC 6455 appends to the client's key.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Longest HTTP head either end accepts.
const MAX_HEAD: usize = 16 << 10;

/// The `Sec-WebSocket-Accept` value for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.trim().as_bytes());
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// A `Sec-WebSocket-Key` made from 16 bytes of `rng`.
pub fn client_key(rng: &mut Rng) -> String {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    raw[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// The value of header `name` (ASCII case-insensitive) in an HTTP head, trimmed.
pub fn header<'h>(head: &'h str, name: &str) -> Option<&'h str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// A small, fast xorshift generator for mask keys and handshake nonces.
///
/// Benchmark traffic needs unpredictability only in the RFC's formal sense, not
/// cryptographically; what matters is that generating a mask costs nothing.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from `seed` (zero is replaced by a fixed odd constant).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A fresh 4-byte mask key.
    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_le_bytes()
    }
}

/// XORs `buf` with the repeating 4-byte `key`, eight bytes at a time.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut chunks = buf.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().expect("chunk of 8")) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i % 4];
    }
}

/// Appends one final frame to `out`; with `mask`, the payload is masked as a client must.
pub fn encode_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    out.push(0x80 | opcode);
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if let Some(key) = mask {
        out.extend_from_slice(&key);
    }
    let start = out.len();
    out.extend_from_slice(payload);
    if let Some(key) = mask {
        apply_mask(&mut out[start..], key);
    }
}

/// A frame's header fields that the benchmark looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// The opcode (low four bits of the first byte).
    pub opcode: u8,
    /// Whether this is the final fragment.
    pub fin: bool,
}

/// A buffered reader over the read side of a connection.
///
/// The buffer is allocated on first use and grows only as far as the largest frame, so an
/// idle connection costs no buffer at all. Payloads are returned as slices of the buffer,
/// already unmasked.
#[derive(Debug)]
pub struct Reader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    /// Wraps `inner`; no memory is allocated until the first read.
    pub fn new(inner: R) -> Reader<R> {
        Reader {
            inner,
            buf: Vec::new(),
            start: 0,
            end: 0,
        }
    }

    /// The wrapped stream, for writing.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Reads more bytes into the buffer, making room first. Returns 0 at end of stream.
    pub async fn fill(&mut self) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let grown = (self.buf.len() * 2).max(4096);
                self.buf.resize(grown, 0);
            }
        }
        let n = self.inner.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// Reads an HTTP head up to and including the blank line; bytes after it stay buffered.
    pub async fn read_head(&mut self) -> io::Result<String> {
        loop {
            let pending = &self.buf[self.start..self.end];
            if let Some(pos) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&pending[..pos + 4]).into_owned();
                self.start += pos + 4;
                return Ok(head);
            }
            if pending.len() > MAX_HEAD {
                return Err(invalid("HTTP head too large"));
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Locates one whole buffered frame without consuming it; may make room for a
    /// partially buffered one. Never reads.
    fn parse(&mut self) -> io::Result<Option<Parsed>> {
        let b = &self.buf[self.start..self.end];
        if b.len() < 2 {
            return Ok(None);
        }
        let head = FrameHead {
            opcode: b[0] & 0x0F,
            fin: b[0] & 0x80 != 0,
        };
        let masked = b[1] & 0x80 != 0;
        let (len, mut at) = match b[1] & 0x7F {
            126 if b.len() >= 4 => (usize::from(u16::from_be_bytes([b[2], b[3]])), 4),
            127 if b.len() >= 10 => {
                let len = u64::from_be_bytes(b[2..10].try_into().expect("8 bytes"));
                (usize::try_from(len).unwrap_or(usize::MAX), 10)
            }
            126 | 127 => return Ok(None),
            n => (usize::from(n), 2),
        };
        if len > MAX_PAYLOAD {
            return Err(invalid("frame too large"));
        }
        let key = if masked {
            if b.len() < at + 4 {
                return Ok(None);
            }
            at += 4;
            Some([b[at - 4], b[at - 3], b[at - 2], b[at - 1]])
        } else {
            None
        };
        let needed = at + len;
        if b.len() < needed {
            if needed > self.buf.len() - self.start {
                // Make room so that further fills can complete this frame.
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                if needed > self.buf.len() {
                    self.buf.resize(needed.next_power_of_two(), 0);
                }
            }
            return Ok(None);
        }
        Ok(Some(Parsed {
            head,
            payload: self.start + at..self.start + needed,
            key,
        }))
    }

    /// Consumes a frame found by [`Reader::parse`] and unmasks its payload in place.
    fn take(&mut self, frame: Parsed) -> (FrameHead, &mut [u8]) {
        self.start = frame.payload.end;
        let payload = &mut self.buf[frame.payload];
        if let Some(key) = frame.key {
            apply_mask(payload, key);
        }
        (frame.head, payload)
    }

    /// Takes one whole frame from bytes already buffered, if there is one; never reads.
    pub fn try_frame(&mut self) -> io::Result<Option<(FrameHead, &mut [u8])>> {
        Ok(self.parse()?.map(|frame| self.take(frame)))
    }

    /// Reads until one whole frame is buffered and takes it; `None` at a clean end of stream.
    pub async fn read_frame(&mut self) -> io::Result<Option<(FrameHead, &mut [u8])>> {
        loop {
            if let Some(frame) = self.parse()? {
                return Ok(Some(self.take(frame)));
            }
            if self.fill().await? == 0 {
                return if self.start == self.end {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
        }
    }
}

/// A whole frame located in a [`Reader`]'s buffer.
#[derive(Debug)]
struct Parsed {
    head: FrameHead,
    payload: std::ops::Range<usize>,
    key: Option<[u8; 4]>,
}

/// An `InvalidData` error with a message.
pub fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[tokio::test]
    async fn masked_frames_round_trip() {
        let mut rng = Rng::new(7);
        let mut wire = Vec::new();
        for size in [0usize, 5, 125, 126, 65535, 65536, 100_000] {
            let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
            encode_frame(&mut wire, OP_BINARY, &payload, Some(rng.mask()));
        }
        let mut reader = Reader::new(&wire[..]);
        for size in [0usize, 5, 125, 126, 65535, 65536, 100_000] {
            let (head, payload) = reader.read_frame().await.unwrap().unwrap();
            assert_eq!(head.opcode, OP_BINARY);
            assert!(head.fin);
            assert_eq!(payload.len(), size);
            assert!(payload.iter().enumerate().all(|(i, b)| *b == i as u8));
        }
        assert!(reader.read_frame().await.unwrap().is_none());
    }
}
