//! WebSocket framing (RFC 6455 §5) as plain synchronous code: a [`Decoder`] that turns the
//! client's bytes into [`Event`]s, and the server's control frames.
//!
//! relay owns its framing instead of going through a WebSocket library because a server frame is
//! unmasked: its wire bytes, header included, are the same for every subscriber of a message.
//! [`crate::protocol::ServerFrame`] is encoded once with its header in front
//! ([`crate::protocol::wire`]), and every connection writes those shared bytes as they are — no
//! per-connection framing or copy, and the fan-out can hand them straight to the socket
//! ([`super::writer`]).
//!
//! The decoder enforces what a server must refuse: unmasked or reserved-bit frames, unknown
//! opcodes, broken fragmentation and oversized control frames (1002), messages over
//! `ws.max_message_bytes` (1009, checked at the header, before any payload is buffered) and
//! text that is not UTF-8 (1007).

use bytes::{Buf, Bytes, BytesMut};

mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// A control frame (ping, pong, close) with `payload` (at most 125 bytes).
fn control(opcode: u8, payload: &[u8]) -> Bytes {
    let len = payload.len().min(125);
    let mut out = Vec::with_capacity(2 + len);
    out.extend([0x80 | opcode, len as u8]);
    out.extend_from_slice(&payload[..len]);
    out.into()
}

pub fn ping() -> Bytes {
    control(opcode::PING, &[])
}

pub fn pong(payload: &[u8]) -> Bytes {
    control(opcode::PONG, payload)
}

/// A close frame with `code` and `reason` (cut to fit a control frame), or an empty one.
pub fn close(code: Option<u16>, reason: &str) -> Bytes {
    let Some(code) = code else {
        return control(opcode::CLOSE, &[]);
    };
    let mut payload = code.to_be_bytes().to_vec();
    let mut cut = reason.len().min(123);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    payload.extend_from_slice(&reason.as_bytes()[..cut]);
    control(opcode::CLOSE, &payload)
}

/// What the client sent, one complete message or control frame at a time.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Text(String),
    Binary,
    /// Answer with a pong carrying the same payload.
    Ping(Bytes),
    Pong,
    /// The client closes; `code` is `None` for an empty close frame.
    Close(Option<u16>),
}

/// Why the connection must be closed, with the close code to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("message too big")]
    TooBig,
    #[error("text frame is not UTF-8")]
    NotUtf8,
}

impl DecodeError {
    pub fn close_code(self) -> u16 {
        use crate::session::close_code::*;
        match self {
            Self::Protocol(_) => PROTOCOL_ERROR,
            Self::TooBig => TOO_BIG,
            Self::NotUtf8 => INVALID_PAYLOAD,
        }
    }

    pub fn reason(self) -> &'static str {
        match self {
            Self::Protocol(_) => "protocol error",
            Self::TooBig => "message too big",
            Self::NotUtf8 => "text frame is not UTF-8",
        }
    }
}

/// Reassembles the client's frames into messages.
#[derive(Debug)]
pub struct Decoder {
    max_message: usize,
    /// A fragmented data message in progress: whether it is text, and its payload so far.
    /// Boxed: rare, and every connection carries the field.
    partial: Option<Box<(bool, Vec<u8>)>>,
}

struct Header {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    len: usize,
    /// Header bytes, mask key included.
    size: usize,
}

impl Decoder {
    pub fn new(max_message: usize) -> Self {
        Self {
            max_message,
            partial: None,
        }
    }

