//! Property tests of the wire protocol's parsers, against hostile input: channel names (against
//! a one-line oracle of the documented rule), client frames (arbitrary text never panics and
//! every refusal carries a documented code; structurally generated near-valid frames get
//! exactly the code docs/protocol.md promises, and valid ones parse back to what was written),
//! server frames and Redis envelopes (encode, then decode, gives the same values).
//!
//! Default case counts keep these to well under a second; `PROPTEST_CASES` scales them.

use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;

/// docs/protocol.md, *Channels*, read literally: 1–128 characters of `A-Z a-z 0-9 _ - : .`.
fn documented_channel(name: &str) -> bool {
    const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-:.";
    let n = name.chars().count();
    (1..=128).contains(&n) && name.chars().all(|c| ALPHABET.contains(c))
}

/// The error codes of docs/protocol.md a frame can be refused with.
const FRAME_CODES: &[&str] = &[
    "invalid_json",
    "invalid_frame",
    "unknown_type",
    "invalid_channel",
];

fn valid_channel() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_:.-]{1,128}"
}

/// Names near the rule's edges: the alphabet at every length around the limits, plus one
/// foreign character anywhere.
fn channel_candidate() -> impl Strategy<Value = String> {
    prop_oneof![
        "[A-Za-z0-9_:.-]{0,140}",
        (valid_channel(), any::<char>(), any::<prop::sample::Index>()).prop_map(|(name, c, at)| {
            let mut chars: Vec<char> = name.chars().collect();
            chars.insert(at.index(chars.len() + 1), c);
            chars.into_iter().collect()
        }),
        any::<String>(),
        "[ -~]{0,8}",
    ]
}

/// Arbitrary JSON values (bounded depth), the kind a client puts in `data`.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Quarters print and parse back exactly (serde_json's default float parsing is not
        // exact to the last bit for every double).
        any::<i32>().prop_map(|n| Value::from(f64::from(n) / 4.0)),
        Just(Value::from(1e300)),
        "\\PC{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z]{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// One field of a generated frame: its JSON text, or absent.
type Field = Option<String>;

/// A frame built from parts, each valid or broken in a known way, so the expected outcome is
/// known by construction rather than by re-implementing the parser.
#[derive(Debug, Clone)]
struct Spec {
    ty: TypeField,
    channel: ChannelField,
    since: SinceField,
    data: DataField,
    token: Field,
    /// Fields no frame defines (ignored, docs: "Unknown fields in a frame are ignored").
    extra: Vec<(String, String)>,
    /// Order of the fields in the text.
    order: Vec<prop::sample::Index>,
}

#[derive(Debug, Clone)]
enum TypeField {
    Known(&'static str),
    Unknown(String),
    Missing,
    NotAString(String),
}

#[derive(Debug, Clone)]
enum ChannelField {
    Valid(String),
    Invalid(String),
    Missing,
    NotAString(String),
}

#[derive(Debug, Clone)]
enum SinceField {
    Absent,
    Null,
    InRange(i64),
    /// Negative, beyond 2^53 − 1, or not an integer: all `invalid_frame`.
    Bad(String),
}

#[derive(Debug, Clone)]
enum DataField {
    Missing,
    Storable(String),
    /// Valid JSON that `check_data` refuses.
    Unstorable(String),
}

const KNOWN: &[&str] = &[
    "subscribe",
    "unsubscribe",
    "publish",
    "ping",
    "auth",
    "refresh",
];

fn not_a_string() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        "null", "5", "-1", "1.5", "true", "[]", "{}", r#"["x"]"#, "1e400",
    ])
    .prop_map(str::to_owned)
}

