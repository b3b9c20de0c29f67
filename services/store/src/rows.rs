//! Typed columns: the text enums of `tanjiren_shared::model` (statuses, reasons)
//! decoded from Postgres `text` as themselves, so a row carries a `TaskStatus`, not
//! a string parsed later with a silent default. A value that names no variant is a
//! decode error (the column holds something no version of Tanjiren wrote).

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgArgumentBuffer, PgTypeInfo, PgValueRef};
use sqlx::{Decode, Encode, Postgres, Type};
use std::str::FromStr;

/// A text column holding `T`'s snake_case text (any strum `EnumString` /
/// `IntoStaticStr` enum of the model). Read it as `row.status.0` or `*row.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Text<T>(pub T);

impl<T> std::ops::Deref for Text<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> Type<Postgres> for Text<T> {
    fn type_info() -> PgTypeInfo {
        <String as Type<Postgres>>::type_info()
    }
    fn compatible(ty: &PgTypeInfo) -> bool {
        <String as Type<Postgres>>::compatible(ty)
    }
}

impl<'r, T> Decode<'r, Postgres> for Text<T>
where
    T: FromStr,
    T::Err: std::error::Error + Send + Sync + 'static,
{
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        let text = <&str as Decode<Postgres>>::decode(value)?;
        Ok(Text(text.parse()?))
    }
}

impl<T: Copy + Into<&'static str>> Encode<'_, Postgres> for Text<T> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        let text: &'static str = self.0.into();
        <&str as Encode<Postgres>>::encode_by_ref(&text, buf)
    }
}
