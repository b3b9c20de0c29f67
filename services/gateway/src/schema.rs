//! JSON Schemas of the wire types for MCP tools, from the same utoipa derives that
//! describe the HTTP API in the OpenAPI document: a type's schema with the schemas
//! it refers to under `$defs` (OpenAPI 3.1 schemas are JSON Schema 2020-12, so only
//! the references move from `#/components/schemas/X` to `#/$defs/X`). MCP wants an
//! object at the root of tool schemas; every tool's input and output is one.

use rmcp::model::JsonObject;
use serde_json::{Map, Value};
use utoipa::ToSchema;

const COMPONENTS: &str = "#/components/schemas/";
const DEFS: &str = "#/$defs/";

/// A self-contained JSON Schema (2020-12) of `T`.
pub fn of<T: ToSchema>() -> JsonObject {
    let mut deps = Vec::new();
    T::schemas(&mut deps);
    let mut root = match serde_json::to_value(T::schema()) {
        Ok(Value::Object(o)) => o,
        _ => Map::new(),
    };
    if !deps.is_empty() {
        let defs: Map<String, Value> = deps
            .into_iter()
            .filter_map(|(name, s)| Some((name, serde_json::to_value(s).ok()?)))
            .collect();
        root.insert("$defs".into(), Value::Object(defs));
    }
    root.insert(
        "$schema".into(),
        Value::String("https://json-schema.org/draft/2020-12/schema".into()),
    );
    let mut root = Value::Object(root);
    move_refs(&mut root);
    match root {
        Value::Object(o) => o,
        _ => unreachable!("built as an object"),
    }
}

/// A tool's input schema: `T`'s, an object at the root, with the properties of
/// its compositions also listed at the root (see [`hoist`]).
pub fn input<T: ToSchema>() -> JsonObject {
    let mut schema = with_object_root(of::<T>());
    hoist(&mut schema);
    schema
}

/// Lists at the root the properties that a flattened field's `allOf` and a tagged
/// enum's `oneOf` bring (the tag as an `enum` of its values, a variant's own fields
/// as optional), keeping the compositions for validation. Many MCP hosts and
/// function-calling models look only at the root `properties`; without this
/// `create_task` would show neither `mode` nor `command`.
pub fn hoist(schema: &mut JsonObject) {
    let defs = schema
        .get("$defs")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let resolve = |v: &Value| -> Option<Map<String, Value>> {
        let o = v.as_object()?;
        match o.get("$ref").and_then(Value::as_str) {
            Some(r) => defs.get(r.strip_prefix(DEFS)?)?.as_object().cloned(),
            None => Some(o.clone()),
        }
    };
    let Some(parts) = schema.get("allOf").and_then(Value::as_array).cloned() else {
        return;
    };
    let mut properties = schema
        .get("properties")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut required: Vec<Value> = schema
        .get("required")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for part in parts.iter().filter_map(resolve) {
        if let Some(props) = part.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                properties.entry(k.clone()).or_insert_with(|| v.clone());
            }
            for r in part.get("required").and_then(Value::as_array).into_iter().flatten() {
                if !required.contains(r) {
                    required.push(r.clone());
                }
            }
        }
        let variants: Vec<Map<String, Value>> = part
            .get("oneOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(resolve)
            .collect();
        if variants.is_empty() {
            continue;
        }
        // Required in every variant (the tag) stays required.
        let in_all = |name: &str| {
            variants.iter().all(|v| {
                v.get("required")
                    .and_then(Value::as_array)
                    .is_some_and(|r| r.iter().any(|x| x == name))
            })
        };
        for v in &variants {
            for (k, prop) in v.get("properties").and_then(Value::as_object).into_iter().flatten() {
                match (properties.get_mut(k), prop.get("enum")) {
                    (Some(Value::Object(existing)), Some(Value::Array(values))) => {
                        if let Some(Value::Array(all)) = existing.get_mut("enum") {
                            for value in values {
                                if !all.contains(value) {
                                    all.push(value.clone());
                                }
                            }
                        }
                    }
                    (Some(_), _) => {}
                    (None, _) => {
                        properties.insert(k.clone(), prop.clone());
                    }
                }
                if in_all(k) && !required.iter().any(|r| r == k) {
                    required.push(Value::String(k.clone()));
                }
            }
        }
    }
    schema.insert("properties".into(), Value::Object(properties));
    if !required.is_empty() {
        schema.insert("required".into(), Value::Array(required));
    }
}

/// A tool's output schema: `T`'s, an object at the root.
pub fn output<T: ToSchema>() -> JsonObject {
    with_object_root(of::<T>())
}

/// Says `"type": "object"` at the root when a composition (`allOf`/`oneOf` of
/// objects, as a flattened tagged enum makes) left it implicit.
fn with_object_root(mut schema: JsonObject) -> JsonObject {
    schema.entry("type").or_insert_with(|| Value::String("object".into()));
    schema
}

fn move_refs(v: &mut Value) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get_mut("$ref")
                && let Some(name) = r.strip_prefix(COMPONENTS)
            {
                *r = format!("{DEFS}{name}");
            }
            o.values_mut().for_each(move_refs);
        }
        Value::Array(a) => a.iter_mut().for_each(move_refs),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_task_lists_every_field_at_the_root_with_the_modes_as_an_enum() {
        let s = input::<tanjiren_shared::model::TaskSpec>();
        let props = s["properties"].as_object().unwrap();
        for field in [
            "intent",
            "mode",
            "command",
            "prompt",
            "questions",
            "targets",
            "idempotency_key",
        ] {
            assert!(props.contains_key(field), "{field} missing from {props:?}");
        }
        assert_eq!(
            props["mode"]["enum"],
            serde_json::json!(["command", "prompt", "investigate"])
        );
        let required: Vec<&str> = s["required"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(required.contains(&"mode") && required.contains(&"intent") && required.contains(&"targets"));
        assert!(
            !required.contains(&"command"),
            "a variant's own field is optional at the root"
        );
        assert!(s.contains_key("allOf"), "the compositions still validate");
        assert_eq!(s["type"], "object");
    }
}
