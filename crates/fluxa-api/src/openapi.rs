//! `GET /v1/openapi.json`: the OpenAPI 3.1 document of the whole API (contract section 7).
//!
//! Each handler describes itself with `#[utoipa::path]` (its path, method, body, success and
//! handler-made errors) and each response type with `ToSchema`; [`ApiDoc`] lists the handlers.
//! What the shared layers do to *every* route (correlation id, bearer auth, load shedding, body
//! limits and timeouts) is added here by [`document_layers`], in one place, the way the layers
//! themselves wrap every route. The tests at the bottom read the `.route(…)` calls in this
//! crate's source, so a route served but not documented (or documented but not served) fails
//! `cargo test`, and so does an operation whose documented scope is not its router's.
//! (utoipa-axum's `OpenApiRouter` would make one registration serve both, but only by
//! rebuilding every resource's `router()` and `app()`'s layering around it; the test gives the
//! same guarantee without that.)
//!
//! The document is served without authentication, like `/healthz`: it describes the public
//! contract, holds no data, and a client or a tester needs it before it has a token (contract
//! section 5 scopes `GET /v1/events…` and `/v1/admin/…`, and this path is neither).

use std::sync::LazyLock;

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use serde_json::{json, Map, Value};
use utoipa::OpenApi;

use crate::error::ApiErrorCode;

/// The name of the bearer security scheme operations refer to.
const BEARER: &str = "bearer";

pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new().route("/v1/openapi.json", get(serve_document))
}

/// The OpenAPI 3.1 document of this API.
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "operations",
    operation_id = "openapi_document",
    responses(
        (status = 200, description = "This document.", content_type = "application/json",
            body = Object),
    ),
)]
async fn serve_document() -> Response {
    // Built once: the document depends only on the code.
    static DOCUMENT: LazyLock<Bytes> = LazyLock::new(|| {
        Bytes::from(serde_json::to_vec(&document()).expect("a JSON value always serializes"))
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.clone(),
    )
        .into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Fluxa",
        version = "1",
        description = "Fluxa's HTTP API: ingest events, read them back, operate the dead-letter \
            queue. Every error answer has the body `{\"error\": {\"code\", \"message\", \
            \"correlation_id\"}}`; a method a path does not support gets 405 \
            `method_not_allowed` and a path that does not exist 404 `not_found`, with that \
            body. Every response carries `X-Correlation-ID`. Bearer tokens with scopes \
            (`ingest`, `read`, `admin`) are required when the server has tokens configured; \
            a server without tokens (loopback only) ignores them.",
    ),
    paths(
        crate::ingest::ingest_one,
        crate::ingest::ingest_batch,
        crate::query::list_events,
        crate::query::get_event,
        crate::query::get_status,
        crate::admin::list,
        crate::admin::show,
        crate::admin::redrive,
        crate::admin::get_idempotency,
        crate::admin::evict_idempotency,
        crate::admin::erase_event,
        crate::ops::healthz,
        crate::ops::readyz,
        crate::ops::metrics_text,
        serve_document,
    ),
    // Named here because only parameters use some of them, and utoipa collects the schemas
    // of bodies alone.
    components(schemas(
        crate::error::ErrorBody,
        crate::schemas::CorrelationId,
        crate::schemas::EventType,
        crate::schemas::Source,
        crate::schemas::Cursor,
        crate::schemas::ProcessingErrorCode,
        crate::schemas::ErrorClass,
    )),
    tags(
        (name = "ingest", description = "Send events (scope `ingest`)."),
        (name = "query", description = "Read stored events and their status (scope `read`)."),
        (name = "admin", description = "Operate the dead-letter queue, idempotency records \
            and erasure (scope `admin`)."),
        (name = "operations", description = "Liveness, readiness, metrics and this document \
            (no token needed)."),
    ),
)]
struct ApiDoc;

/// The whole document: what the handlers and types say, then what the layers add.
pub(crate) fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the document serializes");
    document_layers(&mut doc);
    doc
}

