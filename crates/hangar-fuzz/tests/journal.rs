//! The JSON store's journal reader: a store written with real commits, its journal then
//! damaged (bytes flipped, cut, inserted, or a frame header's length made huge), opens
//! without a panic or a hang: it opens with a prefix of the acknowledged commits (the
//! damaged tail kept aside) or refuses with an error; and memory stays bounded however
//! large a damaged length field claims a frame is.

use hangar_fuzz::answers;
use hangar_store::{Batch, JsonStore, JsonStoreOptions, Store};
use proptest::prelude::*;
use serde_json::json;

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(48)
}

/// A store with `n` commits, as a crash would leave it: the journal and snapshot as they
/// were before the clean close compacted them (the files are put back after closing, so
/// the lock is released). Answers the journal's bytes.
fn written(dir: &std::path::Path, n: usize) -> Vec<u8> {
    use hangar_store::json::{JOURNAL_FILE, SNAPSHOT_FILE};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
    let (journal, snapshot) = rt.block_on(async {
        let store = JsonStore::open(dir, JsonStoreOptions::default()).await.unwrap_or_else(|e| panic!("{e}"));
        for i in 0..n {
            let b = Batch::new().put("things", &format!("t{i:03}"), json!({"i": i, "pad": "x".repeat(i * 7)}));
            store.commit(b).await.unwrap_or_else(|e| panic!("{e}"));
        }
        let journal = std::fs::read(dir.join(JOURNAL_FILE)).unwrap_or_else(|e| panic!("{e}"));
        let snapshot = std::fs::read(dir.join(SNAPSHOT_FILE)).ok();
        store.close().await.unwrap_or_else(|e| panic!("{e}"));
        (journal, snapshot)
    });
    let _ = std::fs::remove_file(dir.join(SNAPSHOT_FILE));
    if let Some(s) = snapshot {
        std::fs::write(dir.join(SNAPSHOT_FILE), s).unwrap_or_else(|e| panic!("{e}"));
    }
    std::fs::write(dir.join(JOURNAL_FILE), &journal).unwrap_or_else(|e| panic!("{e}"));
    // The commits are in the journal, so damage reaches them.
    assert!(journal.len() > 64 * n, "the journal holds {} bytes for {n} commits", journal.len());
    journal
}

/// Reopen after damage: either an error, or the records are a prefix of what was written.
/// Answers how many records it found (`None`: refused).
fn reopen(dir: std::path::PathBuf, n: usize) -> Option<usize> {
    answers("reopening a damaged journal", move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap_or_else(|e| panic!("{e}"));
        rt.block_on(async {
            let Ok(store) = JsonStore::open(&dir, JsonStoreOptions::default()).await else { return None };
            let ids: Vec<String> = store.list("things").await.unwrap_or_default().into_iter().map(|r| r.id).collect();
            let want: Vec<String> = (0..ids.len()).map(|i| format!("t{i:03}")).collect();
            assert!(ids.len() <= n && ids == want, "not a prefix of the commits: {ids:?}");
            let _ = store.close().await;
            Some(ids.len())
        })
    })
}

#[test]
fn an_undamaged_journal_gives_back_every_commit() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    written(dir.path(), 9);
    assert_eq!(reopen(dir.path().to_path_buf(), 9), Some(9));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn damaged_journals_open_or_refuse(
        n in 1usize..12,
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..6),
    ) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let mut bytes = written(dir.path(), n);
        for (at, byte, kind) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match kind {
                0 => bytes[i] ^= byte | 1,
                1 => bytes.truncate(i),
                2 => bytes.insert(i, byte),
                // A length field claiming a huge frame: four 0xFF bytes.
                _ => bytes.splice(i..i, [0xFF; 4]).for_each(drop),
            }
        }
        std::fs::write(dir.path().join(hangar_store::json::JOURNAL_FILE), &bytes).unwrap_or_else(|e| panic!("{e}"));
        reopen(dir.path().to_path_buf(), n);
    }
}
