use bytes::BytesMut;
use proptest::prelude::*;

use super::*;

/// A client frame as a browser sends it: masked.
fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xFFFF => {
            out.push(0x80 | 126);
            out.extend((len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend((len as u64).to_be_bytes());
        }
    }
    out.extend(mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn decode_all(decoder: &mut Decoder, bytes: &[u8]) -> Result<Vec<Event>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let mut events = Vec::new();
    while let Some(event) = decoder.decode(&mut buf)? {
        events.push(event);
    }
    Ok(events)
}

fn one(bytes: &[u8]) -> Result<Vec<Event>, DecodeError> {
    decode_all(&mut Decoder::new(1024), bytes)
}

#[test]
fn text_ping_pong_close() {
    let mask = [1, 2, 3, 4];
    let mut bytes = client_frame(true, 0x1, br#"{"type":"ping"}"#, mask);
    bytes.extend(client_frame(true, 0x9, b"hi", mask));
    bytes.extend(client_frame(true, 0xA, b"", mask));
    bytes.extend(client_frame(true, 0x2, b"\x00\x01", mask));
    bytes.extend(client_frame(true, 0x8, &1000u16.to_be_bytes(), mask));
    assert_eq!(
        one(&bytes).unwrap(),
        vec![
            Event::Text(r#"{"type":"ping"}"#.to_owned()),
            Event::Ping(Bytes::from_static(b"hi")),
            Event::Pong,
            Event::Binary,
            Event::Close(Some(1000)),
        ]
    );
}

#[test]
fn refusals_carry_their_close_code() {
    let mask = [9, 8, 7, 6];
    let unmasked = [0x81, 0x02, b'{', b'}'];
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (unmasked.to_vec(), 1002),
        (client_frame(true, 0x1 | 0x40, b"{}", mask), 1002),
        (client_frame(true, 0x3, b"?", mask), 1002),
        (client_frame(true, 0xB, b"?", mask), 1002),
        (client_frame(true, 0x0, b"{}", mask), 1002),
        (client_frame(false, 0x9, b"x", mask), 1002),
        (client_frame(true, 0x9, &[b'p'; 126], mask), 1002),
        (client_frame(true, 0x8, &[3], mask), 1002),
        (client_frame(true, 0x8, &1005u16.to_be_bytes(), mask), 1002),
        (client_frame(true, 0x8, b"\x03\xe8\xff\xfe", mask), 1007),
        (client_frame(true, 0x1, b"\xc3\x28", mask), 1007),
        (client_frame(true, 0x1, &[b' '; 1025], mask), 1009),
        (
            [
                client_frame(false, 0x1, b"{", mask),
                client_frame(true, 0x1, b"{}", mask),
            ]
            .concat(),
            1002,
        ),
    ];
    for (bytes, code) in cases {
        let err = one(&bytes).unwrap_err();
        assert_eq!(err.close_code(), code, "{bytes:?}: {err}");
    }
}

#[test]
fn an_oversized_header_is_refused_before_its_payload() {
    // Only the header of a frame claiming 2^63 bytes: refused at once, nothing buffered.
    let mut header = vec![0x81, 0x80 | 127];
    header.extend((1u64 << 63).to_be_bytes());
    assert_eq!(one(&header), Err(DecodeError::TooBig));
    // Fragments that only together exceed the limit, by the last byte.
    let mask = [0; 4];
    let part = vec![b' '; 256];
    let mut bytes = client_frame(false, 0x1, &part, mask);
    for last in [false, false, false] {
        bytes.extend(client_frame(last, 0x0, &part, mask));
    }
    bytes.extend(client_frame(true, 0x0, b" ", mask));
    assert_eq!(one(&bytes), Err(DecodeError::TooBig));
    let exact = [
        client_frame(false, 0x1, &part, mask),
        client_frame(false, 0x0, &part, mask),
        client_frame(false, 0x0, &part, mask),
        client_frame(true, 0x0, &part, mask),
    ]
    .concat();
    assert_eq!(one(&exact).unwrap().len(), 1);
}

#[test]
fn close_frames_out() {
    assert_eq!(&close(None, "")[..], [0x88, 0]);
    assert_eq!(
        &close(Some(4008), "slow")[..],
        [0x88, 6, 0x0F, 0xA8, b's', b'l', b'o', b'w']
    );
    // A long reason is cut at a character boundary to fit 125 bytes.
    let frame = close(Some(1000), &"é".repeat(100));
    assert_eq!(frame[1] as usize, frame.len() - 2);
    assert!(frame.len() - 2 <= 125);
    assert!(std::str::from_utf8(&frame[4..]).is_ok());
    assert_eq!(&pong(b"abc")[..], [0x8A, 3, b'a', b'b', b'c']);
    assert_eq!(&ping()[..], [0x89, 0]);
}

proptest! {
    /// Any message, cut into any fragments (with pings between them), arriving in any chunks,
    /// decodes to the same events as when it arrives whole.
    #[test]
    fn fragments_and_chunks_do_not_matter(
        text in "\\PC{0,300}",
        cuts in proptest::collection::vec(0usize..400, 0..4),
        chunk in 1usize..64,
        mask in any::<[u8; 4]>(),
    ) {
        let bytes = text.as_bytes();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
        cuts.sort_unstable();
        cuts.dedup();
        let mut wire = Vec::new();
        let mut start = 0;
        let mut first = true;
        let mut pings = 0;
        for end in cuts.into_iter().chain([bytes.len()]) {
            if end < start {
                continue;
            }
            let last = end == bytes.len();
            let opcode = if first { 0x1 } else { 0x0 };
            wire.extend(client_frame(last, opcode, &bytes[start..end], mask));
            first = false;
            start = end;
            if last {
                break;
            }
            wire.extend(client_frame(true, 0x9, b"p", mask));
            pings += 1;
        }
        let mut decoder = Decoder::new(1 << 20);
        let mut buf = BytesMut::new();
        let mut events = Vec::new();
        for piece in wire.chunks(chunk) {
            buf.extend_from_slice(piece);
            while let Some(event) = decoder.decode(&mut buf).unwrap() {
                events.push(event);
            }
        }
        prop_assert!(buf.is_empty());
        let texts: Vec<_> = events.iter().filter(|e| matches!(e, Event::Text(_))).collect();
        let want = Event::Text(text.clone());
        prop_assert_eq!(texts, vec![&want]);
        prop_assert_eq!(events.len(), pings + 1);
    }

    /// Arbitrary bytes never panic the decoder; it answers with events, an error, or a wait.
    #[test]
    fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let mut decoder = Decoder::new(64);
        let mut buf = BytesMut::from(&bytes[..]);
        for _ in 0..200 {
            match decoder.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
    }
}
