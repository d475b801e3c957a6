//! Follows the framing of the raw request stream a client sends, alongside hyper, to see what
//! hyper normalises away: a request carrying both `Content-Length` and `Transfer-Encoding`
//! (hyper silently drops the `Content-Length`). Such a request is answered 400 and the
//! connection closed, because a server behind us might frame it the other way.
//!
//! The scanner frames bodies the way hyper does (chunked when `Transfer-Encoding` is present,
//! else `Content-Length`, else none), so it stays in step across keep-alive and pipelined
//! requests; it only reads header names and the few values that decide framing.

/// Upper bound on one header line we look into (longer lines are only skipped over).
const LINE_CAP: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head.
    Head,
    /// `remaining` bytes of a Content-Length body.
    Body(u64),
    ChunkSize,
    ChunkExt,
    ChunkData(u64),
    ChunkDataEnd,
    Trailer,
    /// Framing can no longer be followed (bad chunk syntax, say): hyper will reject it.
    Lost,
}

#[derive(Debug)]
pub struct FramingScanner {
    state: State,
    line: [u8; LINE_CAP],
    line_len: usize,
    line_total: usize,
    /// A request line has been seen for the head being read.
    started: bool,
    /// For the head being read.
    saw_cl: bool,
    saw_te: bool,
    cl: Option<u64>,
    chunk_size: u64,
    chunk_digits: u32,
    /// Request heads completed so far.
    heads: u64,
    /// Ordinal (0-based) of the first request whose head had both CL and TE.
    pub first_ambiguous: Option<u64>,
}

impl Default for FramingScanner {
    fn default() -> Self {
        FramingScanner {
            state: State::Head,
            line: [0; LINE_CAP],
            line_len: 0,
            line_total: 0,
            started: false,
            saw_cl: false,
            saw_te: false,
            cl: None,
            chunk_size: 0,
            chunk_digits: 0,
            heads: 0,
            first_ambiguous: None,
        }
    }
}

