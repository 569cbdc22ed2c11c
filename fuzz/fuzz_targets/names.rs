//! Hidden names as read from the backing directory: entry names, long-name side files,
//! symlink targets and their store markers, xattr names and values. Decoding never
//! panics, and the padding check accepts only what the encoder writes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    envelopefs::names::decode_for_fuzzing(data);
});
