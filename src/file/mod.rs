//! One envelope file: its header and key (`envelope_file`), its content as sealed blocks
//! (`content`), the crash journal every change is recorded in first (`journal`), and what
//! a crash left (`recovery`).

pub mod content;
pub mod envelope_file;
pub mod journal;
pub mod recovery;
