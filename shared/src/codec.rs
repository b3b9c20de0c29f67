//! The wire codec: MessagePack with named fields by default, JSON when the
//! message's `Content-Type` header is `application/json`. Replies use the
//! envelope `{ok: …}` or `{error: {code, message}}` in the caller's encoding.

use crate::error::WireError;
#[cfg(test)]
use crate::ids::TaskId;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

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

    pub fn encode<T: Serialize + ?Sized>(&self, value: &T) -> Vec<u8> {
        match self {
            // Named fields: positional arrays would break every reader when a field is added.
            // Human-readable: ids travel as strings, as in JSON, so any client can read and write them.
            Encoding::MsgPack => {
                let mut buf = Vec::with_capacity(128);
                let mut ser = rmp_serde::Serializer::new(&mut buf)
                    .with_struct_map()
                    .with_human_readable();
                value
                    .serialize(&mut ser)
                    .expect("msgpack encoding of an in-memory value");
                buf
            }
            Encoding::Json => serde_json::to_vec(value).expect("json encoding of an in-memory value"),
        }
    }

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

/// Every reply: exactly one of `ok` or `error`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
            let bytes = enc.encode(&v);
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
        let bytes = Encoding::MsgPack.encode(&Old {
            count: 7,
            name: "n".into(),
        });
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
        let bytes = Encoding::MsgPack.encode(&v);
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
        let back: Reply<u32> = Encoding::MsgPack.decode(&Encoding::MsgPack.encode(&err)).unwrap();
        assert_eq!(back, err);
    }
}
