//! The wire bytes of a server frame: a WebSocket text frame (RFC 6455 §5.2) is its JSON behind a
//! 2-, 4- or 10-byte header, unmasked. Encoded once per frame, in the same allocation as the
//! JSON, so every connection writes the same shared bytes (`ws::codec` reads the client's).

use bytes::Bytes;

/// The largest header of a server frame: 2 bytes and a 64-bit length.
pub const MAX_HEADER: usize = 10;

/// FIN and the text opcode.
const FINAL_TEXT: u8 = 0x81;

/// Write the header of a final text frame of `len` payload bytes right-aligned into `out`;
/// returns where it starts.
fn header_into(len: usize, out: &mut [u8; MAX_HEADER]) -> usize {
    match len {
        0..=125 => {
            out[8] = FINAL_TEXT;
            out[9] = len as u8;
            8
        }
        126..=0xFFFF => {
            out[6] = FINAL_TEXT;
            out[7] = 126;
            out[8..].copy_from_slice(&(len as u16).to_be_bytes());
            6
        }
        _ => {
            out[0] = FINAL_TEXT;
            out[1] = 127;
            out[2..].copy_from_slice(&(len as u64).to_be_bytes());
            0
        }
    }
}

/// The frame whose payload is `buf[MAX_HEADER..]`: the header goes into the reserved space in
/// front, and the frame is what follows its start. Returns the frame and where its payload
/// starts in it.
pub fn text_frame(mut buf: Vec<u8>) -> (Bytes, usize) {
    debug_assert!(buf.len() >= MAX_HEADER);
    let mut head = [0; MAX_HEADER];
    let start = header_into(buf.len() - MAX_HEADER, &mut head);
    buf[start..MAX_HEADER].copy_from_slice(&head[start..]);
    (Bytes::from(buf).slice(start..), MAX_HEADER - start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_of(len: usize) -> (Bytes, usize) {
        let mut buf = vec![0; MAX_HEADER];
        buf.resize(MAX_HEADER + len, b'x');
        text_frame(buf)
    }

    #[test]
    fn server_frames_have_the_shortest_header() {
        for (len, header) in [(0, 2), (125, 2), (126, 4), (65_535, 4), (65_536, 10)] {
            let (wire, at) = frame_of(len);
            assert_eq!((wire.len(), at), (header + len, header), "payload of {len}");
            assert_eq!(wire[0], 0x81, "final text frame");
            assert!(wire[at..].iter().all(|b| *b == b'x'));
        }
    }

    /// A reference implementation reads back what we wrote.
    #[test]
    fn tungstenite_reads_our_frames() {
        use tungstenite::protocol::frame::FrameHeader;
        for len in [0, 5, 125, 126, 300, 65_535, 65_536, 70_000] {
            let (wire, at) = frame_of(len);
            let mut cursor = std::io::Cursor::new(&wire[..]);
            let (header, length) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
            assert!(header.is_final);
            assert!(header.mask.is_none());
            assert_eq!(length, len as u64);
            assert_eq!(cursor.position() as usize, at);
        }
    }
}
