//! The OpenAPI document matches the routes the service serves, the committed copy, and the
//! constraints the server enforces (`.ci/schemathesis.sh` fuzzes the server against it).

use relay::http::apidoc::ApiLimits;
use serde_json::Value;

use crate::helpers::{spawn_app, spawn_app_with};

#[tokio::test]
async fn the_served_document_matches_the_code_the_routes_and_the_committed_copy() {
    let app = spawn_app().await;
    let served: Value = app
        .get("/api-docs/openapi.json")
        .await
        .json()
        .await
        .unwrap();
    let generated =
        serde_json::to_value(relay::http::openapi(&ApiLimits::from(&app.settings))).unwrap();
    assert_eq!(served, generated);

    let committed: Value = serde_json::from_str(include_str!("../../docs/openapi.json")).unwrap();
    assert_eq!(
        committed, generated,
        "docs/openapi.json is stale: run `cargo run -q -- openapi > docs/openapi.json`"
    );

    // Every documented operation is routed (a missing route would answer 404 or 405).
    let paths = served["paths"].as_object().expect("paths");
    assert!(paths.contains_key("/api/v1/channels/{channel}/messages"));
    for (path, item) in paths {
        let concrete = path.replace("{channel}", "openapi-check");
        for method in item.as_object().unwrap().keys() {
            let method: reqwest::Method = method.to_uppercase().parse().unwrap();
            let res = app
                .http
                .request(method.clone(), app.url(&concrete))
                .json(&serde_json::json!({"data": 1}))
                .send()
                .await
                .unwrap();
            assert!(
                res.status() != 404 && res.status() != 405,
                "{method} {path} is documented but answers {}",
                res.status()
            );
        }
    }
}

fn operations(doc: &Value) -> impl Iterator<Item = (String, &Value)> {
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .unwrap()
                .iter()
                .map(move |(method, op)| (format!("{} {path}", method.to_uppercase()), op))
        })
}

fn parameter<'a>(doc: &'a Value, operation: &str, name: &str) -> &'a Value {
    let (_, op) = operations(doc)
        .find(|(label, _)| label == operation)
        .unwrap_or_else(|| panic!("no {operation}"));
    op["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .map(|p| &p["schema"])
        .unwrap_or_else(|| panic!("{operation} has no parameter {name}"))
}

/// A JSON-schema string constraint, applied as a validator would (length in characters).
fn admits(schema: &Value, value: &str) -> bool {
    let pattern = regex::Regex::new(schema["pattern"].as_str().unwrap()).unwrap();
    let len = value.chars().count() as u64;
    pattern.is_match(value)
        && len >= schema["minLength"].as_u64().unwrap()
        && len <= schema["maxLength"].as_u64().unwrap()
}

#[test]
fn the_documented_constraints_are_the_validators() {
    let limits = ApiLimits {
        max_page_size: 1000,
        default_page_size: 100,
        max_subscriptions: 3,
        max_batch_messages: 7,
        max_webhook_timeout_ms: 30_000,
    };
    let doc = serde_json::to_value(relay::http::openapi(&limits)).unwrap();

    let channel = parameter(&doc, "POST /api/v1/channels/{channel}/messages", "channel");
    let long = "x".repeat(128);
    let too_long = "x".repeat(129);
    for name in [
        "a",
        "room-1:a_b.c",
        &long,
        &too_long,
        "",
        "a b",
        "a/b",
        "é",
        "a\n",
        "\na",
        "a,b",
        "%41",
    ] {
        assert_eq!(
            admits(channel, name),
            relay::protocol::validate_channel(name).is_ok(),
            "{name:?}"
        );
    }

    // The batch body states the same rules per item, and the configured item bound.
    let schemas = &doc["components"]["schemas"];
    assert_eq!(&schemas["BatchItem"]["properties"]["channel"], channel);
    let messages = &schemas["BatchRequest"]["properties"]["messages"];
    assert_eq!(
        (&messages["minItems"], &messages["maxItems"]),
        (&serde_json::json!(1), &serde_json::json!(7))
    );

    for operation in ["GET /ws", "GET /sse"] {
        let channels = parameter(&doc, operation, "channels");
        for list in [
            "a", "a,b", "a,b,c", "a,a,a", "a,b,c,d", "", "a,", ",a", "a,,b", "a, b", "a b", "a\n",
            &long, &too_long,
        ] {
            let query = url::form_urlencoded::Serializer::new(String::new())
                .append_pair("channels", list)
                .finish();
            assert_eq!(
                admits(channels, list),
                relay::protocol::parse_subscription_query(Some(&query), 3).is_ok(),
                "{operation} channels={list:?}"
            );
        }
    }

    let offset_max = serde_json::json!(relay::protocol::MAX_OFFSET);
    let since = parameter(&doc, "GET /api/v1/channels/{channel}/messages", "since");
    assert_eq!(
        (&since["minimum"], &since["maximum"]),
        (&0.into(), &offset_max)
    );
    let last_event_id = parameter(&doc, "GET /sse", "Last-Event-ID");
    assert_eq!(
        (&last_event_id["minimum"], &last_event_id["maximum"]),
        (&0.into(), &offset_max)
    );
    let limit = parameter(&doc, "GET /api/v1/channels/{channel}/messages", "limit");
    assert_eq!(
        (&limit["minimum"], &limit["maximum"], &limit["default"]),
        (&1.into(), &1000.into(), &100.into())
    );

    // Every error is documented in the one shape, and every operation that can refuse a token
    // says which schemes it takes.
    for (label, op) in operations(&doc) {
        for (status, response) in op["responses"].as_object().unwrap() {
            if status.starts_with('4') || status.starts_with('5') {
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                let is_readyz = label == "GET /readyz";
                assert!(
                    is_readyz || schema == "#/components/schemas/ErrorBody",
                    "{label} {status}: {response}"
                );
            }
        }
        if op["responses"].get("401").is_some() {
            assert!(op["security"].is_array(), "{label} has no security");
        }
    }
}

