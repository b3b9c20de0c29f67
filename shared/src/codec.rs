//! The wire codec: MessagePack with named fields by default, JSON when the
//! message's `Content-Type` header is `application/json`. Replies use the
//! envelope `{ok: …}` or `{error: {code, message}}` in the caller's encoding.
//!
//! Requests are decoded by [`Encoding::decode_request`], the one decoding rule
//! of every served subject (see [`strict`]): structs only as maps, no NUL in
//! text, and an error that names the field path. Replies and events are read
//! with the lenient [`Encoding::decode`]. The size of a reply is bounded here
//! too: [`MAX_PAGE_BYTES`] and [`fit_page`] for list pages.

mod strict;

use crate::error::{WireError, quote};
#[cfg(test)]
use crate::ids::TaskId;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

pub use strict::TextPolicy;

/// The header that selects the encoding, and the value that selects JSON.
pub const CONTENT_TYPE: &str = "Content-Type";
pub const JSON: &str = "application/json";
pub const MSGPACK: &str = "application/msgpack";

/// Which encoding a message uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    MsgPack,
    Json,
}

impl Encoding {
    /// JSON when the content type says so (parameters such as `; charset=utf-8` allowed), else MessagePack.
    pub fn from_content_type(content_type: Option<&str>) -> Self {
        match content_type {
            Some(ct) if ct.split(';').next().map(|m| m.trim().eq_ignore_ascii_case(JSON)) == Some(true) => {
                Encoding::Json
            }
            _ => Encoding::MsgPack,
        }
    }

