//! `Config::load`: the layering order (defaults < file < `FLUXA_*` < flags), one validation,
//! the backend enums, and that secrets and file text never leak into errors or `Debug`.
//! The environment is passed in, never set on the process, so these tests run in parallel.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fluxa_host::{
    BlobBackend, Config, PgLocation, QueueBackend, Sources, StoreBackend, ValidatedConfig,
    DEFAULT_WORKERS_EMBEDDED, DEFAULT_WORKERS_POSTGRES, SETTINGS,
};

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn flags(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn write_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("fluxa.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn load_env(pairs: &[(&str, &str)]) -> anyhow::Result<ValidatedConfig> {
    Config::load(Sources {
        env: env(pairs),
        ..Sources::default()
    })
}

fn load_file(text: &str) -> anyhow::Result<ValidatedConfig> {
    let dir = tempfile::tempdir().unwrap();
    Config::load(Sources {
        file: Some(write_file(dir.path(), text)),
        ..Sources::default()
    })
}

fn error_of(result: anyhow::Result<ValidatedConfig>) -> String {
    format!(
        "{:#}",
        result.expect_err("the configuration must be refused")
    )
}

#[test]
fn nothing_given_loads_the_defaults() {
    let loaded = Config::load(Sources::default()).unwrap();
    assert_eq!(
        format!("{:?}", loaded.config()),
        format!("{:?}", Config::default())
    );
    assert_eq!(loaded.config().workers, DEFAULT_WORKERS_EMBEDDED);
    assert!(loaded.tokens().is_empty());
}

#[test]
fn the_file_is_overridden_by_the_environment_which_is_overridden_by_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "workers = 2\nlease = \"5s\"\nbatch_size = 10\nmax_receives = 7\n",
    );
    let loaded = Config::load(Sources {
        file: Some(file),
        env: env(&[("FLUXA_WORKERS", "3"), ("FLUXA_LEASE", "6s")]),
        flags: flags(&[("workers", "4")]),
    })
    .unwrap();
    let config = loaded.config();
    assert_eq!(
        config.workers, 4,
        "a flag beats the environment and the file"
    );
    assert_eq!(
        config.lease,
        Duration::from_secs(6),
        "the environment beats the file"
    );
    assert_eq!(config.batch_size, 10, "the file beats the defaults");
    assert_eq!(config.max_receives, 7);
    assert_eq!(config.retry_backoff, Config::default().retry_backoff);
}

#[test]
fn a_lambda_loads_from_the_environment_alone() {
    let loaded = load_env(&[
        (
            "FLUXA_DATABASE_URL",
            "postgres://fluxa@db.internal:5432/fluxa",
        ),
        ("FLUXA_ROLE", "worker"),
        ("FLUXA_INSECURE_NO_AUTH", "true"),
        ("FLUXA_VISIBILITY_TIMEOUT", "500ms"),
    ])
    .unwrap();
    let config = loaded.config();
    assert_eq!(config.role, fluxa_host::Role::Worker);
    assert!(config.insecure_no_auth);
    assert_eq!(config.visibility_timeout, Duration::from_millis(500));
    assert!(matches!(
        loaded.backends().store,
        StoreBackend::Postgres { .. }
    ));
    assert!(matches!(
        loaded.backends().queue,
        QueueBackend::Postgres { .. }
    ));
}

#[test]
fn a_database_secret_selects_postgres_with_the_url_completing_it() {
    let loaded = load_env(&[
        (
            "FLUXA_DATABASE_SECRET_ID",
            "arn:aws:secretsmanager:eu-west-1:1:secret:db",
        ),
        ("FLUXA_DATABASE_URL", "postgres://rds.internal:5432/fluxa"),
    ])
    .unwrap();
    let StoreBackend::Postgres {
        url: PgLocation::Secret { secret_id, base },
    } = &loaded.backends().store
    else {
        panic!("expected the secret: {:?}", loaded.backends().store);
    };
    assert_eq!(secret_id, "arn:aws:secretsmanager:eu-west-1:1:secret:db");
    assert!(base.is_some());
    assert!(matches!(
        loaded.backends().queue,
        QueueBackend::Postgres {
            url: PgLocation::Secret { .. }
        }
    ));
    // PostgreSQL's worker default, as with a URL.
    assert_eq!(
        loaded.config().workers,
        fluxa_host::DEFAULT_WORKERS_POSTGRES
    );
    let refused = error_of(load_env(&[("FLUXA_DATABASE_SECRET_ID", " ")]));
    assert!(refused.contains("FLUXA_DATABASE_SECRET_ID"), "{refused}");
}