    /// The next event from `buf`, consuming its bytes; `Ok(None)` when `buf` holds no complete
    /// frame yet. After an error the connection must be closed: the decoder's state is gone.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Event>, DecodeError> {
        loop {
            let Some(header) = self.header(buf)? else {
                return Ok(None);
            };
            if buf.len() < header.size + header.len {
                // Make room for the rest at once rather than growing while it trickles in.
                buf.reserve(header.size + header.len - buf.len());
                return Ok(None);
            }
            buf.advance(header.size);
            let mut payload = buf.split_to(header.len);
            unmask(&mut payload, header.mask);
            if let Some(event) = self.frame(header.fin, header.opcode, payload)? {
                return Ok(Some(event));
            }
        }
    }

    fn header(&self, buf: &[u8]) -> Result<Option<Header>, DecodeError> {
        let [first, second, ..] = *buf else {
            return Ok(None);
        };
        let fin = first & 0x80 != 0;
        let opcode = first & 0x0F;
        if first & 0x70 != 0 {
            return Err(DecodeError::Protocol("reserved bits set"));
        }
        if second & 0x80 == 0 {
            return Err(DecodeError::Protocol("client frames must be masked"));
        }
        let (len, at) = match second & 0x7F {
            126 => match buf.get(2..4) {
                Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
                None => return Ok(None),
            },
            127 => match buf.get(2..10).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                Some(b) => (u64::from_be_bytes(b), 10),
                None => return Ok(None),
            },
            short => (u64::from(short), 2),
        };
        let control = opcode & 0x08 != 0;
        match opcode {
            opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {
                let so_far = self.partial.as_ref().map_or(0, |p| p.1.len() as u64);
                // Refused at the header: an oversized message is never buffered.
                if so_far.saturating_add(len) > self.max_message as u64 {
                    return Err(DecodeError::TooBig);
                }
            }
            opcode::CLOSE | opcode::PING | opcode::PONG => {}
            _ => return Err(DecodeError::Protocol("unknown opcode")),
        }
        if control && (!fin || len > 125) {
            return Err(DecodeError::Protocol("invalid control frame"));
        }
        let Some(mask) = buf.get(at..at + 4) else {
            return Ok(None);
        };
        Ok(Some(Header {
            fin,
            opcode,
            mask: [mask[0], mask[1], mask[2], mask[3]],
            // Within `max_message` (a `usize`) or a control frame's 125 bytes.
            len: len as usize,
            size: at + 4,
        }))
    }

    fn frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: BytesMut,
    ) -> Result<Option<Event>, DecodeError> {
        let data = match opcode {
            opcode::PING => return Ok(Some(Event::Ping(payload.freeze()))),
            opcode::PONG => return Ok(Some(Event::Pong)),
            opcode::CLOSE => return close_event(&payload).map(Some),
            opcode::CONTINUATION => match &mut self.partial {
                Some(partial) => {
                    partial.1.extend_from_slice(&payload);
                    if !fin {
                        return Ok(None);
                    }
                    self.partial.take().map(|partial| *partial)
                }
                None => return Err(DecodeError::Protocol("continuation of nothing")),
            },
            _ if self.partial.is_some() => {
                return Err(DecodeError::Protocol("new message inside a fragmented one"));
            }
            text_or_binary if !fin => {
                self.partial = Some(Box::new((text_or_binary == opcode::TEXT, payload.to_vec())));
                return Ok(None);
            }
            text_or_binary => Some((text_or_binary == opcode::TEXT, payload.to_vec())),
        };
        match data {
            Some((true, bytes)) => String::from_utf8(bytes)
                .map(|text| Some(Event::Text(text)))
                .map_err(|_| DecodeError::NotUtf8),
            _ => Ok(Some(Event::Binary)),
        }
    }
}

/// A close frame's payload: empty, or a valid code and a UTF-8 reason.
fn close_event(payload: &[u8]) -> Result<Event, DecodeError> {
    match payload {
        [] => Ok(Event::Close(None)),
        [_] => Err(DecodeError::Protocol("close frame of one byte")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            // RFC 6455 §7.4: codes a peer may send (1004-1006 and 1015 are reserved).
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(DecodeError::Protocol("invalid close code"));
            }
            std::str::from_utf8(reason).map_err(|_| DecodeError::NotUtf8)?;
            Ok(Event::Close(Some(code)))
        }
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    // Word at a time: the mask repeats every 4 bytes.
    let word = u32::from_ne_bytes(mask);
    let mut chunks = payload.chunks_exact_mut(4);
    for chunk in &mut chunks {
        let value = u32::from_ne_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) ^ word;
        chunk.copy_from_slice(&value.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i];
    }
}

#[cfg(test)]
mod tests;