    pub fn content_type(&self) -> &'static str {
        match self {
            Encoding::MsgPack => MSGPACK,
            Encoding::Json => JSON,
        }
    }

    /// Encodes `value` in this encoding (MessagePack with named fields, or JSON).
    ///
    /// # Errors
    /// `internal` when the value cannot be serialised (a map whose keys are not
    /// strings, in JSON; a `Serialize` impl that fails). Never panics.
    pub fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Result<Vec<u8>, WireError> {
        let failed = |e: &dyn std::fmt::Display| WireError::internal(format!("cannot encode the message: {e}"));
        match self {
            // Named fields: positional arrays would break every reader when a field is added.
            // Human-readable: ids travel as strings, as in JSON, so any client can read and write them.
            Encoding::MsgPack => {
                let mut buf = Vec::with_capacity(128);
                let mut ser = rmp_serde::Serializer::new(&mut buf)
                    .with_struct_map()
                    .with_human_readable();
                value.serialize(&mut ser).map_err(|e| failed(&e))?;
                Ok(buf)
            }
            Encoding::Json => serde_json::to_vec(value).map_err(|e| failed(&e)),
        }
    }

    /// Decodes a request under the decoding rule (module [`strict`]): a struct sent
    /// as a positional array is `malformed_payload`; NUL in any string is
    /// `invalid_request` (or replaced by U+FFFD under [`TextPolicy::ReplaceNul`]);
    /// a field validator's [`refuse`] becomes its own error. Every error names the
    /// field path (`labels.env`, `questions[2]`, `retry_policy`).
    ///
    /// The path costs an allocation per map key, so it is found only for a
    /// payload that failed: the decode is then run a second time with
    /// `serde_path_to_error` to locate the error.
    pub fn decode_request<T: DeserializeOwned>(&self, bytes: &[u8], policy: TextPolicy) -> Result<T, WireError> {
        strict::clear();
        let first = match self.decode_strict::<T>(bytes, policy) {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        strict::clear();
        let located = self.decode_located::<T>(bytes, policy);
        let refusal = strict::take();
        let (path, message) = match located {
            Err((path, message)) => (path, message),
            Ok(()) => (String::new(), first),
        };
        if let Some(r) = refusal {
            let mut e = r.error;
            if r.prefix_path {
                let field = if path.is_empty() { "payload".to_string() } else { path };
                e = WireError::new(e.code, format!("{field}: {}", e.message));
            }
            return Err(e);
        }
        let what = match self {
            Encoding::MsgPack => "MessagePack",
            Encoding::Json => "JSON",
        };
        Err(WireError::malformed(if path.is_empty() {
            format!("invalid {what} payload: {message}")
        } else {
            format!("invalid {what} payload: {path}: {message}")
        }))
    }

    fn decode_strict<T: DeserializeOwned>(&self, bytes: &[u8], policy: TextPolicy) -> Result<T, String> {
        match self {
            Encoding::MsgPack => {
                let mut de = rmp_serde::Deserializer::from_read_ref(bytes).with_human_readable();
                T::deserialize(strict::Strict::new(&mut de, policy)).map_err(|e| e.to_string())
            }
            Encoding::Json => {
                let mut de = serde_json::Deserializer::from_slice(bytes);
                let v = T::deserialize(strict::Strict::new(&mut de, policy)).map_err(|e| e.to_string())?;
                de.end().map_err(|e| e.to_string())?;
                Ok(v)
            }
        }
    }

    /// The same decode with the path tracked; `Err((path, message))` where it failed.
    fn decode_located<T: DeserializeOwned>(&self, bytes: &[u8], policy: TextPolicy) -> Result<(), (String, String)> {
        fn located<E: std::fmt::Display>(e: serde_path_to_error::Error<E>) -> (String, String) {
            (render_path(e.path()), e.inner().to_string())
        }
        match self {
            Encoding::MsgPack => {
                let mut de = rmp_serde::Deserializer::from_read_ref(bytes).with_human_readable();
                serde_path_to_error::deserialize::<_, T>(strict::Strict::new(&mut de, policy)).map_err(located)?;
            }
            Encoding::Json => {
                let mut de = serde_json::Deserializer::from_slice(bytes);
                serde_path_to_error::deserialize::<_, T>(strict::Strict::new(&mut de, policy)).map_err(located)?;
                de.end().map_err(|e| (String::new(), e.to_string()))?;
            }
        }
        Ok(())
    }

    /// Decodes a reply, an event or any message Tanjiren wrote itself, without the
    /// request rule (a reader must not choke on what a newer peer sends).
    pub fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, WireError> {
        match self {
            Encoding::MsgPack => {
                let mut de = rmp_serde::Deserializer::from_read_ref(bytes).with_human_readable();
                T::deserialize(&mut de).map_err(|e| WireError::malformed(format!("invalid MessagePack payload: {e}")))
            }
            Encoding::Json => {
                serde_json::from_slice(bytes).map_err(|e| WireError::malformed(format!("invalid JSON payload: {e}")))
            }
        }
    }
}

/// `questions[2]`, `labels.env`, `retry_policy`: a field path with every key quoted short.
fn render_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut out = String::new();
    let segments: Vec<&Segment> = path.iter().collect();
    // A trailing unknown segment is a map key that failed to decode: the map names it.
    let known = match segments.last() {
        Some(Segment::Unknown) => &segments[..segments.len() - 1],
        _ => &segments[..],
    };
    for segment in known {
        match segment {
            Segment::Seq { index } => out.push_str(&format!("[{index}]")),
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&quote(key));
            }
            Segment::Unknown => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push('?');
            }
        }
    }
    out
}

/// Refuses a value from inside a field's `Deserialize` (a validator used with
/// `#[serde(deserialize_with = …)]`): the request is answered with `error`,
/// message as given (it names its own field), instead of `malformed_payload`.
/// Only [`Encoding::decode_request`] gives the refusal its code; elsewhere it is
/// an ordinary decoding error.
pub fn refuse<E: serde::de::Error>(error: WireError) -> E {
    strict::record(strict::Refusal {
        error,
        prefix_path: false,
    })
}