#[test]
fn fluxa_config_in_the_environment_names_the_file_when_no_flag_does() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "max_receives = 9\n");
    let loaded = load_env(&[("FLUXA_CONFIG", file.to_str().unwrap())]).unwrap();
    assert_eq!(loaded.config().max_receives, 9);
}

#[test]
fn an_empty_variable_counts_as_unset() {
    let loaded = load_env(&[("FLUXA_DATABASE_URL", ""), ("FLUXA_WORKERS", "")]).unwrap();
    assert!(loaded.config().database_url.is_none());
    assert_eq!(loaded.config().workers, DEFAULT_WORKERS_EMBEDDED);
}

#[test]
fn the_worker_default_depends_on_the_backend_unless_workers_is_given() {
    let url = ("FLUXA_DATABASE_URL", "postgres://fluxa@127.0.0.1/fluxa");
    assert_eq!(
        load_env(&[url]).unwrap().config().workers,
        DEFAULT_WORKERS_POSTGRES
    );
    assert_eq!(
        load_env(&[url, ("FLUXA_WORKERS", "16")])
            .unwrap()
            .config()
            .workers,
        16
    );
}

/// The defaults are written once, in `Config::default`; `config.example.toml` documents them
/// and must agree, so uncommenting its `# key = value` lines changes nothing.
#[test]
fn the_example_file_lists_every_setting_and_its_defaults_are_the_built_in_ones() {
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../config.example.toml"
    ))
    .unwrap();
    for setting in SETTINGS {
        assert!(
            example.contains(&format!("# {} = ", setting.key))
                || example.contains(&format!("# e.g. {} = ", setting.key)),
            "config.example.toml does not mention {}",
            setting.key
        );
    }
    let defaults: String = example
        .lines()
        .filter_map(|line| line.strip_prefix("# "))
        .filter(|line| {
            line.split_once(" = ").is_some_and(|(key, _)| {
                !key.is_empty() && key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
            })
        })
        .map(|line| format!("{line}\n"))
        .collect();
    assert!(defaults.lines().count() >= 10, "found only:\n{defaults}");
    let from_example = load_file(&defaults).unwrap();
    assert_eq!(
        format!("{:?}", from_example.config()),
        format!("{:?}", Config::default())
    );
}

#[test]
fn every_setting_has_a_flag_and_a_variable_named_after_its_key() {
    for setting in SETTINGS {
        assert_eq!(setting.flag, setting.key.replace('_', "-"));
        assert_eq!(
            setting.env,
            format!("FLUXA_{}", setting.key.to_ascii_uppercase())
        );
    }
}

#[test]
fn an_unknown_file_key_is_refused_with_its_line_without_quoting_the_file() {
    let error = error_of(load_file(
        "api_tokens = \"ingest=file-secret-0123456789\"\nworkerz = \"file-secret-2\"\n",
    ));
    assert!(error.contains("line 2: unknown field `workerz`"), "{error}");
    assert!(!error.contains("file-secret"), "{error}");
}

#[test]
fn a_bad_value_is_refused_naming_its_source_and_key_but_not_the_value() {
    let error = error_of(load_file("workers = 2\nlease = \"hunter2-soon\"\n"));
    assert!(error.contains("line 2: lease"), "{error}");
    assert!(!error.contains("hunter2"), "{error}");

    let error = error_of(load_env(&[("FLUXA_BIND", "hunter2-host")]));
    assert!(error.contains("FLUXA_BIND"), "{error}");
    assert!(!error.contains("hunter2"), "{error}");

    let error = error_of(Config::load(Sources {
        flags: flags(&[("max_receives", "hunter2")]),
        ..Sources::default()
    }));
    assert!(error.contains("--max-receives"), "{error}");
    assert!(!error.contains("hunter2"), "{error}");
}

