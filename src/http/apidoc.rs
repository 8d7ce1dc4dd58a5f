//! The OpenAPI document: the route declarations (`#[utoipa::path]` on each handler), the
//! security schemes, and the constraints the handlers enforce.
//!
//! Constraints are not written as literals in the route attributes: [`constrain`] writes them
//! into the parameters from the same constants and settings the validators use
//! ([`crate::protocol`], `history.*`, `ws.max_subscriptions`), so the document states exactly
//! what the server accepts, and the served document follows the configuration. CI fuzzes the
//! server against it in both directions (`.ci/schemathesis.sh`): every request the document
//! allows must be accepted, every other one refused with a 4xx.

use std::borrow::Cow;

use utoipa::openapi::{
    OpenApi, RefOr, Schema,
    path::{Operation, ParameterIn},
    schema::{
        AnyOfBuilder, ArrayBuilder, KnownFormat, ObjectBuilder, Ref, SchemaFormat, SchemaType, Type,
    },
    security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
};

use crate::{
    config::Settings,
    protocol::{CHANNEL_CHAR_CLASS, MAX_CHANNEL_LEN, MAX_IDEMPOTENCY_KEY, MAX_OFFSET},
};

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "relay",
        description = "Realtime fan-out over WebSocket and SSE with durable, gapless per-channel history. \
                       The WebSocket and SSE protocols are specified in docs/protocol.md. \
                       Every error is `{\"error\":{\"code\":\"…\",\"message\":\"…\",\"request_id\":\"…\"}}`."
    ),
    tags(
        (name = "messages", description = "Publish and history"),
        (name = "realtime", description = "WebSocket and Server-Sent Events"),
        (name = "health", description = "Probes"),
        (name = "webhooks", description = "Outbound webhooks (docs/webhooks.md); tokens with the `admin` claim"),
    ),
    modifiers(&SecuritySchemes)
)]
pub(super) struct ApiDoc;

/// How a token is presented; which operations need one is in their `security`.
struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, doc: &mut OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .description(Some(
                        "`Authorization: Bearer <JWT>` (docs/security.md). Needed with \
                         `auth.mode = required`, the production setting.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "token",
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "token",
                "The bearer JWT as `?token=`, for clients that cannot set `Authorization` \
                 (browsers' WebSocket and EventSource); redacted in logs. \
                 `Authorization` wins when both are sent.",
            ))),
        );
    }
}

/// The limits the configuration gives the API; the rest are constants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiLimits {
    /// `history.max_page_size`: the largest `limit`.
    pub max_page_size: i64,
    /// `history.default_page_size`: `limit` when absent.
    pub default_page_size: i64,
    /// `ws.max_subscriptions`: the most channels one `channels` may list.
    pub max_subscriptions: usize,
    /// `publish.max_batch_messages`: the most items of one batch publish.
    pub max_batch_messages: usize,
    /// `webhooks.max_timeout` in milliseconds: the largest `timeout_ms` of a webhook.
    pub max_webhook_timeout_ms: u64,
}

impl From<&Settings> for ApiLimits {
    fn from(settings: &Settings) -> Self {
        Self {
            max_page_size: settings.history.max_page_size,
            default_page_size: settings.history.default_page_size,
            max_subscriptions: settings.ws.max_subscriptions,
            max_batch_messages: settings.publish.max_batch_messages,
            max_webhook_timeout_ms: u64::try_from(settings.webhooks.max_timeout.as_millis())
                .unwrap_or(u64::MAX),
        }
    }
}

/// Write the enforced constraints into every parameter the handlers validate, by name and
/// location (`channel`, `channels`, `since`, `limit`, `Last-Event-ID`, `Idempotency-Key`).
pub(super) fn constrain(doc: &mut OpenApi, limits: &ApiLimits) {
    constrain_batch(doc, limits);
    constrain_webhook_body(doc, limits);
    for item in doc.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.post,
            &mut item.put,
            &mut item.delete,
        ];
        for operation in operations.into_iter().flatten() {
            constrain_operation(operation, limits);
        }
    }
}

fn constrain_operation(operation: &mut Operation, limits: &ApiLimits) {
    let webhooks = operation.tags.iter().flatten().any(|t| t == "webhooks");
    for parameter in operation.parameters.iter_mut().flatten() {
        let RefOr::T(parameter) = parameter else {
            continue;
        };
        let schema = match (&parameter.parameter_in, parameter.name.as_str()) {
            (ParameterIn::Path, "id") if webhooks => webhook_id_schema(),
            (ParameterIn::Path, "delivery") if webhooks => uuid_schema(),
            // `http::webhooks::list_dead_deliveries`: 1 to 1000, not history's page size.
            (ParameterIn::Query, "limit") if webhooks => {
                int64(1, 1000).default(Some(100.into())).into()
            }
            (ParameterIn::Path, "channel") => channel_schema(),
            (ParameterIn::Query, "channels") => channel_list_schema(limits.max_subscriptions),
            (ParameterIn::Query, "since") => offset_schema(Some(0)),
            (ParameterIn::Header, "Last-Event-ID") => offset_schema(None),
            (ParameterIn::Header, "Idempotency-Key") => idempotency_key_schema(),
            (ParameterIn::Query, "limit") => int64(1, limits.max_page_size)
                .default(Some(limits.default_page_size.into()))
                .into(),
            _ => continue,
        };
        parameter.schema = Some(RefOr::T(schema));
    }
}

