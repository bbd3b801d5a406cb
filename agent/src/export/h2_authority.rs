//! Makes stock gRPC clients work on the agent's Unix socket. grpcio (1.57+)
//! and grpc-java send the socket path as the HTTP/2 `:authority`, which is
//! no URI authority, and h2 (under hyper and tonic) resets every such
//! request with PROTOCOL_ERROR before the service sees it; h2 has no option
//! to accept it. [`AuthorityFix`] wraps an accepted connection: bytes from the
//! client pass through a [`Rewriter`] that decodes each HTTP/2 header block
//! (HPACK, mirroring the client's encoder), puts `localhost` in place of an
//! `:authority` h2 would reject, and encodes the block again without the
//! dynamic table, so h2's decoder state never depends on what was rewritten.
//! Every other frame, and everything the server writes, passes unchanged.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What a client's `:authority` becomes when it is no URI authority.
pub const REPLACEMENT_AUTHORITY: &[u8] = b"localhost";

/// The client connection preface (RFC 9113 section 3.4).
pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER_LEN: usize = 9;
/// SETTINGS_MAX_FRAME_SIZE's initial value, the only one h2 accepts unless
/// configured otherwise (tonic does not): re-encoded frames stay within it.
const MAX_FRAME_SIZE: usize = 16_384;
/// SETTINGS_HEADER_TABLE_SIZE's initial value; h2 never advertises another,
/// so a client's encoder may not grow its dynamic table past it.
const HEADER_TABLE_SIZE: usize = 4_096;
/// Largest encoded header block buffered (HEADERS plus its CONTINUATIONs).
const MAX_HEADER_BLOCK: usize = 1024 * 1024;

const TYPE_HEADERS: u8 = 0x1;
const TYPE_PUSH_PROMISE: u8 = 0x5;
const TYPE_CONTINUATION: u8 = 0x9;
const FLAG_END_STREAM: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("HTTP/2 header block of stream {stream} does not decode (HPACK): {source:?}")]
    Hpack {
        stream: u32,
        source: loona_hpack::decoder::DecoderError,
    },
    #[error("HTTP/2 header block of stream {stream} is over {MAX_HEADER_BLOCK} bytes")]
    BlockTooLarge { stream: u32 },
    #[error("malformed HTTP/2 framing after the first header block: {0}")]
    Framing(&'static str),
}

impl From<RewriteError> for io::Error {
    fn from(e: RewriteError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Where the rewriter is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Within the connection preface: this many bytes of it seen.
    Preface(usize),
    /// At a frame boundary (or within a frame header still incomplete).
    FrameHeader,
    /// Copying this many more payload bytes of a frame that is not rewritten.
    Forward(usize),
    /// Collecting the payload of a HEADERS or CONTINUATION frame.
    HeaderPayload([u8; FRAME_HEADER_LEN]),
    /// Everything from here on passes unchanged: the client broke HTTP/2
    /// before any header block was rewritten, so h2 sees exactly what it
    /// sent and answers it as it would have.
    Passthrough,
}

/// A header block being collected across HEADERS and CONTINUATION frames.
#[derive(Debug)]
struct Block {
    stream: u32,
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// The block's frames as they came, while none was rewritten yet.
    raw: Vec<u8>,
}

/// The client-to-server half of an HTTP/2 connection, rewritten frame by
/// frame. Pure: bytes in, bytes out, no I/O.
pub struct Rewriter {
    state: State,
    /// Input not yet consumed (an incomplete frame header or payload).
    pending: Vec<u8>,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
    /// Whether a header block was re-encoded (h2's HPACK state then differs
    /// from the client's, and passing the rest unchanged is no longer sound).
    rewrote: bool,
}

impl Default for Rewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl Rewriter {
    pub fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(HEADER_TABLE_SIZE);
        Rewriter {
            state: State::Preface(0),
            pending: Vec::new(),
            block: None,
            decoder,
            rewrote: false,
        }
    }