#[test]
fn a_file_syntax_error_names_the_line_without_quoting_the_file() {
    let error = error_of(load_file(
        "workers = 2\napi_tokens = \"ingest=file-secret-0123456789\n",
    ));
    assert!(error.contains("line 2"), "{error}");
    assert!(!error.contains("file-secret"), "{error}");
}

#[test]
fn validation_runs_once_after_every_layer() {
    // The file's invalid value is fixed by a flag: only the final configuration is judged.
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(dir.path(), "max_receives = 0\n");
    let loaded = Config::load(Sources {
        file: Some(file.clone()),
        flags: flags(&[("max_receives", "2")]),
        ..Sources::default()
    })
    .unwrap();
    assert_eq!(loaded.config().max_receives, 2);
    let error = error_of(Config::load(Sources {
        file: Some(file),
        ..Sources::default()
    }));
    assert!(
        error.contains("--max-receives must be at least 1"),
        "{error}"
    );
}

#[test]
fn the_blobs_default_to_the_data_dirs_blobs_folder() {
    let loaded = load_env(&[("FLUXA_DATA_DIR", "/srv/fluxa")]).unwrap();
    assert_eq!(
        loaded.backends().blobs,
        BlobBackend::Fs {
            root: PathBuf::from("/srv/fluxa/blobs")
        }
    );
    assert!(matches!(
        &loaded.backends().store,
        StoreBackend::Sqlite { data_dir } if data_dir == Path::new("/srv/fluxa")
    ));
}

#[test]
fn a_file_blob_url_picks_the_fs_backend() {
    let loaded = load_env(&[("FLUXA_BLOB_URL", "file:///x")]).unwrap();
    assert_eq!(
        loaded.backends().blobs,
        BlobBackend::Fs {
            root: PathBuf::from("/x")
        }
    );
}

#[test]
fn an_s3_blob_url_picks_the_s3_backend_with_its_prefix() {
    for (url, bucket, prefix) in [
        (
            "s3://fluxa-payloads/prod/fluxa",
            "fluxa-payloads",
            "prod/fluxa",
        ),
        ("s3://fluxa-payloads/fluxa/", "fluxa-payloads", "fluxa"),
        ("s3://fluxa-payloads", "fluxa-payloads", ""),
        ("s3://fluxa-payloads/", "fluxa-payloads", ""),
        ("s3://my.bucket.2/a_b-c.d", "my.bucket.2", "a_b-c.d"),
    ] {
        let loaded = load_env(&[("FLUXA_BLOB_URL", url)]).unwrap();
        assert_eq!(
            loaded.backends().blobs,
            BlobBackend::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned()
            },
            "{url}"
        );
    }
}

#[test]
fn an_s3_blob_url_without_a_valid_bucket_is_refused_naming_the_flag() {
    for (url, reason) in [
        ("s3://", "needs a bucket name"),
        ("s3:///prefix", "needs a bucket name"),
        ("s3://ab/p", "3 to 63 characters"),
        (&format!("s3://{}/p", "b".repeat(64)), "3 to 63 characters"),
        ("s3://Fluxa-Payloads/p", "lower-case letters"),
        ("s3://fluxa_payloads/p", "lower-case letters"),
        ("s3://-fluxa/p", "begin and end"),
        ("s3://fluxa-/p", "begin and end"),
        ("s3://flu..xa/p", "adjacent periods"),
        ("s3://192.168.1.1/p", "IP address"),
        ("s3://xn--fluxa/p", "reserves"),
        ("s3://fluxa-s3alias/p", "reserves"),
        ("s3://fluxa/a//b", "no empty"),
        ("s3://fluxa/a/../b", "no empty"),
        ("s3://fluxa/a b", "letters, digits"),
        ("s3://fluxa/p?x=1", "no query"),
    ] {
        let error = error_of(load_env(&[("FLUXA_BLOB_URL", url)]));
        assert!(error.contains("--blob-url"), "{url}: {error}");
        assert!(error.contains(reason), "{url}: {error}");
    }
}

