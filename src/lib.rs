//! envelopefs: a FUSE filesystem that encrypts each file with its own data key (DEK),
//! wrapped by a key-encryption key (KEK) held in a key store.
//!
//! Layers: `envelope` (format, no I/O) → `crypto` (AES-256-GCM blocks) → `keys`
//! (providers, DEK cache) → `volume` (config, headers) → `content` (block layer) →
//! `fs` (POSIX over a backing directory) → `mount` (thin FUSE adapter). On top: what
//! the commands do (`volume_lock`, `retire`, `key_move`, `key_slots`, `mount_options`, `status`,
//! `service`, `daemonize`, `umount`, `helper_args`) and `cli`, the command line itself.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod atomic_file;
pub mod audit;
pub mod check;
pub mod cli;
pub mod config;
pub mod content;
pub mod control;
pub mod crypto;
pub mod daemon;
pub mod daemonize;
pub mod envelope;
pub mod envelope_file;
pub mod error;
pub mod fs;
pub mod helper_args;
pub mod journal;
pub mod key_move;
pub mod key_slots;
pub mod keys;
pub mod mount;
pub mod mount_options;
pub mod name_paths;
pub mod names;
pub mod recovery;
pub mod rekey;
pub mod retire;
pub mod service;
pub mod status;
pub mod sync;
pub mod sys;
#[cfg(test)]
mod test_support;
pub mod tree;
pub mod trust;
pub mod umount;
pub mod volume;
pub mod volume_lock;
