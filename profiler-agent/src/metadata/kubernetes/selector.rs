//! Kubernetes label selectors (`app=web,tier in (a,b),!canary`) and
//! namespace names, checked when the configuration is read so a typo is an
//! error at start rather than a selection that silently matches nothing.

use std::collections::BTreeMap;

/// One requirement of a selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; every requirement must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector(pub Vec<Requirement>);

impl LabelSelector {
    /// Parses the API's selector syntax.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Vec::new();
        for term in split_terms(text)? {
            let term = term.trim();
            if term.is_empty() {
                return Err(format!("label selector `{text}`: empty requirement"));
            }
            out.push(requirement(term).map_err(|e| format!("label selector `{text}`: {e}"))?);
        }
        Ok(Self(out))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

/// Splits at commas outside parentheses.
fn split_terms(text: &str) -> Result<Vec<&str>, String> {
    let (mut depth, mut start, mut out) = (0i32, 0, Vec::new());
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(format!("label selector `{text}`: unbalanced parentheses"));
        }
    }
    if depth != 0 {
        return Err(format!("label selector `{text}`: unbalanced parentheses"));
    }
    if !text.trim().is_empty() {
        out.push(&text[start..]);
    }
    Ok(out)
}

fn requirement(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::NotExists(key_of(key.trim())?));
    }
    for (op, make) in [
        ("!=", Requirement::NotEquals as fn(String, String) -> Requirement),
        ("==", Requirement::Equals),
        ("=", Requirement::Equals),
    ] {
        if let Some((k, v)) = term.split_once(op) {
            return Ok(make(key_of(k.trim())?, value_of(v.trim())?));
        }
    }
    for (op, make) in
        [(" notin ", Requirement::NotIn as fn(String, Vec<String>) -> Requirement), (" in ", Requirement::In)]
    {
        if let Some((k, set)) = term.split_once(op) {
            let set = set.trim();
            let inner = set
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(|| format!("`{term}`: expected `(v1,v2)` after `{}`", op.trim()))?;
            let values = inner.split(',').map(|v| value_of(v.trim())).collect::<Result<Vec<_>, _>>()?;
            return Ok(make(key_of(k.trim())?, values));
        }
    }
    Ok(Requirement::Exists(key_of(term)?))
}

/// `[prefix/]name`: a DNS subdomain prefix and a 63-character name.
fn key_of(key: &str) -> Result<String, String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 || !p.split('.').all(is_dns_label) {
            return Err(format!("`{key}`: the key's prefix must be a DNS subdomain"));
        }
    }
    if !is_label_value(name) || name.is_empty() {
        return Err(format!("`{key}` is not a label key (alphanumerics, `-`, `_`, `.`, at most 63)"));
    }
    Ok(key.to_owned())
}

fn value_of(v: &str) -> Result<String, String> {
    if is_label_value(v) {
        Ok(v.to_owned())
    } else {
        Err(format!("`{v}` is not a label value (alphanumerics, `-`, `_`, `.`, at most 63)"))
    }
}

/// Empty, or up to 63 of `[A-Za-z0-9_.-]`, beginning and ending alphanumeric.
fn is_label_value(v: &str) -> bool {
    let b = v.as_bytes();
    v.is_empty()
        || (b.len() <= 63
            && b.iter().all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(c))
            && b[0].is_ascii_alphanumeric()
            && b[b.len() - 1].is_ascii_alphanumeric())
}

/// A DNS-1123 label: what a namespace name must be.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// Checks namespace names.
pub fn check_namespace(ns: &str) -> Result<(), String> {
    if is_dns_label(ns) {
        Ok(())
    } else {
        Err(format!(
            "`{ns}` is not a namespace name (lowercase letters, digits and `-`, at most 63, as in `kube-system`)"
        ))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    }

    #[test]
    fn parses_and_matches_the_api_syntax() {
        let s = LabelSelector::parse("app.kubernetes.io/name=web, tier in (front,back),!canary,env!=dev,team").unwrap();
        assert_eq!(s.0.len(), 5);
        assert!(s.matches(&labels(&[("app.kubernetes.io/name", "web"), ("tier", "front"), ("team", "x")])));
        assert!(!s.matches(&labels(&[
            ("app.kubernetes.io/name", "web"),
            ("tier", "front"),
            ("team", "x"),
            ("canary", "1")
        ])));
        assert!(!s.matches(&labels(&[("app.kubernetes.io/name", "web"), ("tier", "mid"), ("team", "x")])));
        let s = LabelSelector::parse("tier notin (a)").unwrap();
        assert!(s.matches(&labels(&[])) && !s.matches(&labels(&[("tier", "a")])));
        assert_eq!(LabelSelector::parse("").unwrap(), LabelSelector::default());
    }

    #[test]
    fn bad_selectors_and_namespaces_are_named() {
        for bad in ["app=", "=x", "a in b", "a in (b", "a=b,,c", "a=b c", "-a", "a/=b", "x=-y"] {
            let e = LabelSelector::parse(bad);
            if bad == "app=" {
                // An empty value is valid in the API syntax.
                assert!(e.is_ok(), "{bad}");
                continue;
            }
            let e = e.unwrap_err();
            assert!(e.contains(bad), "{bad}: {e}");
        }
        assert!(check_namespace("kube-system").is_ok());
        for bad in ["Kube", "a_b", "", "-x", "a.b"] {
            assert!(check_namespace(bad).is_err(), "{bad}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC*") {
            let _ = LabelSelector::parse(&s);
        }

        #[test]
        fn never_panics_on_selector_shaped_text(s in "[a-z!=(), /.-]{0,40}") {
            if let Ok(sel) = LabelSelector::parse(&s) {
                let _ = sel.matches(&BTreeMap::new());
            }
        }
    }
}