#[test]
fn an_s3_blob_url_holding_credentials_is_refused_without_quoting_them() {
    let url = "s3://AKIAEXAMPLE:wJalrXUtnFEMI@fluxa-payloads/p";
    let error = error_of(load_env(&[("FLUXA_BLOB_URL", url)]));
    assert!(error.contains("holds no credentials"), "{error}");
    assert!(!error.contains("wJalrXUtnFEMI"), "{error}");
    assert!(!error.contains("AKIAEXAMPLE"), "{error}");
}

#[test]
fn any_other_blob_url_is_refused_clearly() {
    for url in [
        "http://example.com/blobs",
        "file://relative/path",
        "/abs/path",
    ] {
        let error = error_of(load_env(&[("FLUXA_BLOB_URL", url)]));
        assert!(
            error.contains("must be s3://bucket/prefix or file:///absolute/path"),
            "{url}: {error}"
        );
    }
}

#[test]
fn a_queue_url_needs_the_store_on_postgresql_and_must_be_a_url() {
    let error = error_of(load_env(&[(
        "FLUXA_QUEUE_URL",
        "https://sqs.eu-west-1.amazonaws.com/1/fluxa",
    )]));
    assert!(error.contains("needs the store on PostgreSQL"), "{error}");

    let error = error_of(load_env(&[
        ("FLUXA_QUEUE_URL", "fluxa-queue"),
        ("FLUXA_DATABASE_URL", "postgres://127.0.0.1/fluxa"),
    ]));
    assert!(error.contains("must be an SQS queue URL"), "{error}");

    let loaded = load_env(&[
        (
            "FLUXA_QUEUE_URL",
            "https://sqs.eu-west-1.amazonaws.com/1/fluxa",
        ),
        ("FLUXA_DATABASE_URL", "postgres://127.0.0.1/fluxa"),
    ])
    .unwrap();
    assert!(
        matches!(
            &loaded.backends().queue,
            fluxa_host::QueueBackend::Sqs { url } if url.ends_with("/1/fluxa")
        ),
        "{:?}",
        loaded.backends()
    );
}

#[test]
fn a_database_urls_password_never_shows_in_debug_or_errors() {
    let loaded = load_env(&[(
        "FLUXA_DATABASE_URL",
        "postgres://fluxa:hunter2-db@127.0.0.1:5432/fluxa",
    )])
    .unwrap();
    let debug = format!("{loaded:?} {:?} {:?}", loaded.config(), loaded.backends());
    assert!(!debug.contains("hunter2"), "{debug}");
    assert_eq!(
        fluxa_host::backend_name(loaded.config()),
        "postgres (127.0.0.1:5432/fluxa)"
    );

    let error = error_of(load_env(&[(
        "FLUXA_DATABASE_URL",
        "mysql://fluxa:hunter2-db@h/x",
    )]));
    assert!(error.contains("postgres://"), "{error}");
    assert!(!error.contains("hunter2"), "{error}");
}

#[test]
fn api_tokens_never_show_in_debug_or_errors() {
    let token = "ingest+read=tok-secret-0123456789abcdef";
    let loaded = load_env(&[("FLUXA_API_TOKENS", token)]).unwrap();
    assert_eq!(loaded.tokens().len(), 1);
    let debug = format!("{loaded:?}");
    assert!(!debug.contains("tok-secret"), "{debug}");

    let error = error_of(load_env(&[("FLUXA_API_TOKENS", "read=tok-secret")]));
    assert!(!error.contains("tok-secret"), "{error}");
}

#[test]
fn serving_without_tokens_on_a_public_address_is_refused() {
    let error = error_of(load_env(&[("FLUXA_BIND", "0.0.0.0:8080")]));
    assert!(error.contains("without API tokens"), "{error}");
    assert!(load_env(&[
        ("FLUXA_BIND", "0.0.0.0:8080"),
        ("FLUXA_INSECURE_NO_AUTH", "1")
    ])
    .is_ok());
}