    /// Consumes `input` and appends what the server should read to `out`.
    /// An error means the connection must be closed.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), RewriteError> {
        if self.state == State::Passthrough {
            out.extend_from_slice(input);
            return Ok(());
        }
        self.pending.extend_from_slice(input);
        let mut at = 0;
        let result = self.run(&mut at, out);
        self.pending.drain(..at);
        result
    }

    fn run(&mut self, at: &mut usize, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        loop {
            let rest = &self.pending[*at..];
            match self.state {
                State::Passthrough => {
                    out.extend_from_slice(rest);
                    *at = self.pending.len();
                    return Ok(());
                }
                State::Preface(seen) => {
                    let n = rest.len().min(PREFACE.len() - seen);
                    if rest[..n] != PREFACE[seen..seen + n] {
                        self.state = State::Passthrough;
                        continue;
                    }
                    out.extend_from_slice(&rest[..n]);
                    *at += n;
                    if seen + n < PREFACE.len() {
                        self.state = State::Preface(seen + n);
                        return Ok(());
                    }
                    self.state = State::FrameHeader;
                }
                State::Forward(remaining) => {
                    let n = rest.len().min(remaining);
                    out.extend_from_slice(&rest[..n]);
                    *at += n;
                    if n < remaining {
                        self.state = State::Forward(remaining - n);
                        return Ok(());
                    }
                    self.state = State::FrameHeader;
                }
                State::FrameHeader => {
                    let Some(head) = rest.get(..FRAME_HEADER_LEN) else {
                        return Ok(());
                    };
                    let head: [u8; FRAME_HEADER_LEN] = head.try_into().expect("9 bytes");
                    let (len, kind) = (frame_len(&head), head[3]);
                    let header_frame = kind == TYPE_HEADERS || kind == TYPE_CONTINUATION;
                    if self.block.is_some() && kind != TYPE_CONTINUATION {
                        self.anomaly("a frame other than CONTINUATION within a header block", out)?;
                    } else if kind == TYPE_PUSH_PROMISE {
                        self.anomaly("PUSH_PROMISE from a client", out)?;
                    } else if header_frame && len > MAX_FRAME_SIZE {
                        self.anomaly("a header frame over the maximum frame size", out)?;
                    } else if header_frame {
                        *at += FRAME_HEADER_LEN;
                        self.state = State::HeaderPayload(head);
                    } else {
                        out.extend_from_slice(&head);
                        *at += FRAME_HEADER_LEN;
                        self.state = State::Forward(len);
                    }
                }
                State::HeaderPayload(head) => {
                    let len = frame_len(&head);
                    if rest.len() < len {
                        return Ok(());
                    }
                    let payload = rest[..len].to_vec();
                    *at += len;
                    self.state = State::FrameHeader;
                    match self.header_frame(&head, &payload, out) {
                        Ok(()) => {}
                        Err(FrameError::Fatal(e)) => return Err(e),
                        Err(FrameError::Framing(why)) => {
                            // Give h2 the frame as it came, if that is still
                            // sound: its header here, its payload unconsumed.
                            self.anomaly(why, out)?;
                            out.extend_from_slice(&head);
                            *at -= len;
                        }
                    }
                }
            }
        }
    }

    /// The client broke HTTP/2 framing: let h2 see it unchanged if no block
    /// was rewritten yet (h2 then answers it as it would have), else end the
    /// connection.
    fn anomaly(&mut self, why: &'static str, out: &mut Vec<u8>) -> Result<(), RewriteError> {
        if self.rewrote {
            return Err(RewriteError::Framing(why));
        }
        tracing::debug!(why, "HTTP/2 from a Unix socket client passed on unchanged");
        if let Some(block) = self.block.take() {
            out.extend_from_slice(&block.raw);
        }
        self.state = State::Passthrough;
        Ok(())
    }

    /// One whole HEADERS or CONTINUATION frame.
    fn header_frame(
        &mut self,
        head: &[u8; FRAME_HEADER_LEN],
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        let (kind, flags, stream) = (head[3], head[4], stream_id(head));
        if stream == 0 {
            return Err(FrameError::Framing("a header frame on stream 0"));
        }
        let fragment = if kind == TYPE_HEADERS {
            let (priority, fragment) = headers_payload(flags, payload)?;
            self.block = Some(Block {
                stream,
                end_stream: flags & FLAG_END_STREAM != 0,
                priority,
                fragment: Vec::new(),
                raw: Vec::new(),
            });
            fragment
        } else {
            match &self.block {
                Some(block) if block.stream == stream => payload,
                Some(_) => return Err(FrameError::Framing("CONTINUATION on another stream")),
                None => return Err(FrameError::Framing("CONTINUATION without HEADERS")),
            }
        };
        let block = self.block.as_mut().expect("a block was started above");
        if block.fragment.len() + fragment.len() > MAX_HEADER_BLOCK {
            return Err(FrameError::Fatal(RewriteError::BlockTooLarge { stream }));
        }
        block.fragment.extend_from_slice(fragment);
        if !self.rewrote {
            block.raw.extend_from_slice(head);
            block.raw.extend_from_slice(payload);
        }
        if flags & FLAG_END_HEADERS == 0 {
            return Ok(());
        }
        let block = self.block.take().expect("a block was started above");
        let encoded = self
            .reencode(&block.fragment)
            .map_err(|source| FrameError::Fatal(RewriteError::Hpack { stream, source }))?;
        self.rewrote = true;
        write_header_block(&block, &encoded, out);
        Ok(())
    }

    /// Decodes one header block and encodes it again, `:authority` fixed.
    fn reencode(&mut self, fragment: &[u8]) -> Result<Vec<u8>, loona_hpack::decoder::DecoderError> {
        let mut encoded = Vec::with_capacity(fragment.len() + 64);
        self.decoder.decode_with_cb(fragment, |name, value| {
            let value: &[u8] = if &*name == b":authority" && !is_authority(&value) {
                REPLACEMENT_AUTHORITY
            } else {
                &value
            };
            encode_literal(&name, value, &mut encoded);
        })?;
        Ok(encoded)
    }
}

