//! iamlinkd's modules form no import cycle: a request's path can be read one way, and a module
//! can be changed without the ones it does not import. Every `crate::` path in `src/` is an edge
//! from its file's module to the module the path names (through a folder's `pub use`); comments
//! do not count. The graph must be acyclic.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;

/// `a::b` for `src/a/b.rs`, `a` for `src/a/mod.rs` and `src/a.rs`, `` for `src/lib.rs`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src").with_extension("");
    let parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).filter(|p| *p != "mod" && *p != "lib").collect();
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in fs::read_dir(dir).expect("readable src") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("main.rs") {
            out.push(path);
        }
    }
}

/// Every `crate::x::y::…` path in `text`, as its segments; a `{…}` group gives one per item.
fn crate_paths(text: &str) -> Vec<Vec<String>> {
    let mut paths = vec![];
    for (i, _) in text.match_indices("crate::") {
        if text[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let mut at = &text[i + "crate::".len()..];
        let mut kept = vec![];
        loop {
            let ident: String = at.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if ident.is_empty() {
                break;
            }
            at = &at[ident.len()..];
            kept.push(ident);
            match at.strip_prefix("::") {
                Some(rest) => at = rest,
                None => break,
            }
        }
        // `crate::a::{b, c::D}`: one path per item.
        if let Some(group) = at.strip_prefix('{').and_then(|g| g.split_once('}')).map(|(g, _)| g) {
            for item in group.split(',') {
                let item: Vec<String> = item.trim().split("::").map(|s| s.trim().to_string()).collect();
                paths.push(kept.iter().cloned().chain(item.into_iter().filter(|s| s != "self")).collect());
            }
            continue;
        }
        paths.push(kept);
    }
    paths
}

#[test]
fn the_daemon_s_modules_import_each_other_without_a_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = vec![];
    rust_files(&src, &mut files);
    // Code only: a doc comment may name any module.
    let code = |f: &Path| -> String {
        let text = fs::read_to_string(f).expect("readable");
        text.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
    };
    let modules: BTreeMap<String, String> = files.iter().map(|f| (module_of(&src, f), code(f))).collect();
    // A folder's `pub use sub::{A, B}` names where A and B live.
    let mut reexports: BTreeMap<String, String> = BTreeMap::new();
    for (module, text) in &modules {
        for line in text.lines().filter_map(|l| l.trim().strip_prefix("pub use ")) {
            let (sub, items) = line.trim_end_matches(';').split_once("::").unwrap_or(("", ""));
            let prefix = if module.is_empty() { sub.to_string() } else { format!("{module}::{sub}") };
            for item in items.trim_matches(|c| c == '{' || c == '}').split(',') {
                reexports.insert(format!("{module}::{}", item.trim()), prefix.clone());
            }
        }
    }
    let mut edges: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (module, text) in &modules {
        for path in crate_paths(text) {
            // The longest prefix of the path that is a module, or the module a re-export names.
            let mut target = None;
            for n in (1..=path.len()).rev() {
                let candidate = path[..n].join("::");
                if modules.contains_key(&candidate) {
                    target = Some(candidate);
                    break;
                }
                if let Some(m) = reexports.get(&candidate) {
                    target = Some(m.clone());
                    break;
                }
            }
            if let Some(t) = target.filter(|t| t != module) {
                edges.entry(module).or_default().insert(t);
            }
        }
    }
    assert!(edges.len() > 10, "the scan found the imports: {edges:?}");
    // Depth-first search for a back edge.
    fn visit<'a>(
        m: &'a str,
        edges: &'a BTreeMap<&str, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|p| *p == m) {
            let mut cycle: Vec<String> = path[i..].iter().map(|s| s.to_string()).collect();
            cycle.push(m.to_string());
            return Some(cycle);
        }
        if !done.insert(m) {
            return None;
        }
        path.push(m);
        for next in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        None
    }
    let mut done = BTreeSet::new();
    for m in edges.keys() {
        if let Some(cycle) = visit(m, &edges, &mut vec![], &mut done) {
            panic!("import cycle: {}", cycle.join(" → "));
        }
    }
}
