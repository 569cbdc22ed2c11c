//! The folders of `src/` are the layers: no file imports from a folder above its own, or
//! from a peer on its line (docs/ARCHITECTURE.md draws the same picture). Every line of
//! every file is read, test modules included: a test that needs a higher layer lives there.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Bottom to top; folders on one line are peers and do not use each other.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["sys"],
    &["format"],
    &["crypto"],
    &["keys", "names"],
    &["volume"],
    &["file"],
    &["fs"],
    &["fuse", "tools"],
    &["daemon"],
    &["cli"],
];

fn layer(m: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&m))
}

fn files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The layer folders a file's text names through `crate::` (and `super::` that leaves it).
fn used_folders(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let used: String =
            text[i + 7..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit()).collect();
        if !used.is_empty() {
            out.insert(used);
        }
    }
    out
}

#[test]
fn no_folder_imports_a_folder_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut seen = BTreeSet::new();
    let mut up = Vec::new();
    for f in all {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        if rel == "lib.rs" || rel == "main.rs" {
            continue;
        }
        assert!(rel.contains('/'), "{rel}: src/ holds lib.rs, main.rs and the layer folders only");
        let folder = rel.split('/').next().unwrap().to_owned();
        let own = layer(&folder).unwrap_or_else(|| panic!("{rel}: folder {folder} is in no layer; add it to LAYERS"));
        seen.insert(folder.clone());
        let text = std::fs::read_to_string(&f).unwrap();
        for used in used_folders(&text) {
            if used == folder {
                continue;
            }
            let theirs = layer(&used).unwrap_or_else(|| panic!("{rel} uses crate::{used}, which is in no layer"));
            if theirs >= own {
                up.push(format!("{rel} ({folder}) uses {used}"));
            }
        }
    }
    up.sort();
    up.dedup();
    assert!(up.is_empty(), "imports that go up or sideways:\n{}", up.join("\n"));
    let listed: BTreeSet<String> = LAYERS.iter().flat_map(|l| l.iter().map(|s| s.to_string())).collect();
    assert_eq!(seen, listed, "LAYERS lists exactly the folders there are");
}

#[test]
fn the_check_reads_test_modules_too() {
    // A use inside a test module after `#[cfg(test)]` counts like any other.
    let text = "use crate::error::Error;\n#[cfg(test)]\nmod tests {\n    use crate::fuse::FuseFs;\n}\n";
    assert!(used_folders(text).contains("fuse"));
}

#[test]
fn no_source_file_is_over_600_lines() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut long: Vec<String> = all
        .iter()
        .map(|f| (f, std::fs::read_to_string(f).unwrap().lines().count()))
        .filter(|(_, n)| *n > 600)
        .map(|(f, n)| format!("{} ({n} lines)", f.strip_prefix(&src).unwrap().display()))
        .collect();
    long.sort();
    assert!(long.is_empty(), "files over 600 lines:\n{}", long.join("\n"));
}
