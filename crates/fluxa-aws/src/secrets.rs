//! The database credentials behind `FLUXA_DATABASE_SECRET_ID` (contract section 9): a Secrets
//! Manager secret holding either the JSON that RDS writes (`username`, `password`, `host`,
//! `port`, `dbname`) or a plain `postgres://` URL.
//!
//! RDS's own managed secret (`manage_master_user_password`) holds only `username` and
//! `password`; the host, port and database then come from `FLUXA_DATABASE_URL` without a
//! password (`postgres://host:5432/fluxa`), and the secret's fields fill in the rest.
//!
//! The secret is fetched once, when the process (or Lambda container) starts, and kept as a
//! [`SecretString`]. No error here quotes the secret's text, its fields or the URL built from
//! them: a message names the secret id and what was wrong, never a value.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Why the database URL could not be had from the secret. Messages quote no secret value.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("could not read the secret {secret_id} from Secrets Manager: {reason}")]
    Fetch { secret_id: String, reason: String },
    #[error("the secret {secret_id} has no text value (a binary secret cannot hold credentials)")]
    NotText { secret_id: String },
    #[error(
        "the secret {secret_id} is neither a postgres:// URL nor JSON with username, password \
         and host (the form RDS writes){detail}"
    )]
    Unusable { secret_id: String, detail: String },
}

/// The fields of an RDS credentials secret that matter here. `port` is a number when RDS
/// writes it; some people write it as a string.
#[derive(Deserialize)]
struct RdsSecret {
    username: Option<String>,
    password: Option<String>,
    host: Option<String>,
    port: Option<serde_json::Value>,
    dbname: Option<String>,
}

/// [`database_url`] through one client and one fetch per secret for the whole process: a
/// Lambda container, or a server whose store and queue both open the database, asks Secrets
/// Manager once (a rotated password is picked up by the next container or restart).
pub async fn cached_database_url(
    secret_id: &str,
    base: Option<&SecretString>,
) -> Result<SecretString, SecretError> {
    static FETCHED: tokio::sync::Mutex<Vec<(String, SecretString)>> =
        tokio::sync::Mutex::const_new(Vec::new());
    // Held across the fetch, so two openers at start make one request between them.
    let mut fetched = FETCHED.lock().await;
    if let Some((_, url)) = fetched.iter().find(|(id, _)| id == secret_id) {
        return Ok(url.clone());
    }
    let client = aws_sdk_secretsmanager::Client::new(&crate::sdk_config().await);
    let url = database_url(&client, secret_id, base).await?;
    fetched.push((secret_id.to_owned(), url.clone()));
    Ok(url)
}

/// Fetches `secret_id` and turns it into a `postgres://` URL, with `base` (a
/// `FLUXA_DATABASE_URL` without a password, if one is set) supplying whatever the secret lacks.
pub async fn database_url(
    client: &aws_sdk_secretsmanager::Client,
    secret_id: &str,
    base: Option<&SecretString>,
) -> Result<SecretString, SecretError> {
    let output = client
        .get_secret_value()
        .secret_id(secret_id)
        .send()
        .await
        .map_err(|e| SecretError::Fetch {
            secret_id: secret_id.to_owned(),
            reason: crate::error_detail(&e),
        })?;
    let text = output.secret_string().ok_or_else(|| SecretError::NotText {
        secret_id: secret_id.to_owned(),
    })?;
    let url = url_from_secret(secret_id, text, base)?;
    tracing::info!(secret_id, "database credentials read from Secrets Manager");
    Ok(url)
}

