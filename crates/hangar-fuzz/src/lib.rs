//! Strategies shared by the fuzz targets in `tests/`: arbitrary JSON documents, texts that
//! look like what a parser expects (so the fuzz reaches past the first check), and
//! mutations of real samples.
//!
//! Every target asserts the same three things for any input: no panic, an answer within a
//! deadline, and bounded memory (inputs are small; parsers must not amplify them). The
//! default is proptest's 256 cases per target; `PROPTEST_CASES=100000 cargo test -p
//! hangar-fuzz` runs a longer campaign.

use proptest::prelude::*;
use serde_json::{Map, Value};

/// Any JSON value, nested a few levels, with keys drawn from `keys` half of the time (so
/// objects often have the fields a parser looks for) and arbitrary otherwise.
pub fn json(keys: &'static [&'static str]) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map(Value::Number).unwrap_or(Value::Null)),
        text().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((key(keys), inner), 0..8).prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<
                String,
                Value,
            >>(
            ))),
        ]
    })
}

fn key(keys: &'static [&'static str]) -> impl Strategy<Value = String> {
    prop_oneof![prop::sample::select(keys).prop_map(str::to_string), text()]
}

/// Short texts: printable, unicode, control characters and the separators parsers split on.
pub fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,24}",
        "\\PC{0,16}",
        prop::collection::vec(any::<char>(), 0..16).prop_map(|c| c.into_iter().collect()),
        prop::sample::select(
            &["", " ", "-", "--", "=", ";", "\0", "\n", "{", "}", "[", "\"", "Mb", "GB", "0", "-1", "1e400", "NaN"][..]
        )
        .prop_map(str::to_string),
    ]
}

/// A real sample with a few bytes changed, cut, or repeated.
pub fn mutated(sample: &'static str) -> impl Strategy<Value = String> {
    let len = sample.len().max(1);
    prop::collection::vec((0..len, any::<u8>(), 0u8..3), 1..8).prop_map(move |edits| {
        let mut bytes = sample.as_bytes().to_vec();
        for (at, byte, kind) in edits {
            let at = at.min(bytes.len());
            match kind {
                0 if at < bytes.len() => bytes[at] = byte,
                1 => bytes.truncate(at),
                _ => bytes.insert(at, byte),
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Run `f` on its own thread and fail if it has not answered within 10 s: a parser that
/// loops forever on some input fails the case instead of hanging the suite.
pub fn answers<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(10)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{what} did not answer within 10 s"),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("{what} panicked"),
    }
}
