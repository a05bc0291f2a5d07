//! How the operator commands reach Fluxa: the HTTP API, either of a running server
//! (`--server URL --token …`, the only way on AWS) or served in-process over the configured
//! backends. Both run the very same handlers, so a command validates, filters and answers
//! alike whichever way it goes; the CLI is a client of the contract, not a second
//! implementation of it.

use std::sync::Arc;

use anyhow::Context;
use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use tower::ServiceExt;

/// An error answer from the API, with what the contract's error body said.
#[derive(Debug, thiserror::Error)]
#[error("{message} ({code}, HTTP {status})")]
pub struct ApiFailure {
    pub status: StatusCode,
    pub code: String,
    pub message: String,
}

/// A raw answer: status and body.
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
}

pub enum Client {
    /// The API router over backends this process opened.
    Local(axum::Router),
    /// A running server.
    Remote {
        http: reqwest::Client,
        base: String,
        token: Option<String>,
    },
}

impl Client {
    /// Opens the configured backends and serves the API over them in-process, with
    /// authentication off: whoever can open the database needs no token.
    pub async fn local(config: &fluxa_host::ValidatedConfig) -> anyhow::Result<Self> {
        let backends = fluxa_host::open_validated(config).await?;
        let mut state = fluxa_server::app_state(config, &backends);
        state.tokens = Arc::new(Vec::new());
        Ok(Self::Local(fluxa_api::app(state)))
    }

    pub fn remote(url: &str, token: Option<String>) -> anyhow::Result<Self> {
        let base = url.trim_end_matches('/').to_owned();
        anyhow::ensure!(
            base.starts_with("http://") || base.starts_with("https://"),
            "--server must be an http:// or https:// URL"
        );
        let http = reqwest::Client::builder()
            .user_agent(concat!("fluxa-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self::Remote { http, base, token })
    }

    /// Sends one request; `body`, when given, is JSON.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<Reply> {
        match self {
            Self::Local(router) => {
                let mut request = Request::builder().method(method).uri(path);
                if body.is_some() {
                    request = request.header(header::CONTENT_TYPE, "application/json");
                }
                let request = request
                    .body(body.map_or_else(Body::empty, Body::from))
                    .context("cannot build the request")?;
                let response = router
                    .clone()
                    .oneshot(request)
                    .await
                    .context("the in-process API failed")?;
                let status = response.status();
                let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                    .await
                    .context("cannot read the in-process answer")?;
                Ok(Reply { status, body })
            }
            Self::Remote { http, base, token } => {
                let mut request = http.request(method, format!("{base}{path}"));
                if let Some(token) = token {
                    request = request.bearer_auth(token);
                }
                if let Some(body) = body {
                    request = request
                        .header(header::CONTENT_TYPE, "application/json")
                        .body(body);
                }
                let response = request
                    .send()
                    .await
                    .with_context(|| format!("cannot reach the server at {base}"))?;
                let status = StatusCode::from_u16(response.status().as_u16())
                    .context("the server answered an invalid status")?;
                let body = response
                    .bytes()
                    .await
                    .context("cannot read the server's answer")?;
                Ok(Reply { status, body })
            }
        }
    }

    /// Sends one request and parses a 2xx answer as `T`; any other answer becomes an
    /// [`ApiFailure`].
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> anyhow::Result<T> {
        let reply = self.send(method, path, body).await?;
        let reply = success(reply)?;
        let body = if reply.body.is_empty() {
            Bytes::from_static(b"null")
        } else {
            reply.body
        };
        serde_json::from_slice(&body).context("the answer is not the JSON the contract promises")
    }
}

/// `reply` if it is a success, else the failure its error body describes.
pub fn success(reply: Reply) -> Result<Reply, ApiFailure> {
    if reply.status.is_success() {
        return Ok(reply);
    }
    let error: serde_json::Value = serde_json::from_slice(&reply.body).unwrap_or_default();
    let text = |key: &str| error["error"][key].as_str().map(str::to_owned);
    Err(ApiFailure {
        status: reply.status,
        code: text("code").unwrap_or_else(|| "unknown".to_owned()),
        message: text("message").unwrap_or_else(|| {
            String::from_utf8_lossy(&reply.body)
                .chars()
                .take(200)
                .collect()
        }),
    })
}

/// A query string from `(name, value)` pairs, skipping absent values.
pub fn query(pairs: &[(&str, Option<String>)]) -> String {
    let present: Vec<String> = pairs
        .iter()
        .filter_map(|(name, value)| {
            value
                .as_ref()
                .map(|value| format!("{name}={}", encode(value)))
        })
        .collect();
    if present.is_empty() {
        String::new()
    } else {
        format!("?{}", present.join("&"))
    }
}

/// Percent-encodes a path segment or query value (everything but unreserved characters).
pub fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_skip_absent_values_and_encode_the_rest() {
        assert_eq!(query(&[("a", None)]), "");
        assert_eq!(
            query(&[
                ("since", Some("2026-01-01T00:00:00+01:00".to_owned())),
                ("x", None),
                ("t", Some("a b/c".to_owned()))
            ]),
            "?since=2026-01-01T00%3A00%3A00%2B01%3A00&t=a%20b%2Fc"
        );
    }
}
