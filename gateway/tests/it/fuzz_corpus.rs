//! Replays the `rest` fuzz target's stored inputs (`fuzz/corpus/rest/`, `fuzz/regressions/rest/`)
//! through its check (`fuzz/checks/rest.rs`): every REST body endpoint of an embedded node
//! answers each with a status its contract lists and a JSON error, and never panics.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::Path,
};

#[path = "../../../fuzz/checks/rest.rs"]
mod rest;

#[test]
fn rest_corpus_gets_contract_answers() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut rest = rest::Rest::new();
    let (mut replayed, mut failed) = (0, Vec::new());
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join("rest")) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            let bytes = std::fs::read(&path).expect("a corpus file");
            replayed += 1;
            if catch_unwind(AssertUnwindSafe(|| rest.check(&bytes))).is_err() {
                failed.push(path);
            }
        }
    }
    assert!(replayed > 0, "no stored inputs for rest");
    assert!(failed.is_empty(), "rest: failing inputs {failed:?}");
}
