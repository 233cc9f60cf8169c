//! packaging/config.example.toml against the configuration reference.

use std::path::Path;

use crate::config::Config;

use super::{config_reference, dotted, toml_value};

/// A key line of packaging/config.example.toml: `key = value`, or
/// `# key = value` for a key shown commented out.
struct ExampleKey {
    key: String,
    commented: bool,
    line: usize,
}

/// The keys of a TOML example, dotted with their table (`[table]` lines,
/// commented or not); prose comments are not keys.
fn example_keys(text: &str) -> Vec<ExampleKey> {
    let mut table = String::new();
    let mut keys = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let commented = line.starts_with('#');
        let body = line.trim_start_matches('#').trim();
        if let Some(name) = body.strip_prefix('[').and_then(|b| b.strip_suffix(']')) {
            if !name.is_empty() && name.chars().all(|c| c.is_ascii_lowercase() || c == '_' || c == '.') {
                table = name.to_owned();
            }
            continue;
        }
        let key: String =
            body.chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_').collect();
        if !key.is_empty() && body[key.len()..].trim_start().starts_with('=') {
            keys.push(ExampleKey { key: dotted(&table, &key), commented, line: i + 1 });
        }
    }
    keys
}

/// packaging/config.example.toml is the deb's conffile with every line
/// commented (xtask/src/package/deb.rs `commented_config`), whose header
/// says the agent runs on the defaults shown. So the example lists every
/// key of the reference and no other, each once; a key it writes out is at
/// the reference's default (a key only an example value makes sense for is
/// written commented), and the commented ones are valid once uncommented.
#[test]
fn example_config_lists_every_reference_key_at_its_default() {
    use std::collections::BTreeSet;

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/config.example.toml");
    let text = std::fs::read_to_string(&path).expect("packaging/config.example.toml");
    let reference = config_reference(&mut String::new());
    let example = example_keys(&text);
    let documented: BTreeSet<&str> = reference.iter().map(|(k, _)| k.as_str()).collect();
    let shown: BTreeSet<&str> = example.iter().map(|k| k.key.as_str()).collect();
    let missing: Vec<&&str> = documented.difference(&shown).collect();
    let unknown: Vec<&&str> = shown.difference(&documented).collect();
    assert!(
        missing.is_empty() && unknown.is_empty(),
        "packaging/config.example.toml and the configuration reference differ: keys of the reference not in \
         the example (add them, commented if they have no default): {missing:?}; keys of the example the \
         config types do not have: {unknown:?}"
    );
    for k in &example {
        let lines: Vec<usize> = example.iter().filter(|o| o.key == k.key).map(|o| o.line).collect();
        assert_eq!(lines.len(), 1, "{} appears on lines {lines:?} of the example", k.key);
    }

    let parsed = serde_json::to_value(Config::parse(&text, &path).expect("the example parses")).unwrap();
    for k in example.iter().filter(|k| !k.commented) {
        let default = &reference.iter().find(|(key, _)| *key == k.key).expect("checked above").1;
        let value = k.key.split('.').fold(&parsed, |v, part| &v[part]);
        assert_eq!(
            value,
            default,
            "config.example.toml line {}: {} = {value}, but its default is {}; write the default, or comment \
             the line out when it shows an example value",
            k.line,
            k.key,
            toml_value(default)
        );
    }

    let uncommented: Vec<&str> = text
        .lines()
        .enumerate()
        .map(|(i, l)| match example.iter().any(|k| k.commented && k.line == i + 1) {
            true => l.trim_start().trim_start_matches('#').trim_start(),
            false => l,
        })
        .collect();
    if let Err(e) = toml::from_str::<Config>(&uncommented.join("\n")) {
        panic!("config.example.toml with its commented keys uncommented is not a valid configuration: {e}");
    }
}

#[test]
fn example_keys_skip_prose() {
    let keys = example_keys(
        "[a]\n# Prose with x = 1 inside, and e.g. { k = v }\nx = 1   # trailing = comment\n# [b.c]\n#  y = \"2\"\n",
    );
    let found: Vec<(&str, bool, usize)> = keys.iter().map(|k| (k.key.as_str(), k.commented, k.line)).collect();
    assert_eq!(found, [("a.x", false, 3), ("b.c.y", true, 5)]);
}
