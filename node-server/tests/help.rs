//! `iamlinkd --help` names every configuration key, as `config::KEYS` lists it (tables in brackets).

use std::process::Command;

use iamlinkd::config::KEYS;

#[test]
fn help_names_every_config_key_with_its_meaning() {
    let out = Command::new(env!("CARGO_BIN_EXE_iamlinkd")).arg("--help").output().expect("iamlinkd runs");
    assert!(out.status.success(), "{out:?}");
    let help = String::from_utf8_lossy(&out.stdout);
    let line_of = |path: &str| help.lines().find(|l| l.split_whitespace().next() == Some(path)).map(str::to_string);
    let missing: Vec<String> = KEYS.iter().map(|k| k.shown()).filter(|p| line_of(p).is_none()).collect();
    assert!(missing.is_empty(), "--help does not name {missing:?}:\n{help}");
    for k in KEYS {
        let line = line_of(&k.shown()).unwrap_or_default();
        assert!(line.contains(k.meaning), "{}: {line:?} lacks {:?}", k.path, k.meaning);
    }
}
