//! QMP and the QEMU guest agent over real Unix sockets: a fake QEMU answers the client
//! with arbitrary lines (garbage, JSON of any shape, events, replies with wrong ids, a
//! valid reply or none). The client always answers within its deadline with a value or an
//! error: no panic, no hang.

use std::time::Duration;

use hangar_fuzz::{json, text};
use hangar_qemu::qga::Qga;
use hangar_qemu::qmp::Qmp;
use proptest::prelude::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

const KEYS: &[&str] = &["QMP", "return", "error", "event", "id", "class", "desc", "data", "timestamp", "status"];

/// What the fake sends: its greeting (or not), then lines after each client line.
#[derive(Debug, Clone)]
struct Script {
    greeting: Option<String>,
    replies: Vec<String>,
    answer_properly: bool,
}

fn line() -> impl Strategy<Value = String> {
    prop_oneof![text(), json(KEYS).prop_map(|v| v.to_string())]
}

fn script() -> impl Strategy<Value = Script> {
    (
        prop_oneof![
            Just(Some(r#"{"QMP": {"version": {}, "capabilities": []}}"#.to_string())),
            line().prop_map(Some),
            Just(None)
        ],
        prop::collection::vec(line(), 0..6),
        any::<bool>(),
    )
        .prop_map(|(greeting, replies, answer_properly)| Script { greeting, replies, answer_properly })
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32)
}

/// Serve one connection: greeting, then for each client line the scripted lines and, when
/// asked to, a reply carrying the client's id.
async fn fake(listener: UnixListener, s: Script, delimiter: bool) {
    let Ok((sock, _)) = listener.accept().await else { return };
    let (read, mut write) = sock.into_split();
    if let Some(g) = &s.greeting {
        let _ = write.write_all(format!("{g}\n").as_bytes()).await;
    }
    let mut lines = BufReader::new(read).lines();
    while let Ok(Some(l)) = lines.next_line().await {
        for r in &s.replies {
            let _ = write.write_all(format!("{r}\n").as_bytes()).await;
        }
        if s.answer_properly {
            let l = l.trim_start_matches('\u{FF}');
            let id = serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("id").cloned().or_else(|| v.pointer("/arguments/id").cloned()));
            let reply = match id {
                Some(id) if delimiter => serde_json::json!({"return": id}),
                Some(id) => serde_json::json!({"return": {}, "id": id}),
                None => serde_json::json!({"return": {}}),
            };
            let prefix = if delimiter { "\u{FF}" } else { "" };
            let _ = write.write_all(format!("{prefix}{reply}\n").as_bytes()).await;
        }
    }
}

fn run(s: Script, agent: bool) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("sock");
        let listener = UnixListener::bind(&path).unwrap_or_else(|e| panic!("{e}"));
        let server = tokio::spawn(fake(listener, s, agent));
        let limit = Duration::from_millis(300);
        let client = async {
            if agent {
                if let Ok(mut q) = Qga::connect(&path, tokio::time::Instant::now() + limit).await {
                    let _ = q.call("guest-ping", None, limit).await;
                }
            } else if let Ok((q, _events)) = Qmp::connect(&path, limit).await {
                let _ = q.execute("query-status", None, limit).await;
            }
        };
        // The client's own deadlines are a few hundred ms; ten seconds means a hang.
        tokio::time::timeout(Duration::from_secs(10), client).await.unwrap_or_else(|_| panic!("the client hung"));
        server.abort();
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn qmp_answers_any_peer(s in script()) {
        run(s, false);
    }

    #[test]
    fn guest_agent_answers_any_peer(s in script()) {
        run(s, true);
    }
}