/// The batch body's rules (`http::batch`): 1 to `max_batch_messages` items, each with a valid
/// channel and, if any, a valid idempotency key.
fn constrain_batch(doc: &mut OpenApi, limits: &ApiLimits) {
    let Some(components) = doc.components.as_mut() else {
        return;
    };
    if let Some(RefOr::T(Schema::Object(item))) = components.schemas.get_mut("BatchItem") {
        item.properties
            .insert("channel".to_owned(), RefOr::T(channel_schema()));
        let key = ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
            .min_length(Some(1))
            .max_length(Some(MAX_IDEMPOTENCY_KEY))
            .pattern(Some(format!("^[!-~]{{1,{MAX_IDEMPOTENCY_KEY}}}$")));
        item.properties
            .insert("idempotency_key".to_owned(), RefOr::T(key.into()));
    }
    if let Some(RefOr::T(Schema::Object(request))) = components.schemas.get_mut("BatchRequest") {
        let messages = ArrayBuilder::new()
            .items(Ref::from_schema_name("BatchItem"))
            .min_items(Some(1))
            .max_items(Some(limits.max_batch_messages.max(1)))
            .description(Some(
                "1 to publish.max_batch_messages items; the body at most http.max_body_bytes",
            ));
        request
            .properties
            .insert("messages".to_owned(), RefOr::T(messages.into()));
    }
}

/// `webhooks::valid_id`.
fn webhook_id_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(crate::webhooks::MAX_ID_LEN))
        .pattern(Some(format!(
            "^[A-Za-z0-9_-]{{1,{}}}$",
            crate::webhooks::MAX_ID_LEN
        )))
        .into()
}

/// A hyphenated UUID, as `http::webhooks::retry_dead_delivery` parses it.
fn uuid_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .format(Some(SchemaFormat::Custom("uuid".to_owned())))
        .min_length(Some(36))
        .max_length(Some(36))
        .pattern(Some(WEBHOOK_UUID_PATTERN))
        .into()
}

pub const WEBHOOK_UUID_PATTERN: &str =
    "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";
/// `webhooks::WebhookSpec` checks: the URL's start and alphabet (the rest — a host, no
/// credentials, an allowed host — is refused with 400 and cannot be a schema).
pub const WEBHOOK_URL_PATTERN: &str = "^[Hh][Tt][Tt][Pp][Ss]?://[!-~]+$";
/// A webhook secret: printable ASCII.
pub const WEBHOOK_SECRET_PATTERN: &str = "^[ -~]+$";

/// A channel pattern (`auth::permissions::Pattern`): a channel name, or a prefix and one `*`.
fn channel_pattern_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_CHANNEL_LEN + 1))
        .pattern(Some(format!(
            "^({CHANNEL_CHAR_CLASS}{{1,{MAX_CHANNEL_LEN}}}|{CHANNEL_CHAR_CLASS}{{0,{MAX_CHANNEL_LEN}}}\\*)$"
        )))
        .into()
}

/// The body of `POST /api/v1/webhooks` as `http::webhooks::create_webhook` checks it.
fn constrain_webhook_body(doc: &mut OpenApi, limits: &ApiLimits) {
    use crate::webhooks::{
        MAX_ATTEMPTS, MAX_PATTERNS, MAX_SECRET_BYTES, MAX_URL_LEN, MIN_SECRET_BYTES, MIN_TIMEOUT,
    };
    let Some(components) = doc.components.as_mut() else {
        return;
    };
    let Some(RefOr::T(Schema::Object(body))) = components.schemas.get_mut("CreateWebhook") else {
        return;
    };
    let string = |min: usize, max: usize, pattern: &str| {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .min_length(Some(min))
            .max_length(Some(max))
            .pattern(Some(pattern))
    };
    body.properties.insert(
        "url".to_owned(),
        RefOr::T(string(9, MAX_URL_LEN, WEBHOOK_URL_PATTERN).into()),
    );
    body.properties.insert(
        "secret".to_owned(),
        RefOr::T(string(MIN_SECRET_BYTES, MAX_SECRET_BYTES, WEBHOOK_SECRET_PATTERN).into()),
    );
    let channels = ArrayBuilder::new()
        .items(RefOr::T(channel_pattern_schema()))
        .min_items(Some(1))
        .max_items(Some(MAX_PATTERNS));
    body.properties
        .insert("channels".to_owned(), RefOr::T(channels.into()));
    let optional_int = |min: i64, max: i64| {
        ObjectBuilder::new()
            .schema_type(SchemaType::from_iter([Type::Integer, Type::Null]))
            .minimum(Some(min))
            .maximum(Some(max))
    };
    let min_timeout = i64::try_from(MIN_TIMEOUT.as_millis()).unwrap_or(100);
    let max_timeout = i64::try_from(limits.max_webhook_timeout_ms).unwrap_or(i64::MAX);
    body.properties.insert(
        "timeout_ms".to_owned(),
        RefOr::T(optional_int(min_timeout, max_timeout).into()),
    );
    body.properties.insert(
        "max_attempts".to_owned(),
        RefOr::T(optional_int(1, i64::from(MAX_ATTEMPTS)).into()),
    );
}