fn spec() -> impl Strategy<Value = Spec> {
    let ty = prop_oneof![
        6 => prop::sample::select(KNOWN).prop_map(TypeField::Known),
        1 => "\\PC{0,10}"
            .prop_filter("not a known type", |t| !KNOWN.contains(&t.as_str()))
            .prop_map(TypeField::Unknown),
        1 => Just(TypeField::Missing),
        1 => not_a_string().prop_map(TypeField::NotAString),
    ];
    let channel = prop_oneof![
        4 => valid_channel().prop_map(ChannelField::Valid),
        2 => channel_candidate()
            .prop_filter("invalid", |c| !documented_channel(c))
            .prop_map(ChannelField::Invalid),
        1 => Just(ChannelField::Missing),
        1 => not_a_string().prop_map(ChannelField::NotAString),
    ];
    let since = prop_oneof![
        3 => Just(SinceField::Absent),
        1 => Just(SinceField::Null),
        2 => (0..=MAX_OFFSET).prop_map(SinceField::InRange),
        2 => prop_oneof![
            (i64::MIN..0).prop_map(|n| n.to_string()),
            (MAX_OFFSET + 1..=i64::MAX).prop_map(|n| n.to_string()),
            Just("18446744073709551616".to_owned()),
            Just("1e30".to_owned()),
            Just("1.5".to_owned()),
            Just("4.0".to_owned()),
            Just(r#""4""#.to_owned()),
            Just("[]".to_owned()),
        ]
        .prop_map(SinceField::Bad),
    ];
    let data = prop_oneof![
        1 => Just(DataField::Missing),
        4 => json_value().prop_map(|v| DataField::Storable(v.to_string())),
        1 => prop::sample::select(vec![
            r#""\u0000""#, r#"{"a":"x\u0000y"}"#, r#""\ud800""#, r#"["\udc00"]"#,
            r#""\ud800\u0041""#, "1e400", "[1E-309]", "2e+99999999999",
            r#"{"n":-0.5e1000}"#,
        ])
        .prop_map(|d| DataField::Unstorable(d.to_owned())),
    ];
    let token = prop_oneof![
        Just(None),
        "\\PC{0,40}".prop_map(|t| Some(json!(t).to_string())),
        not_a_string().prop_map(Some),
    ];
    let extra = prop::collection::vec(
        (
            "[a-z_]{1,8}".prop_filter("not a frame field", |k| {
                !["type", "channel", "since", "data", "token"].contains(&k.as_str())
            }),
            json_value().prop_map(|v| v.to_string()),
        ),
        0..3,
    )
    .prop_map(|mut fields| {
        // Duplicate keys are refused by the parser; a real client does not send them.
        fields.sort();
        fields.dedup_by(|a, b| a.0 == b.0);
        fields
    });
    let order = prop::collection::vec(any::<prop::sample::Index>(), 8);
    (ty, channel, since, data, token, extra, order).prop_map(
        |(ty, channel, since, data, token, extra, order)| Spec {
            ty,
            channel,
            since,
            data,
            token,
            extra,
            order,
        },
    )
}

impl Spec {
    fn text(&self) -> String {
        let mut fields: Vec<(String, String)> = Vec::new();
        let quoted = |s: &str| json!(s).to_string();
        match &self.ty {
            TypeField::Known(t) => fields.push(("type".into(), quoted(t))),
            TypeField::Unknown(t) => fields.push(("type".into(), quoted(t))),
            TypeField::NotAString(raw) => fields.push(("type".into(), raw.clone())),
            TypeField::Missing => {}
        }
        match &self.channel {
            ChannelField::Valid(c) | ChannelField::Invalid(c) => {
                fields.push(("channel".into(), quoted(c)))
            }
            ChannelField::NotAString(raw) => fields.push(("channel".into(), raw.clone())),
            ChannelField::Missing => {}
        }
        match &self.since {
            SinceField::Absent => {}
            SinceField::Null => fields.push(("since".into(), "null".into())),
            SinceField::InRange(n) => fields.push(("since".into(), n.to_string())),
            SinceField::Bad(raw) => fields.push(("since".into(), raw.clone())),
        }
        match &self.data {
            DataField::Missing => {}
            DataField::Storable(raw) | DataField::Unstorable(raw) => {
                fields.push(("data".into(), raw.clone()))
            }
        }
        if let Some(raw) = &self.token {
            fields.push(("token".into(), raw.clone()));
        }
        fields.extend(self.extra.iter().cloned());
        for (i, at) in self.order.iter().enumerate().take(fields.len()) {
            let j = at.index(fields.len());
            fields.swap(i, j);
        }
        let body: Vec<String> = fields
            .iter()
            .map(|(k, v)| format!("{}:{v}", quoted(k)))
            .collect();
        format!("{{{}}}", body.join(","))
    }

    /// The outcome docs/protocol.md promises: Ok, or the error code.
    fn expected(&self) -> Result<(), &'static str> {
        let ty = match &self.ty {
            TypeField::Known(t) => *t,
            TypeField::Unknown(_) => return Err("unknown_type"),
            // `"type": null` reads as a missing type.
            TypeField::Missing | TypeField::NotAString(_) => return Err("invalid_frame"),
        };
        let channel = || match &self.channel {
            ChannelField::Valid(_) => Ok(()),
            ChannelField::Invalid(_) => Err("invalid_channel"),
            ChannelField::Missing | ChannelField::NotAString(_) => Err("invalid_frame"),
        };
        // A field of the wrong type is found while reading the frame, before any rule is
        // checked on the values.
        let shape = |present: bool| {
            if present {
                Ok(())
            } else {
                Err("invalid_frame")
            }
        };
        let channel_is_string = matches!(
            self.channel,
            ChannelField::Valid(_) | ChannelField::Invalid(_)
        );
        match ty {
            "subscribe" => {
                let since_is_int = !matches!(&self.since, SinceField::Bad(raw)
                    if raw.parse::<i64>().is_err());
                shape(channel_is_string && since_is_int)?;
                channel()?;
                match self.since {
                    SinceField::Bad(_) => Err("invalid_frame"),
                    _ => Ok(()),
                }
            }
            "unsubscribe" => channel(),
            "publish" => {
                shape(channel_is_string && !matches!(self.data, DataField::Missing))?;
                channel()?;
                match self.data {
                    DataField::Unstorable(_) => Err("invalid_frame"),
                    _ => Ok(()),
                }
            }
            "ping" => Ok(()),
            _ => {
                let token_is_string = self.token.as_deref().is_some_and(|t| t.starts_with('"'));
                shape(token_is_string)
            }
        }
    }
}

