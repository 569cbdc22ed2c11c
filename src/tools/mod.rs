//! The offline tools: `fsck` and `inspect` (`check`), re-wrapping and re-encrypting
//! (`rekey`), retiring a KEK version (`retire`), moving to another key (`key_move`), key
//! slots (`key_slots`), plaintext ↔ backing paths (`name_paths`), and format upgrades
//! (`upgrade`).

pub mod check;
pub mod key_move;
pub mod key_slots;
pub mod name_paths;
pub mod rekey;
pub mod retire;
pub mod upgrade;
