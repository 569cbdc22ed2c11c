//! The mount daemon's process and its operation: process hygiene and logging
//! (`process`), going to the background (`daemonize`), the mount's settings (`options`),
//! the status socket and reply (`control`, `status`), systemd units (`service`), and
//! unmounting (`umount`).

pub mod control;
pub mod daemonize;
pub mod metrics;
pub mod options;
pub mod process;
pub mod service;
pub mod status;
pub mod umount;