/// `protocol::valid_idempotency_key`: 1 to `MAX_IDEMPOTENCY_KEY` visible ASCII characters.
fn idempotency_key_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_IDEMPOTENCY_KEY))
        .pattern(Some(format!("^[!-~]{{1,{MAX_IDEMPOTENCY_KEY}}}$")))
        .into()
}

fn number() -> ObjectBuilder {
    ObjectBuilder::new().schema_type(Type::Number)
}

fn int64(minimum: i64, maximum: i64) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(minimum))
        .maximum(Some(maximum))
}

/// A message offset as a client sends it (`since`, `Last-Event-ID`): `protocol::parse_offset`.
fn offset_schema(default: Option<i64>) -> Schema {
    int64(0, MAX_OFFSET).default(default.map(Into::into)).into()
}

/// `protocol::validate_channel`: 1 to `MAX_CHANNEL_LEN` of [`CHANNEL_CHAR_CLASS`] (ASCII, so
/// the schema's length in characters is the validator's length in bytes).
fn channel_schema() -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(MAX_CHANNEL_LEN))
        .pattern(Some(format!("^{CHANNEL_CHAR_CLASS}+$")))
        .into()
}

/// `protocol::parse_subscription_query`: 1 to `max` valid names separated by commas.
fn channel_list_schema(max: usize) -> Schema {
    let max = max.max(1);
    let name = format!("{CHANNEL_CHAR_CLASS}{{1,{MAX_CHANNEL_LEN}}}");
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(max * (MAX_CHANNEL_LEN + 1) - 1))
        .pattern(Some(format!("^{name}(,{name}){{0,{}}}$", max - 1)))
        .into()
}

/// A string without U+0000, the one character `check_storable` refuses that a pattern can say.
const NO_NUL: &str = "^[^\\x00]*$";

/// A message offset in a request body (`expected_last_id`): 0 to 2^53 − 1.
pub struct Offset;

impl utoipa::PartialSchema for Offset {
    fn schema() -> RefOr<Schema> {
        RefOr::T(offset_schema(None))
    }
}

impl utoipa::ToSchema for Offset {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Offset")
    }
}

/// The `data` of a message: any JSON value that can be stored and read back (`protocol::check_data`).
pub struct MessageData;

impl utoipa::PartialSchema for MessageData {
    fn schema() -> RefOr<Schema> {
        let this = || Ref::from_schema_name(<Self as utoipa::ToSchema>::name());
        let no_nul = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(NO_NUL))
        };
        AnyOfBuilder::new()
            .description(Some(
                "Any JSON value that Postgres `jsonb` can store and clients can read back: no \
                 U+0000 in a string or key, no unpaired UTF-16 surrogate escape, numbers with at \
                 most 131072 digits before the decimal point and 16383 after it and a written \
                 exponent within ±308, and arrays and objects nested at most 100 deep. Anything \
                 else is refused with 400.",
            ))
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::Array(vec![Type::Null, Type::Boolean])),
            )
            // Numbers whose shortest form has an exponent within ±308 (`protocol::check_data`):
            // 0, or at least 1e-308 in magnitude. Finite doubles never exceed it upwards.
            .item(number().minimum(Some(1e-308)))
            .item(number().maximum(Some(-1e-308)))
            .item(number().minimum(Some(0)).maximum(Some(0)))
            .item(no_nul())
            .item(ArrayBuilder::new().items(this()))
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .property_names(Some(no_nul()))
                    .additional_properties(Some(RefOr::Ref(this()))),
            )
            .into()
    }
}

impl utoipa::ToSchema for MessageData {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("MessageData")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_idempotency_key_is_the_validator() {
        let Schema::Object(schema) = idempotency_key_schema() else {
            panic!("an object schema");
        };
        let pattern = regex::Regex::new(schema.pattern.as_deref().unwrap()).unwrap();
        let mut keys: Vec<String> = (0u8..=255).map(|b| char::from(b).to_string()).collect();
        keys.extend(
            ["", "a b", "uuid-4f1c", &"x".repeat(255), &"x".repeat(256)].map(str::to_owned),
        );
        for key in keys {
            assert_eq!(
                pattern.is_match(&key),
                crate::protocol::valid_idempotency_key(&key),
                "{key:?}"
            );
        }
    }
}
