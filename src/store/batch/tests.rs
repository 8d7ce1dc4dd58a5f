//! [`plan`] against a model that commits the same publishes one at a time, each group on a copy
//! of the state that is kept only if the whole group was stored.

use std::collections::HashMap;

use proptest::prelude::*;

use super::*;

fn raw(s: &str) -> Box<RawValue> {
    RawValue::from_string(s.to_owned()).expect("valid JSON")
}

fn message(channel: &str, data: &str) -> NewMessage {
    NewMessage::plain(channel, &raw(data))
}

/// A store before the batch: channels (last offset, exists), creators' counts, earlier keys.
#[derive(Debug, Clone, Default)]
struct Store {
    channels: HashMap<String, (i64, bool)>,
    created: HashMap<String, u64>,
    keys: HashMap<(String, String), (i64, String)>,
}

impl Lookup for Store {
    fn channel(&self, name: &str) -> (i64, bool) {
        self.channels.get(name).copied().unwrap_or((0, false))
    }

    fn created_by(&self, creator: &str) -> u64 {
        self.created.get(creator).copied().unwrap_or(0)
    }

    fn earlier(&self, _: usize, m: &NewMessage) -> Option<Earlier> {
        let key = m.idempotency_key.as_deref()?;
        let (offset, data) = self.keys.get(&(m.channel.to_string(), key.to_owned()))?;
        Some(Earlier {
            offset: *offset,
            created_at: DateTime::<Utc>::MIN_UTC,
            same_data: same_json(&raw(data), &m.data),
        })
    }
}

/// One publish at a time, as the single-message append always behaved.
fn model_one(store: &mut Store, m: &NewMessage, rules: Rules, now: DateTime<Utc>) -> Appended {
    if let Some(key) = &m.idempotency_key
        && let Some((offset, data)) = store.keys.get(&(m.channel.to_string(), key.to_string()))
    {
        // The replay's time is not modelled (the comparison ignores it).
        return if same_json(&raw(data), &m.data) {
            Appended::Replayed {
                offset: *offset,
                created_at: now,
            }
        } else {
            Appended::KeyReused
        };
    }
    let (last, exists) = store.channel(&m.channel);
    if m.expected_last_id.is_some_and(|e| e != last) {
        return Appended::Conflict { last_offset: last };
    }
    if !exists {
        let created = store.created_by(&m.creator);
        if rules.max_channels > 0 && created >= u64::from(rules.max_channels) {
            return Appended::ChannelLimit;
        }
        *store.created.entry(m.creator.to_string()).or_default() += 1;
    }
    store
        .channels
        .insert(m.channel.to_string(), (last + 1, true));
    if let Some(key) = &m.idempotency_key {
        store.keys.insert(
            (m.channel.to_string(), key.to_string()),
            (last + 1, m.data.get().to_owned()),
        );
    }
    Appended::Stored {
        offset: last + 1,
        created_at: now,
    }
}

fn model(
    store: &Store,
    messages: &[NewMessage],
    groups: &[usize],
    rules: Rules,
    now: DateTime<Utc>,
) -> (Vec<Appended>, Store) {
    let mut store = store.clone();
    let mut outcomes = Vec::new();
    let mut start = 0;
    for &size in groups {
        let mut copy = store.clone();
        let group: Vec<Appended> = messages[start..start + size]
            .iter()
            .map(|m| model_one(&mut copy, m, rules, now))
            .collect();
        match group
            .iter()
            .position(|o| !matches!(o, Appended::Stored { .. } | Appended::Replayed { .. }))
        {
            None => {
                store = copy;
                outcomes.extend(group);
            }
            Some(failed) => outcomes.extend(group.iter().enumerate().map(|(i, o)| {
                if i == failed {
                    // The model stops at the first refusal as the plan does.
                    *o
                } else {
                    Appended::Aborted
                }
            })),
        }
        start += size;
    }
    (outcomes, store)
}

/// Apply a plan's writes to the store, as the backends do.
fn apply(store: &Store, messages: &[NewMessage], plan: &Plan) -> Store {
    let before = store;
    let mut store = store.clone();
    for write in &plan.channels {
        let before = store.channel(&write.name);
        assert_eq!(write.previous, before.1.then_some(before.0), "previous");
        if write.previous.is_none() {
            *store.created.entry(write.creator.to_string()).or_default() += 1;
        }
        store
            .channels
            .insert(write.name.to_string(), (write.last_offset, true));
    }
    let mut last: HashMap<&str, i64> = HashMap::new();
    for &(i, offset) in &plan.rows {
        let m = &messages[i];
        let previous = last
            .get(&*m.channel)
            .copied()
            .unwrap_or_else(|| before.channel(&m.channel).0);
        assert_eq!(
            offset,
            previous + 1,
            "gapless rows in offset order per channel"
        );
        last.insert(&m.channel, offset);
        if let Some(key) = &m.idempotency_key {
            store.keys.insert(
                (m.channel.to_string(), key.to_string()),
                (offset, m.data.get().to_owned()),
            );
        }
    }
    store
}

