//! The little of RFC 6455 a proxy needs: the handshake's accept key, and following frame
//! headers so that a close frame tidegate writes lands between two frames, never inside one.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha1::{Digest, Sha1};

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// `Sec-WebSocket-Accept` for a client's `Sec-WebSocket-Key`.
pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID);
    STANDARD.encode(sha.finalize())
}

/// A `Sec-WebSocket-Key` must be the base64 of exactly 16 bytes.
pub fn valid_key(key: &[u8]) -> bool {
    key.len() == 24 && STANDARD.decode(key).is_ok_and(|k| k.len() == 16)
}

/// Close codes tidegate sends.
pub const CLOSE_GOING_AWAY: u16 = 1001;

/// A close frame with `code`; `mask` is required client→server (RFC 6455 §5.3).
pub fn close_frame(code: u16, mask: Option<[u8; 4]>) -> Vec<u8> {
    let payload = code.to_be_bytes();
    match mask {
        None => vec![0x88, 0x02, payload[0], payload[1]],
        Some(m) => vec![0x88, 0x82, m[0], m[1], m[2], m[3], payload[0] ^ m[0], payload[1] ^ m[1]],
    }
}

/// Follows frame boundaries in one direction of a WebSocket stream by reading headers only;
/// payload bytes are counted, never inspected or copied.
#[derive(Debug, Clone, Default)]
pub struct FrameTracker {
    header: [u8; 14],
    /// Header bytes collected so far for the frame being read.
    have: u8,
    /// Payload bytes left in the current frame (valid once the header is complete).
    remaining: u64,
    in_payload: bool,
    /// The stream is not valid WebSocket framing; boundaries are unknown from here on.
    lost: bool,
    /// Opcode of the frame being read.
    opcode: u8,
    /// Close frames seen complete so far.
    closes: u32,
}

impl FrameTracker {
    /// A tracker for a stream that is not WebSocket (plain TCP): no boundaries to follow.
    pub fn raw() -> Self {
        FrameTracker { lost: true, ..Default::default() }
    }

    /// True when the next byte would start a new frame.
    pub fn at_boundary(&self) -> bool {
        !self.lost && !self.in_payload && self.have == 0
    }

    /// How many complete close frames have passed.
    pub fn closes_seen(&self) -> u32 {
        self.closes
    }

    fn frame_done(&mut self) {
        if self.opcode == 0x8 {
            self.closes += 1;
        }
    }

    /// True when framing could not be followed (a reserved length, say).
    pub fn is_lost(&self) -> bool {
        self.lost
    }

    /// How many bytes may be read before the next point where a frame could end; reading at
    /// most this many while closing guarantees stopping exactly on a boundary.
    pub fn bytes_to_step(&self) -> u64 {
        if self.in_payload {
            self.remaining
        } else if self.have < 2 {
            2 - u64::from(self.have)
        } else {
            u64::from(Self::header_len(&self.header) - self.have)
        }
    }

    fn header_len(h: &[u8; 14]) -> u8 {
        let ext = match h[1] & 0x7f {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let mask = if h[1] & 0x80 != 0 { 4 } else { 0 };
        2 + ext + mask
    }

    fn payload_len(h: &[u8; 14]) -> u64 {
        match h[1] & 0x7f {
            126 => u64::from(u16::from_be_bytes([h[2], h[3]])),
            127 => u64::from_be_bytes([h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9]]),
            n => u64::from(n),
        }
    }

    /// Feeds bytes that passed through in this direction.
    pub fn advance(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.lost {
            if self.in_payload {
                let take = self.remaining.min(data.len() as u64);
                self.remaining -= take;
                data = &data[take as usize..];
                if self.remaining == 0 {
                    self.in_payload = false;
                    self.frame_done();
                }
                continue;
            }
            let want = if self.have < 2 { 2 } else { Self::header_len(&self.header) };
            let take = usize::from(want - self.have).min(data.len());
            let start = usize::from(self.have);
            self.header[start..start + take].copy_from_slice(&data[..take]);
            self.have += take as u8;
            data = &data[take..];
            if self.have >= 2 && self.have == Self::header_len(&self.header) {
                let len = Self::payload_len(&self.header);
                if len > i64::MAX as u64 {
                    self.lost = true;
                    return;
                }
                self.have = 0;
                self.remaining = len;
                self.in_payload = len > 0;
                self.opcode = self.header[0] & 0x0f;
                if len == 0 {
                    self.frame_done();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_example_accept_key() {
        assert_eq!(accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert!(valid_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!valid_key(b"dGhlIHNhbXBsZSBub25jZQ"));
        assert!(!valid_key(b"not base64 at all!!!!!!!"));
    }

    fn frame(len: usize, masked: bool) -> Vec<u8> {
        let mut f = vec![0x82];
        let m = if masked { 0x80 } else { 0 };
        if len < 126 {
            f.push(m | len as u8);
        } else if len <= 0xffff {
            f.push(m | 126);
            f.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            f.push(m | 127);
            f.extend_from_slice(&(len as u64).to_be_bytes());
        }
        if masked {
            f.extend_from_slice(&[1, 2, 3, 4]);
        }
        f.extend(std::iter::repeat_n(0xAA, len));
        f
    }

    #[test]
    fn follows_frames_fed_byte_by_byte_and_in_chunks() {
        let mut stream = Vec::new();
        for (len, masked) in [(0, false), (5, true), (200, false), (70_000, true), (125, false)] {
            stream.extend(frame(len, masked));
        }
        for chunk in [1, 3, 7, 1000, stream.len()] {
            let mut t = FrameTracker::default();
            let mut boundaries = 0;
            for c in stream.chunks(chunk) {
                t.advance(c);
                if t.at_boundary() {
                    boundaries += 1;
                }
            }
            assert!(t.at_boundary(), "chunk {chunk}");
            assert!(boundaries >= 1);
        }
    }

    #[test]
    fn counts_close_frames() {
        let mut t = FrameTracker::default();
        t.advance(&frame(3, true));
        t.advance(&close_frame(1000, Some([1, 2, 3, 4])));
        assert_eq!(t.closes_seen(), 1);
        t.advance(&[0x88, 0x00]);
        assert_eq!(t.closes_seen(), 2);
    }

    #[test]
    fn step_never_crosses_a_boundary() {
        let stream = [frame(300, false), frame(2, false), frame(0, true)].concat();
        let mut t = FrameTracker::default();
        let mut pos = 0;
        let mut seen = vec![];
        while pos < stream.len() {
            let step = t.bytes_to_step().max(1) as usize;
            let end = (pos + step).min(stream.len());
            t.advance(&stream[pos..end]);
            pos = end;
            if t.at_boundary() {
                seen.push(pos);
            }
        }
        let a = 2 + 2 + 300;
        assert_eq!(seen, vec![a, a + 4, a + 4 + 6]);
    }
}
