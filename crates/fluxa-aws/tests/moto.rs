//! The AWS glue against a real AWS API emulator (moto server), as `./test` runs it: with moto
//! up and `AWS_ENDPOINT_URL`, `AWS_REGION` and static credentials in the environment, it runs
//! these with `--ignored`. Nothing here mocks the SDK.

use fluxa_aws::secrets::{database_url, SecretError};
use secrecy::{ExposeSecret, SecretString};

async fn client() -> aws_sdk_secretsmanager::Client {
    assert!(
        std::env::var_os("AWS_ENDPOINT_URL").is_some(),
        "these tests need moto: run them through ./test, or set AWS_ENDPOINT_URL"
    );
    aws_sdk_secretsmanager::Client::new(&fluxa_aws::sdk_config().await)
}

fn unique(name: &str) -> String {
    format!("fluxa-test/{name}-{}", uuid::Uuid::new_v4())
}

#[tokio::test]
#[ignore = "needs moto server: ./test runs it with --ignored"]
async fn the_database_url_is_built_from_an_rds_secret_read_from_secrets_manager() {
    let client = client().await;
    let secret_id = unique("rds");
    client
        .create_secret()
        .name(&secret_id)
        .secret_string(
            r#"{"username":"fluxa","password":"p@ss word","engine":"postgres",
                "host":"db.internal","port":5432,"dbname":"events"}"#,
        )
        .send()
        .await
        .unwrap();
    let url = database_url(&client, &secret_id, None).await.unwrap();
    assert_eq!(
        url.expose_secret(),
        "postgres://fluxa:p%40ss%20word@db.internal:5432/events"
    );

    // RDS's managed secret holds only the credentials; the configured URL gives the rest.
    let managed = unique("managed");
    client
        .create_secret()
        .name(&managed)
        .secret_string(r#"{"username":"admin","password":"pw"}"#)
        .send()
        .await
        .unwrap();
    let base = SecretString::from("postgres://rds.internal:5432/fluxa".to_owned());
    let url = database_url(&client, &managed, Some(&base)).await.unwrap();
    assert_eq!(
        url.expose_secret(),
        "postgres://admin:pw@rds.internal:5432/fluxa"
    );
}

#[tokio::test]
#[ignore = "needs moto server: ./test runs it with --ignored"]
async fn a_missing_or_binary_secret_is_a_clear_error_that_quotes_no_value() {
    let client = client().await;
    let missing = database_url(&client, &unique("missing"), None)
        .await
        .unwrap_err();
    assert!(matches!(missing, SecretError::Fetch { .. }), "{missing}");
    assert!(
        missing.to_string().contains("fluxa-test/missing"),
        "{missing}"
    );

    let binary = unique("binary");
    client
        .create_secret()
        .name(&binary)
        .secret_binary(aws_sdk_secretsmanager::primitives::Blob::new(
            b"hunter2".to_vec(),
        ))
        .send()
        .await
        .unwrap();
    let refused = database_url(&client, &binary, None).await.unwrap_err();
    assert!(matches!(refused, SecretError::NotText { .. }), "{refused}");

    let bad = unique("bad");
    client
        .create_secret()
        .name(&bad)
        .secret_string(r#"{"username":"u","password":"hunter2"}"#)
        .send()
        .await
        .unwrap();
    let refused = database_url(&client, &bad, None).await.unwrap_err();
    assert!(!refused.to_string().contains("hunter2"), "{refused}");
}
