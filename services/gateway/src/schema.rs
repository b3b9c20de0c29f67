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

/// A tool's input schema: `T`'s, an object at the root.
pub fn input<T: ToSchema>() -> JsonObject {
    with_object_root(of::<T>())
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