/// 100,000 levels (more than a WebSocket message may hold) in every position: no stack overflow.
#[test]
fn very_deep_nesting_costs_no_stack() {
    let n = 100_000;
    let nest = format!("{}{}", "[".repeat(n), "]".repeat(n));
    for text in [
        nest.clone(),
        format!(r#"{{"type":"publish","channel":"x","data":{nest}}}"#),
        format!(r#"{{"type":"ping","x":{nest}}}"#),
        format!(r#"{{"type":{nest}}}"#),
        "{\"a\":".repeat(n),
    ] {
        let _ = ClientFrame::parse(&text);
    }
    assert!(Envelope::parse(format!(r#"{{"data":{nest}}}"#).as_bytes()).is_ok());
}

proptest! {
    /// The validator accepts exactly the documented names.
    #[test]
    fn channel_validator_is_the_documented_rule(name in channel_candidate()) {
        prop_assert_eq!(validate_channel(&name).is_ok(), documented_channel(&name), "{:?}", name);
    }

    /// Every name the grammar generates is accepted, as itself.
    #[test]
    fn generated_channel_names_are_accepted(name in valid_channel()) {
        prop_assert_eq!(validate_channel(&name), Ok(name.as_str()));
    }

    /// Channel lists and subscription queries never panic, and keep only valid names.
    #[test]
    fn channel_lists_and_queries_are_total(list in "[A-Za-z0-9_:., %&=+-]{0,80}", query in any::<String>()) {
        if let Ok(names) = parse_channel_list(&list) {
            prop_assert!(names.iter().all(|n| documented_channel(n)));
        }
        for q in [&list, &query] {
            if let Ok(subs) = parse_subscription_query(Some(q), 100) {
                prop_assert!(subs.len() <= 100);
                for sub in subs {
                    prop_assert!(documented_channel(&sub.channel));
                    prop_assert!(sub.since.is_none_or(|s| (0..=MAX_OFFSET).contains(&s)));
                }
            }
        }
    }

    /// Arbitrary text (any characters, JSON-ish soup, lossily decoded bytes) never panics; a
    /// refusal carries a documented code, and the code is right about what the text is.
    #[test]
    fn arbitrary_text_never_panics(
        text in prop_oneof![
            any::<String>(),
            "[{}\\[\\]\":,0-9a-z\\\\ .eE+-]{0,64}",
            prop::collection::vec(any::<u8>(), 0..64)
                .prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
        ]
    ) {
        match ClientFrame::parse(&text) {
            Ok(_) => prop_assert!(text.trim_start().starts_with('{'), "{:?}", text),
            Err(err) => {
                let code = err.code();
                prop_assert!(FRAME_CODES.contains(&code), "{}", code);
                let is_json = serde_json::from_str::<serde::de::IgnoredAny>(&text).is_ok();
                prop_assert_eq!(code == "invalid_json", !is_json, "{:?}: {}", text, err);
            }
        }
    }

    /// Deep nesting costs no stack: unclosed it is not JSON; closed, the frame parses (serde
    /// skips unknown fields and reads `data` without recursion) and `data` nested deeper than
    /// the documented limit is refused.
    #[test]
    fn deep_nesting_is_refused(depth in 1usize..1_000, array in any::<bool>(), closed in any::<bool>()) {
        let (open, close) = if array { ("[", "]") } else { (r#"{"a":"#, "}") };
        let mut data = open.repeat(depth);
        if closed {
            data.push('1');
            data.push_str(&close.repeat(depth));
        }
        let text = format!(r#"{{"type":"publish","channel":"x","data":{data}}}"#);
        let got = ClientFrame::parse(&text).map(|_| ()).map_err(|e| e.code());
        let expected = match (closed, depth <= MAX_DEPTH) {
            (false, _) => Err("invalid_json"),
            (true, true) => Ok(()),
            (true, false) => Err("invalid_frame"),
        };
        prop_assert_eq!(got, expected);
        // A top-level nest is not an object.
        let nest = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        prop_assert_eq!(ClientFrame::parse(&nest).unwrap_err().code(), "invalid_frame");
    }

    /// Near-valid frames get exactly the documented outcome; valid ones parse back to the
    /// values they were written with.
    #[test]
    fn near_valid_frames_get_the_documented_answer(spec in spec()) {
        let text = spec.text();
        let parsed = ClientFrame::parse(&text);
        let got = parsed.as_ref().map(|_| ()).map_err(FrameError::code);
        prop_assert_eq!(got, spec.expected(), "{} -> {:?}", text, parsed);
        let Ok(frame) = parsed else { return Ok(()) };
        let ChannelField::Valid(channel) = &spec.channel else {
            // Only frames without a channel parse with any other channel field.
            let channelless = matches!(
                frame,
                ClientFrame::Ping | ClientFrame::Auth { .. } | ClientFrame::Refresh { .. }
            );
            prop_assert!(channelless, "{:?}", frame);
            return Ok(());
        };
        match frame {
            ClientFrame::Subscribe { channel: c, since } => {
                prop_assert_eq!(&*c, channel.as_str());
                let written = match spec.since {
                    SinceField::InRange(n) => Some(n),
                    _ => None,
                };
                prop_assert_eq!(since, written);
            }
            ClientFrame::Unsubscribe { channel: c } => prop_assert_eq!(&*c, channel.as_str()),
            ClientFrame::Publish { channel: c, data, .. } => {
                prop_assert_eq!(&*c, channel.as_str());
                let DataField::Storable(raw) = &spec.data else { unreachable!() };
                prop_assert_eq!(data.get(), raw.as_str());
            }
            ClientFrame::Ping => prop_assert!(matches!(spec.ty, TypeField::Known("ping"))),
            ClientFrame::Auth { token } | ClientFrame::Refresh { token } => {
                let written: String = serde_json::from_str(spec.token.as_deref().unwrap()).unwrap();
                prop_assert_eq!(&*token, written.as_str());
            }
        }
    }

    /// What `check_data` accepts is what a JSON value with no NUL, whole surrogate pairs and
    /// double-range numbers serialises to; it never panics on any valid JSON.
    #[test]
    fn data_check_accepts_ordinary_json(value in json_value(), odd in "\\PC{0,6}") {
        let text = value.to_string();
        let raw = RawValue::from_string(text.clone()).unwrap();
        prop_assert_eq!(check_data(&raw), Ok(()), "{}", text);
        // Non-BMP characters escaped as surrogate pairs are whole pairs.
        let escaped: String = odd.encode_utf16().map(|u| format!("\\u{u:04x}")).collect();
        let raw = RawValue::from_string(format!("\"{escaped}\"")).unwrap();
        let has_nul = odd.contains('\0');
        prop_assert_eq!(check_data(&raw).is_err(), has_nul);
    }

    /// Server frames are valid JSON carrying exactly their values, whatever the strings.
    #[test]
    fn server_frames_round_trip(
        channel in valid_channel(),
        data in json_value(),
        id in proptest::option::of(1..=MAX_OFFSET),
        code in "\\PC{0,16}",
        message in any::<String>(),
        (from, to) in (1..=MAX_OFFSET).prop_flat_map(|f| (Just(f), f..=MAX_OFFSET)),
    ) {
        let raw = RawValue::from_string(data.to_string()).unwrap();
        let parse = |f: ServerFrame| serde_json::from_str::<Value>(&f.text).unwrap();
        prop_assert_eq!(
            parse(ServerFrame::message(&channel, &raw, id)),
            json!({"type": "message", "channel": channel, "data": data, "id": id})
        );
        prop_assert_eq!(
            parse(ServerFrame::error(&code, &message)),
            json!({"type": "error", "code": code, "message": message})
        );
        prop_assert_eq!(
            parse(ServerFrame::gap(&channel, from, to)),
            json!({"type": "gap", "channel": channel, "from": from, "to": to})
        );
        prop_assert_eq!(
            parse(ServerFrame::subscribed_recovering(&channel, to, false, from)),
            json!({"type": "subscribed", "channel": channel, "last_id": to, "recovered": false, "oldest_id": from})
        );
    }

    /// A Redis envelope relay writes is read back as the same envelope; arbitrary payloads
    /// never panic, and whatever parses has an offset only if it is relay's own and in range.
    #[test]
    fn envelopes_round_trip_and_garbage_is_skipped(
        data in json_value(),
        id in proptest::option::of(any::<i64>()),
        origin in proptest::option::of(prop_oneof![Just("relay".to_owned()), "\\PC{0,8}"]),
        ts in proptest::option::of(any::<i64>()),
        payload in prop::collection::vec(any::<u8>(), 0..48),
    ) {
        let raw = RawValue::from_string(data.to_string()).unwrap();
        let env = Envelope { data: &raw, id, origin: origin.clone().map(Cow::Owned), traceparent: None, ts, replica: None };
        let text = env.encode();
        let back = Envelope::parse(text.as_bytes()).unwrap();
        prop_assert_eq!(back.data.get(), raw.get());
        prop_assert_eq!((back.id, back.origin.as_deref(), back.ts), (id, origin.as_deref(), ts));
        let own = origin.as_deref() == Some(RELAY_ORIGIN);
        prop_assert_eq!(back.offset(), id.filter(|i| own && (1..=MAX_OFFSET).contains(i)));

        if let Ok(env) = Envelope::parse(&payload) {
            prop_assert!(env.offset().is_none_or(|o| (1..=MAX_OFFSET).contains(&o)));
        }
    }
}