/// The served document states the limits this server was configured with.
#[tokio::test]
async fn the_served_document_follows_the_configuration() {
    let app = spawn_app_with(|s| {
        s.history.max_page_size = 50;
        s.history.default_page_size = 20;
        s.ws.max_subscriptions = 2;
    })
    .await;
    let served: Value = app
        .get("/api-docs/openapi.json")
        .await
        .json()
        .await
        .unwrap();
    let limit = parameter(&served, "GET /api/v1/channels/{channel}/messages", "limit");
    assert_eq!(
        (&limit["maximum"], &limit["default"]),
        (&50.into(), &20.into())
    );
    let channels = parameter(&served, "GET /sse", "channels");
    assert!(admits(channels, "a,b"));
    assert!(!admits(channels, "a,b,c"));
    assert_eq!(
        app.get("/api/v1/channels/x/messages?limit=51")
            .await
            .status(),
        400
    );
    assert_eq!(app.get("/sse?channels=a,b,c").await.status(), 400);
}

/// The webhook body's and paths' constraints are the validators: the channel-pattern schema
/// admits exactly what `Pattern::parse` accepts, the secret schema what `WebhookSpec` accepts,
/// the id schema what `webhooks::valid_id` accepts.
#[test]
fn the_documented_webhook_constraints_are_the_validators() {
    use relay::{auth::permissions::Pattern, webhooks};
    let limits = ApiLimits {
        max_page_size: 1000,
        default_page_size: 100,
        max_subscriptions: 3,
        max_batch_messages: 7,
        max_webhook_timeout_ms: 30_000,
    };
    let doc = serde_json::to_value(relay::http::openapi(&limits)).unwrap();
    let body = &doc["components"]["schemas"]["CreateWebhook"]["properties"];
    let pattern = &body["channels"]["items"];
    for entry in [
        "a",
        "orders:*",
        "*",
        "a*b",
        "**",
        "*a",
        "sp ace",
        "",
        "x.y-z_1:",
        &"x".repeat(128),
        &"x".repeat(129),
        &format!("{}*", "x".repeat(128)),
        &format!("{}*", "x".repeat(129)),
    ] {
        assert_eq!(
            admits(pattern, entry),
            Pattern::parse(entry).is_ok(),
            "{entry:?}"
        );
    }
    assert_eq!(body["channels"]["maxItems"], webhooks::MAX_PATTERNS);
    assert_eq!(body["timeout_ms"]["maximum"], 30_000);
    let secret = &body["secret"];
    for s in [
        "0123456789abcdef",
        "short",
        "0123456789abcde\n",
        "0123456789abcdeé",
        &"x".repeat(256),
        &"x".repeat(257),
    ] {
        let valid = (16..=256).contains(&s.len()) && s.bytes().all(|b| (b' '..=b'~').contains(&b));
        assert_eq!(admits(secret, s), valid, "{s:?}");
    }
    let id = parameter(&doc, "GET /api/v1/webhooks/{id}", "id");
    for s in [
        "wh_0af",
        "billing-1",
        "",
        "a b",
        "a/b",
        &"x".repeat(64),
        &"x".repeat(65),
    ] {
        assert_eq!(admits(id, s), webhooks::valid_id(s), "{s:?}");
    }
    let url = &body["url"];
    for (s, ok) in [
        ("https://h.example/x", true),
        ("HTTP://h/", true),
        (" http://h/", false),
        ("ftp://h/", false),
        ("http://a b/", false),
    ] {
        assert_eq!(admits(url, s), ok, "{s:?}");
    }
}
