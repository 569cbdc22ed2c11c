//! `envelopefs.keyring` as read from the backing directory: the unauthenticated preamble and
//! the body decoder never panic on any bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = envelopefs::keys::local::decode_for_fuzzing(data);
});
