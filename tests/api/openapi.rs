//! The OpenAPI document matches the routes the service serves, and the committed copy.

use serde_json::Value;

use crate::helpers::spawn_app;

#[tokio::test]
async fn the_served_document_matches_the_code_the_routes_and_the_committed_copy() {
    let app = spawn_app().await;
    let served: Value = app
        .get("/api-docs/openapi.json")
        .await
        .json()
        .await
        .unwrap();
    let generated = serde_json::to_value(relay::http::openapi()).unwrap();
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
