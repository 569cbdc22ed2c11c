//! The mount helper's calling conventions. mount(8) runs
//! `mount.fuse.envelopefs SRC MNT [-sfnv] [-o OPTS]`, and fuse3's mount.fuse3 runs
//! `envelopefs SRC MNT -o OPTS`: both become `envelopefs mount SRC MNT -o OPTS`.

use std::ffi::OsString;
use std::path::Path;

/// The binary's subcommands: a first argument naming one is never a mount source.
pub const SUBCOMMANDS: [&str; 15] = [
    "init",
    "mount",
    "umount",
    "key",
    "trust",
    "upgrade",
    "share",
    "rekey",
    "status",
    "inspect",
    "name",
    "fsck",
    "service",
    "completions",
    "man",
];

/// Rewrite a helper-style argv into `envelopefs mount …`; any other argv is returned as is.
pub fn rewrite(args: Vec<OsString>) -> Vec<OsString> {
    let argv0 = args.first().map(|a| Path::new(a).file_name().unwrap_or_default().to_string_lossy().into_owned());
    let as_helper = argv0.as_deref().is_some_and(|n| n.starts_with("mount.fuse.envelopefs") || n == "mount.envelopefs");
    let looks_like_mount = args.len() >= 3 && {
        let first = args[1].to_string_lossy();
        !first.starts_with('-') && !SUBCOMMANDS.contains(&first.as_ref()) && Path::new(&args[1]).is_dir()
    };
    if !as_helper && !looks_like_mount {
        return args;
    }
    let mut out = vec!["envelopefs".into(), "mount".into()];
    let mut it = args.into_iter().skip(1);
    while let Some(a) = it.next() {
        match a.to_string_lossy().as_ref() {
            "-o" => out.extend(["-o".into(), it.next().unwrap_or_default()]),
            "-t" => drop(it.next()),
            "-s" | "-f" | "-n" | "-v" => {}
            _ => out.push(a),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(words: &[&str]) -> Vec<OsString> {
        words.iter().map(OsString::from).collect()
    }

    #[test]
    fn helper_calls_become_mount_commands() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().to_str().unwrap();
        let cases: Vec<(Vec<&str>, Vec<&str>)> = vec![
            // mount(8) through the helper link, with its flags.
            (
                vec!["/sbin/mount.fuse.envelopefs", src, "/mnt/a", "-n", "-v", "-o", "ro,key_file=/k"],
                vec!["envelopefs", "mount", src, "/mnt/a", "-o", "ro,key_file=/k"],
            ),
            (
                vec!["mount.fuse.envelopefs", "/not/a/dir", "/mnt/a", "-s", "-f"],
                vec!["envelopefs", "mount", "/not/a/dir", "/mnt/a"],
            ),
            (
                vec!["mount.envelopefs", src, "/mnt/a", "-t", "fuse.envelopefs"],
                vec!["envelopefs", "mount", src, "/mnt/a"],
            ),
            // An -o at the very end has an empty value.
            (vec!["mount.fuse.envelopefs", src, "/mnt/a", "-o"], vec!["envelopefs", "mount", src, "/mnt/a", "-o", ""]),
            // mount.fuse3 runs the binary with SRC first.
            (
                vec!["/usr/bin/envelopefs", src, "/mnt/a", "-o", "allow_other"],
                vec!["envelopefs", "mount", src, "/mnt/a", "-o", "allow_other"],
            ),
        ];
        for (input, want) in cases {
            assert_eq!(rewrite(argv(&input)), argv(&want), "{input:?}");
        }
    }

    #[test]
    fn ordinary_commands_are_left_alone() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_str().unwrap();
        let cases: Vec<Vec<&str>> = vec![
            vec!["envelopefs"],
            vec!["envelopefs", "--help"],
            vec!["envelopefs", "mount", dir, "/mnt/a"],
            vec!["envelopefs", "fsck", dir],
            vec!["envelopefs", dir],
            vec!["envelopefs", "/not/a/dir", "/mnt/a"],
            vec!["envelopefs", "-o", dir],
        ];
        for input in cases {
            assert_eq!(rewrite(argv(&input)), argv(&input), "{input:?}");
        }
    }
}