enum FrameError {
    /// HTTP/2 framing broken: h2 would end the connection on it too.
    Framing(&'static str),
    Fatal(RewriteError),
}

fn frame_len(head: &[u8; FRAME_HEADER_LEN]) -> usize {
    u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize
}

fn stream_id(head: &[u8; FRAME_HEADER_LEN]) -> u32 {
    u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff
}

/// Splits a HEADERS payload into its priority fields and its header block
/// fragment, padding removed; errors where h2's `Headers::load` fails the
/// connection.
fn headers_payload(flags: u8, payload: &[u8]) -> Result<(Option<[u8; 5]>, &[u8]), FrameError> {
    let mut rest = payload;
    let mut pad = 0;
    if flags & FLAG_PADDED != 0 {
        let (&n, tail) = rest
            .split_first()
            .ok_or(FrameError::Framing("PADDED HEADERS without a pad length"))?;
        pad = usize::from(n);
        rest = tail;
    }
    let mut priority = None;
    if flags & FLAG_PRIORITY != 0 {
        let (fields, tail) = rest
            .split_first_chunk::<5>()
            .ok_or(FrameError::Framing("PRIORITY HEADERS shorter than 5 bytes"))?;
        priority = Some(*fields);
        rest = tail;
    }
    let len = rest
        .len()
        .checked_sub(pad)
        .ok_or(FrameError::Framing("HEADERS padding longer than the frame"))?;
    Ok((priority, &rest[..len]))
}

/// Whether h2 accepts `value` as `:authority` (it parses it the same way).
fn is_authority(value: &[u8]) -> bool {
    http::uri::Authority::try_from(value).is_ok()
}

/// HPACK "literal header field without indexing, new name", no Huffman
/// coding (RFC 7541 section 6.2.2): touches neither side's dynamic table.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    encode_string(name, out);
    encode_string(value, out);
}

fn encode_string(s: &[u8], out: &mut Vec<u8>) {
    encode_int(s.len(), 7, 0x00, out);
    out.extend_from_slice(s);
}

/// An HPACK integer with an N-bit prefix (RFC 7541 section 5.1).
fn encode_int(mut value: usize, prefix_bits: u32, first_byte_flags: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(first_byte_flags | value as u8);
        return;
    }
    out.push(first_byte_flags | max as u8);
    value -= max;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Frames an encoded header block as HEADERS plus CONTINUATIONs, each
