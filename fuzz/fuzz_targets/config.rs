//! `envelopefs.toml` as read from the backing directory: parsing never panics, and a config
//! that parses serializes back to TOML that parses to the same value.
#![no_main]

use envelopefs::volume::config::VolumeConfig;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cfg) = VolumeConfig::parse(data) else { return };
    let text = toml::to_string(&cfg).expect("a parsed config serializes");
    let again = VolumeConfig::parse(text.as_bytes())
        .unwrap_or_else(|e| panic!("re-serialized config does not parse: {e}\n{text}"));
    assert_eq!(cfg, again, "re-serialized config parses to another value:\n{text}");
});
