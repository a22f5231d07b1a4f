//! Storage connection strings (`provider=...;key=value;...`): any text and mutations of real
//! ones give a config or an error, never a panic; an error never echoes a secret.

use hangar_blobstore::config::StoreConfig;
use hangar_fuzz::{answers, mutated, text};
use proptest::prelude::*;

const SECRET: &str = "Sup3rS3cretValue";

const SAMPLES: &[&str] = &[
    "provider=aws-s3;bucket=images;region=eu-west-1;access_key=AKIA;secret_key=Sup3rS3cretValue",
    "provider=minio;endpoint=http://127.0.0.1:9000;bucket=b;access_key=a;secret_key=Sup3rS3cretValue",
    "provider=azure-storage-account;storage_account_name=acct;storage_account_key=Sup3rS3cretValue;container_name=c",
    "provider=artifactory;url=http://127.0.0.1:8081;repo=generic;access_key=Sup3rS3cretValue",
    "provider=local-storage;catalog_path=/tmp/catalog",
];

fn pairs() -> impl Strategy<Value = String> {
    let keys = prop::sample::select(
        &[
            "provider",
            "bucket",
            "region",
            "endpoint",
            "access_key",
            "secret_key",
            "url",
            "repo",
            "catalog_path",
            "storage_account_name",
            "storage_account_key",
            "container_name",
            "username",
            "password",
        ][..],
    );
    prop::collection::vec((keys, text()), 0..8)
        .prop_map(|kv| kv.into_iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(";"))
}

fn parses(s: String) {
    answers("the connection-string parser", move || {
        if let Err(e) = s.parse::<StoreConfig>() {
            let shown = e.to_string();
            assert!(!shown.contains(SECRET), "an error shows the secret: {shown}");
        }
    });
}

proptest! {
    #[test]
    fn any_text(s in text()) {
        parses(s);
    }

    #[test]
    fn key_value_lists(s in pairs()) {
        parses(s);
    }

    #[test]
    fn mutated_real_strings(s in (0..SAMPLES.len()).prop_flat_map(|i| mutated(SAMPLES[i]))) {
        parses(s);
    }
}