/// Most bytes of items one page of a list reply carries, measured as JSON (which
/// is never much smaller than the MessagePack form): half of NATS's default max
/// payload (1 MiB), leaving room for the envelope and the rest of the reply.
/// A page that reaches it ends early with a cursor to go on.
pub const MAX_PAGE_BYTES: usize = 512 * 1024;

/// The page budget on a connection whose server accepts `max_payload` bytes:
/// [`MAX_PAGE_BYTES`], or half the server's limit if that is smaller.
pub fn page_budget(max_payload: usize) -> usize {
    MAX_PAGE_BYTES.min(max_payload / 2)
}

/// The size of `value` encoded as JSON, in bytes (counted, not allocated).
pub fn json_size<T: Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    serde_json::to_writer(&mut c, value).expect("json encoding of an in-memory value");
    c.0
}

/// Keeps the longest prefix of `items` whose JSON size fits in `budget` bytes —
/// always at least one item, so a page makes progress — and drops the rest.
/// Returns how many bytes the kept items take and whether any were dropped.
pub fn fit_page<T: Serialize>(items: &mut Vec<T>, budget: usize) -> (usize, bool) {
    let mut used = 0;
    for (i, item) in items.iter().enumerate() {
        let size = json_size(item) + 1;
        if i > 0 && used + size > budget {
            items.truncate(i);
            return (used, true);
        }
        used += size;
    }
    (used, false)
}

/// Every reply: exactly one of `ok` or `error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Reply<T> {
    Ok(T),
    Error(WireError),
}

impl<T> Reply<T> {
    pub fn into_result(self) -> Result<T, WireError> {
        match self {
            Reply::Ok(v) => Ok(v),
            Reply::Error(e) => Err(e),
        }
    }
}

impl<T> From<Result<T, WireError>> for Reply<T> {
    fn from(r: Result<T, WireError>) -> Self {
        match r {
            Ok(v) => Reply::Ok(v),
            Err(e) => Reply::Error(e),
        }
    }
}