/// Adds to every operation what the layers around the handlers do, and the keywords utoipa
/// cannot express (a header's `required`, `not`, a `oneOf` rule beside properties, a bare
/// schema in `anyOf`).
fn document_layers(doc: &mut Value) {
    doc["components"]["securitySchemes"] = json!({
        BEARER: {
            "type": "http",
            "scheme": "bearer",
            "description": "An API token configured with `--api-tokens` (`SCOPES=TOKEN`). \
                The scopes an operation needs are listed in its security requirement: \
                `ingest`, `read` or `admin`. Missing or unknown token: 401; a token without \
                the scope: 403.",
        }
    });
    let paths = doc["paths"]
        .as_object_mut()
        .expect("the document has paths");
    for path_item in paths.values_mut() {
        let path_item = path_item.as_object_mut().expect("a path item is an object");
        for (method, operation) in path_item.iter_mut() {
            if is_method(method) {
                document_operation_layers(operation);
            }
        }
    }
    // JSON Schema's `pattern` cannot say "not `.` or `..`" without a look-around, which not
    // every tester's regex engine has, and utoipa 5 has no `not` keyword.
    doc["components"]["schemas"]["EventId"]["not"] = json!({"enum": [".", ".."]});
    // A batch item may be any JSON value (each gets its own result, contract section 1b);
    // naming the event schema as the first choice still tells readers, client generators and
    // testers what an item is meant to be. utoipa cannot write `anyOf` with a bare schema.
    doc["components"]["schemas"]["BatchIn"]["properties"]["events"]["items"] = json!({
        "anyOf": [
            {"$ref": "#/components/schemas/EventIn"},
            {"description": "Any other JSON value, which gets its own 400 result."},
        ]
    });
    // The redrive handler takes a struct of optional members and goes ahead only when exactly
    // one selector is set; `oneOf` over "this selector is set" is that rule, so another
    // member may still be present as `null` (or `all` as `false`), as the server allows.
    doc["components"]["schemas"]["RedriveIn"]["oneOf"] = json!([
        {"required": ["all"], "properties": {"all": {"const": true}}},
        {"required": ["event_id"], "properties": {"event_id": {"not": {"type": "null"}}}},
        {"required": ["id"], "properties": {"id": {"not": {"type": "null"}}}},
        {"required": ["filter"], "properties": {"filter": {"not": {"type": "null"}}}},
    ]);
}

fn is_method(key: &str) -> bool {
    matches!(
        key,
        "get" | "put" | "post" | "delete" | "options" | "head" | "patch" | "trace"
    )
}

fn document_operation_layers(operation: &mut Value) {
    let secured = operation["security"]
        .as_array()
        .is_some_and(|requirements| !requirements.is_empty());
    let takes_body = operation.get("requestBody").is_some();

    let parameters = operation
        .as_object_mut()
        .expect("an operation is an object")
        .entry("parameters")
        .or_insert_with(|| json!([]));
    parameters
        .as_array_mut()
        .expect("parameters are an array")
        .push(json!({
            "name": "X-Correlation-ID",
            "in": "header",
            "required": false,
            "description": "Ties this request's logs, queue message and stored event together. \
                Absent: a UUIDv4 is generated. Present but invalid (empty included): 400, and \
                the error body carries a freshly generated id.",
            "schema": correlation_id_ref(),
        }));

    let responses = operation["responses"]
        .as_object_mut()
        .expect("an operation has responses");
    // The correlation middleware wraps every route.
    add_error_response(
        responses,
        "400",
        "Bad request: an invalid X-Correlation-ID header, or an invalid parameter or body.",
    );
    add_error_response(
        responses,
        "500",
        "An unexpected failure (a generic message; the cause is logged).",
    );
    if secured {
        // `app()` puts exactly the routers that require a scope (ingest, query, admin) behind
        // the concurrency limit and the body guards; the operations routes stay outside them.
        add_error_response(
            responses,
            "503",
            "Unavailable: the server is at its concurrency or body-memory limit, or a backend \
             it needs is down. Retry after `Retry-After` seconds.",
        );
        add_error_response(
            responses,
            "401",
            "No bearer token, or not a configured one.",
        );
        add_error_response(
            responses,
            "403",
            "The token lacks the scope this operation needs.",
        );
    }
    if takes_body {
        add_error_response(
            responses,
            "408",
            "The body arrived too slowly (under 1 KiB/s on average after a 10 s grace).",
        );
        add_error_response(responses, "413", "The body is over its size limit.");
        add_error_response(
            responses,
            "415",
            "Content-Type is not application/json, or declares a charset other than utf-8.",
        );
    }

    for (status, response) in responses.iter_mut() {
        let headers = response
            .as_object_mut()
            .expect("a response is an object")
            .entry("headers")
            .or_insert_with(|| json!({}));
        headers["X-Correlation-ID"] = json!({
            "description": "The request's correlation id: the one it carried, or a generated \
                UUIDv4.",
            "required": true,
            "schema": correlation_id_ref(),
        });
        match status.as_str() {
            "503" => {
                headers["Retry-After"] = json!({
                    "description": "Seconds to wait before retrying.",
                    "required": true,
                    "schema": {"type": "string", "pattern": "^[0-9]+$"},
                });
            }
            "401" => {
                headers["WWW-Authenticate"] = json!({
                    "description": "The authentication scheme: `Bearer`.",
                    "required": true,
                    "schema": {"type": "string"},
                });
            }
            _ => {}
        }
        narrow_error_codes(status, response);
    }
}