#[test]
fn offsets_follow_each_channel_and_groups_are_all_or_nothing() {
    let mut store = Store::default();
    store.channels.insert("a".into(), (5, true));
    let messages = vec![
        message("a", "1"),
        message("b", "1"),
        message("a", "2"),
        NewMessage {
            expected_last_id: Some(99),
            ..message("a", "3")
        },
        message("b", "2"),
    ];
    let now = Utc::now();
    let plan = plan(&messages, &[3, 2], &store, Rules::default(), now);
    let offsets: Vec<_> = plan
        .outcomes
        .iter()
        .map(|o| match o {
            Appended::Stored { offset, .. } => Some(*offset),
            _ => None,
        })
        .collect();
    assert_eq!(offsets, [Some(6), Some(1), Some(7), None, None]);
    assert_eq!(plan.outcomes[3], Appended::Conflict { last_offset: 7 });
    assert_eq!(plan.outcomes[4], Appended::Aborted);
    assert_eq!(plan.rows, [(0, 6), (1, 1), (2, 7)]);
    let names: Vec<_> = plan.channels.iter().map(|c| &*c.name).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(plan.channels[0].previous, Some(5));
    assert_eq!(plan.channels[1].previous, None);
}

#[test]
fn a_key_used_twice_in_one_batch_is_a_replay_or_a_reuse() {
    let keyed = |data: &str| NewMessage {
        idempotency_key: Some("k".into()),
        ..message("c", data)
    };
    let messages = vec![
        keyed(r#"{"a":1,"b":2}"#),
        keyed(r#"{"b":2, "a":1}"#),
        keyed("3"),
    ];
    let plan = plan(
        &messages,
        &[1, 1, 1],
        &Store::default(),
        Rules::default(),
        Utc::now(),
    );
    assert!(matches!(
        plan.outcomes[0],
        Appended::Stored { offset: 1, .. }
    ));
    assert!(matches!(
        plan.outcomes[1],
        Appended::Replayed { offset: 1, .. }
    ));
    assert_eq!(plan.outcomes[2], Appended::KeyReused);
    assert_eq!(plan.rows.len(), 1);
}

#[test]
fn the_quota_counts_channels_created_earlier_in_the_batch() {
    let by = |channel: &str| NewMessage {
        creator: "alice".into(),
        ..message(channel, "1")
    };
    let messages = vec![by("a"), by("a"), by("b"), by("c")];
    let rules = Rules {
        max_channels: 2,
        ..Rules::default()
    };
    let plan = plan(
        &messages,
        &[1, 1, 1, 1],
        &Store::default(),
        rules,
        Utc::now(),
    );
    assert_eq!(plan.outcomes[3], Appended::ChannelLimit);
    assert_eq!(plan.rows.len(), 3);
}

fn arb_message() -> impl Strategy<Value = NewMessage> {
    (
        0..4u8,
        0..3u8,
        0..2u8,
        prop::option::weighted(0.2, 0..6i64),
        prop::option::weighted(0.3, 0..3u8),
    )
        .prop_map(|(channel, data, creator, expected, key)| NewMessage {
            channel: format!("c{channel}").into(),
            data: raw(&data.to_string()),
            creator: format!("s{creator}").into(),
            expected_last_id: expected,
            idempotency_key: key.map(|k| format!("k{k}").into()),
        })
}

fn arb_store() -> impl Strategy<Value = Store> {
    (
        prop::collection::vec(prop::option::of(0..4i64), 4),
        0..3u64,
        prop::collection::vec(prop::option::of((0..3u8, 1..4i64)), 3),
    )
        .prop_map(|(channels, created, keys)| {
            let mut store = Store::default();
            for (i, last) in channels.into_iter().enumerate() {
                // A channel that does not exist stands at a floor of 0..4 as well.
                store
                    .channels
                    .insert(format!("c{i}"), (last.unwrap_or(0), last.is_some()));
            }
            store.created.insert("s0".into(), created);
            for (k, key) in keys.into_iter().enumerate() {
                if let Some((data, offset)) = key
                    && store.channels["c0"].1
                {
                    store
                        .keys
                        .insert(("c0".into(), format!("k{k}")), (offset, data.to_string()));
                }
            }
            store
        })
}

proptest! {
    #[test]
    fn a_batch_decides_as_one_by_one_commits_would(
        store in arb_store(),
        messages in prop::collection::vec(arb_message(), 0..24),
        cuts in prop::collection::vec(1..5usize, 24),
        max_channels in 0..4u32,
    ) {
        let mut groups = Vec::new();
        let mut left = messages.len();
        for cut in cuts {
            if left == 0 { break; }
            let size = cut.min(left);
            groups.push(size);
            left -= size;
        }
        let rules = Rules { max_channels, idempotency_window: Duration::from_secs(60) };
        let now = Utc::now();
        let plan = plan(&messages, &groups, &store, rules, now);
        let (expected, after) = model(&store, &messages, &groups, rules, now);
        // Replays of keys that existed before the batch carry their own time in both.
        let strip = |o: &Appended| match *o {
            Appended::Replayed { offset, .. } => Appended::Replayed { offset, created_at: now },
            o => o,
        };
        let got: Vec<_> = plan.outcomes.iter().map(strip).collect();
        let want: Vec<_> = expected.iter().map(strip).collect();
        prop_assert_eq!(got, want);
        let applied = apply(&store, &messages, &plan);
        prop_assert_eq!(applied.channels, after.channels);
        prop_assert_eq!(applied.created, after.created);
        let stored = plan.outcomes.iter().filter(|o| matches!(o, Appended::Stored { .. })).count();
        prop_assert_eq!(plan.rows.len(), stored);
    }
}
