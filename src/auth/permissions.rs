//! Channel permissions: which channels a [`Principal`](super::Principal) may subscribe to,
//! publish on and read the history of. Plain synchronous values, so the matching rules are
//! tested directly (and with proptest) without tokens, keys or a server.
//!
//! An entry is an exact channel name (`news`) or a prefix pattern ending in one `*`
//! (`chat:*` matches `chat:` followed by anything, `*` matches every channel). Nothing else is
//! special: `*` elsewhere is refused, so a pattern can never match more than it reads.

use serde::{Deserialize, Serialize};

use crate::protocol::is_channel_char;

/// What a client wants to do with a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
    History,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Subscribe => "subscribe",
            Self::Publish => "publish",
            Self::History => "history",
        }
    }
}

/// One permission entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    /// Everything starting with this (the `*` removed).
    Prefix(String),
}

/// Why a permission entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid channel pattern `{0}`: a channel name, or a prefix of channel characters ending in `*`"
)]
pub struct InvalidPattern(pub String);

impl Pattern {
    pub fn parse(entry: &str) -> Result<Self, InvalidPattern> {
        let (body, prefix) = match entry.strip_suffix('*') {
            Some(body) => (body, true),
            None => (entry, false),
        };
        let valid = body.len() <= crate::protocol::MAX_CHANNEL_LEN
            && body.chars().all(is_channel_char)
            && (prefix || !body.is_empty());
        if !valid {
            return Err(InvalidPattern(entry.chars().take(140).collect()));
        }
        Ok(if prefix {
            Self::Prefix(body.to_owned())
        } else {
            Self::Exact(body.to_owned())
        })
    }

    pub fn matches(&self, channel: &str) -> bool {
        match self {
            Self::Exact(name) => name == channel,
            Self::Prefix(prefix) => channel.starts_with(prefix.as_str()),
        }
    }
}

/// A list of patterns; a channel is allowed when any of them matches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelSet(Vec<Pattern>);

impl ChannelSet {
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, InvalidPattern> {
        entries
            .iter()
            .map(|e| Pattern::parse(e.as_ref()))
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub fn allows(&self, channel: &str) -> bool {
        self.0.iter().any(|p| p.matches(channel))
    }
}

/// The `channels` claim as it appears in a token: lists of pattern strings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelClaims {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subscribe: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<String>,
}

/// Parsed permissions, one [`ChannelSet`] per action. The default allows nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    pub subscribe: ChannelSet,
    pub publish: ChannelSet,
    pub history: ChannelSet,
}

impl Permissions {
    pub fn from_claims(claims: &ChannelClaims) -> Result<Self, InvalidPattern> {
        Ok(Self {
            subscribe: ChannelSet::parse(&claims.subscribe)?,
            publish: ChannelSet::parse(&claims.publish)?,
            history: ChannelSet::parse(&claims.history)?,
        })
    }

    pub fn allows(&self, action: Action, channel: &str) -> bool {
        match action {
            Action::Subscribe => self.subscribe.allows(channel),
            Action::Publish => self.publish.allows(channel),
            Action::History => self.history.allows(channel),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn exact_and_prefix_entries() {
        let set = ChannelSet::parse(&["chat:*", "news"]).unwrap();
        assert!(set.allows("chat:room1"));
        assert!(set.allows("chat:"));
        assert!(set.allows("news"));
        assert!(!set.allows("news2"));
        assert!(!set.allows("chat"));
        assert!(!set.allows("xchat:room1"));
        assert!(ChannelSet::parse(&["*"]).unwrap().allows("anything"));
        assert!(!ChannelSet::default().allows("news"));
    }

    #[test]
    fn malformed_entries_are_refused() {
        for bad in [
            "",
            "a*b",
            "**",
            "*a",
            "chat:**",
            "sp ace",
            "a/b*",
            &"x".repeat(129),
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn each_action_has_its_own_list() {
        let perms = Permissions::from_claims(&ChannelClaims {
            subscribe: vec!["chat:*".into(), "news".into()],
            publish: vec!["chat:room1".into()],
            history: vec!["chat:*".into()],
        })
        .unwrap();
        assert!(perms.allows(Action::Subscribe, "news"));
        assert!(!perms.allows(Action::Publish, "news"));
        assert!(!perms.allows(Action::History, "news"));
        assert!(perms.allows(Action::Publish, "chat:room1"));
        assert!(!perms.allows(Action::Publish, "chat:room2"));
        assert!(perms.allows(Action::History, "chat:room2"));
    }

    fn channel() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_:.-]{1,24}"
    }

    proptest! {
        /// An exact entry matches its own name and nothing else.
        #[test]
        fn exact_matches_only_itself(name in channel(), other in channel()) {
            let p = Pattern::parse(&name).unwrap();
            prop_assert!(p.matches(&name));
            prop_assert_eq!(p.matches(&other), other == name);
        }

        /// `prefix*` matches exactly the channels that start with the prefix.
        #[test]
        fn prefix_matches_exactly_its_extensions(prefix in "[A-Za-z0-9_:.-]{0,12}", tail in "[A-Za-z0-9_:.-]{0,12}", other in channel()) {
            let p = Pattern::parse(&format!("{prefix}*")).unwrap();
            let extended = format!("{prefix}{tail}");
            prop_assert!(p.matches(&extended));
            prop_assert_eq!(p.matches(&other), other.starts_with(&prefix));
        }

        /// A set allows a channel iff one of its entries does; adding entries never removes access.
        #[test]
        fn set_is_the_union_of_its_entries(entries in proptest::collection::vec("[a-c:]{1,4}\\*?", 0..6), extra in "[a-c:]{1,4}\\*?", ch in "[a-c:]{1,6}") {
            let set = ChannelSet::parse(&entries).unwrap();
            let any = entries.iter().any(|e| Pattern::parse(e).unwrap().matches(&ch));
            prop_assert_eq!(set.allows(&ch), any);
            let mut more = entries.clone();
            more.push(extra);
            prop_assert!(!set.allows(&ch) || ChannelSet::parse(&more).unwrap().allows(&ch));
        }

        /// Parsing accepts exactly the entries docs/security.md describes (a channel name, or
        /// a prefix of channel characters and one trailing `*`); one bad entry anywhere in a
        /// list refuses the whole claim, so a typo never silently narrows or widens access.
        #[test]
        fn parse_accepts_exactly_the_documented_entries(
            entry in prop_oneof!["[A-Za-z0-9_:.*-]{0,6}", "[a-z]{126,130}\\*?", "\\PC{0,12}"],
            good in proptest::collection::vec(channel(), 0..3),
        ) {
            let alphabet = |c: char| c.is_ascii_alphanumeric() || "_-:.".contains(c);
            let body = entry.strip_suffix('*').unwrap_or(&entry);
            let documented = body.chars().count() <= 128
                && body.chars().all(alphabet)
                && (entry.ends_with('*') || !body.is_empty());
            prop_assert_eq!(Pattern::parse(&entry).is_ok(), documented, "{:?}", entry);
            let mut list = good.clone();
            list.insert(good.len() / 2, entry.clone());
            let claims = ChannelClaims { subscribe: good, publish: list, history: Vec::new() };
            prop_assert_eq!(Permissions::from_claims(&claims).is_ok(), documented);
        }

        /// Parsing never panics, and whatever parses only matches valid channel names it covers.
        #[test]
        fn parse_is_total(entry in "\\PC{0,40}") {
            if let Ok(Pattern::Exact(name)) = Pattern::parse(&entry) {
                prop_assert!(crate::protocol::validate_channel(&name).is_ok());
            }
        }
    }
}
