//! The limits the CRD's schema states (lengths, item counts, ranges, enums, required fields,
//! unique list keys), checked again in Rust on every spec: the apiserver enforces them only
//! when the installed CRD carries them (an older or hand-edited CRD may not), and standalone
//! manifests never meet an apiserver. The schema is the generated CRD's own, so a limit added
//! to a type is checked here without a line of code. Patterns and `x-kubernetes-validations`
//! rules (CEL) are checked where each value is parsed ([`crate::controller::validate`],
//! `src/names.rs`), with the reasons users need, and a duration stored before its pattern
//! narrowed still parses. A keyword this walker does not know fails a unit test, so none is
//! skipped silently.

use std::collections::HashSet;
use std::sync::LazyLock;

use serde_json::Value;

/// The keywords of the CRD's schemas: those checked, and those that state no limit.
#[cfg(test)]
const KEYWORDS: &[&str] = &[
    // Checked.
    "type",
    "nullable",
    "properties",
    "required",
    "items",
    "maxLength",
    "minLength",
    "maxItems",
    "minItems",
    "maximum",
    "minimum",
    "enum",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    // No limit of their own: documentation, defaults (applied by serde), formats and patterns
    // (the values are parsed in Rust), rules checked in Rust, embedded objects (their own API).
    "pattern",
    "description",
    "title",
    "default",
    "format",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
    "x-kubernetes-embedded-resource",
    "x-kubernetes-int-or-string",
    "additionalProperties",
];

/// The `spec` schema of the generated CRD.
static SPEC: LazyLock<Value> = LazyLock::new(|| {
    let crd = serde_json::to_value(super::crd()).expect("a CRD serialises to JSON");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
});

/// Checks `spec` (a ChronTask's spec as JSON) against the CRD's schema; the error names the
/// first field that breaks a limit and the limit (`spec.action.http.headers: 65 items, at most
/// 64`).
pub fn check(spec: &Value) -> Result<(), (String, String)> {
    walk(&SPEC, spec, "spec")
}

fn walk(schema: &Value, value: &Value, at: &str) -> Result<(), (String, String)> {
    let fail = |why: String| Err((at.to_string(), why));
    if value.is_null() {
        return match schema.get("nullable").and_then(Value::as_bool) {
            Some(true) => Ok(()),
            _ if schema.get("type").is_none() => Ok(()),
            _ => fail("must not be null".into()),
        };
    }
    if let Some(kind) = schema.get("type").and_then(Value::as_str) {
        let matches = match kind {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            _ => true,
        };
        if !matches {
            return fail(format!("must be of type {kind}"));
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let names: Vec<String> = allowed.iter().map(Value::to_string).collect();
        return fail(format!("must be one of {}", names.join(", ")));
    }
    match value {
        Value::String(text) => string(schema, text).or_else(fail),
        Value::Number(number) => range(schema, number.as_f64().unwrap_or(0.0)).or_else(fail),
        Value::Array(items) => {
            size(schema, "maxItems", "minItems", items.len(), "items").or_else(fail)?;
            unique(schema, items).or_else(fail)?;
            if let Some(item) = schema.get("items") {
                for (i, value) in items.iter().enumerate() {
                    walk(item, value, &format!("{at}[{i}]"))?;
                }
            }
            Ok(())
        }
        Value::Object(fields) => {
            for name in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if fields.get(name).is_none_or(Value::is_null) {
                    return Err((format!("{at}.{name}"), "is required".into()));
                }
            }
            if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
                for (name, value) in fields {
                    if let Some(property) = properties.get(name) {
                        walk(property, value, &format!("{at}.{name}"))?;
                    }
                }
            }
            Ok(())
        }
        Value::Bool(_) | Value::Null => Ok(()),
    }
}

fn string(schema: &Value, text: &str) -> Result<(), String> {
    // Kubernetes counts characters, not bytes.
    size(
        schema,
        "maxLength",
        "minLength",
        text.chars().count(),
        "characters",
    )
}

