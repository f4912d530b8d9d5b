//! REST request bodies through the router of an embedded node: see `checks/rest.rs`.
#![no_main]

use std::sync::{Mutex, OnceLock};

#[path = "../checks/rest.rs"]
mod rest;

/// One node for the whole run (libFuzzer calls the target from one thread).
static REST: OnceLock<Mutex<rest::Rest>> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut rest = REST
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    rest.check(data);
});
