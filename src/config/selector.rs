//! Label selectors in kubectl's syntax (`team=payments,tier in (gold,silver),!canary`), parsed
//! into kube's [`Selector`] so a configuration key can choose tasks by their labels.

use std::collections::{BTreeMap, BTreeSet};

use kube::core::{Expression, Selector, SelectorExt};
use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize};

/// A label selector of tasks, as written in the configuration.
#[derive(Debug, Clone)]
pub struct TaskSelector {
    text: String,
    selector: Selector,
}

impl TaskSelector {
    /// Parses a selector in kubectl's syntax.
    pub fn new(text: &str) -> Result<Self, String> {
        Ok(Self {
            text: text.trim().to_string(),
            selector: parse(text)?,
        })
    }

    /// Whether a task with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.matches(labels)
    }
}

impl PartialEq for TaskSelector {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl Eq for TaskSelector {}

impl Serialize for TaskSelector {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for TaskSelector {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = super::values::text(deserializer)?;
        Self::new(&text).map_err(|e| de::Error::custom(format!("expected a label selector: {e}")))
    }
}

/// Parses `text`: requirements separated by commas, each `key`, `!key`, `key=value`,
/// `key==value`, `key!=value`, `key in (v1,v2)` or `key notin (v1,v2)`. Keys and values are
/// checked as Kubernetes checks label keys and values.
pub fn parse(text: &str) -> Result<Selector, String> {
    let mut expressions = Vec::new();
    for requirement in split(text)? {
        expressions.push(requirement_of(requirement.trim())?);
    }
    if expressions.is_empty() {
        return Err("expected at least one requirement, such as team=payments".into());
    }
    Ok(Selector::from_iter(expressions))
}

/// Splits at the commas outside parentheses.
fn split(text: &str) -> Result<Vec<&str>, String> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0usize, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' if depth == 0 => depth = 1,
            ')' if depth == 1 => depth = 0,
            '(' | ')' => return Err(format!("unbalanced parentheses in {text:?}")),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced parentheses in {text:?}"));
    }
    parts.push(&text[start..]);
    Ok(parts.into_iter().filter(|p| !p.trim().is_empty()).collect())
}

fn requirement_of(text: &str) -> Result<Expression, String> {
    if let Some(key) = text.strip_prefix('!') {
        return Ok(Expression::DoesNotExist(key_of(key.trim())?));
    }
    for (operator, make) in [
        (
            "!=",
            Expression::NotEqual as fn(String, String) -> Expression,
        ),
        ("==", Expression::Equal),
        ("=", Expression::Equal),
    ] {
        if let Some((key, value)) = text.split_once(operator) {
            return Ok(make(key_of(key.trim())?, value_of(value.trim())?));
        }
    }
    if let Some(open) = text.find('(') {
        let (head, set) = (text[..open].trim(), &text[open..]);
        let set = set
            .strip_prefix('(')
            .and_then(|s| s.strip_suffix(')'))
            .ok_or_else(|| format!("{text:?}: expected a set such as (a,b) at its end"))?;
        let values = set
            .split(',')
            .map(|v| value_of(v.trim()))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let (key, operator) = head
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| format!("{text:?}: expected key in (…) or key notin (…)"))?;
        let key = key_of(key.trim())?;
        return match operator {
            "in" => Ok(Expression::In(key, values)),
            "notin" => Ok(Expression::NotIn(key, values)),
            other => Err(format!("{text:?}: unknown operator {other:?} (in, notin)")),
        };
    }
    Ok(Expression::Exists(key_of(text)?))
}

/// A label key: an optional DNS subdomain prefix and `/`, then a name of at most 63
/// characters: alphanumerics, `-`, `_`, `.`, alphanumeric at both ends.
fn key_of(text: &str) -> Result<String, String> {
    let (prefix, name) = match text.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, text),
    };
    let prefix_ok = prefix.is_none_or(|p| p.len() <= 253 && crate::names::is_dns_subdomain(p));
    if !prefix_ok || name.is_empty() || !is_label_value(name) {
        return Err(format!("{text:?} is not a valid label key"));
    }
    Ok(text.to_string())
}

fn value_of(text: &str) -> Result<String, String> {
    if is_label_value(text) {
        Ok(text.to_string())
    } else {
        Err(format!("{text:?} is not a valid label value"))
    }
}

/// Empty, or at most 63 alphanumerics, `-`, `_` and `.`, alphanumeric at both ends.
fn is_label_value(text: &str) -> bool {
    let inner = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    text.is_empty()
        || (text.len() <= 63
            && text.chars().all(inner)
            && text.starts_with(|c: char| c.is_ascii_alphanumeric())
            && text.ends_with(|c: char| c.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::SelectorExt;
    use std::collections::BTreeMap;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn kubectl_s_syntax_selects_as_kubernetes_does() {
        let selector =
            parse("team=payments, tier in (gold,silver),!canary,example.com/owner, env!=dev")
                .unwrap();
        let matching = labels(&[
            ("team", "payments"),
            ("tier", "gold"),
            ("example.com/owner", "x"),
        ]);
        assert!(selector.matches(&matching));
        for (key, value) in [
            ("canary", "yes"),
            ("env", "dev"),
            ("tier", "bronze"),
            ("team", "shop"),
        ] {
            let mut other = matching.clone();
            other.insert(key.into(), value.into());
            assert!(!selector.matches(&other), "{key}={value}");
        }
        let mut without_owner = matching.clone();
        without_owner.remove("example.com/owner");
        assert!(!selector.matches(&without_owner));
        let notin = parse("tier notin (gold)").unwrap();
        assert!(notin.matches(&labels(&[])) && !notin.matches(&labels(&[("tier", "gold")])));
        assert!(
            parse("team==payments")
                .unwrap()
                .matches(&labels(&[("team", "payments")]))
        );
    }

    #[test]
    fn a_bad_selector_says_what_is_wrong() {
        for (text, error) in [
            ("", "expected at least one requirement"),
            ("tier in (gold", "unbalanced parentheses"),
            ("tier within (gold)", "unknown operator \"within\""),
            ("team=pay ments", "\"pay ments\" is not a valid label value"),
            (
                "Bad_Prefix/x=1",
                "\"Bad_Prefix/x\" is not a valid label key",
            ),
            ("-team", "\"-team\" is not a valid label key"),
        ] {
            let got = parse(text).unwrap_err();
            assert!(got.contains(error), "{text:?}: {got}");
        }
    }
}
