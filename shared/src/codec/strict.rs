//! The decoding rule every served request goes through, as a serde
//! `Deserializer` wrapper (built like `serde_ignored` and `serde_path_to_error`:
//! each visitor, seed and access is wrapped so the rule reaches every nested value):
//!
//! - a struct must arrive as a map of named fields: a positional array in its
//!   place is refused (`malformed_payload`), whatever the format allows;
//! - a string (a value or a map key, at any depth) must not contain NUL (U+0000),
//!   which Postgres `text` cannot store: refused (`invalid_request`), or — for
//!   worker output, under [`TextPolicy::ReplaceNul`] — replaced by U+FFFD.
//!
//! A refusal is recorded in a thread-local slot before the error unwinds through
//! the format's own error type, so [`super::Encoding::decode_request`] can tell
//! it from an ordinary decoding error and give it its wire code. Field
//! validators use the same slot through [`super::refuse`]. Values skipped as
//! unknown fields are not looked at.

use crate::error::WireError;
use serde::de::{self, DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
use std::cell::RefCell;
use std::fmt;

/// What happens to NUL (U+0000) in a string of a request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TextPolicy {
    /// Refuse the request with `invalid_request` naming the field (every subject but worker output).
    #[default]
    Refuse,
    /// Replace each NUL by U+FFFD and go on: for worker output (`ingest.logs`,
    /// `ingest.progress`), which is whatever bytes a command printed and is never
    /// a reason to fail a step.
    ReplaceNul,
}

/// A decoding refusal: the wire error it becomes, and whether the message still
/// needs the field path in front of it.
#[derive(Debug)]
pub(super) struct Refusal {
    pub error: WireError,
    pub prefix_path: bool,
}

thread_local! {
    static REFUSAL: RefCell<Option<Refusal>> = const { RefCell::new(None) };
}

/// Forgets any refusal left from an earlier decode on this thread.
pub(super) fn clear() {
    REFUSAL.with(|r| r.borrow_mut().take());
}

/// The refusal recorded since the last [`clear`], if any.
pub(super) fn take() -> Option<Refusal> {
    REFUSAL.with(|r| r.borrow_mut().take())
}

/// Records `refusal` (the first one wins) and returns the format error that unwinds the decode.
pub(super) fn record<E: de::Error>(refusal: Refusal) -> E {
    let message = refusal.error.message.clone();
    REFUSAL.with(|r| {
        let mut slot = r.borrow_mut();
        if slot.is_none() {
            *slot = Some(refusal);
        }
    });
    E::custom(message)
}

const NUL_IN_TEXT: &str = "must not contain NUL (U+0000)";
const NUL_IN_KEY: &str = "a key must not contain NUL (U+0000)";
const POSITIONAL: &str = "expected an object (a map of named fields), not a positional array";

fn refuse_nul<E: de::Error>(key: bool) -> E {
    record(Refusal {
        error: WireError::invalid(if key { NUL_IN_KEY } else { NUL_IN_TEXT }),
        prefix_path: true,
    })
}

fn refuse_positional<E: de::Error>() -> E {
    record(Refusal {
        error: WireError::malformed(POSITIONAL),
        prefix_path: true,
    })
}

/// What the type being decoded asked for, as far as the rule cares.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// A struct (or a struct variant): only a map will do.
    Struct,
    /// Raw bytes, asked for explicitly: NUL is just a byte there.
    Bytes,
    Other,
}

/// A deserializer that applies the rule to everything read through it.
pub(super) struct Strict<D> {
    de: D,
    policy: TextPolicy,
    key: bool,
}

impl<D> Strict<D> {
    pub(super) fn new(de: D, policy: TextPolicy) -> Self {
        Self { de, policy, key: false }
    }
}

struct Wrap<V> {
    inner: V,
    policy: TextPolicy,
    key: bool,
    shape: Shape,
}

impl<D> Strict<D> {
    fn wrap<V>(&self, inner: V, shape: Shape) -> Wrap<V> {
        Wrap {
            inner,
            policy: self.policy,
            key: self.key,
            shape,
        }
    }
}

