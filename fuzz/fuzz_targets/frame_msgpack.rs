//! Client and server frames decoded from MsgPack: see `checks/frame.rs`.
#![no_main]

#[path = "../checks/frame.rs"]
mod frame;

libfuzzer_sys::fuzz_target!(|data: &[u8]| frame::check(shared::Encoding::MsgPack, data));
