//! Hand-written schema fragments for fields whose Rust types carry no schema of their own.

use schemars::{json_schema, Schema, SchemaGenerator};

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