/// within [`MAX_FRAME_SIZE`], keeping END_STREAM and the priority fields.
fn write_header_block(block: &Block, encoded: &[u8], out: &mut Vec<u8>) {
    let mut flags = 0;
    if block.end_stream {
        flags |= FLAG_END_STREAM;
    }
    let room = match block.priority {
        Some(_) => {
            flags |= FLAG_PRIORITY;
            MAX_FRAME_SIZE - 5
        }
        None => MAX_FRAME_SIZE,
    };
    let (first, mut rest) = encoded.split_at(encoded.len().min(room));
    let prefix: &[u8] = block.priority.as_ref().map_or(&[], |p| &p[..]);
    if rest.is_empty() {
        flags |= FLAG_END_HEADERS;
    }
    write_frame_head(
        prefix.len() + first.len(),
        TYPE_HEADERS,
        flags,
        block.stream,
        out,
    );
    out.extend_from_slice(prefix);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(MAX_FRAME_SIZE));
        rest = tail;
        let flags = if rest.is_empty() { FLAG_END_HEADERS } else { 0 };
        write_frame_head(chunk.len(), TYPE_CONTINUATION, flags, block.stream, out);
        out.extend_from_slice(chunk);
    }
}

fn write_frame_head(len: usize, kind: u8, flags: u8, stream: u32, out: &mut Vec<u8>) {
    let len = u32::try_from(len).expect("frames are within MAX_FRAME_SIZE");
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&stream.to_be_bytes());
}

// ---------------------------------------------------------------- I/O

