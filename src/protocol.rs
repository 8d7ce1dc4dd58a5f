//! The wire protocol, in code: channel names, the frames clients send, the frames the server
//! sends, and the Redis envelope. `docs/protocol.md` is the prose version of this file; change
//! both together.
//!
//! Server frames are encoded once and shared: a message frame is built by the Redis listener and
//! the same bytes go to every WebSocket and SSE subscriber.

use std::borrow::Cow;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tungstenite::Utf8Bytes;

/// Longest channel name accepted.
pub const MAX_CHANNEL_LEN: usize = 128;

/// Largest offset relay assigns or accepts (`since`, `Last-Event-ID`, envelope `id`): 2^53 − 1,
/// the largest integer a JavaScript client holds exactly. Keeping every offset below it also
/// leaves `offset + 1` far from `i64::MAX`, so offset arithmetic cannot overflow.
pub const MAX_OFFSET: i64 = (1 << 53) - 1;

/// Parse an offset given as text (`since.x=…`, `Last-Event-ID`): an integer in `0..=MAX_OFFSET`.
pub fn parse_offset(text: &str) -> Option<i64> {
    text.trim()
        .parse::<i64>()
        .ok()
        .filter(|o| (0..=MAX_OFFSET).contains(o))
}

/// Why a message's `data` cannot be stored: JSON that Postgres `jsonb` refuses. The same rule
/// holds in embedded mode, so a message accepted there is accepted in production too.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnstorableData {
    #[error("`data` contains U+0000 (`\\u0000`) in a string, which cannot be stored")]
    Nul,
    #[error("`data` contains an unpaired UTF-16 surrogate escape (`\\uD800`-`\\uDFFF`)")]
    UnpairedSurrogate,
    #[error(
        "`data` contains a number beyond what can be stored: at most {MAX_INTEGER_DIGITS} digits \
         before the decimal point and {MAX_FRACTION_DIGITS} after it"
    )]
    NumberOutOfRange,
}

/// Postgres `numeric` limits, which `jsonb` numbers have: the weight of the first digit is an
/// `int16` in base 10000 (so 4 × 32768 decimal digits before the point), and the display scale
/// (digits written after the point, less the exponent) is at most `0x3FFF`.
const MAX_INTEGER_DIGITS: i64 = 131_072;
const MAX_FRACTION_DIGITS: i64 = 16_383;
/// Postgres refuses any exponent from `INT_MAX / 2` on, even on zero.
const MAX_EXPONENT: i64 = 1_073_741_823;

/// Check that `json` (already valid JSON) can be stored: no U+0000 and no unpaired surrogate in
/// any string or key, every number within `numeric`'s range.
pub fn check_storable(json: &str) -> Result<(), UnstorableData> {
    let bytes = json.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        // Outside strings, valid JSON has digits and `-` only in numbers.
        i = match bytes[i] {
            b'"' => storable_string(bytes, i + 1)?,
            b'-' | b'0'..=b'9' => storable_number(bytes, i)?,
            _ => i + 1,
        };
    }
    Ok(())
}

/// Check the string starting after the quote at `i - 1`; returns the index after its end.
fn storable_string(bytes: &[u8], mut i: usize) -> Result<usize, UnstorableData> {
    // A high surrogate escape waiting for its low half.
    let mut high = false;
    while let Some(&b) = bytes.get(i) {
        let unit = match b {
            b'"' => break,
            b'\\' if bytes.get(i + 1) == Some(&b'u') => {
                let hex = bytes.get(i + 2..i + 6).unwrap_or_default();
                i += 6;
                std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u16::from_str_radix(h, 16).ok())
            }
            b'\\' => {
                i += 2;
                None
            }
            _ => {
                i += 1;
                None
            }
        };
        match unit {
            Some(0) => return Err(UnstorableData::Nul),
            Some(0xD800..=0xDBFF) if !high => high = true,
            Some(0xDC00..=0xDFFF) if high => high = false,
            Some(0xD800..=0xDFFF) => return Err(UnstorableData::UnpairedSurrogate),
            _ if high => return Err(UnstorableData::UnpairedSurrogate),
            _ => {}
        }
    }
    if high {
        return Err(UnstorableData::UnpairedSurrogate);
    }
    Ok(i + 1)
}

/// Check the number starting at `i`; returns the index after it.
fn storable_number(bytes: &[u8], mut i: usize) -> Result<usize, UnstorableData> {
    let digits = |i: &mut usize| {
        let start = *i;
        while bytes.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        &bytes[start..*i]
    };
    if bytes.get(i) == Some(&b'-') {
        i += 1;
    }
    let integer = digits(&mut i);
    let fraction = if bytes.get(i) == Some(&b'.') {
        i += 1;
        digits(&mut i)
    } else {
        &[]
    };
    let mut exponent: i64 = 0;
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        let negative = bytes.get(i) == Some(&b'-');
        if matches!(bytes.get(i), Some(b'-' | b'+')) {
            i += 1;
        }
        for d in digits(&mut i) {
            // Saturates: anything this large is refused anyway.
            exponent = (exponent * 10 + i64::from(d - b'0')).min(MAX_EXPONENT);
        }
        if negative {
            exponent = -exponent;
        }
    }
    let scale = fraction.len() as i64 - exponent;
    let first_significant = integer.iter().chain(fraction).position(|&d| d != b'0');
    // Decimal position of the first significant digit (0 for units, -1 for tenths, …).
    let top = first_significant.map(|f| integer.len() as i64 - 1 - f as i64 + exponent);
    if exponent.abs() >= MAX_EXPONENT
        || scale > MAX_FRACTION_DIGITS
        || top.is_some_and(|t| t >= MAX_INTEGER_DIGITS)
    {
        return Err(UnstorableData::NumberOutOfRange);
    }
    Ok(i)
}

