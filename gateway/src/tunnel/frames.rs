//! A WebSocket frame-boundary tracker for one tunnel direction. It reads only frame
//! headers and skips payloads (no unmasking, no copying), so the tunnel stays byte-exact
//! and cheap while still knowing who sent the first Close frame and whether it may
//! inject a Close of its own at a frame boundary.

/// Close frame opcode (RFC 6455 §5.5.1).
const OP_CLOSE: u8 = 0x8;

/// Where one direction's byte stream stands.
#[derive(Debug, Default)]
pub struct Frames {
    header: [u8; 14],
    have: usize,
    remaining: u64,
    saw_close: bool,
}

impl Frames {
    /// Feeds bytes as they pass; returns true when they completed a Close frame header.
    pub fn feed(&mut self, mut data: &[u8]) -> bool {
        let mut close = false;
        while !data.is_empty() {
            if self.remaining > 0 {
                let skip = self.remaining.min(data.len() as u64);
                self.remaining -= skip;
                data = &data[skip as usize..];
                continue;
            }
            self.header[self.have] = data[0];
            self.have += 1;
            data = &data[1..];
            if let Some((opcode, len)) = self.parse() {
                self.have = 0;
                self.remaining = len;
                if opcode == OP_CLOSE && !self.saw_close {
                    self.saw_close = true;
                    close = true;
                }
            }
        }
        close
    }

    /// The opcode and payload length once the buffered header is complete.
    fn parse(&self) -> Option<(u8, u64)> {
        if self.have < 2 {
            return None;
        }
        let len7 = self.header[1] & 0x7f;
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if self.header[1] & 0x80 != 0 { 4 } else { 0 };
        if self.have < 2 + ext + mask {
            return None;
        }
        let len = match ext {
            0 => u64::from(len7),
            n => self.header[2..2 + n]
                .iter()
                .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)),
        };
        Some((self.header[0] & 0x0f, len))
    }

    /// Whether a Close frame has passed this way.
    pub fn saw_close(&self) -> bool {
        self.saw_close
    }

    /// True between frames, where a new frame may be written.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.remaining == 0
    }
}

/// A Close frame with status 1001 (going away), as a server sends it (unmasked).
pub const GOING_AWAY_TO_CLIENT: [u8; 4] = [0x88, 0x02, 0x03, 0xE9];
/// The same Close as a client must send it (masked; RFC 6455 §5.3 allows any key).
pub const GOING_AWAY_TO_SERVER: [u8; 8] =
    [0x88, 0x82, 0x5a, 0x17, 0xc3, 0x3e, 0x03 ^ 0x5a, 0xE9 ^ 0x17];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_close_after_payloads_split_anywhere() {
        // A masked 200-byte binary frame (16-bit length), then a masked close frame.
        let mut stream = vec![0x82, 0x80 | 126, 0, 200, 1, 2, 3, 4];
        stream.extend(std::iter::repeat_n(0x88, 200)); // payload bytes that look like Close
        stream.extend_from_slice(&GOING_AWAY_TO_SERVER);
        for split in [1, 3, 7, 100, stream.len() - 1] {
            let mut f = Frames::default();
            let first = f.feed(&stream[..split]);
            let second = f.feed(&stream[split..]);
            // Reported exactly once, when the Close header completes.
            assert!(first ^ second, "split at {split}");
            assert_eq!(first, split >= stream.len() - 2, "split at {split}");
            assert!(f.at_boundary());
        }
    }

    #[test]
    fn mid_frame_is_not_a_boundary() {
        let mut f = Frames::default();
        assert!(!f.feed(&[0x81, 0x05, b'h', b'e']));
        assert!(!f.at_boundary());
        f.feed(b"llo");
        assert!(f.at_boundary());
        // 64-bit length header.
        let mut f = Frames::default();
        f.feed(&[0x82, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(f.remaining, 65536);
    }
}