impl FramingScanner {
    /// Feeds bytes the client sent, in order.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Lost => return,
                State::Body(n) => {
                    let take = n.min(data.len() as u64);
                    data = &data[take as usize..];
                    self.state = if n == take { State::Head } else { State::Body(n - take) };
                }
                State::ChunkData(n) => {
                    let take = n.min(data.len() as u64);
                    data = &data[take as usize..];
                    self.state = if n == take { State::ChunkDataEnd } else { State::ChunkData(n - take) };
                }
                State::Head | State::Trailer => {
                    // A line at a time (heads are most of what a client sends on a
                    // keep-alive connection): up to its `\n`, or all there is so far.
                    let end = data.iter().position(|&b| b == b'\n');
                    self.line_bytes(&data[..end.unwrap_or(data.len())]);
                    match end {
                        Some(i) => {
                            data = &data[i + 1..];
                            self.end_line();
                        }
                        None => data = &[],
                    }
                }
                _ => {
                    let b = data[0];
                    data = &data[1..];
                    self.byte(b);
                }
            }
        }
    }

    /// Bytes of a head or trailer line, without its `\n`; `\r` is skipped wherever it is.
    fn line_bytes(&mut self, part: &[u8]) {
        for &b in part {
            if b != b'\r' {
                if self.line_len < LINE_CAP {
                    self.line[self.line_len] = b.to_ascii_lowercase();
                    self.line_len += 1;
                }
                self.line_total += 1;
            }
        }
    }

    /// One byte of chunk framing (the other states are handled in `feed`).
    fn byte(&mut self, b: u8) {
        match self.state {
            State::ChunkSize => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                    self.chunk_digits += 1;
                    if self.chunk_digits > 16 {
                        self.state = State::Lost;
                        return;
                    }
                    self.chunk_size = self.chunk_size * 16 + d;
                }
                b';' | b' ' | b'\t' => self.state = State::ChunkExt,
                b'\r' => {}
                b'\n' => self.end_chunk_size(),
                _ => self.state = State::Lost,
            },
            State::ChunkExt => {
                if b == b'\n' {
                    self.end_chunk_size();
                }
            }
            State::ChunkDataEnd => match b {
                b'\r' => {}
                b'\n' => self.begin_chunk(),
                _ => self.state = State::Lost,
            },
            State::Head | State::Trailer | State::Body(_) | State::ChunkData(_) | State::Lost => {}
        }
    }

    fn begin_chunk(&mut self) {
        self.state = State::ChunkSize;
        self.chunk_size = 0;
        self.chunk_digits = 0;
    }

    fn end_chunk_size(&mut self) {
        if self.chunk_digits == 0 {
            self.state = State::Lost;
        } else if self.chunk_size == 0 {
            self.state = State::Trailer;
        } else {
            self.state = State::ChunkData(self.chunk_size);
        }
    }

    fn end_line(&mut self) {
        let blank = self.line_total == 0;
        let line = &self.line[..self.line_len];
        if self.state == State::Trailer {
            if blank {
                self.state = State::Head;
            }
        } else if blank {
            // Leading empty lines before a request line are tolerated (RFC 9112 §2.2).
            if self.started {
                self.end_head();
            }
        } else {
            self.started = true;
            if let Some(v) = line.strip_prefix(b"content-length:") {
                self.saw_cl = true;
                self.cl = std::str::from_utf8(v).ok().and_then(|v| v.trim().parse().ok());
            } else if line.starts_with(b"transfer-encoding:") {
                self.saw_te = true;
            }
        }
        self.line_len = 0;
        self.line_total = 0;
    }

    fn end_head(&mut self) {
        if self.saw_cl && self.saw_te && self.first_ambiguous.is_none() {
            self.first_ambiguous = Some(self.heads);
        }
        self.state = if self.saw_te {
            self.chunk_size = 0;
            self.chunk_digits = 0;
            State::ChunkSize
        } else {
            match self.cl {
                Some(n) if n > 0 => State::Body(n),
                Some(_) => State::Head,
                None if self.saw_cl => State::Lost,
                None => State::Head,
            }
        };
        self.heads += 1;
        self.started = false;
        self.saw_cl = false;
        self.saw_te = false;
        self.cl = None;
    }

    /// Whether request number `ordinal` (0-based, in arrival order) had ambiguous framing.
    pub fn is_ambiguous(&self, ordinal: u64) -> bool {
        self.first_ambiguous.is_some_and(|first| ordinal >= first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(chunks: &[&[u8]]) -> FramingScanner {
        let mut s = FramingScanner::default();
        for c in chunks {
            s.feed(c);
        }
        s
    }

    #[test]
    fn follows_keepalive_and_pipelined_requests() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\n\r\n\
POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n\
POST /d HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for size in [1, 2, 7, stream.len()] {
            let chunks: Vec<&[u8]> = stream.chunks(size).collect();
            let s = scan(&chunks);
            assert_eq!(s.heads, 4, "chunk size {size}");
            assert_eq!(s.first_ambiguous, Some(3), "chunk size {size}");
            assert!(!s.is_ambiguous(2) && s.is_ambiguous(3));
        }
    }

    #[test]
    fn body_bytes_that_look_like_headers_are_not_read_as_headers() {
        let s = scan(&[b"POST / HTTP/1.1\r\nContent-Length: 42\r\n\r\nTransfer-Encoding: chunked\r\nContent-Le\r\n\r\n"]);
        assert_eq!((s.heads, s.first_ambiguous), (1, None));
    }

    #[test]
    fn te_before_cl_and_odd_case_are_seen() {
        let s = scan(&[b"POST / HTTP/1.1\r\ntransfer-ENCODING: chunked\r\nCONTENT-length: 3\r\n\r\n0\r\n\r\n"]);
        assert_eq!(s.first_ambiguous, Some(0));
    }
}
