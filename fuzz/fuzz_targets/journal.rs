//! A crash journal file as recovery reads it after a crash (host state, but read without
//! authentication): decoding never panics, whatever was torn or written.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = envelopefs::file::journal::decode_for_fuzzing(data);
});
