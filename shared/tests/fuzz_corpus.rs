//! Replays the fuzz corpus through the checks the fuzz targets run (`fuzz/checks/`): every input
//! kept in `fuzz/corpus/<target>/` (a minimized set that covers what the fuzzer reached) and
//! `fuzz/regressions/<target>/` (inputs that once failed a check, named after the bug) must pass
//! them, so `make test` guards what fuzzing found without running a fuzzer.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

use shared::Encoding;

#[path = "../../fuzz/checks/body.rs"]
mod body;
#[path = "../../fuzz/checks/frame.rs"]
mod frame;

/// Every stored input of `target`: (file, bytes).
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut inputs = Vec::new();
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(fuzz.join(dir).join(target)) else {
            continue;
        };
        for entry in entries {
            let path = entry.expect("a directory entry").path();
            let bytes = std::fs::read(&path).expect("a corpus file");
            inputs.push((path, bytes));
        }
    }
    assert!(!inputs.is_empty(), "no stored inputs for {target}");
    inputs
}

/// Runs `check` on every input of `target`, and names every input that fails it. On a thread
/// with a tokio worker's stack (2 MiB) in release builds; debug builds take far more stack per
/// level of a nested body (as in `frame_de_tests.rs`), so they get 32 MiB.
fn replay(target: &'static str, check: fn(&[u8])) {
    let run = move || {
        let failed: Vec<PathBuf> = inputs(target)
            .into_iter()
            .filter(|(_, bytes)| catch_unwind(AssertUnwindSafe(|| check(bytes))).is_err())
            .map(|(path, _)| path)
            .collect();
        assert!(failed.is_empty(), "{target}: failing inputs {failed:?}");
    };
    std::thread::Builder::new()
        .stack_size(if cfg!(debug_assertions) {
            32 << 20
        } else {
            2 << 20
        })
        .spawn(run)
        .expect("thread starts")
        .join()
        .expect("every input passes");
}

#[test]
fn frame_msgpack_corpus_decodes_without_panics_and_round_trips() {
    replay("frame_msgpack", |data| {
        frame::check(Encoding::MsgPack, data)
    });
}

#[test]
fn frame_json_corpus_decodes_without_panics_and_round_trips() {
    replay("frame_json", |data| frame::check(Encoding::Json, data));
}

#[test]
fn body_corpus_checked_bodies_read_the_same_in_both_encodings() {
    replay("body", body::check);
}