/// Longest idempotency key accepted (visible ASCII).
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Whether `key` can be an idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY`] visible ASCII
/// characters (a UUID fits; so does anything a header can carry unescaped).
pub fn valid_idempotency_key(key: &str) -> bool {
    (1..=MAX_IDEMPOTENCY_KEY).contains(&key.len()) && key.bytes().all(|b| b.is_ascii_graphic())
}

/// An integer as JSON may write it, `17` or `17.0` (JSON Schema's `integer`, which the OpenAPI
/// document promises for offsets in bodies); `None` for a fraction or beyond `i64`.
pub fn integer_of(n: &serde_json::Number) -> Option<i64> {
    n.as_i64().or_else(|| {
        n.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() <= MAX_OFFSET as f64)
            .map(|f| f as i64)
    })
}

fn optional_integer<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    Option::<serde_json::Number>::deserialize(d)?
        .map(|n| integer_of(&n).ok_or_else(|| serde::de::Error::custom("expected an integer")))
        .transpose()
}

/// Characters allowed in channel names (and in the Redis prefix in front of them, which
/// `config` validates with this same function).
pub fn is_channel_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.')
}

/// [`is_channel_char`] as a regular-expression class, for the OpenAPI document's `pattern`s
/// (a test checks the two agree on every `char`).
pub const CHANNEL_CHAR_CLASS: &str = "[A-Za-z0-9_.:-]";

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid channel name: must be 1-128 characters of A-Z a-z 0-9 _ - : .")]
pub struct InvalidChannel;

/// Validate a channel name (1–128 of `A-Z a-z 0-9 _ - : .`).
pub fn validate_channel(name: &str) -> Result<&str, InvalidChannel> {
    if !name.is_empty() && name.len() <= MAX_CHANNEL_LEN && name.chars().all(is_channel_char) {
        Ok(name)
    } else {
        Err(InvalidChannel)
    }
}

/// Parse a `channels=a,b` query value: one or more valid names separated by commas, nothing
/// else (no blanks, no empty items), so the OpenAPI `pattern` can state exactly what is
/// accepted. Duplicates are kept once.
pub fn parse_channel_list(list: &str) -> Result<Vec<String>, InvalidChannel> {
    let mut out: Vec<String> = Vec::new();
    for name in list.split(',') {
        let name = validate_channel(name)?;
        if !out.iter().any(|c| c == name) {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

/// A subscription requested in a URL query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuerySubscription {
    pub channel: String,
    /// Replay stored messages after this offset first.
    pub since: Option<i64>,
}

/// Parse `channels=a,b&since.a=41` (the form `/ws` and `/sse` accept), listing at most
/// `max_channels` names in all. Other parameters are ignored. Errors: a `channels` that is empty
/// or not a list of valid names, more than `max_channels` names listed (duplicates count: the
/// limit is on what the request lists, as the OpenAPI `pattern` states it), a `since.x` for a
/// channel not listed, or one that is not an offset.
pub fn parse_subscription_query(
    query: Option<&str>,
    max_channels: usize,
) -> Result<Vec<QuerySubscription>, String> {
    let mut listed = 0usize;
    let mut subs: Vec<QuerySubscription> = Vec::new();
    let mut since = Vec::new();
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        if key == "channels" {
            if value.is_empty() {
                return Err(
                    "`channels` is empty: list at least one channel, or leave it out".to_owned(),
                );
            }
            listed += value.split(',').count();
            if listed > max_channels {
                return Err(format!("at most {max_channels} channels per connection"));
            }
            for channel in parse_channel_list(&value).map_err(|e| e.to_string())? {
                if !subs.iter().any(|s| s.channel == channel) {
                    subs.push(QuerySubscription {
                        channel,
                        since: None,
                    });
                }
            }
        } else if let Some(channel) = key.strip_prefix("since.") {
            let offset = parse_offset(&value).ok_or_else(|| {
                format!("`{key}` must be an integer offset between 0 and {MAX_OFFSET}")
            })?;
            since.push((channel.to_owned(), offset));
        }
    }
    for (channel, offset) in since {
        let sub = subs
            .iter_mut()
            .find(|s| s.channel == channel)
            .ok_or_else(|| format!("`since.{channel}` names a channel not in `channels`"))?;
        sub.since = Some(offset);
    }
    Ok(subs)
}

/// A frame sent by a client, parsed from a JSON text message.
#[derive(Debug)]
pub enum ClientFrame<'a> {
    Subscribe {
        channel: Cow<'a, str>,
        since: Option<i64>,
    },
    Unsubscribe {
        channel: Cow<'a, str>,
    },
    Publish {
        channel: Cow<'a, str>,
        data: &'a RawValue,
        /// Compare-and-publish: commit only if the channel's last offset is this.
        expected_last_id: Option<i64>,
        /// A repeat with the same key within the window stores nothing new.
        idempotency_key: Option<Cow<'a, str>>,
        /// The client's name for this publish ([`check_ref`]): answered by an `ack` frame, and
        /// carried by an error frame about it.
        reference: Option<&'a RawValue>,
    },
    Ping,
    /// The handshake frame of a WebSocket opened without a token.
    Auth {
        token: Cow<'a, str>,
    },
    /// A new token for the same `sub`, answering `token_expiring`.
    Refresh {
        token: Cow<'a, str>,
    },
}

/// A client frame that could not be accepted; becomes an `error` frame, the connection stays.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("unknown frame type `{0}`")]
    UnknownType(String),
    #[error("invalid `{ty}` frame: {reason}")]
    InvalidFrame { ty: &'static str, reason: String },
    #[error(transparent)]
    InvalidChannel(#[from] InvalidChannel),
}

impl FrameError {
    /// The `code` of the error frame.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidJson(_) => "invalid_json",
            Self::UnknownType(_) => "unknown_type",
            Self::InvalidFrame { .. } => "invalid_frame",
            Self::InvalidChannel(_) => "invalid_channel",
        }
    }
}

#[derive(Deserialize)]
struct Head<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct ChannelBody<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
}

#[derive(Deserialize)]
struct SubscribeBody<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(default)]
    since: Option<i64>,
}

#[derive(Deserialize)]
struct TokenBody<'a> {
    #[serde(borrow)]
    token: Cow<'a, str>,
}

#[derive(Deserialize)]
struct PublishBody<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default, deserialize_with = "optional_integer")]
    expected_last_id: Option<i64>,
    #[serde(default, borrow)]
    idempotency_key: Option<Cow<'a, str>>,
    #[serde(default, borrow, rename = "ref")]
    reference: Option<&'a RawValue>,
}

/// A publish's `expected_last_id`, when given, is an offset in `0..=MAX_OFFSET` (HTTP body,
/// WebSocket frame, batch item).
pub fn check_expected_last_id(expected: Option<i64>) -> Result<(), String> {
    match expected {
        Some(e) if !(0..=MAX_OFFSET).contains(&e) => Err(format!(
            "`expected_last_id` must be an offset between 0 and {MAX_OFFSET}"
        )),
        _ => Ok(()),
    }
}

/// An `idempotency_key` field (WebSocket frame, batch item), when given, is valid
/// ([`valid_idempotency_key`]).
pub fn check_idempotency_key(key: Option<&str>) -> Result<(), String> {
    match key {
        Some(k) if !valid_idempotency_key(k) => Err(format!(
            "`idempotency_key` must be 1 to {MAX_IDEMPOTENCY_KEY} visible ASCII characters"
        )),
        _ => Ok(()),
    }
}

/// Read `expected_last_id` from a JSON number, accepting integral ones such as `17.0`.
pub fn expected_last_id_of<E: serde::de::Error>(
    n: Option<serde_json::Number>,
) -> Result<Option<i64>, E> {
    n.map(|n| {
        integer_of(&n).ok_or_else(|| E::custom("`expected_last_id` must be an integer offset"))
    })
    .transpose()
}

/// Longest `ref` accepted, in bytes of its JSON text.
pub const MAX_REF_BYTES: usize = 128;

/// A publish frame's `ref`: a JSON string or integer of at most [`MAX_REF_BYTES`], echoed as
/// sent.
pub fn check_ref(reference: &RawValue) -> Result<(), String> {
    let text = reference.get();
    let shape_ok = match text.as_bytes().first() {
        Some(b'"') => true,
        Some(b'-' | b'0'..=b'9') => text.bytes().skip(1).all(|b| b.is_ascii_digit()),
        _ => false,
    };
    if !shape_ok || text.len() > MAX_REF_BYTES {
        return Err(format!(
            "`ref` must be a string or an integer of at most {MAX_REF_BYTES} bytes"
        ));
    }
    Ok(())
}

/// The valid `ref` of a frame that failed to parse otherwise, so its error can carry it.
pub fn frame_ref(text: &str) -> Option<Box<RawValue>> {
    #[derive(Deserialize)]
    struct RefOnly<'a> {
        #[serde(borrow, rename = "ref")]
        reference: Option<&'a RawValue>,
    }
    let reference = serde_json::from_str::<RefOnly<'_>>(text).ok()?.reference?;
    check_ref(reference).ok()?;
    Some(reference.to_owned())
}

impl<'a> ClientFrame<'a> {
    /// Parse and validate one client frame.
    pub fn parse(text: &'a str) -> Result<Self, FrameError> {
        let not_a_frame = |reason: String| FrameError::InvalidFrame {
            ty: "unknown",
            reason,
        };
        let head: Head<'a> = match serde_json::from_str(text) {
            Ok(head) => head,
            // The first error may be about the shape (`[1]`, `{"type":5}`, `{"type":1e400}`)
            // while the text is valid JSON, or hide a syntax error further on; only a parse
            // of the whole text tells "not JSON" from "not a frame". Refused frames only.
            Err(err) => {
                return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                    Err(syntax) => FrameError::InvalidJson(syntax.to_string()),
                    Ok(_) if !is_json_object(text) => {
                        not_a_frame("a frame must be a JSON object".to_owned())
                    }
                    Ok(_) => not_a_frame(err.to_string()),
                });
            }
        };
        if !is_json_object(text) {
            return Err(not_a_frame("a frame must be a JSON object".to_owned()));
        }
        let ty = head.ty.ok_or_else(|| FrameError::InvalidFrame {
            ty: "unknown",
            reason: "missing field `type`".to_owned(),
        })?;
        fn body<'b, T: Deserialize<'b>>(ty: &'static str, text: &'b str) -> Result<T, FrameError> {
            serde_json::from_str(text).map_err(|e| FrameError::InvalidFrame {
                ty,
                reason: e.to_string(),
            })
        }
        let frame = match &*ty {
            "subscribe" => {
                let b: SubscribeBody = body("subscribe", text)?;
                validate_channel(&b.channel)?;
                if b.since.is_some_and(|s| !(0..=MAX_OFFSET).contains(&s)) {
                    return Err(FrameError::InvalidFrame {
                        ty: "subscribe",
                        reason: format!("`since` must be an offset between 0 and {MAX_OFFSET}"),
                    });
                }
                Self::Subscribe {
                    channel: b.channel,
                    since: b.since,
                }
            }
            "unsubscribe" => {
                let b: ChannelBody = body("unsubscribe", text)?;
                validate_channel(&b.channel)?;
                Self::Unsubscribe { channel: b.channel }
            }
            "publish" => {
                let b: PublishBody = body("publish", text)?;
                validate_channel(&b.channel)?;
                check_data(b.data).map_err(|e| FrameError::InvalidFrame {
                    ty: "publish",
                    reason: e.to_string(),
                })?;
                let invalid = |reason| FrameError::InvalidFrame {
                    ty: "publish",
                    reason,
                };
                check_expected_last_id(b.expected_last_id).map_err(invalid)?;
                check_idempotency_key(b.idempotency_key.as_deref()).map_err(invalid)?;
                if let Some(reference) = b.reference {
                    check_ref(reference).map_err(|reason| FrameError::InvalidFrame {
                        ty: "publish",
                        reason,
                    })?;
                }
                Self::Publish {
                    channel: b.channel,
                    data: b.data,
                    expected_last_id: b.expected_last_id,
                    idempotency_key: b.idempotency_key,
                    reference: b.reference,
                }
            }
            "ping" => Self::Ping,
            "auth" => Self::Auth {
                token: body::<TokenBody>("auth", text)?.token,
            },
            "refresh" => Self::Refresh {
                token: body::<TokenBody>("refresh", text)?.token,
            },
            other => return Err(FrameError::UnknownType(truncate(other, 64).to_owned())),
        };
        Ok(frame)
    }
}

/// Why a message's `data` was refused although it is valid JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidData {
    /// Postgres `jsonb` cannot hold it ([`check_storable`]).
    #[error(transparent)]
    Unstorable(#[from] UnstorableData),
    #[error("`data` contains a number whose exponent is beyond ±{MAX_DATA_EXPONENT}")]
    Exponent,
    #[error("`data` is nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Deepest nesting of arrays and objects accepted in `data`. serde_json (and so relay) reads
/// skipped and raw values without a depth limit, but clients parsing the frame may not
/// (serde_json's own limit is 128).
pub const MAX_DEPTH: usize = 100;

/// Largest exponent (`1e308`) written in a number of `data`: the range of a double, which is
/// what JavaScript clients can read anyway.
pub const MAX_DATA_EXPONENT: u32 = 308;

/// Check published `data` (valid JSON): storable ([`check_storable`]), and readable back as it
/// was sent, by relay and by its clients. Postgres stores numbers as `numeric` and prints them
/// in full, so `1e100000` (storable) would come back from history as 100,001 digits and a small
/// message could make every history read huge; exponents are therefore bounded by a double's,
/// and nesting by [`MAX_DEPTH`]. The same rules apply in embedded mode, so both backends accept
/// exactly the same messages.
pub fn check_data(data: &RawValue) -> Result<(), InvalidData> {
    check_storable(data.get())?;
    let bytes = data.get().as_bytes();
    let mut i = 0;
    let mut in_string = false;
    let mut depth = 0usize;
    while let Some(&b) = bytes.get(i) {
        i += 1;
        match b {
            b'"' => in_string = !in_string,
            // An escape inside a string: skip the escaped character (`\"` does not end it).
            b'\\' if in_string => i += 1,
            b'[' | b'{' if !in_string => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Err(InvalidData::TooDeep);
                }
            }
            b']' | b'}' if !in_string => depth = depth.saturating_sub(1),
            // Outside strings an `e` is an exponent, or part of `true` / `false` (never
            // followed by a digit or sign).
            b'e' | b'E' if !in_string => {
                if bytes.get(i).is_some_and(|c| matches!(c, b'+' | b'-')) {
                    i += 1;
                }
                let mut exponent: u32 = 0;
                while let Some(d) = bytes.get(i).filter(|d| d.is_ascii_digit()) {
                    exponent = exponent
                        .saturating_mul(10)
                        .saturating_add(u32::from(d - b'0'));
                    i += 1;
                }
                if exponent > MAX_DATA_EXPONENT {
                    return Err(InvalidData::Exponent);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// serde also accepts a struct written as an array (`[a, b]`); frames and envelopes are JSON
/// objects only.
fn is_json_object(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Which SSE event a frame becomes (WebSocket clients read `type` from the JSON instead).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Message,
    Subscribed,
    Unsubscribed,
    Pong,
    Gap,
    Error,
    Ack,
    Authenticated,
    TokenExpiring,
}

impl FrameKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Message => "message",
            Self::Subscribed => "subscribed",
            Self::Unsubscribed => "unsubscribed",
            Self::Pong => "pong",
            Self::Gap => "gap",
            Self::Error => "error",
            Self::Ack => "ack",
            Self::Authenticated => "authenticated",
            Self::TokenExpiring => "token_expiring",
        }
    }
}

