//! Which webhooks a channel's message goes to: every webhook with a pattern matching the
//! channel, each once. Pure and synchronous, so both stores (Postgres inside the publish
//! transaction, memory under its lock) decide with the same code, and it is tested directly.
//!
//! Patterns are the token permissions' ([`Pattern`]): an exact channel name, or a prefix ending
//! in one `*`. Exact names are found in a map; prefixes are few in practice and checked in turn.

use std::collections::HashMap;

use crate::auth::permissions::Pattern;

/// The webhooks of a store, indexed for matching.
#[derive(Debug, Default, Clone)]
pub struct Matcher {
    ids: Vec<Box<str>>,
    exact: HashMap<String, Vec<usize>>,
    prefixes: Vec<(String, usize)>,
}

impl Matcher {
    /// Index `webhooks`: (id, its patterns).
    pub fn new<'a, I, P>(webhooks: I) -> Self
    where
        I: IntoIterator<Item = (&'a str, P)>,
        P: IntoIterator<Item = &'a Pattern>,
    {
        let mut matcher = Self::default();
        for (id, patterns) in webhooks {
            let index = matcher.ids.len();
            matcher.ids.push(id.into());
            for pattern in patterns {
                match pattern {
                    Pattern::Exact(name) => {
                        matcher.exact.entry(name.clone()).or_default().push(index)
                    }
                    Pattern::Prefix(prefix) => matcher.prefixes.push((prefix.clone(), index)),
                }
            }
        }
        matcher
    }

    /// Whether no webhook exists (the publish path then skips the outbox entirely).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// The ids of the webhooks `channel` goes to, each once, in the order they were given.
    pub fn matching(&self, channel: &str) -> Vec<&str> {
        let mut hits: Vec<usize> = self.exact.get(channel).cloned().unwrap_or_default();
        hits.extend(
            self.prefixes
                .iter()
                .filter(|(prefix, _)| channel.starts_with(prefix.as_str()))
                .map(|&(_, i)| i),
        );
        // A webhook with overlapping patterns (`orders:*` and `orders:1`) gets one delivery.
        hits.sort_unstable();
        hits.dedup();
        hits.into_iter().map(|i| &*self.ids[i]).collect()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn patterns(entries: &[&str]) -> Vec<Pattern> {
        entries.iter().map(|e| Pattern::parse(e).unwrap()).collect()
    }

    #[test]
    fn exact_prefix_and_overlap() {
        let a = patterns(&["orders:*", "news"]);
        let b = patterns(&["orders:1", "orders:*"]);
        let c = patterns(&["*"]);
        let m = Matcher::new([("a", &a), ("b", &b), ("c", &c)]);
        assert_eq!(m.matching("orders:1"), ["a", "b", "c"]);
        assert_eq!(m.matching("orders:2"), ["a", "b", "c"]);
        assert_eq!(m.matching("news"), ["a", "c"]);
        assert_eq!(m.matching("news2"), ["c"]);
        assert_eq!(m.len(), 3);
        let empty = Matcher::default();
        assert!(empty.is_empty());
        assert!(empty.matching("news").is_empty());
    }

    proptest! {
        /// A channel goes to exactly the webhooks one of whose patterns matches it, each once,
        /// in their given order: the same answer as checking every pattern in turn.
        #[test]
        fn matching_is_the_union_of_patterns(
            hooks in proptest::collection::vec(
                proptest::collection::vec("[ab:]{0,3}\\*?", 0..4), 0..6),
            channel in "[ab:]{1,5}",
        ) {
            let parsed: Vec<(String, Vec<Pattern>)> = hooks
                .iter()
                .enumerate()
                .map(|(i, entries)| {
                    let ps = entries.iter().filter_map(|e| Pattern::parse(e).ok()).collect();
                    (format!("w{i}"), ps)
                })
                .collect();
            let m = Matcher::new(parsed.iter().map(|(id, ps)| (id.as_str(), ps)));
            let expected: Vec<&str> = parsed
                .iter()
                .filter(|(_, ps)| ps.iter().any(|p| p.matches(&channel)))
                .map(|(id, _)| id.as_str())
                .collect();
            prop_assert_eq!(m.matching(&channel), expected);
        }
    }
}