#[test]
fn the_client_protection_defaults_are_the_contracts_numbers() {
    let config = Config::default();
    assert_eq!(config.header_read_timeout, Duration::from_secs(10));
    assert_eq!(config.keep_alive_timeout, Duration::from_secs(60));
    assert_eq!(config.limits.min_body_rate, 1024);
    assert_eq!(config.limits.body_rate_grace, Duration::from_secs(10));
    assert_eq!(config.shutdown_grace, Duration::from_secs(20));
    assert_eq!(
        config.max_connections, None,
        "auto: below the open-file limit"
    );
    assert!(config.limits.max_body_memory >= config.limits.largest_body());
}

#[test]
fn the_client_protection_settings_load_from_the_file_the_environment_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    let file = write_file(
        dir.path(),
        "header_read_timeout = \"2s\"\nmin_body_rate = 4096\nmax_connections = 300\n",
    );
    let loaded = Config::load(Sources {
        file: Some(file),
        env: env(&[
            ("FLUXA_KEEP_ALIVE_TIMEOUT", "90s"),
            ("FLUXA_BODY_RATE_GRACE", "500ms"),
            ("FLUXA_MAX_BODY_MEMORY", "67108864"),
        ]),
        flags: flags(&[
            ("max_concurrent_requests", "64"),
            ("shutdown_grace", "5s"),
            ("max_connections", "auto"),
        ]),
    })
    .unwrap();
    let config = loaded.config();
    assert_eq!(config.header_read_timeout, Duration::from_secs(2));
    assert_eq!(config.keep_alive_timeout, Duration::from_secs(90));
    assert_eq!(config.limits.min_body_rate, 4096);
    assert_eq!(config.limits.body_rate_grace, Duration::from_millis(500));
    assert_eq!(config.limits.max_body_memory, 64 * 1024 * 1024);
    assert_eq!(config.limits.max_concurrent_requests, 64);
    assert_eq!(config.shutdown_grace, Duration::from_secs(5));
    assert_eq!(
        config.max_connections, None,
        "the flag's auto beats the file"
    );
    let loaded = load_env(&[("FLUXA_MAX_CONNECTIONS", "300")]).unwrap();
    assert_eq!(loaded.config().max_connections, Some(300));
}

#[test]
fn client_protection_settings_that_would_switch_a_protection_off_are_refused() {
    for (variable, value, message) in [
        ("FLUXA_HEADER_READ_TIMEOUT", "0s", "--header-read-timeout"),
        ("FLUXA_KEEP_ALIVE_TIMEOUT", "0s", "--keep-alive-timeout"),
        ("FLUXA_MIN_BODY_RATE", "0", "--min-body-rate"),
        ("FLUXA_BODY_RATE_GRACE", "0s", "--body-rate-grace"),
        (
            "FLUXA_MAX_CONCURRENT_REQUESTS",
            "0",
            "--max-concurrent-requests",
        ),
        ("FLUXA_MAX_CONNECTIONS", "0", "--max-connections"),
        ("FLUXA_SHUTDOWN_GRACE", "0s", "--shutdown-grace"),
        ("FLUXA_MAX_CONNECTIONS", "many", "FLUXA_MAX_CONNECTIONS"),
    ] {
        let error = error_of(load_env(&[(variable, value)]));
        assert!(error.contains(message), "{variable}={value}: {error}");
    }
}

#[test]
fn a_body_memory_bound_below_the_largest_accepted_body_is_refused() {
    // The default batch limit is 32 MiB: a 16 MiB bound could never hold such a batch.
    let error = error_of(load_env(&[("FLUXA_MAX_BODY_MEMORY", "16777216")]));
    assert!(error.contains("--max-body-memory"), "{error}");
    assert!(load_env(&[
        ("FLUXA_MAX_BODY_MEMORY", "16777216"),
        ("FLUXA_MAX_BATCH_BYTES", "8388608"),
        ("FLUXA_MAX_PAYLOAD_BYTES", "8388608"),
    ])
    .is_ok());
}