/// An encoded server frame. Cloning shares the bytes (a reference-count increment).
#[derive(Debug, Clone)]
pub struct ServerFrame {
    pub kind: FrameKind,
    /// The JSON text, exactly as sent on a WebSocket and as SSE `data:`.
    pub text: Utf8Bytes,
    /// The complete WebSocket frame, header and `text` (the same allocation): encoded once,
    /// written as is by every connection that sends it.
    pub wire: Bytes,
    /// The message offset, when there is one (SSE `id:`).
    pub id: Option<i64>,
}

#[derive(Serialize)]
struct MessageJson<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    channel: &'a str,
    data: &'a RawValue,
    id: Option<i64>,
}

#[derive(Serialize)]
struct SubscribedJson<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    channel: &'a str,
    last_id: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    oldest_id: Option<i64>,
}

#[derive(Serialize)]
struct ChannelJson<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    channel: &'a str,
}

#[derive(Serialize)]
struct GapJson<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    channel: &'a str,
    from: i64,
    to: i64,
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    code: &'a str,
    message: &'a str,
    #[serde(rename = "ref", skip_serializing_if = "Option::is_none")]
    reference: Option<&'a RawValue>,
}

#[derive(Serialize)]
struct AckJson<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    #[serde(rename = "ref")]
    reference: &'a RawValue,
    channel: &'a str,
    id: i64,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    replayed: bool,
}