/// Adds an error response for `status` unless the handler already documents one.
fn add_error_response(responses: &mut Map<String, Value>, status: &str, description: &str) {
    responses.entry(status).or_insert_with(|| {
        json!({
            "description": description,
            "content": {"application/json": {"schema": error_body_ref()}},
        })
    });
}

fn correlation_id_ref() -> Value {
    json!({"$ref": "#/components/schemas/CorrelationId"})
}

fn error_body_ref() -> Value {
    json!({"$ref": "#/components/schemas/ErrorBody"})
}

/// An error response's body names the codes its status can carry, so a 401 saying `forbidden`
/// does not conform.
fn narrow_error_codes(status: &str, response: &mut Value) {
    let Some(schema) = response.pointer_mut("/content/application~1json/schema") else {
        return;
    };
    if *schema != error_body_ref() {
        return;
    }
    // A 4xx no code has is answered as `validation_error` (see `ApiErrorCode::for_status`).
    let mut codes: Vec<&str> = ApiErrorCode::ALL
        .into_iter()
        .filter(|code| code.status().as_str() == status)
        .map(ApiErrorCode::as_str)
        .collect();
    if codes.is_empty() {
        codes.push(ApiErrorCode::ValidationError.as_str());
    }
    *schema = json!({
        "allOf": [
            error_body_ref(),
            {"properties": {"error": {"properties": {"code": {"enum": codes}}}}},
        ]
    });
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;

    /// `(METHOD, path)` pairs, each with the scope its router demands (if any).
    type Routes = BTreeMap<(String, String), Option<String>>;

    #[tokio::test]
    async fn the_document_is_served_as_openapi_3_1_json_whose_references_all_resolve() {
        let request = Request::get("/v1/openapi.json")
            .body(Body::empty())
            .unwrap();
        let response = router::<()>().oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "application/json");
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let doc: Value = serde_json::from_slice(&body).expect("the document is JSON");
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3.1."),
            "{}",
            doc["openapi"]
        );
        assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
        let mut dangling = Vec::new();
        find_dangling_refs(&doc, &doc, &mut dangling);
        assert!(dangling.is_empty(), "unresolved $refs: {dangling:?}");
    }

    #[test]
    fn every_route_the_router_serves_is_documented_and_nothing_else_is() {
        let served: BTreeSet<_> = served_routes().into_keys().collect();
        let documented: BTreeSet<_> = documented_routes().into_keys().collect();
        assert!(
            served.len() >= 11,
            "the source scan found too little: {served:?}"
        );
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty() && unserved.is_empty(),
            "served but not documented: {undocumented:?}; documented but not served: \
             {unserved:?} (add the handler to ApiDoc's paths, or fix its #[utoipa::path])"
        );
    }

    #[test]
    fn each_operation_asks_for_the_scope_its_router_enforces() {
        let documented = documented_routes();
        for (route, scope) in served_routes() {
            assert_eq!(documented.get(&route), Some(&scope), "{route:?}");
        }
    }

    #[test]
    fn every_operation_documents_the_correlation_header_and_the_layers_answers() {
        let doc = document();
        for (path, path_item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in path_item.as_object().unwrap() {
                let name = format!("{method} {path}");
                let parameters = operation["parameters"].as_array().unwrap();
                assert!(
                    parameters.iter().any(|p| p["name"] == "X-Correlation-ID"),
                    "{name}"
                );
                let responses = operation["responses"].as_object().unwrap();
                let mut expected = vec!["400", "500"];
                if operation.get("security").is_some() {
                    expected.extend(["401", "403", "503"]);
                }
                if operation.get("requestBody").is_some() {
                    expected.extend(["408", "413", "415"]);
                }
                for status in expected {
                    assert!(responses.contains_key(status), "{name} lacks {status}");
                }
                for (status, response) in responses {
                    assert_eq!(
                        response["headers"]["X-Correlation-ID"]["required"], true,
                        "{name} {status}"
                    );
                    if status.starts_with('4') || status.starts_with('5') {
                        let codes = &response["content"]["application/json"]["schema"]["allOf"][1]
                            ["properties"]["error"]["properties"]["code"]["enum"];
                        assert!(codes.is_array(), "{name} {status} does not name its codes");
                    }
                }
                if let Some(unavailable) = responses.get("503") {
                    assert_eq!(unavailable["headers"]["Retry-After"]["required"], true);
                }
            }
        }
        assert_eq!(
            doc["components"]["securitySchemes"][BEARER]["scheme"],
            "bearer"
        );
    }

    #[test]
    fn the_ingest_body_schema_follows_the_contract() {
        let doc = document();
        let schemas = &doc["components"]["schemas"];
        let event = &schemas["EventIn"];
        assert_eq!(event["additionalProperties"], false);
        assert_eq!(
            event["required"],
            json!(["event_id", "event_type", "payload"])
        );
        let properties = &event["properties"];
        assert_eq!(
            properties["event_id"]["$ref"],
            "#/components/schemas/EventId"
        );
        assert_eq!(schemas["EventId"]["pattern"], "^[A-Za-z0-9._:-]{1,128}$");
        assert_eq!(schemas["EventId"]["not"], json!({"enum": [".", ".."]}));
        let event_type = resolve(&doc, &properties["event_type"]);
        assert_eq!(event_type["minLength"], 1);
        assert_eq!(event_type["maxLength"], 128);
        assert_eq!(resolve(&doc, &properties["source"])["maxLength"], 256);
        assert_eq!(properties["occurred_at"]["format"], "date-time");
        // Any JSON value: a schema with no type.
        assert!(properties["payload"].get("type").is_none());
        assert_eq!(schemas["PayloadSha256"]["pattern"], "^[0-9a-f]{64}$");
        let batch = &schemas["BatchIn"]["properties"]["events"];
        assert_eq!(
            (&batch["minItems"], &batch["maxItems"]),
            (&json!(1), &json!(fluxa_core::ingest::MAX_BATCH_EVENTS))
        );
    }

    #[test]
    fn a_batch_item_may_be_any_json_value_since_each_is_judged_on_its_own() {
        let doc = document();
        let items = &doc["components"]["schemas"]["BatchIn"]["properties"]["events"]["items"];
        // A non-object item gets its own 400 result inside a 200, so the document must not
        // promise a 400 for the whole request: one choice must constrain nothing.
        let unconstrained = |schema: &Value| {
            schema
                .as_object()
                .unwrap()
                .keys()
                .all(|keyword| keyword == "description")
        };
        let choices = items["anyOf"].as_array().unwrap();
        assert!(
            choices.iter().any(unconstrained),
            "a batch item's schema constrains it: {items}"
        );
        assert_eq!(choices[0]["$ref"], "#/components/schemas/EventIn");
    }

    #[test]
    fn the_dead_letter_error_code_filter_lists_exactly_the_processing_error_codes() {
        let doc = document();
        let codes: Vec<&str> = fluxa_core::ErrorCode::ALL
            .iter()
            .map(|code| code.as_str())
            .collect();
        let filter = &doc["components"]["schemas"]["DeadLetterFilter"]["properties"];
        for schema in [
            query_parameter(&doc, "/v1/admin/dlq", "error_code"),
            resolve(&doc, &filter["error_code"]),
        ] {
            assert_eq!(schema["enum"], json!(codes), "{schema}");
        }
        for schema in [
            query_parameter(&doc, "/v1/admin/dlq", "error_class"),
            resolve(&doc, &filter["error_class"]),
        ] {
            let classes = schema["enum"].as_array().unwrap();
            assert_eq!(classes.len(), 2, "{schema}");
            for class in classes {
                let class = class.as_str().unwrap();
                assert!(fluxa_core::FailureClass::parse(class).is_some(), "{class}");
            }
        }
    }

    #[test]
    fn every_query_parameter_states_the_bounds_the_server_checks() {
        let doc = document();
        let event_type = json!({
            "minLength": 1,
            "maxLength": fluxa_core::EventType::MAX_CHARS,
            "pattern": crate::schemas::NO_CONTROL_CHARS,
        });
        let source = json!({
            "maxLength": fluxa_core::Source::MAX_CHARS,
            "pattern": crate::schemas::NO_CONTROL_CHARS,
        });
        let cursor = json!({
            "minLength": 1,
            "maxLength": fluxa_core::cursor::MAX_CURSOR_LEN,
            "pattern": crate::schemas::CURSOR_PATTERN,
        });
        let limit = json!({"minimum": 1, "maximum": crate::listing::MAX_LIMIT});
        let time = json!({"format": "date-time"});
        let expected = [
            ("/v1/events", "event_type", &event_type),
            ("/v1/events", "source", &source),
            ("/v1/events", "since", &time),
            ("/v1/events", "until", &time),
            ("/v1/events", "limit", &limit),
            ("/v1/events", "cursor", &cursor),
            ("/v1/events", "include", &json!({"pattern": "^payload$"})),
            (
                "/v1/admin/dlq",
                "event_id",
                &json!({"pattern": crate::schemas::ID_PATTERN}),
            ),
            ("/v1/admin/dlq", "event_type", &event_type),
            ("/v1/admin/dlq", "since", &time),
            ("/v1/admin/dlq", "until", &time),
            ("/v1/admin/dlq", "limit", &limit),
            ("/v1/admin/dlq", "cursor", &cursor),
        ];
        for (path, name, keywords) in expected {
            let schema = query_parameter(&doc, path, name);
            for (keyword, value) in keywords.as_object().unwrap() {
                assert_eq!(&schema[keyword], value, "{path} {name} {keyword}");
            }
        }
        // And no query parameter is left as a bare string the server would then refuse.
        for (path, path_item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in path_item.as_object().unwrap() {
                let parameters = operation["parameters"].as_array().unwrap();
                for parameter in parameters.iter().filter(|p| p["in"] == "query") {
                    let schema = resolve(&doc, &parameter["schema"]);
                    let bounded = ["enum", "pattern", "format", "maxLength", "maximum"]
                        .iter()
                        .any(|keyword| schema.get(*keyword).is_some());
                    assert!(bounded, "{method} {path} {}: {schema}", parameter["name"]);
                }
            }
        }
    }

    #[test]
    fn the_text_patterns_match_the_rules_of_the_core_types() {
        // `NO_CONTROL_CHARS` names the ranges `char::is_control` refuses.
        for c in (0..=0x10_ffff).filter_map(char::from_u32) {
            let in_pattern_ranges = matches!(u32::from(c), 0..=0x1f | 0x7f..=0x9f);
            assert_eq!(c.is_control(), in_pattern_ranges, "{:#x}", u32::from(c));
        }
        assert_eq!(
            crate::schemas::NO_CONTROL_CHARS,
            "^[^\\x00-\\x1f\\x7f-\\x9f]*$"
        );
        // A real cursor is in the documented alphabet and length.
        let position = fluxa_core::cursor::Position {
            at: chrono::Utc::now(),
            id: "x".repeat(128),
        };
        let filters = fluxa_core::cursor::fingerprint(&[Some("t"), None]);
        let cursor = fluxa_core::cursor::encode(
            fluxa_core::cursor::Listing::DeadLetters,
            &filters,
            &position,
        );
        assert!(cursor.len() <= fluxa_core::cursor::MAX_CURSOR_LEN);
        assert!(cursor
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'));
        assert_eq!(crate::schemas::CURSOR_PATTERN, "^[A-Za-z0-9_-]*$");
    }

    #[test]
    fn a_redrive_body_takes_dry_run_as_a_boolean_never_null() {
        let doc = document();
        let redrive = &doc["components"]["schemas"]["RedriveIn"];
        let properties = &redrive["properties"];
        // Absent is false; `null` is refused by the handler, so it must not be allowed here.
        for flag in ["dry_run", "all"] {
            assert_eq!(properties[flag]["type"], "boolean", "{flag}");
        }
        assert_eq!(redrive["required"], Value::Null);
        assert_eq!(redrive["additionalProperties"], false);
        assert_eq!(
            properties["limit"]["maximum"],
            json!(crate::admin::MAX_REDRIVE_LIMIT)
        );
        // Exactly one selector: each `oneOf` branch says one of them is set.
        let selectors: Vec<&Value> = redrive["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|branch| &branch["required"][0])
            .collect();
        assert_eq!(
            selectors,
            [
                &json!("all"),
                &json!("event_id"),
                &json!("id"),
                &json!("filter")
            ]
        );
    }

    /// The routes registered with `.route("PATH", METHOD(handler)…)` in this crate's source
    /// (test modules aside), each with the `Scope::…` its file's router demands. Reading the
    /// source is the only way to list them: axum's `Router` does not enumerate its routes.
    fn served_routes() -> Routes {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut routes = Routes::new();
        for entry in std::fs::read_dir(&src).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let text = text.split("#[cfg(test)]").next().unwrap();
            let scope = ["Ingest", "Read", "Admin"]
                .into_iter()
                .find(|s| text.contains(&format!("Scope::{s},")))
                .map(str::to_lowercase);
            for (method, route) in scan_routes(text) {
                routes.insert((method, route), scope.clone());
            }
        }
        routes
    }

    /// `(METHOD, path)` for each `.route("path", …)` call in `text`.
    fn scan_routes(text: &str) -> Vec<(String, String)> {
        const METHODS: [&str; 8] = [
            "get", "post", "put", "delete", "patch", "head", "options", "trace",
        ];
        let mut found = Vec::new();
        for (at, _) in text.match_indices(".route(") {
            let rest = text[at + ".route(".len()..].trim_start();
            let Some(rest) = rest.strip_prefix('"') else {
                continue;
            };
            let (route, rest) = rest.split_once('"').unwrap();
            // The method routers: everything up to the `)` closing `.route(`.
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map(|(i, _)| i)
                .unwrap();
            let args = &rest[..end];
            for method in METHODS {
                let call = format!("{method}(");
                for (i, _) in args.match_indices(&call) {
                    let before = args[..i].chars().next_back();
                    if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                        found.push((method.to_uppercase(), route.to_owned()));
                    }
                }
            }
        }
        found
    }

    fn documented_routes() -> Routes {
        let doc = document();
        let mut routes = Routes::new();
        for (path, path_item) in doc["paths"].as_object().unwrap() {
            for (method, operation) in path_item.as_object().unwrap() {
                let scope = operation["security"][0][BEARER][0]
                    .as_str()
                    .map(str::to_owned);
                routes.insert((method.to_uppercase(), path.clone()), scope);
            }
        }
        routes
    }

    /// `schema` with a `$ref` followed, and an optional value's `oneOf: [null, X]` taken as X.
    fn resolve<'a>(doc: &'a Value, schema: &'a Value) -> &'a Value {
        if let Some(target) = schema["$ref"].as_str() {
            return resolve(doc, doc.pointer(target.strip_prefix('#').unwrap()).unwrap());
        }
        if let Some(branches) = schema["oneOf"].as_array() {
            let not_null: Vec<&Value> = branches
                .iter()
                .filter(|branch| branch["type"] != "null")
                .collect();
            if let [only] = not_null[..] {
                return resolve(doc, only);
            }
        }
        schema
    }

    /// The resolved schema of the query parameter `name` of `GET path`.
    fn query_parameter<'a>(doc: &'a Value, path: &str, name: &str) -> &'a Value {
        let parameters = doc["paths"][path]["get"]["parameters"].as_array().unwrap();
        let parameter = parameters
            .iter()
            .find(|p| p["in"] == "query" && p["name"] == name)
            .unwrap_or_else(|| panic!("GET {path} has no query parameter {name}"));
        resolve(doc, &parameter["schema"])
    }

    fn find_dangling_refs(doc: &Value, value: &Value, dangling: &mut Vec<String>) {
        match value {
            Value::Object(object) => {
                if let Some(Value::String(target)) = object.get("$ref") {
                    let pointer = target.strip_prefix('#').unwrap_or(target);
                    if doc.pointer(pointer).is_none() {
                        dangling.push(target.clone());
                    }
                }
                for child in object.values() {
                    find_dangling_refs(doc, child, dangling);
                }
            }
            Value::Array(items) => {
                for child in items {
                    find_dangling_refs(doc, child, dangling);
                }
            }
            _ => {}
        }
    }
}