/// A reply whose `ok` payload is ignored; used to decode only the error side.
#[derive(Debug, Deserialize)]
pub struct Ignored {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;
    use std::collections::BTreeMap;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Inner {
        a: u32,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Outer {
        name: String,
        #[serde(default)]
        inner: Option<Inner>,
        #[serde(default)]
        labels: BTreeMap<String, String>,
        #[serde(default)]
        questions: Vec<String>,
        #[serde(default)]
        doc: Option<serde_json::Value>,
    }

    fn both<T: DeserializeOwned + std::fmt::Debug>(v: serde_json::Value) -> Vec<Result<T, WireError>> {
        let json = serde_json::to_vec(&v).unwrap();
        let mp = rmp_serde::to_vec_named(&v).unwrap();
        vec![
            Encoding::Json.decode_request::<T>(&json, TextPolicy::Refuse),
            Encoding::MsgPack.decode_request::<T>(&mp, TextPolicy::Refuse),
        ]
    }

    #[test]
    fn a_struct_sent_as_a_positional_array_is_malformed_and_named() {
        for r in both::<Outer>(serde_json::json!(["x"])) {
            let e = r.unwrap_err();
            assert_eq!(e.code, ErrorCode::MalformedPayload, "{e:?}");
            assert!(e.message.starts_with("payload: expected an object"), "{}", e.message);
        }
        for r in both::<Outer>(serde_json::json!({"name": "x", "inner": [1]})) {
            let e = r.unwrap_err();
            assert_eq!(e.code, ErrorCode::MalformedPayload, "{e:?}");
            assert!(e.message.starts_with("inner: expected an object"), "{}", e.message);
        }
        // Sequences where a list is expected are fine, and so are maps.
        for r in both::<Outer>(serde_json::json!({"name": "x", "inner": {"a": 1}, "questions": ["q"]})) {
            assert_eq!(r.unwrap().inner, Some(Inner { a: 1 }));
        }
    }

    #[test]
    fn nul_in_any_string_is_refused_with_its_path() {
        let cases = [
            (serde_json::json!({"name": "a\0b"}), "name: must not contain NUL"),
            (
                serde_json::json!({"name": "x", "labels": {"env": "pro\0d"}}),
                "labels.env: must not contain NUL",
            ),
            (
                serde_json::json!({"name": "x", "labels": {"e\0nv": "prod"}}),
                "a key must not contain NUL",
            ),
            (
                serde_json::json!({"name": "x", "questions": ["a", "b", "c\0"]}),
                "questions[2]: must not contain NUL",
            ),
            (
                serde_json::json!({"name": "x", "doc": {"rules": [{"d": "\0"}]}}),
                "doc.rules[0].d: must not contain NUL",
            ),
        ];
        for (v, expected) in cases {
            for r in both::<Outer>(v.clone()) {
                let e = r.unwrap_err();
                assert_eq!(e.code, ErrorCode::InvalidRequest, "{v}: {e:?}");
                assert!(
                    e.message.contains(expected),
                    "{v}: `{}` should contain `{expected}`",
                    e.message
                );
            }
        }
        // An unknown field is skipped, never looked at.
        for r in both::<Outer>(serde_json::json!({"name": "x", "extra": "\0"})) {
            assert_eq!(r.unwrap().name, "x");
        }
    }

    #[test]
    fn worker_output_has_nul_replaced_instead() {
        let v = serde_json::json!({"name": "a\0b", "questions": ["\0"]});
        for enc in [Encoding::Json, Encoding::MsgPack] {
            let bytes = match enc {
                Encoding::Json => serde_json::to_vec(&v).unwrap(),
                Encoding::MsgPack => rmp_serde::to_vec_named(&v).unwrap(),
            };
            let o: Outer = enc.decode_request(&bytes, TextPolicy::ReplaceNul).unwrap();
            assert_eq!(o.name, "a\u{FFFD}b");
            assert_eq!(o.questions, ["\u{FFFD}"]);
        }
    }

    #[test]
    fn ordinary_errors_name_the_path_and_stay_short() {
        let huge = "z".repeat(600 * 1024);
        for r in both::<Outer>(serde_json::json!({"name": "x", "inner": {"a": huge}})) {
            let e = r.unwrap_err();
            assert_eq!(e.code, ErrorCode::MalformedPayload);
            assert!(e.message.contains("payload: inner.a: "), "{}", e.message);
            assert!(e.message.len() <= crate::error::MAX_MESSAGE_BYTES);
        }
        // A refusal from a field validator keeps its own code and message.
        #[derive(Debug, Deserialize)]
        struct Checked {
            #[serde(deserialize_with = "short")]
            #[allow(dead_code)]
            id: String,
        }
        fn short<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
            let s = String::deserialize(d)?;
            if s.len() > 3 {
                return Err(refuse(WireError::too_large("id: at most 3 bytes")));
            }
            Ok(s)
        }
        for r in both::<Checked>(serde_json::json!({"id": "abcdef"})) {
            let e = r.unwrap_err();
            assert_eq!(
                (e.code, e.message.as_str()),
                (ErrorCode::TooLarge, "id: at most 3 bytes")
            );
        }
        // Trailing garbage after a JSON document is still malformed.
        let e = Encoding::Json
            .decode_request::<Inner>(br#"{"a": 1} x"#, TextPolicy::Refuse)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::MalformedPayload);
    }

    #[test]
    fn pages_fit_their_byte_budget_and_always_make_progress() {
        let mut items: Vec<String> = (0..100).map(|_| "x".repeat(1000)).collect();
        let (used, cut) = fit_page(&mut items, 10_500);
        assert!(cut && items.len() == 10 && used <= 10_500, "{} {used}", items.len());
        let mut one = vec!["y".repeat(50_000)];
        assert!(!fit_page(&mut one, 10).1);
        assert_eq!(one.len(), 1);
        // JSON escaping counts: a control character takes six bytes.
        assert_eq!(json_size("\u{1}"), 8);
        assert_eq!(page_budget(1 << 20), MAX_PAGE_BYTES);
        assert_eq!(page_budget(64 * 1024), 32 * 1024);
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        count: u32,
        #[serde(default)]
        added_later: Option<String>,
    }

    #[test]
    fn both_encodings_round_trip() {
        let v = Sample {
            name: "x".into(),
            count: 3,
            added_later: None,
        };
        for enc in [Encoding::MsgPack, Encoding::Json] {
            let bytes = enc.encode(&v).unwrap();
            assert_eq!(enc.decode::<Sample>(&bytes).unwrap(), v);
        }
    }

    #[test]
    fn msgpack_uses_named_fields_so_old_readers_survive_new_fields() {
        #[derive(Serialize)]
        struct Old {
            count: u32,
            name: String,
        }
        let bytes = Encoding::MsgPack
            .encode(&Old {
                count: 7,
                name: "n".into(),
            })
            .unwrap();
        let v: Sample = Encoding::MsgPack.decode(&bytes).unwrap();
        assert_eq!(
            v,
            Sample {
                name: "n".into(),
                count: 7,
                added_later: None
            }
        );
    }

    #[test]
    fn ids_are_strings_in_msgpack_too() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct WithId {
            task_id: TaskId,
        }
        let v = WithId { task_id: TaskId::new() };
        let bytes = Encoding::MsgPack.encode(&v).unwrap();
        // A plain MessagePack reader sees a map with a string id.
        let generic: rmpv_like::Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(generic.0.get("task_id").unwrap(), &v.task_id.to_string());
        // And a client that sends the id as a string is understood.
        let from_client = rmp_serde::to_vec_named(&serde_json::json!({"task_id": v.task_id.to_string()})).unwrap();
        assert_eq!(Encoding::MsgPack.decode::<WithId>(&from_client).unwrap(), v);
    }