/// An accepted connection whose client-to-server bytes go through a
/// [`Rewriter`]; writes pass straight to the inner stream.
pub struct AuthorityFix<S> {
    inner: S,
    rewriter: Rewriter,
    /// Rewritten bytes not yet read by the server, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    scratch: Box<[u8]>,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        AuthorityFix {
            inner,
            rewriter: Rewriter::new(),
            out: Vec::new(),
            out_pos: 0,
            scratch: vec![0; MAX_FRAME_SIZE].into_boxed_slice(),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.out_pos);
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut raw))?;
            let got = raw.filled();
            if got.is_empty() {
                // End of stream: whatever incomplete frame was held back is
                // lost either way; h2 sees the connection end.
                return Poll::Ready(Ok(()));
            }
            if let Err(e) = this.rewriter.feed(got, &mut this.out) {
                tracing::debug!(error = %e, "closing a gRPC connection on a Unix socket");
                return Poll::Ready(Err(e.into()));
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// grpcio 1.76 on a Unix socket: preface, SETTINGS, and two concurrent
    /// calls whose :authority is the percent-encoded socket path; the second
    /// HEADERS refers to the first one's dynamic-table entries
    /// (testdata/record_grpcio_h2.py).
    const GRPCIO: &[u8] = include_bytes!("testdata/grpcio-two-calls.h2");

    const SOCKET_PATH: &[u8] = b"/var/run/flowaudit/flowaudit.sock";

    pub(crate) fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame_head(payload.len(), kind, flags, stream, &mut out);
        out.extend_from_slice(payload);
        out
    }

    /// HPACK "literal with incremental indexing, new name", as grpcio sends.
    fn indexed_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
        out.push(0x40);
        encode_string(name, out);
        encode_string(value, out);
    }

    pub(crate) fn request_block(authority: &[u8]) -> Vec<u8> {
        let mut b = vec![0x83, 0x86]; // :method POST, :scheme http
        indexed_literal(b":path", b"/flowaudit.v1.FlowAudit/GetFlows", &mut b);
        indexed_literal(b":authority", authority, &mut b);
        indexed_literal(b"content-type", b"application/grpc", &mut b);
        b
    }

    fn with_preface(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        v.extend(frame(0x4, 0, 0, &[]));
        for f in frames {
            v.extend_from_slice(f);
        }
        v
    }

    fn rewrite(input: &[u8]) -> Result<Vec<u8>, RewriteError> {
        let mut out = Vec::new();
        Rewriter::new().feed(input, &mut out)?;
        Ok(out)
    }

    #[derive(Debug, PartialEq)]
    pub(crate) struct Frame {
        pub kind: u8,
        pub flags: u8,
        pub stream: u32,
        pub payload: Vec<u8>,
    }

    fn frames(bytes: &[u8]) -> Vec<Frame> {
        frames_after_preface(
            bytes
                .strip_prefix(PREFACE)
                .expect("output starts with the preface"),
        )
    }

    /// Whole frames, as a server sends them (no preface).
    pub(crate) fn frames_after_preface(mut rest: &[u8]) -> Vec<Frame> {
        let mut v = Vec::new();
        while !rest.is_empty() {
            let head: [u8; 9] = rest[..9].try_into().unwrap();
            let len = frame_len(&head);
            v.push(Frame {
                kind: head[3],
                flags: head[4],
                stream: stream_id(&head),
                payload: rest[9..9 + len].to_vec(),
            });
            rest = &rest[9 + len..];
        }
        v
    }

    type Headers = Vec<(Vec<u8>, Vec<u8>)>;

    /// What a server's HPACK decoder makes of a byte stream: each stream's
    /// header list, in order, and every other frame as it came.
    fn server_view(bytes: &[u8]) -> (Vec<(u32, Headers)>, Vec<Frame>) {
        let mut decoder = loona_hpack::Decoder::new();
        let (mut blocks, mut others, mut fragment) = (Vec::new(), Vec::new(), Vec::new());
        for f in frames(bytes) {
            assert!(
                f.payload.len() <= MAX_FRAME_SIZE,
                "frame over 16 KiB: {f:?}"
            );
            match f.kind {
                TYPE_HEADERS => {
                    let (_, frag) = headers_payload(f.flags, &f.payload).ok().unwrap();
                    fragment = frag.to_vec();
                }
                TYPE_CONTINUATION => fragment.extend_from_slice(&f.payload),
                _ => {
                    others.push(f);
                    continue;
                }
            }
            if f.flags & FLAG_END_HEADERS != 0 {
                blocks.push((f.stream, decoder.decode(&fragment).unwrap()));
            }
        }
        (blocks, others)
    }

    fn authority(headers: &Headers) -> &[u8] {
        &headers.iter().find(|(n, _)| n == b":authority").unwrap().1
    }

    /// The header lists with :authority taken out.
    fn without_authority(blocks: &[(u32, Headers)]) -> Vec<(u32, Headers)> {
        blocks
            .iter()
            .map(|(s, h)| {
                let h = h.iter().filter(|(n, _)| n != b":authority").cloned();
                (*s, h.collect())
            })
            .collect()
    }

    #[test]
    fn recorded_grpcio_calls_get_localhost_and_keep_everything_else() {
        let out = rewrite(GRPCIO).unwrap();
        let (before, before_other) = server_view(GRPCIO);
        let (after, after_other) = server_view(&out);
        assert_eq!(before.len(), 2, "two calls recorded");
        for (stream, headers) in &before {
            assert!(
                !is_authority(authority(headers)),
                "stream {stream} of the recording has an invalid :authority"
            );
        }
        for (_, headers) in &after {
            assert_eq!(authority(headers), REPLACEMENT_AUTHORITY);
        }
        assert_eq!(without_authority(&before), without_authority(&after));
        assert_eq!(before_other, after_other, "other frames pass unchanged");
        // h2's decoder never sees a dynamic-table insertion or reference.
        for f in frames(&out).iter().filter(|f| f.kind == TYPE_HEADERS) {
            assert_eq!(f.payload[0], 0x00, "literal without indexing: {f:?}");
        }
    }

    #[test]
    fn any_split_of_the_input_gives_the_same_output() {
        let whole = rewrite(GRPCIO).unwrap();
        for step in [1, 2, 7, 9, 10, 100] {
            let mut r = Rewriter::new();
            let mut out = Vec::new();
            for chunk in GRPCIO.chunks(step) {
                r.feed(chunk, &mut out).unwrap();
            }
            assert_eq!(out, whole, "input fed {step} bytes at a time");
        }
    }

    #[test]
    fn a_block_split_across_continuation_with_padding_and_priority() {
        let block = request_block(SOCKET_PATH);
        let (a, rest) = block.split_at(10);
        let (b, c) = rest.split_at(20);
        let mut first = vec![3]; // pad length
        first.extend([0x80, 0, 0, 0, 0x10]); // exclusive, depends on 0, weight 17
        first.extend_from_slice(a);
        first.extend([0, 0, 0]);
        let input = with_preface(&[
            frame(
                TYPE_HEADERS,
                FLAG_PADDED | FLAG_PRIORITY | FLAG_END_STREAM,
                1,
                &first,
            ),
            frame(TYPE_CONTINUATION, 0, 1, b),
            frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, c),
            frame(0x0, 0x1, 1, b"data"),
        ]);
        let out = rewrite(&input).unwrap();
        let f = frames(&out);
        assert_eq!(f[1].kind, TYPE_HEADERS);
        assert_eq!(
            f[1].flags,
            FLAG_PRIORITY | FLAG_END_STREAM | FLAG_END_HEADERS,
            "one frame, padding dropped, END_STREAM and priority kept"
        );
        assert_eq!(f[1].payload[..5], [0x80, 0, 0, 0, 0x10]);
        assert_eq!(f[2], frames(&input)[4], "the DATA frame passes unchanged");
        let (blocks, _) = server_view(&out);
        assert_eq!(authority(&blocks[0].1), REPLACEMENT_AUTHORITY);
        assert_eq!(blocks[0].1.len(), 5);
    }

    #[test]
    fn a_huffman_coded_authority_is_checked_decoded() {
        // RFC 7541 C.6.1 and C.4.1: "https://www.example.com" (no
        // authority) and "www.example.com" (one), Huffman-coded.
        let url = [
            0x91, 0x9d, 0x29, 0xad, 0x17, 0x18, 0x63, 0xc7, 0x8f, 0x0b, 0x97, 0xc8, 0xe9, 0xae,
            0x82, 0xae, 0x43, 0xd3,
        ];
        let host = [
            0x8c, 0xf1, 0xe3, 0xc2, 0xe5, 0xf2, 0x3a, 0x6b, 0xa0, 0xab, 0x90, 0xf4, 0xff,
        ];
        let mut blocks = Vec::new();
        for (stream, value) in [(1, &url[..]), (3, &host[..])] {
            let mut b = vec![0x83, 0x86, 0x84, 0x41]; // POST http / then :authority (static 1)
            b.extend_from_slice(value);
            blocks.push(frame(TYPE_HEADERS, FLAG_END_HEADERS, stream, &b));
        }
        let input = with_preface(&blocks);
        let (sent, _) = server_view(&input);
        assert_eq!(authority(&sent[0].1), b"https://www.example.com");
        assert_eq!(authority(&sent[1].1), b"www.example.com");
        let (got, _) = server_view(&rewrite(&input).unwrap());
        assert_eq!(authority(&got[0].1), REPLACEMENT_AUTHORITY);
        assert_eq!(
            authority(&got[1].1),
            b"www.example.com",
            "a valid one stays"
        );
    }

    #[test]
    fn dynamic_table_references_and_size_updates_across_requests() {
        let mut second = vec![0x3f, 0xe1, 0x1f]; // size update to 4096: allowed
        second.extend([0x83, 0x86, 0xc0, 0xbf, 0xbe]); // the 3 entries of the first
        let mut third = vec![0x20]; // size update to 0: the table empties
        third.extend(request_block(b"localhost:4245"));
        let input = with_preface(&[
            frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                1,
                &request_block(SOCKET_PATH),
            ),
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &second),
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 5, &third),
        ]);
        let (sent, _) = server_view(&input);
        let (got, _) = server_view(&rewrite(&input).unwrap());
        assert_eq!(authority(&sent[1].1), SOCKET_PATH, "the reference resolves");
        assert_eq!(authority(&got[0].1), REPLACEMENT_AUTHORITY);
        assert_eq!(authority(&got[1].1), REPLACEMENT_AUTHORITY);
        assert_eq!(authority(&got[2].1), b"localhost:4245");
        assert_eq!(without_authority(&sent), without_authority(&got));
        // After the table was emptied, a reference to it is an HPACK error.
        let input = with_preface(&[
            frame(
                TYPE_HEADERS,
                FLAG_END_HEADERS,
                1,
                &request_block(SOCKET_PATH),
            ),
            frame(TYPE_HEADERS, FLAG_END_HEADERS, 3, &[0x20, 0x83, 0xbe]),
        ]);
        assert!(matches!(
            rewrite(&input),
            Err(RewriteError::Hpack { stream: 3, .. })
        ));
    }

    #[test]
    fn a_table_size_over_the_settings_value_closes_the_connection() {
        let mut block = vec![0x3f, 0xe2, 0x1f]; // 4097
        block.extend(request_block(SOCKET_PATH));
        let input = with_preface(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 1, &block)]);
        assert!(matches!(rewrite(&input), Err(RewriteError::Hpack { .. })));
    }

    #[test]
    fn a_large_block_is_reframed_within_the_maximum_frame_size() {
        let mut block = request_block(SOCKET_PATH);
        let big = vec![b'x'; 40_000];
        indexed_literal(b"x-big", &big, &mut block);
        let mut input_frames = Vec::new();
        let chunks: Vec<&[u8]> = block.chunks(MAX_FRAME_SIZE).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let kind = if i == 0 {
                TYPE_HEADERS
            } else {
                TYPE_CONTINUATION
            };
            let last = i + 1 == chunks.len();
            let flags = if last { FLAG_END_HEADERS } else { 0 };
            input_frames.push(frame(kind, flags, 1, chunk));
        }
        let out = rewrite(&with_preface(&input_frames)).unwrap();
        let kinds: Vec<u8> = frames(&out).iter().map(|f| f.kind).collect();
        assert_eq!(kinds, [0x4, 0x1, 0x9, 0x9]);
        let (got, _) = server_view(&out);
        assert_eq!(authority(&got[0].1), REPLACEMENT_AUTHORITY);
        assert_eq!(got[0].1.last().unwrap().1, big);
    }

    #[test]
    fn broken_framing_before_any_rewrite_passes_unchanged() {
        let cases = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            with_preface(&[frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 1, &[0x82])]),
            with_preface(&[frame(TYPE_HEADERS, FLAG_END_HEADERS, 0, &[0x82])]),
            with_preface(&[frame(
                TYPE_HEADERS,
                FLAG_PADDED | FLAG_END_HEADERS,
                1,
                &[9, 1],
            )]),
            with_preface(&[
                frame(TYPE_HEADERS, 0, 1, &request_block(SOCKET_PATH)),
                frame(0x0, 0, 1, b"not a CONTINUATION"),
            ]),
            with_preface(&[frame(TYPE_PUSH_PROMISE, FLAG_END_HEADERS, 1, &[0, 0, 0, 2])]),
        ];
        for input in cases {
            assert_eq!(rewrite(&input).unwrap(), input);
        }
    }

    #[test]
    fn broken_framing_after_a_rewrite_closes_the_connection() {
        let mut input = GRPCIO.to_vec();
        input.extend(frame(TYPE_CONTINUATION, FLAG_END_HEADERS, 9, &[0x82]));
        assert!(matches!(rewrite(&input), Err(RewriteError::Framing(_))));
    }

    #[test]
    fn malformed_input_never_panics() {
        // xorshift: deterministic noise, as frames and as mutations of the recording.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..2000 {
            let mut input = GRPCIO.to_vec();
            if round % 2 == 0 {
                input.truncate(PREFACE.len());
                for _ in 0..next() % 64 {
                    let kind = [0x1, 0x9, 0x0, 0x4][next() as usize % 4];
                    let flags = next() as u8;
                    let payload: Vec<u8> = (0..next() % 40).map(|_| next() as u8).collect();
                    input.extend(frame(kind, flags, next() as u32 % 4, &payload));
                }
            } else {
                for _ in 0..1 + next() % 4 {
                    let at = next() as usize % input.len();
                    input[at] = next() as u8;
                }
            }
            let mut r = Rewriter::new();
            let mut out = Vec::new();
            for chunk in input.chunks(1 + next() as usize % 50) {
                if r.feed(chunk, &mut out).is_err() {
                    break;
                }
            }
        }
    }

    #[tokio::test]
    async fn the_stream_adapter_rewrites_reads_and_passes_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut client, server) = tokio::io::duplex(64);
        let mut fixed = AuthorityFix::new(server);
        let writer = tokio::spawn(async move {
            client.write_all(GRPCIO).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut read = Vec::new();
        fixed.read_to_end(&mut read).await.unwrap();
        assert_eq!(read, rewrite(GRPCIO).unwrap());
        fixed.write_all(b"server bytes").await.unwrap();
        fixed.shutdown().await.unwrap();
        drop(fixed);
        assert_eq!(writer.await.unwrap(), b"server bytes");
    }
}