#[derive(Serialize)]
struct AuthenticatedJson<'a> {
    #[serde(rename = "type")]
    ty: &'static str,
    sub: &'a str,
    exp: u64,
}

#[derive(Serialize)]
struct ExpiringJson {
    #[serde(rename = "type")]
    ty: &'static str,
    exp: u64,
}

fn encode(kind: FrameKind, value: &impl Serialize, id: Option<i64>) -> ServerFrame {
    let mut buf = Vec::with_capacity(128);
    buf.resize(wire::MAX_HEADER, 0);
    // Serialising these plain structs cannot fail: every field is a string, number or raw JSON.
    let _ = serde_json::to_writer(&mut buf, value);
    let (wire, at) = wire::text_frame(buf);
    let text = Utf8Bytes::try_from(wire.slice(at..)).expect("serde_json writes UTF-8");
    ServerFrame {
        kind,
        text,
        wire,
        id,
    }
}

impl ServerFrame {
    /// `{"type":"message","channel":…,"data":…,"id":…}`
    pub fn message(channel: &str, data: &RawValue, id: Option<i64>) -> Self {
        let json = MessageJson {
            ty: "message",
            channel,
            data,
            id,
        };
        encode(FrameKind::Message, &json, id)
    }

    /// `{"type":"subscribed","channel":…,"last_id":…}`: live delivery continues after `last_id`.
    pub fn subscribed(channel: &str, last_id: i64) -> Self {
        let json = SubscribedJson {
            ty: "subscribed",
            channel,
            last_id,
            recovered: None,
            oldest_id: None,
        };
        encode(FrameKind::Subscribed, &json, None)
    }

