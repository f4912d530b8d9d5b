//! Message bodies through `check_body` and both encodings: see `checks/body.rs`.
#![no_main]

#[path = "../checks/body.rs"]
mod body;

libfuzzer_sys::fuzz_target!(|data: &[u8]| body::check(data));