    mod rmpv_like {
        /// A map of string values, enough to look inside an encoded message.
        #[derive(Debug, serde::Deserialize)]
        pub struct Value(pub std::collections::HashMap<String, String>);
    }

    #[test]
    fn content_type_selects_json() {
        assert_eq!(Encoding::from_content_type(Some("application/json")), Encoding::Json);
        assert_eq!(
            Encoding::from_content_type(Some("Application/JSON; charset=utf-8")),
            Encoding::Json
        );
        assert_eq!(
            Encoding::from_content_type(Some("application/msgpack")),
            Encoding::MsgPack
        );
        assert_eq!(Encoding::from_content_type(None), Encoding::MsgPack);
    }

    #[test]
    fn malformed_payloads_give_typed_errors() {
        let e = Encoding::Json.decode::<Sample>(b"{not json").unwrap_err();
        assert_eq!(e.code, ErrorCode::MalformedPayload);
        let e = Encoding::MsgPack.decode::<Sample>(&[0xc1, 0x00]).unwrap_err();
        assert_eq!(e.code, ErrorCode::MalformedPayload);
        let e = Encoding::Json
            .decode::<Sample>(br#"{"name": 5, "count": 1}"#)
            .unwrap_err();
        assert!(
            e.message.contains("name") || e.message.contains("string"),
            "{}",
            e.message
        );
    }

    #[test]
    fn reply_envelope_shape() {
        let ok: Reply<u32> = Reply::Ok(5);
        assert_eq!(serde_json::to_string(&ok).unwrap(), r#"{"ok":5}"#);
        let err: Reply<u32> = Reply::Error(WireError::new(ErrorCode::NotFound, "no such task"));
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"error":{"code":"not_found","message":"no such task"}}"#
        );
        let back: Reply<u32> = Encoding::MsgPack
            .decode(&Encoding::MsgPack.encode(&err).unwrap())
            .unwrap();
        assert_eq!(back, err);
    }
}