    /// `subscribed` for a subscription with `since`: whether every message after `since` will be
    /// replayed (`recovered`), and if not, the oldest offset still available.
    pub fn subscribed_recovering(
        channel: &str,
        last_id: i64,
        recovered: bool,
        oldest_id: i64,
    ) -> Self {
        let json = SubscribedJson {
            ty: "subscribed",
            channel,
            last_id,
            recovered: Some(recovered),
            oldest_id: (!recovered).then_some(oldest_id),
        };
        encode(FrameKind::Subscribed, &json, None)
    }

    /// `{"type":"unsubscribed","channel":…}`
    pub fn unsubscribed(channel: &str) -> Self {
        let json = ChannelJson {
            ty: "unsubscribed",
            channel,
        };
        encode(FrameKind::Unsubscribed, &json, None)
    }

    /// `{"type":"authenticated","sub":…,"exp":…}`: the token (handshake frame or refresh) was
    /// accepted; its permissions apply from now on.
    pub fn authenticated(sub: &str, exp: u64) -> Self {
        let json = AuthenticatedJson {
            ty: "authenticated",
            sub,
            exp,
        };
        encode(FrameKind::Authenticated, &json, None)
    }

    /// `{"type":"token_expiring","exp":…}`: send a `refresh` before `exp` or be closed (4003).
    pub fn token_expiring(exp: u64) -> Self {
        let json = ExpiringJson {
            ty: "token_expiring",
            exp,
        };
        encode(FrameKind::TokenExpiring, &json, None)
    }

