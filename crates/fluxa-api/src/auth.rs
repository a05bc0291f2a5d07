//! Bearer-token authentication with scopes (contract section 5).
//!
//! Tokens are compared by their SHA-256 digests with `subtle`'s constant-time equality, so
//! neither a token's content nor its length leaks through timing. Tokens are `SecretString`s:
//! their `Debug` is redacted and nothing here ever logs one.

use std::collections::BTreeSet;
use std::fmt;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::{ApiError, ApiErrorCode};
use crate::AppState;

/// What a token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// `POST /v1/events`, `POST /v1/events/batch`.
    Ingest,
    /// `GET /v1/events/…`.
    Read,
    /// `/v1/admin/…`.
    Admin,
}

impl Scope {
    fn parse(text: &str) -> Option<Self> {
        match text {
            "ingest" => Some(Self::Ingest),
            "read" => Some(Self::Read),
            "admin" => Some(Self::Admin),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Ingest => "ingest",
            Self::Read => "read",
            Self::Admin => "admin",
        }
    }
}

/// One configured token and its scopes.
#[derive(Clone)]
pub struct ApiToken {
    digest: [u8; 32],
    scopes: BTreeSet<Scope>,
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiToken")
            .field("token", &"[redacted]")
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// Why a token specification was refused. Never contains the token itself.
#[derive(Debug, thiserror::Error)]
#[error("invalid API token specification #{position}: {reason}")]
pub struct TokenParseError {
    position: usize,
    reason: String,
}

impl ApiToken {
    /// Parses a comma-separated list of `SCOPES=TOKEN` entries, where SCOPES joins `ingest`,
    /// `read` and `admin` with `+`; for example `ingest+read=abc123,admin=def456`.
    pub fn parse_list(spec: &SecretString) -> Result<Vec<Self>, TokenParseError> {
        spec.expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .enumerate()
            .map(|(idx, entry)| {
                let position = idx + 1;
                let error = |reason: &str| TokenParseError {
                    position,
                    reason: reason.to_owned(),
                };
                let (scopes, token) = entry
                    .split_once('=')
                    .ok_or_else(|| error("expected SCOPES=TOKEN"))?;
                if token.len() < 16 {
                    return Err(error("the token must be at least 16 characters"));
                }
                let scopes = scopes
                    .split('+')
                    .map(|s| Scope::parse(s.trim()))
                    .collect::<Option<BTreeSet<_>>>()
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| error("scopes must be ingest, read or admin joined by +"))?;
                Ok(Self {
                    digest: Sha256::digest(token.as_bytes()).into(),
                    scopes,
                })
            })
            .collect()
    }
}

/// Middleware factory: requests must carry a token with `scope` (when tokens are configured).
pub async fn require(
    scope: Scope,
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if state.tokens.is_empty() {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(presented) = presented else {
        return ApiError::new(ApiErrorCode::Unauthorized, "a bearer token is required")
            .into_response();
    };
    let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    // Look at every token so the time taken does not depend on which one matched.
    let mut matched: Option<&ApiToken> = None;
    for token in state.tokens.iter() {
        if bool::from(token.digest.ct_eq(&digest)) {
            matched = Some(token);
        }
    }
    match matched {
        None => ApiError::new(ApiErrorCode::Unauthorized, "the bearer token is not valid")
            .into_response(),
        Some(token) if !token.scopes.contains(&scope) => ApiError::new(
            ApiErrorCode::Forbidden,
            format!("the token lacks the {} scope", scope.as_str()),
        )
        .into_response(),
        Some(_) => next.run(request).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lists_parse_scopes_and_reject_short_tokens_without_echoing_them() {
        let tokens = ApiToken::parse_list(&SecretString::from(
            "ingest+read=0123456789abcdef, admin=fedcba9876543210",
        ))
        .unwrap();
        assert_eq!(tokens.len(), 2);
        assert!(tokens[0].scopes.contains(&Scope::Read));
        let error = ApiToken::parse_list(&SecretString::from("read=short-secret")).unwrap_err();
        assert!(!error.to_string().contains("short-secret"));
        assert!(ApiToken::parse_list(&SecretString::from("write=0123456789abcdef")).is_err());
        assert!(!format!("{:?}", tokens[0]).contains("0123456789abcdef"));
    }
}
