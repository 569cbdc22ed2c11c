//! envelopefs: a FUSE filesystem that encrypts each file with its own data key (DEK),
//! wrapped by a key-encryption key (KEK) held in a key store.
//!
//! One folder per layer, each using only those below it (docs/ARCHITECTURE.md):
//! `error` → `sys` → `format` (the envelope codec) → `crypto` → `keys`, `names` →
//! `volume` (a volume as the host trusts it) → `file` (one envelope, its journal) → `fs`
//! (POSIX over the backing directory) → `fuse` (the thin adapter), `tools` (fsck, rekey,
//! key moves) → `daemon` (the mount's process) → `cli`.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod crypto;
pub mod daemon;
pub mod error;
pub mod file;
pub mod format;
pub mod fs;
pub mod fuse;
pub mod keys;
pub mod names;
pub mod sys;
pub mod tools;
pub mod volume;