    /// `{"type":"pong"}`
    pub fn pong() -> Self {
        const WIRE: &[u8] = b"\x81\x0f{\"type\":\"pong\"}";
        ServerFrame {
            kind: FrameKind::Pong,
            text: Utf8Bytes::from_static(r#"{"type":"pong"}"#),
            wire: Bytes::from_static(WIRE),
            id: None,
        }
    }

    /// `{"type":"gap","channel":…,"from":…,"to":…}`: offsets `from..=to` of the channel are lost
    /// (pruned, or history unavailable) and will not be delivered. The SSE `id:` is `to`, so a
    /// reconnecting browser resumes after the hole instead of asking for it again.
    pub fn gap(channel: &str, from: i64, to: i64) -> Self {
        let json = GapJson {
            ty: "gap",
            channel,
            from,
            to,
        };
        encode(FrameKind::Gap, &json, Some(to))
    }

    /// `{"type":"error","code":…,"message":…}`
    pub fn error(code: &str, message: &str) -> Self {
        Self::error_for(code, message, None)
    }

    /// An error frame about the publish the client named `reference` (its `ref`), if any.
    pub fn error_for(code: &str, message: &str, reference: Option<&RawValue>) -> Self {
        let json = ErrorJson {
            ty: "error",
            code,
            message,
            reference,
        };
        encode(FrameKind::Error, &json, None)
    }

    /// `{"type":"ack","ref":…,"channel":…,"id":…}`: the publish named `ref` is committed at
    /// offset `id` (`"replayed":true` when it repeated an idempotency key, and `id` is the
    /// original's).
    pub fn ack(reference: &RawValue, channel: &str, id: i64, replayed: bool) -> Self {
        let json = AckJson {
            ty: "ack",
            reference,
            channel,
            id,
            replayed,
        };
        encode(FrameKind::Ack, &json, None)
    }
}

/// The payload relay PUBLISHes to Redis and expects to receive: `{"data":<JSON>,"id":<int>,
/// "origin":"relay"}`, plus the optional `traceparent` and `ts` relay adds. Only `data` is
/// required (other publishers may omit the rest); unknown fields are ignored so later versions
/// can add some without breaking older replicas.
///
/// Offsets belong to relay: [`Envelope::offset`] honours `id` only on envelopes relay marked as
/// its own with `origin`, so an outside publisher can never take, replace or use up an offset.
#[derive(Debug, Deserialize, Serialize)]
pub struct Envelope<'a> {
    #[serde(borrow)]
    pub data: &'a RawValue,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<i64>,
    /// [`RELAY_ORIGIN`] on envelopes relay published after committing the message.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub origin: Option<Cow<'a, str>>,
    /// W3C trace context of the publish, so delivery spans join the publisher's trace.
    #[serde(default, borrow, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<Cow<'a, str>>,
    /// Publish time in Unix microseconds (listener lag metric).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    /// The publishing replica (a random id per process), which delivered the message to its own
    /// subscribers already and drops this echo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<u64>,
}

/// Why a Redis payload was skipped.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("payload is not UTF-8")]
    NotUtf8,
    #[error("payload is not a JSON object")]
    NotObject,
    #[error("payload is not an envelope: {0}")]
    Shape(#[from] serde_json::Error),
}

/// The `origin` relay writes into its own envelopes.
pub const RELAY_ORIGIN: &str = "relay";

impl<'a> Envelope<'a> {
    /// The message's offset: `id` of an envelope relay published itself, within
    /// `1..=MAX_OFFSET`. Outside envelopes (and out-of-range ids) have none and are delivered
    /// with `"id": null`.
    pub fn offset(&self) -> Option<i64> {
        let own = self.origin.as_deref() == Some(RELAY_ORIGIN);
        self.id.filter(|id| own && (1..=MAX_OFFSET).contains(id))
    }

    pub fn parse(payload: &'a [u8]) -> Result<Self, EnvelopeError> {
        let text = std::str::from_utf8(payload).map_err(|_| EnvelopeError::NotUtf8)?;
        if !is_json_object(text) {
            return Err(EnvelopeError::NotObject);
        }
        Ok(serde_json::from_str(text)?)
    }

