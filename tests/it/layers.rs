//! The layers `src/lib.rs` declares hold: every `crate::…` path in a module of the library names
//! a module of a lower layer (or the module itself).

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::repo_root;

/// Layer of each top-level module, from the numbered list in `src/lib.rs` (1 is the top).
fn declared_layers(lib_rs: &str) -> BTreeMap<String, usize> {
    let mut layers = BTreeMap::new();
    for line in lib_rs.lines() {
        let Some(item) = line.strip_prefix("//! ") else {
            continue;
        };
        let Some((number, rest)) = item.split_once(". ") else {
            continue;
        };
        let Ok(layer) = number.trim().parse::<usize>() else {
            continue;
        };
        let names = rest.split('—').next().unwrap_or_default();
        for name in names.split(',') {
            layers.insert(name.trim().trim_matches('`').to_string(), layer);
        }
    }
    layers
}

/// The top-level modules a source file names through `crate::`, outside comments.
fn used_modules(source: &str) -> Vec<String> {
    let mut used = Vec::new();
    for line in source.lines() {
        let code = line.split("//").next().unwrap_or_default();
        let mut rest = code;
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a::X, b};`, possibly over several lines: the first line's names.
                for part in group.split(',') {
                    used.push(ident(part.trim_start()));
                }
            } else {
                used.push(ident(rest));
            }
        }
    }
    used.retain(|m| !m.is_empty());
    used
}

/// The identifier at the start of `s`.
fn ident(s: &str) -> String {
    s.chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect()
}

/// Every import against the layers: "file: module (layer) uses module (layer)".
fn violations(root: &Path, layers: &BTreeMap<String, usize>) -> Vec<String> {
    let mut found = Vec::new();
    let mut files = Vec::new();
    collect_rs(&root.join("src"), &mut files);
    for file in files {
        let relative = file.strip_prefix(root.join("src")).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if matches!(top.as_str(), "lib" | "main" | "cli") {
            continue;
        }
        let own = *layers
            .get(&top)
            .unwrap_or_else(|| panic!("src/lib.rs gives module {top} no layer"));
        let source = std::fs::read_to_string(&file).unwrap();
        for used in used_modules(&source) {
            if used == top {
                continue;
            }
            let Some(&theirs) = layers.get(&used) else {
                continue; // a macro or item at the crate root, not a module
            };
            if theirs <= own {
                found.push(format!(
                    "{}: {top} (layer {own}) uses {used} (layer {theirs})",
                    relative.display()
                ));
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

fn collect_rs(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_rs(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn every_module_imports_only_from_the_layers_below_it() {
    let root = repo_root();
    let layers = declared_layers(&std::fs::read_to_string(root.join("src/lib.rs")).unwrap());
    for module in [
        "bench", "web", "collab", "study", "db", "engine", "protocol", "stats",
    ] {
        assert!(
            layers.contains_key(module),
            "no layer for {module}: {layers:?}"
        );
    }
    let found = violations(&root, &layers);
    assert!(
        found.is_empty(),
        "imports against the layers:\n{}",
        found.join("\n")
    );
}

/// The check finds what it is for: an upward import, a sideways one, a grouped one.
#[test]
fn the_layer_check_finds_imports_against_the_layers() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("low")).unwrap();
    let lib = "//! 1. `top` — a\n//! 2. `left`, `right` — b\n//! 3. `low` — c\n";
    std::fs::write(src.join("lib.rs"), lib).unwrap();
    std::fs::write(src.join("top.rs"), "use crate::low::X; // crate::top\n").unwrap();
    std::fs::write(src.join("left.rs"), "use crate::{low::Y, right::Z};\n").unwrap();
    std::fs::write(
        src.join("right.rs"),
        "// use crate::top;\nfn f() { crate::low::g() }\n",
    )
    .unwrap();
    std::fs::write(src.join("low/mod.rs"), "pub fn g() { crate::top::h() }\n").unwrap();
    let found = violations(dir.path(), &declared_layers(lib));
    assert_eq!(
        found,
        [
            "left.rs: left (layer 2) uses right (layer 2)",
            "low/mod.rs: low (layer 3) uses top (layer 1)",
        ]
    );
}
