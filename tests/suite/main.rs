//! The integration tests, in one crate so the dependency graph links once. Plain
//! `cargo test` runs the library-level suites anywhere; mounts, PKCS#11 and KMS sit
//! behind the `fuse_tests`, `pkcs11_tests` and `kms_tests` features (scripts/test.sh).

mod common;

mod aws_kms;
mod backing_attacks;
mod cli;
mod crash_kill;
mod fixtures;
mod fs_api;
mod full_disk;
mod hidden_names;
mod io_uring;
mod key_slots;
mod layers;
mod matrix;
mod model;
mod mount;
mod namespace_model;
mod operations;
mod pkcs11_mount;
mod planted_files;
mod power_cut;
mod providers;
mod rekey;
mod scale;
mod service;
mod sharing;
mod untrusted_config;
mod xattr_binding;
