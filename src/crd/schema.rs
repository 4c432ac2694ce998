//! Hand-written schema fragments for fields whose Rust types carry no schema of their own.

use schemars::{Schema, SchemaGenerator, json_schema};

/// An object stored as given (embedded Kubernetes templates): validated by the operator and by
/// the apiserver when the object is created, not at admission of the ChronTask.
pub fn preserve_unknown_object(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

/// `metav1.Condition` list as Kubernetes types it: a list-map keyed by `type`, so server-side
/// apply merges conditions by type.
pub fn conditions(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": {
            "type": "object",
            "required": ["type", "status", "lastTransitionTime", "reason", "message"],
            "properties": {
                "type": {"type": "string", "description": "Condition type, e.g. Ready."},
                "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                "observedGeneration": {"type": "integer", "format": "int64"},
                "lastTransitionTime": {"type": "string", "format": "date-time",
                    "description": "When status last changed."},
                "reason": {"type": "string", "description": "CamelCase reason for the status."},
                "message": {"type": "string", "description": "Human-readable details."},
            },
        },
    })
}

/// Adapts a schemars-generated schema to what the apiserver and `kubectl explain` expect:
/// unsigned integer formats become the signed ones Kubernetes knows (the `minimum: 0` stays),
/// and doc-comment line breaks inside a paragraph become spaces so `kubectl explain` can wrap.
pub fn adapt_for_kubernetes(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            for (key, entry) in map.iter_mut() {
                match (key.as_str(), &mut *entry) {
                    ("format", Value::String(format)) if format.starts_with("uint") => {
                        *format = format.trim_start_matches('u').to_string();
                    }
                    ("description", Value::String(text)) => *text = unwrap_paragraphs(text),
                    _ => adapt_for_kubernetes(entry),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(adapt_for_kubernetes),
        _ => {}
    }
}

fn unwrap_paragraphs(text: &str) -> String {
    text.split("\n\n")
        .map(|paragraph| {
            paragraph
                .split('\n')
                .map(str::trim)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n\n")
}