/// `n` within the schema's `most` and `least` keywords (`65 items, at most 64`).
fn size(schema: &Value, most: &str, least: &str, n: usize, unit: &str) -> Result<(), String> {
    if let Some(most) = limit(schema, most)
        && n as f64 > most
    {
        return Err(format!("{n} {unit}, at most {most}"));
    }
    if let Some(least) = limit(schema, least)
        && (n as f64) < least
    {
        return Err(format!("{n} {unit}, at least {least}"));
    }
    Ok(())
}

fn range(schema: &Value, number: f64) -> Result<(), String> {
    if let Some(most) = limit(schema, "maximum")
        && number > most
    {
        return Err(format!("{number} is above the maximum {most}"));
    }
    if let Some(least) = limit(schema, "minimum")
        && number < least
    {
        return Err(format!("{number} is below the minimum {least}"));
    }
    Ok(())
}

/// `x-kubernetes-list-type: set` (no item twice) and `map` (no two items with equal keys).
fn unique(schema: &Value, items: &[Value]) -> Result<(), String> {
    let keys: Vec<&str> = match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("map") => schema
            .get("x-kubernetes-list-map-keys")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect(),
        Some("set") => Vec::new(),
        _ => return Ok(()),
    };
    let mut seen = HashSet::new();
    for item in items {
        let identity = match keys.is_empty() {
            true => item.to_string(),
            false => keys.iter().map(|k| item[*k].to_string()).collect(),
        };
        if !seen.insert(identity) {
            return Err(format!("{item} appears twice"));
        }
    }
    Ok(())
}

fn limit(schema: &Value, keyword: &str) -> Option<f64> {
    schema.get(keyword).and_then(Value::as_f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every keyword of every schema in the CRD is one this walker knows.
    #[test]
    fn the_walker_knows_every_keyword_of_the_schema() {
        fn keywords(schema: &Value, at: &str, unknown: &mut Vec<String>) {
            let Some(fields) = schema.as_object() else {
                return;
            };
            for (keyword, value) in fields {
                if !KEYWORDS.contains(&keyword.as_str()) {
                    unknown.push(format!("{at}: {keyword}"));
                }
                match keyword.as_str() {
                    "properties" => {
                        for (name, property) in value.as_object().into_iter().flatten() {
                            keywords(property, &format!("{at}.{name}"), unknown);
                        }
                    }
                    "items" | "additionalProperties" => {
                        keywords(value, &format!("{at}[]"), unknown)
                    }
                    _ => {}
                }
            }
        }
        let mut unknown = Vec::new();
        keywords(&SPEC, "spec", &mut unknown);
        assert_eq!(unknown, Vec::<String>::new());
    }

    fn spec(http: Value) -> Value {
        json!({"schedule": {"interval": "1m"}, "action": {"http": http}})
    }

    #[test]
    fn every_kind_of_limit_names_the_field_and_the_limit() {
        let url = "http://x.example/";
        let header = |i: usize| json!({"name": format!("X-{i}"), "value": "v"});
        let cases = [
            (
                spec(json!({"url": url, "headers": (0..65).map(header).collect::<Vec<_>>()})),
                "spec.action.http.headers",
                "65 items, at most 64",
            ),
            (
                spec(json!({"url": url, "body": "x".repeat(65_537)})),
                "spec.action.http.body",
                "65537 characters, at most 65536",
            ),
            (
                spec(json!({"url": url, "successCodes": vec!["200"; 33]})),
                "spec.action.http.successCodes",
                "33 items, at most 32",
            ),
            (
                json!({"schedule": {"interval": "1m"}, "maxConcurrentRuns": 1000,
                       "action": {"http": {"url": url}}}),
                "spec.maxConcurrentRuns",
                "1000 is above the maximum",
            ),
            (
                spec(json!({"url": url, "method": "BREW"})),
                "spec.action.http.method",
                "must be one of",
            ),
            (
                spec(json!({"url": url, "headers": [{"value": "v"}]})),
                "spec.action.http.headers[0].name",
                "is required",
            ),
        ];
        for (spec, field, why) in cases {
            let (at, reason) = check(&spec).unwrap_err();
            assert_eq!(at, field, "{reason}");
            assert!(reason.contains(why), "{at}: {reason}");
        }
        assert_eq!(check(&spec(json!({"url": url}))), Ok(()));
    }
}