/// The URL a secret's text describes; `base` fills in what the secret lacks.
pub fn url_from_secret(
    secret_id: &str,
    text: &str,
    base: Option<&SecretString>,
) -> Result<SecretString, SecretError> {
    let unusable = |detail: &str| SecretError::Unusable {
        secret_id: secret_id.to_owned(),
        detail: if detail.is_empty() {
            String::new()
        } else {
            format!(": {detail}")
        },
    };
    let text = text.trim();
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        url::Url::parse(text).map_err(|_| unusable("the URL does not parse"))?;
        return Ok(SecretString::from(text.to_owned()));
    }
    // serde's own messages can quote a value ("invalid type: string \"…\""), so none of them
    // is passed on.
    let secret: RdsSecret =
        serde_json::from_str(text).map_err(|_| unusable("it is not a JSON object of strings"))?;
    let mut url = match base {
        Some(base) => url::Url::parse(base.expose_secret())
            .map_err(|_| unusable("FLUXA_DATABASE_URL does not parse"))?,
        None => url::Url::parse("postgres://localhost:5432/postgres").expect("a constant URL"),
    };
    match (&secret.host, base) {
        (Some(host), _) => url
            .set_host(Some(host))
            .map_err(|_| unusable("`host` is not a host name"))?,
        (None, Some(_)) => {}
        (None, None) => {
            return Err(unusable(
                "it has no `host`; set FLUXA_DATABASE_URL=postgres://host:port/dbname beside it",
            ))
        }
    }
    if let Some(port) = &secret.port {
        let port = match port {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        }
        .and_then(|port| u16::try_from(port).ok())
        .ok_or_else(|| unusable("`port` is not a port number"))?;
        url.set_port(Some(port))
            .map_err(|()| unusable("`port` cannot be set"))?;
    }
    if let Some(dbname) = &secret.dbname {
        url.set_path(&format!("/{dbname}"));
    }
    let username = secret
        .username
        .ok_or_else(|| unusable("it has no `username`"))?;
    let password = secret
        .password
        .ok_or_else(|| unusable("it has no `password`"))?;
    // The URL crate percent-encodes both, so a password with `@`, `/` or `:` stays whole.
    url.set_username(&username)
        .map_err(|()| unusable("`username` cannot be used in a URL"))?;
    url.set_password(Some(&password))
        .map_err(|()| unusable("`password` cannot be used in a URL"))?;
    Ok(SecretString::from(String::from(url)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(text: &str, base: Option<&str>) -> Result<String, String> {
        let base = base.map(|b| SecretString::from(b.to_owned()));
        url_from_secret("s", text, base.as_ref())
            .map(|url| url.expose_secret().to_owned())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn the_json_rds_writes_becomes_a_url_with_an_encoded_password() {
        let secret = r#"{"username":"fluxa","password":"p@ss:w/rd","engine":"postgres",
            "host":"db.example.internal","port":5432,"dbname":"events"}"#;
        assert_eq!(
            url(secret, None).unwrap(),
            "postgres://fluxa:p%40ss%3Aw%2Frd@db.example.internal:5432/events"
        );
    }

    #[test]
    fn a_managed_secret_of_only_user_and_password_completes_the_configured_url() {
        let secret = r#"{"username":"admin","password":"s3cret"}"#;
        assert_eq!(
            url(secret, Some("postgres://rds.internal:6543/fluxa")).unwrap(),
            "postgres://admin:s3cret@rds.internal:6543/fluxa"
        );
        let refused = url(secret, None).unwrap_err();
        assert!(refused.contains("no `host`"), "{refused}");
    }

    #[test]
    fn a_plain_url_is_taken_as_it_is() {
        assert_eq!(
            url(" postgres://u:p@h/db\n", None).unwrap(),
            "postgres://u:p@h/db"
        );
    }

    #[test]
    fn no_refusal_quotes_the_secret() {
        for secret in [
            r#"{"username":"u","password":"hunter2-secret","host":"h","port":"not-hunter2"}"#,
            r#"{"username":"u","password":"hunter2-secret","port":1}"#,
            r#"{"username":["hunter2-secret"]}"#,
            "hunter2-secret",
            r#"{"username":"u","host":"h hunter2"}"#,
        ] {
            let refused = url(secret, None).unwrap_err();
            assert!(!refused.contains("hunter2"), "{refused}");
        }
    }
}