    pub fn encode(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

pub mod wire;

#[cfg(test)]
mod proptests;

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame's wire bytes are its text behind the shortest text-frame header.
    #[test]
    fn every_frame_is_its_text_behind_a_header() {
        let data = RawValue::from_string("[1,2,3]".to_owned()).unwrap();
        let long = "x".repeat(300);
        let frames = [
            ServerFrame::pong(),
            ServerFrame::message("c", &data, Some(7)),
            ServerFrame::error("invalid_frame", &long),
            ServerFrame::subscribed("c", 3),
        ];
        for frame in frames {
            let text = frame.text.as_bytes();
            let header = if text.len() < 126 { 2 } else { 4 };
            assert_eq!(frame.wire.len(), header + text.len(), "{}", frame.text);
            assert_eq!(&frame.wire[header..], text);
            assert_eq!(frame.wire[0], 0x81);
        }
    }

    #[test]
    fn channel_names() {
        assert!(validate_channel("room-1:a_b.c").is_ok());
        assert!(validate_channel(&"x".repeat(128)).is_ok());
        assert!(validate_channel(&"x".repeat(129)).is_err());
        assert!(validate_channel("").is_err());
        assert!(validate_channel("a b").is_err());
        assert!(validate_channel("é").is_err());
        assert_eq!(parse_channel_list("a,b,a").unwrap(), vec!["a", "b"]);
        for bad in ["a,b/c", "a, b", "a,,b", "a,", ",a", " a", ""] {
            assert!(parse_channel_list(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_documented_channel_class_is_the_validator() {
        let class = regex::Regex::new(&format!("^{CHANNEL_CHAR_CLASS}$")).unwrap();
        for c in (0..=u32::from(char::MAX)).filter_map(char::from_u32) {
            let mut buf = [0; 4];
            assert_eq!(
                class.is_match(c.encode_utf8(&mut buf)),
                is_channel_char(c),
                "{c:?}"
            );
        }
    }

    #[test]
    fn subscription_queries() {
        let subs = parse_subscription_query(Some("channels=a,b&since.b=41&token=x"), 100).unwrap();
        assert_eq!(
            subs,
            vec![
                QuerySubscription {
                    channel: "a".into(),
                    since: None
                },
                QuerySubscription {
                    channel: "b".into(),
                    since: Some(41)
                },
            ]
        );
        for bad in [
            "channels=a&since.c=1",
            "channels=a&since.a=-1",
            "channels=a%20b",
            "channels=",
            "channels=a,",
            "channels=a&channels=",
        ] {
            assert!(parse_subscription_query(Some(bad), 100).is_err(), "{bad}");
        }
        assert!(parse_subscription_query(None, 100).unwrap().is_empty());
        assert!(
            parse_subscription_query(Some("token=x"), 100)
                .unwrap()
                .is_empty()
        );
        // The limit is on the names listed, duplicates and repeated `channels` included.
        assert_eq!(
            parse_subscription_query(Some("channels=a,b&channels=a"), 3)
                .unwrap()
                .len(),
            2
        );
        assert!(parse_subscription_query(Some("channels=a,a,a,a"), 3).is_err());
        assert!(parse_subscription_query(Some("channels=a,b&channels=c,d"), 3).is_err());
    }

    #[test]
    fn storable_json() {
        for ok in [
            r#"{"a":[1,"x",null,true,{"b":-2.5e10}]}"#,
            r#""\\u0000""#,
            r#""\ud83d\ude00""#,
            "1e131071",
            "0e1000000",
            "1e-16383",
        ] {
            assert_eq!(check_storable(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            (r#""a\u0000""#, UnstorableData::Nul),
            (r#"{"\u0000":1}"#, UnstorableData::Nul),
            (r#""\ud83d""#, UnstorableData::UnpairedSurrogate),
            (r#""\ude00\ud83d""#, UnstorableData::UnpairedSurrogate),
            (r#""\ud83dx""#, UnstorableData::UnpairedSurrogate),
            ("1e131072", UnstorableData::NumberOutOfRange),
            ("[1.0e-16383]", UnstorableData::NumberOutOfRange),
            ("0e1073741823", UnstorableData::NumberOutOfRange),
        ] {
            assert_eq!(check_storable(bad), Err(why), "{bad}");
        }
    }

    #[test]
    fn client_frames() {
        assert!(matches!(
            ClientFrame::parse(r#"{"type":"subscribe","channel":"x"}"#),
            Ok(ClientFrame::Subscribe { .. })
        ));
        match ClientFrame::parse(r#"{"type":"publish","channel":"x","data":{"a":[1,2]}}"#) {
            Ok(ClientFrame::Publish { data, .. }) => assert_eq!(data.get(), r#"{"a":[1,2]}"#),
            other => panic!("{other:?}"),
        }
        assert_eq!(ClientFrame::parse("{").unwrap_err().code(), "invalid_json");
        assert_eq!(
            ClientFrame::parse(r#"{"type":"nope"}"#).unwrap_err().code(),
            "unknown_type"
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"subscribe"}"#)
                .unwrap_err()
                .code(),
            "invalid_frame"
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"subscribe","channel":"a b"}"#)
                .unwrap_err()
                .code(),
            "invalid_channel"
        );
        // Valid JSON that is not a frame object is `invalid_frame` (docs/protocol.md).
        for not_a_frame in ["[1]", "[]", "1", "null", r#""x""#, r#"{"type":5}"#] {
            assert_eq!(
                ClientFrame::parse(not_a_frame).unwrap_err().code(),
                "invalid_frame",
                "{not_a_frame}"
            );
        }
        // ... unless it is not JSON further on.
        assert_eq!(
            ClientFrame::parse(r#"{"type":5,"#).unwrap_err().code(),
            "invalid_json"
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"publish","channel":"x","data":"\u0000"}"#)
                .unwrap_err()
                .code(),
            "invalid_frame"
        );
    }

    #[test]
    fn data_that_cannot_be_stored_as_sent_is_refused() {
        let check = |text: &str| check_data(&RawValue::from_string(text.to_owned()).unwrap());
        for ok in [
            r#""\\u0000""#,
            r#""\ud83d\ude00""#,
            r#""é\u00e9""#,
            "1e308",
            "-1.5E-308",
            "[true,false,null]",
            r#"{"e":"e999","x":1e+2}"#,
            &format!("{}1{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH)),
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for (bad, why) in [
            (r#""\u0000""#, UnstorableData::Nul.into()),
            (r#"{"k":["a\u0000"]}"#, UnstorableData::Nul.into()),
            (r#""\ud800""#, UnstorableData::UnpairedSurrogate.into()),
            (
                r#""\ud800\u0041""#,
                UnstorableData::UnpairedSurrogate.into(),
            ),
            (
                r#""\ude00\ud83d""#,
                UnstorableData::UnpairedSurrogate.into(),
            ),
            ("1e309", InvalidData::Exponent),
            ("1e100000", InvalidData::Exponent),
            ("[0.5E-100000]", UnstorableData::NumberOutOfRange.into()),
            (
                "1e99999999999999999999",
                UnstorableData::NumberOutOfRange.into(),
            ),
            (
                &format!(
                    "{}1{}",
                    "[".repeat(MAX_DEPTH + 1),
                    "]".repeat(MAX_DEPTH + 1)
                ),
                InvalidData::TooDeep,
            ),
        ] {
            assert_eq!(check(bad), Err(why), "{bad}");
        }
    }

    #[test]
    fn outside_envelopes_never_carry_offsets() {
        for payload in [
            r#"{"data":1,"id":4}"#,
            r#"{"data":1,"id":4,"origin":"someone"}"#,
            r#"{"data":1,"id":0,"origin":"relay"}"#,
            r#"{"data":1,"id":-3,"origin":"relay"}"#,
            r#"{"data":1,"id":9007199254740992,"origin":"relay"}"#,
        ] {
            let env = Envelope::parse(payload.as_bytes()).unwrap();
            assert_eq!(env.offset(), None, "{payload}");
        }
        // An id beyond i64 is not an envelope at all.
        assert!(Envelope::parse(br#"{"data":1,"id":99999999999999999999}"#).is_err());
    }

    #[test]
    fn offsets_are_range_checked() {
        assert_eq!(parse_offset("41"), Some(41));
        assert_eq!(parse_offset("9007199254740991"), Some(MAX_OFFSET));
        for bad in [
            "-1",
            "9007199254740992",
            "9223372036854775807",
            "99999999999999999999",
            "x",
            "",
        ] {
            assert_eq!(parse_offset(bad), None, "{bad}");
        }
        for since in [
            "9007199254740992",
            "9223372036854775807",
            "1e30",
            "-1",
            "1.5",
            "\"4\"",
        ] {
            let frame = format!(r#"{{"type":"subscribe","channel":"x","since":{since}}}"#);
            assert_eq!(
                ClientFrame::parse(&frame).unwrap_err().code(),
                "invalid_frame",
                "{since}"
            );
        }
        assert!(
            parse_subscription_query(Some("channels=a&since.a=9223372036854775807"), 100).is_err()
        );
    }

    #[test]
    fn envelope_round_trip_and_garbage() {
        let env =
            Envelope::parse(br#"{"data":{"k":"v"},"id":7,"origin":"relay","traceparent":"x"}"#)
                .unwrap();
        assert_eq!(env.offset(), Some(7));
        let frame = ServerFrame::message("c", env.data, env.offset());
        assert_eq!(
            &*frame.text,
            r#"{"type":"message","channel":"c","data":{"k":"v"},"id":7}"#
        );
        assert!(Envelope::parse(b"not json").is_err());
        assert!(Envelope::parse(b"{\"id\":1}").is_err());
        assert!(Envelope::parse(&[0xff, 0xfe]).is_err());
        assert!(Envelope::parse(b"[1,2]").is_err());
        let no_id = Envelope::parse(br#"{"data":null}"#).unwrap();
        assert_eq!(
            &*ServerFrame::message("c", no_id.data, None).text,
            r#"{"type":"message","channel":"c","data":null,"id":null}"#
        );
    }
}
