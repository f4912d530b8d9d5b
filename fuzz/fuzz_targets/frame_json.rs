//! Client and server frames decoded from Json: see `checks/frame.rs`.
#![no_main]

#[path = "../checks/frame.rs"]
mod frame;

libfuzzer_sys::fuzz_target!(|data: &[u8]| frame::check(shared::Encoding::Json, data));
