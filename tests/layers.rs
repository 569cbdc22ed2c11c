//! No module imports a module above it (docs/ARCHITECTURE.md draws the same layers).
//! Test-only code (`#[cfg(test)]` modules and `test_support`) is left out.

use std::collections::BTreeSet;
use std::path::Path;

/// Bottom to top; modules on one line are peers and do not use each other.
const LAYERS: &[&[&str]] = &[
    &["error"],
    &["sync", "sys", "daemon", "helper_args"],
    &["atomic_file"],
    &["envelope"],
    &["crypto", "journal"],
    &["keys", "names"],
    &["audit", "config"],
    &["trust"],
    &["volume"],
    &["content"],
    &["envelope_file"],
    &["tree", "name_paths"],
    &["recovery"],
    &["check", "rekey", "fs"],
    &["mount", "control"],
    &["volume_lock"],
    &["retire", "key_move", "key_slots", "status", "service", "daemonize", "umount", "mount_options"],
    &["cli"],
];

fn layer(m: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&m))
}

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

#[test]
fn no_module_imports_a_module_above_it() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut all = Vec::new();
    files(&src, &mut all);
    let mut seen = BTreeSet::new();
    let mut up = Vec::new();
    for f in all {
        let rel = f.strip_prefix(&src).unwrap().to_string_lossy().into_owned();
        let module = rel.split(['/', '.']).next().unwrap().to_owned();
        if ["lib", "main", "test_support"].contains(&module.as_str()) {
            continue;
        }
        let own = layer(&module).unwrap_or_else(|| panic!("{rel}: module {module} is in no layer; add it to LAYERS"));
        seen.insert(module.clone());
        let text = std::fs::read_to_string(&f).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap().split("#[cfg(all(test").next().unwrap();
        for (i, _) in code.match_indices("crate::") {
            let used: String = code[i + 7..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit())
                .collect();
            if used == module || used.is_empty() {
                continue;
            }
            let theirs = layer(&used).unwrap_or_else(|| panic!("{rel} uses crate::{used}, which is in no layer"));
            if theirs > own || (theirs == own && used != module) {
                up.push(format!("{rel} ({module}) uses {used}"));
            }
        }
    }
    up.sort();
    up.dedup();
    assert!(up.is_empty(), "imports that go up or sideways:\n{}", up.join("\n"));
    let listed: BTreeSet<String> = LAYERS.iter().flat_map(|l| l.iter().map(|s| s.to_string())).collect();
    assert_eq!(seen, listed, "LAYERS lists exactly the modules there are");
}