macro_rules! forward {
    ($($method:ident($($arg:ident: $ty:ty),*);)*) => {$(
        fn $method<V: Visitor<'de>>(self, $($arg: $ty,)* visitor: V) -> Result<V::Value, D::Error> {
            let v = self.wrap(visitor, Shape::Other);
            self.de.$method($($arg,)* v)
        }
    )*};
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Strict<D> {
    type Error = D::Error;

    forward! {
        deserialize_any();
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_str();
        deserialize_string();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
        deserialize_identifier();
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        let v = self.wrap(visitor, Shape::Bytes);
        self.de.deserialize_bytes(v)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        let v = self.wrap(visitor, Shape::Bytes);
        self.de.deserialize_byte_buf(v)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, D::Error> {
        let v = self.wrap(visitor, Shape::Struct);
        self.de.deserialize_struct(name, fields, v)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        // An unknown field is skipped, never stored: nothing to check.
        self.de.deserialize_ignored_any(visitor)
    }

    fn is_human_readable(&self) -> bool {
        self.de.is_human_readable()
    }
}

impl<V> Wrap<V> {
    fn strict<D>(&self, de: D, key: bool) -> Strict<D> {
        Strict {
            de,
            policy: self.policy,
            key,
        }
    }
}

macro_rules! forward_visit {
    ($($method:ident($ty:ty);)*) => {$(
        fn $method<E: de::Error>(self, v: $ty) -> Result<Self::Value, E> {
            self.inner.$method(v)
        }
    )*};
}

impl<'de, V: Visitor<'de>> Visitor<'de> for Wrap<V> {
    type Value = V::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(f)
    }

    forward_visit! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i64(i64);
        visit_i128(i128);
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u64(u64);
        visit_u128(u128);
        visit_f32(f32);
        visit_f64(f64);
    }

    fn visit_char<E: de::Error>(self, c: char) -> Result<Self::Value, E> {
        match (c, self.policy) {
            ('\0', TextPolicy::Refuse) => Err(refuse_nul(self.key)),
            ('\0', TextPolicy::ReplaceNul) => self.inner.visit_char('\u{FFFD}'),
            _ => self.inner.visit_char(c),
        }
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
        if !s.contains('\0') {
            return self.inner.visit_str(s);
        }
        match self.policy {
            TextPolicy::Refuse => Err(refuse_nul(self.key)),
            TextPolicy::ReplaceNul => self.inner.visit_string(s.replace('\0', "\u{FFFD}")),
        }
    }

    fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Self::Value, E> {
        if !s.contains('\0') {
            return self.inner.visit_borrowed_str(s);
        }
        self.visit_str(s)
    }

    fn visit_string<E: de::Error>(self, s: String) -> Result<Self::Value, E> {
        if !s.contains('\0') {
            return self.inner.visit_string(s);
        }
        self.visit_str(&s)
    }

    fn visit_bytes<E: de::Error>(self, b: &[u8]) -> Result<Self::Value, E> {
        if self.shape == Shape::Bytes || !b.contains(&0) {
            return self.inner.visit_bytes(b);
        }
        // Bytes read into a string (MessagePack `bin` for a text field) follow the text rule.
        match (self.policy, std::str::from_utf8(b)) {
            (TextPolicy::Refuse, _) => Err(refuse_nul(self.key)),
            (TextPolicy::ReplaceNul, Ok(s)) => self.inner.visit_string(s.replace('\0', "\u{FFFD}")),
            (TextPolicy::ReplaceNul, Err(_)) => self.inner.visit_bytes(b),
        }
    }

    fn visit_borrowed_bytes<E: de::Error>(self, b: &'de [u8]) -> Result<Self::Value, E> {
        if self.shape == Shape::Bytes || !b.contains(&0) {
            return self.inner.visit_borrowed_bytes(b);
        }
        self.visit_bytes(b)
    }

    fn visit_byte_buf<E: de::Error>(self, b: Vec<u8>) -> Result<Self::Value, E> {
        if self.shape == Shape::Bytes || !b.contains(&0) {
            return self.inner.visit_byte_buf(b);
        }
        self.visit_bytes(&b)
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let d = self.strict(d, self.key);
        self.inner.visit_some(d)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let d = self.strict(d, self.key);
        self.inner.visit_newtype_struct(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        if self.shape == Shape::Struct {
            return Err(refuse_positional());
        }
        self.inner.visit_seq(Seq {
            seq,
            policy: self.policy,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_map(Map {
            map,
            policy: self.policy,
        })
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<Self::Value, A::Error> {
        self.inner.visit_enum(Enum {
            data,
            policy: self.policy,
        })
    }
}

/// A seed whose value is read through [`Strict`].
struct Seed<S> {
    seed: S,
    policy: TextPolicy,
    key: bool,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
        self.seed.deserialize(Strict {
            de: d,
            policy: self.policy,
            key: self.key,
        })
    }
}

struct Seq<A> {
    seq: A,
    policy: TextPolicy,
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Seq<A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<Option<T::Value>, A::Error> {
        self.seq.next_element_seed(Seed {
            seed,
            policy: self.policy,
            key: false,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        self.seq.size_hint()
    }
}

struct Map<A> {
    map: A,
    policy: TextPolicy,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Map<A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        self.map.next_key_seed(Seed {
            seed,
            policy: self.policy,
            key: true,
        })
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
        self.map.next_value_seed(Seed {
            seed,
            policy: self.policy,
            key: false,
        })
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

struct Enum<A> {
    data: A,
    policy: TextPolicy,
}

impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Enum<A> {
    type Error = A::Error;
    type Variant = Variant<A::Variant>;

    fn variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<(T::Value, Self::Variant), A::Error> {
        let policy = self.policy;
        // A variant name is read like a value: `view: must not contain NUL`.
        let (value, variant) = self.data.variant_seed(Seed {
            seed,
            policy,
            key: false,
        })?;
        Ok((value, Variant { variant, policy }))
    }
}

struct Variant<A> {
    variant: A,
    policy: TextPolicy,
}

impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Variant<A> {
    type Error = A::Error;

    fn unit_variant(self) -> Result<(), A::Error> {
        self.variant.unit_variant()
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
        self.variant.newtype_variant_seed(Seed {
            seed,
            policy: self.policy,
            key: false,
        })
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, A::Error> {
        self.variant.tuple_variant(
            len,
            Wrap {
                inner: visitor,
                policy: self.policy,
                key: false,
                shape: Shape::Other,
            },
        )
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.variant.struct_variant(
            fields,
            Wrap {
                inner: visitor,
                policy: self.policy,
                key: false,
                shape: Shape::Struct,
            },
        )
    }
}
