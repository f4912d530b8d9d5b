//! Reading one value the way serde's derived internally tagged enums read it, without buffering
//! it first.
//!
//! A derived `#[serde(tag = "type")]` enum first reads every entry of the map into serde's private
//! `Content` tree (with `deserialize_any`), then deserializes the variant from that tree through
//! `ContentDeserializer`. That second reader has rules of its own, which are what the frames have
//! always accepted and refused: a MessagePack bin is not an array (`platforms` from a bin is
//! refused), a unit enum is a string or a one-entry map and never a variant index, `()` also
//! reads an empty map, keys of nested structs are strings or 8/64-bit integers, a JSON string is
//! UTF-8-checked even where the value is then ignored, and so on. Handing the field types straight
//! to `rmp_serde` or `serde_json` would apply the format's own rules instead, which differ on
//! exactly those inputs.
//!
//! So this module sits between a field's (derived) `Deserialize` and the format, and does what
//! the two passes did, in one: it asks the format for `deserialize_any`, as the buffering pass
//! did ([`Kinded`]), and once the format has said what kind of value is there (a scalar, or a
//! sequence, map or inner value it is still reading), it hands the field a deserializer for that
//! kind which applies `ContentDeserializer`'s rules to whatever the field asks for (the [`Hint`]).
//! Nothing is buffered: containers are read element by element as the field asks for them.
//!
//! It also makes a refused value recoverable: a value refused by its type ("soft") is still read
//! to its end, so the caller can go on with the next map entry. [`crate::frame_de`] needs that for
//! fields that come before `type`, which only count if the variant named later has them. An error
//! of the format itself (truncated or malformed input, nesting too deep) is "hard": the input's
//! position is then lost, [`Ctx`] is marked broken, and everything fails.
//!
//! Not reproduced, because no frame type can reach it: a unit struct read from an empty sequence
//! or map (`ContentDeserializer` calls `visit_unit` there).

use std::cell::Cell;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, Expected, MapAccess, SeqAccess, Unexpected,
    VariantAccess, Visitor,
};

/// What a `Deserialize` impl asked for: one class per group of `ContentDeserializer` methods that
/// share their rules.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Hint {
    Any,
    Bool,
    Int,
    Float,
    Char,
    Str,
    Bytes,
    Option,
    Unit,
    UnitStruct,
    NewtypeStruct,
    Seq,
    Map,
    Struct,
    Enum,
    Identifier,
    IgnoredAny,
}

/// What the reading of one frame shares.
#[derive(Default)]
pub(crate) struct Ctx {
    /// The format itself failed (not just a value's type): the input's position is lost and
    /// nothing more can be read.
    broken: Cell<bool>,
    /// The message of the last soft refusal, carried across the format's own calls (whose error
    /// type the carrier cannot name) while they return `Ok(None)`.
    refusal: Cell<Option<String>>,
}

impl Ctx {
    fn is_broken(&self) -> bool {
        self.broken.get()
    }

    fn set_broken(&self) {
        self.broken.set(true);
    }

    /// Keeps a soft refusal for the caller; the value in hand stands for it.
    #[cold]
    fn refuse<T>(&self, e: impl fmt::Display) -> Option<T> {
        self.refusal.set(Some(e.to_string()));
        None
    }

    /// The refusal kept by [`Ctx::refuse`], as an error of the caller's type.
    #[cold]
    pub(crate) fn take_refusal<E: de::Error>(&self) -> E {
        E::custom(self.refusal.take().unwrap_or_default())
    }

    /// A format call's result: its errors are hard.
    #[inline]
    fn hard<T, E>(&self, result: Result<T, E>) -> Result<T, E> {
        result.inspect_err(|_| self.set_broken())
    }

    /// A value read through [`Soft`]: `None` stands for the refusal kept in the context.
    #[inline]
    fn soft<T, E: de::Error>(&self, value: Option<T>) -> Result<T, E> {
        value.ok_or_else(|| self.take_refusal())
    }
}

/// Reads the value of the current map entry as a `T`, with `ContentDeserializer`'s rules, into
/// `slot`. `Ok(false)`: `T` refused the value, which was still read to its end; the error is then
/// [`Ctx::take_refusal`]'s.
#[inline]
pub(crate) fn read_into<'de, T, M>(
    map: &mut M,
    ctx: &Ctx,
    slot: &mut Option<T>,
) -> Result<bool, M::Error>
where
    T: de::Deserialize<'de>,
    M: MapAccess<'de>,
{
    let stored = ctx.hard(map.next_value_seed(Soft {
        seed: Store(slot),
        ctx,
    }))?;
    Ok(stored.is_some())
}

/// Deserializes a `T` into a slot, so the value is not passed back through every layer.
struct Store<'a, T>(&'a mut Option<T>);

impl<'de, T: de::Deserialize<'de>> DeserializeSeed<'de> for Store<'_, T> {
    type Value = ();

    #[inline]
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        *self.0 = Some(T::deserialize(d)?);
        Ok(())
    }
}

/// Reads any value and drops it. It is read as fully as the buffering pass read it
/// (`deserialize_any` all the way down, so JSON strings are UTF-8-checked and numbers
/// range-checked), which `IgnoredAny` does not do for JSON.
pub(crate) struct Skip;

impl<'de> DeserializeSeed<'de> for Skip {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(Skip)
    }
}

impl<'de> Visitor<'de> for Skip {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_char<E: de::Error>(self, _: char) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<(), E> {
        Ok(())
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(Skip)
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(Skip)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(Skip)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_key_seed(Skip)?.is_some() {
            map.next_value_seed(Skip)?;
        }
        Ok(())
    }
    fn visit_enum<A: EnumAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(de::Error::custom(ENUM_INPUT))
    }
}

/// `ContentVisitor`'s refusal of enum input (neither format produces it).
const ENUM_INPUT: &str = "untagged and internally tagged enums do not support enum input";

/// Handed to the format in place of a seed. Like serde's buffering pass, it asks the format for
/// `deserialize_any`; once the format has said what kind of value is there, the seed reads it
/// through a deserializer for that kind with `ContentDeserializer`'s rules ([`Kinded`]). A soft
/// refusal comes back as `Ok(None)` (the message kept in [`Ctx`]), so the format sees a value read
/// to its end and stays usable.
struct Soft<'f, S> {
    seed: S,
    ctx: &'f Ctx,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Soft<'_, S> {
    type Value = Option<S::Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(Kinded {
            seed: self.seed,
            ctx: self.ctx,
        })
    }
}

const LEFT_UNREAD: &str = "a value was left unread";

/// Something that reads a value for a visitor under a [`Hint`], with `ContentDeserializer`'s
/// rules. Every implementation leaves its value fully read unless it fails hard (and sets
/// `broken`).
trait Apply<'de>: Sized {
    type Error: de::Error;
    fn apply<V: Visitor<'de>>(self, hint: Hint, visitor: V) -> Result<V::Value, Self::Error>;
}

/// The `Deserializer` methods of [`De`], each one hint (the arguments other than the visitor
/// are not needed).
macro_rules! hinted {
    ($($method:ident($($arg:ty),*) => $hint:ident,)*) => {
        $(fn $method<V: Visitor<'de>>(self, $(_: $arg,)* v: V) -> Result<V::Value, X::Error> {
            self.0.apply(Hint::$hint, v)
        })*
    };
}

/// The `Deserializer` face of an [`Apply`]: every method is one hint.
struct De<X>(X);

impl<'de, X: Apply<'de>> Deserializer<'de> for De<X> {
    type Error = X::Error;

    fn is_human_readable(&self) -> bool {
        // As `ContentDeserializer` answers (serde's default).
        true
    }

    hinted! {
        deserialize_any() => Any,
        deserialize_bool() => Bool,
        deserialize_i8() => Int,
        deserialize_i16() => Int,
        deserialize_i32() => Int,
        deserialize_i64() => Int,
        deserialize_u8() => Int,
        deserialize_u16() => Int,
        deserialize_u32() => Int,
        deserialize_u64() => Int,
        deserialize_f32() => Float,
        deserialize_f64() => Float,
        deserialize_char() => Char,
        deserialize_str() => Str,
        deserialize_string() => Str,
        deserialize_bytes() => Bytes,
        deserialize_byte_buf() => Bytes,
        deserialize_option() => Option,
        deserialize_unit() => Unit,
        deserialize_unit_struct(&'static str) => UnitStruct,
        deserialize_newtype_struct(&'static str) => NewtypeStruct,
        deserialize_seq() => Seq,
        deserialize_tuple(usize) => Seq,
        deserialize_tuple_struct(&'static str, usize) => Seq,
        deserialize_map() => Map,
        deserialize_struct(&'static str, &'static [&'static str]) => Struct,
        deserialize_enum(&'static str, &'static [&'static str]) => Enum,
        deserialize_identifier() => Identifier,
        deserialize_ignored_any() => IgnoredAny,
    }
}

/// A value the format has not read yet, handed to a visitor that asks for it with a hint: the
/// inner value of a MessagePack ext (`visit_newtype_struct`). It is read like any other, through
/// [`Kinded`].
struct Replay<'f, 't, D> {
    de: D,
    ctx: &'f Ctx,
    /// Set once the value is read, so [`Inner`] can tell a visitor that never looked at it.
    touched: &'t Cell<bool>,
}

impl<'de, D: Deserializer<'de>> Apply<'de> for Replay<'_, '_, D> {
    type Error = D::Error;

    fn apply<V: Visitor<'de>>(self, hint: Hint, visitor: V) -> Result<V::Value, D::Error> {
        self.touched.set(true);
        let ctx = self.ctx;
        let value = ctx.hard(self.de.deserialize_any(Kinded {
            seed: ByHint { hint, visitor },
            ctx,
        }))?;
        ctx.soft(value)
    }
}

/// A visitor as a seed: calls the `Deserializer` method of `hint`.
struct ByHint<V> {
    hint: Hint,
    visitor: V,
}

impl<'de, V: Visitor<'de>> DeserializeSeed<'de> for ByHint<V> {
    type Value = V::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        let v = self.visitor;
        match self.hint {
            Hint::Any => d.deserialize_any(v),
            Hint::Bool => d.deserialize_bool(v),
            Hint::Int => d.deserialize_u64(v),
            Hint::Float => d.deserialize_f64(v),
            Hint::Char => d.deserialize_char(v),
            Hint::Str => d.deserialize_str(v),
            Hint::Bytes => d.deserialize_bytes(v),
            Hint::Option => d.deserialize_option(v),
            Hint::Unit => d.deserialize_unit(v),
            Hint::UnitStruct => d.deserialize_unit_struct("", v),
            Hint::NewtypeStruct => d.deserialize_newtype_struct("", v),
            Hint::Seq => d.deserialize_seq(v),
            Hint::Map => d.deserialize_map(v),
            Hint::Struct => d.deserialize_struct("", &[], v),
            Hint::Enum => d.deserialize_enum("", &[], v),
            Hint::Identifier => d.deserialize_identifier(v),
            Hint::IgnoredAny => d.deserialize_ignored_any(v),
        }
    }
}

/// The visitor the format sees: once it knows what kind of value is there, it runs the seed on a
/// deserializer for that kind, which applies `ContentDeserializer`'s rules to whatever the seed
/// asks for.
struct Kinded<'f, S> {
    seed: S,
    ctx: &'f Ctx,
}

impl<'f, S> Kinded<'f, S> {
    #[inline]
    fn scalar<'de, E: de::Error>(self, value: Scalar<'_, 'de>) -> Result<Option<S::Value>, E>
    where
        S: DeserializeSeed<'de>,
    {
        match self.seed.deserialize(De(ScalarDe::<E> {
            value,
            err: PhantomData,
        })) {
            Ok(value) => Ok(Some(value)),
            Err(e) => Ok(self.ctx.refuse(e)),
        }
    }

    /// Runs the seed on a live value (one the format is still reading). Soft refusals go back to
    /// the format as values, hard errors as errors.
    fn live<'de, X: Apply<'de>>(self, value: X) -> Result<Option<S::Value>, X::Error>
    where
        S: DeserializeSeed<'de>,
    {
        let ctx = self.ctx;
        let touched = Cell::new(false);
        let result = self.seed.deserialize(De(Handed {
            inner: value,
            touched: &touched,
        }));
        match check_touched(&touched, ctx, result) {
            Ok(value) => Ok(Some(value)),
            Err(e) if ctx.is_broken() => Err(e),
            Err(e) => Ok(ctx.refuse(e)),
        }
    }
}

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for Kinded<'_, S> {
    type Value = Option<S::Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
        self.scalar(Scalar::Bool(v))
    }
    fn visit_i8<E: de::Error>(self, v: i8) -> Result<Self::Value, E> {
        self.scalar(Scalar::I8(v))
    }
    fn visit_i16<E: de::Error>(self, v: i16) -> Result<Self::Value, E> {
        self.scalar(Scalar::I16(v))
    }
    fn visit_i32<E: de::Error>(self, v: i32) -> Result<Self::Value, E> {
        self.scalar(Scalar::I32(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        self.scalar(Scalar::I64(v))
    }
    fn visit_u8<E: de::Error>(self, v: u8) -> Result<Self::Value, E> {
        self.scalar(Scalar::U8(v))
    }
    fn visit_u16<E: de::Error>(self, v: u16) -> Result<Self::Value, E> {
        self.scalar(Scalar::U16(v))
    }
    fn visit_u32<E: de::Error>(self, v: u32) -> Result<Self::Value, E> {
        self.scalar(Scalar::U32(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        self.scalar(Scalar::U64(v))
    }
    fn visit_f32<E: de::Error>(self, v: f32) -> Result<Self::Value, E> {
        self.scalar(Scalar::F32(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        self.scalar(Scalar::F64(v))
    }
    fn visit_char<E: de::Error>(self, v: char) -> Result<Self::Value, E> {
        self.scalar(Scalar::Char(v))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        self.scalar(Scalar::Str(v))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        self.scalar(Scalar::BorrowedStr(v))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        self.scalar(Scalar::Str(&v))
    }
    fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Self::Value, E> {
        self.scalar(Scalar::Bytes(v))
    }
    fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Self::Value, E> {
        self.scalar(Scalar::BorrowedBytes(v))
    }
    fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Self::Value, E> {
        self.scalar(Scalar::Bytes(&v))
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.scalar(Scalar::None)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.scalar(Scalar::Unit)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let ctx = self.ctx;
        self.live(Inner {
            de: d,
            ctx,
            kind: InnerKind::Some,
        })
    }
    fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        let ctx = self.ctx;
        self.live(Inner {
            de: d,
            ctx,
            kind: InnerKind::Newtype,
        })
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let ctx = self.ctx;
        self.live(SeqDe { seq: &mut seq, ctx })
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let ctx = self.ctx;
        self.live(MapDe { map: &mut map, ctx })
    }
    fn visit_enum<A: EnumAccess<'de>>(self, _: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(ENUM_INPUT))
    }
}

/// A value the format has already handed over whole.
#[derive(Clone, Copy)]
enum Scalar<'a, 'de> {
    Bool(bool),
    U8(u8),
    U16(u16),
    U32(u32),
    U64(u64),
    I8(i8),
    I16(i16),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
    Char(char),
    Str(&'a str),
    BorrowedStr(&'de str),
    Bytes(&'a [u8]),
    BorrowedBytes(&'de [u8]),
    Unit,
    None,
}

impl Scalar<'_, '_> {
    fn unexpected(&self) -> Unexpected<'_> {
        match *self {
            Scalar::Bool(v) => Unexpected::Bool(v),
            Scalar::U8(v) => Unexpected::Unsigned(v.into()),
            Scalar::U16(v) => Unexpected::Unsigned(v.into()),
            Scalar::U32(v) => Unexpected::Unsigned(v.into()),
            Scalar::U64(v) => Unexpected::Unsigned(v),
            Scalar::I8(v) => Unexpected::Signed(v.into()),
            Scalar::I16(v) => Unexpected::Signed(v.into()),
            Scalar::I32(v) => Unexpected::Signed(v.into()),
            Scalar::I64(v) => Unexpected::Signed(v),
            Scalar::F32(v) => Unexpected::Float(v.into()),
            Scalar::F64(v) => Unexpected::Float(v),
            Scalar::Char(v) => Unexpected::Char(v),
            Scalar::Str(v) | Scalar::BorrowedStr(v) => Unexpected::Str(v),
            Scalar::Bytes(v) | Scalar::BorrowedBytes(v) => Unexpected::Bytes(v),
            Scalar::Unit => Unexpected::Unit,
            Scalar::None => Unexpected::Option,
        }
    }

    /// Whether `ContentDeserializer` hands this value to the visitor as it is for `hint`.
    fn passes(&self, hint: Hint) -> bool {
        let int = matches!(
            self,
            Scalar::U8(_)
                | Scalar::U16(_)
                | Scalar::U32(_)
                | Scalar::U64(_)
                | Scalar::I8(_)
                | Scalar::I16(_)
                | Scalar::I32(_)
                | Scalar::I64(_)
        );
        let string = matches!(self, Scalar::Str(_) | Scalar::BorrowedStr(_));
        let bytes = matches!(self, Scalar::Bytes(_) | Scalar::BorrowedBytes(_));
        match hint {
            Hint::Any | Hint::UnitStruct => true,
            Hint::Bool => matches!(self, Scalar::Bool(_)),
            Hint::Int => int,
            Hint::Float => int || matches!(self, Scalar::F32(_) | Scalar::F64(_)),
            Hint::Char => string || matches!(self, Scalar::Char(_)),
            Hint::Str | Hint::Bytes => string || bytes,
            Hint::Unit => matches!(self, Scalar::Unit),
            Hint::Identifier => string || bytes || matches!(self, Scalar::U8(_) | Scalar::U64(_)),
            // Decided in `ScalarDe::apply`.
            Hint::Option
            | Hint::NewtypeStruct
            | Hint::Enum
            | Hint::IgnoredAny
            | Hint::Seq
            | Hint::Map
            | Hint::Struct => false,
        }
    }
}

struct ScalarDe<'a, 'de, E> {
    value: Scalar<'a, 'de>,
    err: PhantomData<E>,
}

impl<'de, E: de::Error> ScalarDe<'_, 'de, E> {
    fn visit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, E> {
        match self.value {
            Scalar::Bool(v) => visitor.visit_bool(v),
            Scalar::U8(v) => visitor.visit_u8(v),
            Scalar::U16(v) => visitor.visit_u16(v),
            Scalar::U32(v) => visitor.visit_u32(v),
            Scalar::U64(v) => visitor.visit_u64(v),
            Scalar::I8(v) => visitor.visit_i8(v),
            Scalar::I16(v) => visitor.visit_i16(v),
            Scalar::I32(v) => visitor.visit_i32(v),
            Scalar::I64(v) => visitor.visit_i64(v),
            Scalar::F32(v) => visitor.visit_f32(v),
            Scalar::F64(v) => visitor.visit_f64(v),
            Scalar::Char(v) => visitor.visit_char(v),
            Scalar::Str(v) => visitor.visit_str(v),
            Scalar::BorrowedStr(v) => visitor.visit_borrowed_str(v),
            Scalar::Bytes(v) => visitor.visit_bytes(v),
            Scalar::BorrowedBytes(v) => visitor.visit_borrowed_bytes(v),
            Scalar::Unit => visitor.visit_unit(),
            Scalar::None => visitor.visit_none(),
        }
    }
}

impl<'de, E: de::Error> Apply<'de> for ScalarDe<'_, 'de, E> {
    type Error = E;

    fn apply<V: Visitor<'de>>(self, hint: Hint, visitor: V) -> Result<V::Value, E> {
        match hint {
            _ if self.value.passes(hint) => self.visit(visitor),
            Hint::Option => match self.value {
                Scalar::None => visitor.visit_none(),
                Scalar::Unit => visitor.visit_unit(),
                _ => visitor.visit_some(De(self)),
            },
            Hint::NewtypeStruct => visitor.visit_newtype_struct(De(self)),
            Hint::IgnoredAny => visitor.visit_unit(),
            Hint::Enum => match self.value {
                Scalar::Str(_) | Scalar::BorrowedStr(_) => visitor.visit_enum(UnitOnly(self)),
                _ => Err(E::invalid_type(self.value.unexpected(), &"string or map")),
            },
            _ => Err(E::invalid_type(self.value.unexpected(), &visitor)),
        }
    }
}

/// An enum written as a plain string: the string names a unit variant.
struct UnitOnly<'a, 'de, E>(ScalarDe<'a, 'de, E>);

impl<'de, E: de::Error> EnumAccess<'de> for UnitOnly<'_, 'de, E> {
    type Error = E;
    type Variant = NoContent<E>;

    fn variant_seed<S: DeserializeSeed<'de>>(
        self,
        seed: S,
    ) -> Result<(S::Value, Self::Variant), E> {
        let variant = seed.deserialize(De(self.0))?;
        Ok((variant, NoContent(PhantomData)))
    }
}

struct NoContent<E>(PhantomData<E>);

impl<'de, E: de::Error> VariantAccess<'de> for NoContent<E> {
    type Error = E;

    fn unit_variant(self) -> Result<(), E> {
        Ok(())
    }
    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, _: S) -> Result<S::Value, E> {
        Err(E::invalid_type(Unexpected::UnitVariant, &"newtype variant"))
    }
    fn tuple_variant<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, E> {
        Err(E::invalid_type(Unexpected::UnitVariant, &"tuple variant"))
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, E> {
        Err(E::invalid_type(Unexpected::UnitVariant, &"struct variant"))
    }
}

/// Fails hard when a visitor was given a live value and returned without reading it: the input
/// is then not where its container expects it.
fn check_touched<T, E: de::Error>(
    touched: &Cell<bool>,
    ctx: &Ctx,
    result: Result<T, E>,
) -> Result<T, E> {
    if touched.get() {
        return result;
    }
    ctx.set_broken();
    match result {
        Ok(_) => Err(E::custom(LEFT_UNREAD)),
        Err(e) => Err(e),
    }
}

/// Hands a live value to `visitor` as the inner value of an option (`hint` is `Option`) or of a
/// newtype struct (`NewtypeStruct`), and fails hard if the visitor never read it.
fn hand_inner<'de, X: Apply<'de>, V: Visitor<'de>>(
    inner: X,
    hint: Hint,
    visitor: V,
    ctx: &Ctx,
) -> Result<V::Value, X::Error> {
    let touched = Cell::new(false);
    let handed = De(Handed {
        inner,
        touched: &touched,
    });
    let result = if hint == Hint::Option {
        visitor.visit_some(handed)
    } else {
        visitor.visit_newtype_struct(handed)
    };
    check_touched(&touched, ctx, result)
}

/// Ends a sequence or map a visitor has read ([`Read`] says how much): what it left is drained,
/// and is an error if the visitor succeeded, as `ContentDeserializer` reports it.
fn finish<T, E: de::Error>(
    ctx: &Ctx,
    result: Result<T, E>,
    drain: impl FnOnce() -> Result<usize, E>,
    read: Read,
) -> Result<T, E> {
    if ctx.is_broken() {
        return result.and_then(|_| Err(E::custom(LEFT_UNREAD)));
    }
    let left = drain()?;
    match result {
        Ok(_) if left > 0 => Err(E::invalid_length(read.0 + left, &read)),
        result => result,
    }
}

/// Hands out a live value as a `Deserializer` and records whether it was read.
struct Handed<'t, X> {
    inner: X,
    touched: &'t Cell<bool>,
}

impl<'de, X: Apply<'de>> Apply<'de> for Handed<'_, X> {
    type Error = X::Error;

    fn apply<V: Visitor<'de>>(self, hint: Hint, visitor: V) -> Result<V::Value, X::Error> {
        self.touched.set(true);
        self.inner.apply(hint, visitor)
    }
}

/// `Some(inner)` or `Newtype(inner)` in `Content` terms: the format handed over a deserializer
/// for the inner value (MessagePack does it for ext values).
#[derive(Clone, Copy, PartialEq, Eq)]
enum InnerKind {
    Some,
    Newtype,
}

struct Inner<'f, D> {
    de: D,
    ctx: &'f Ctx,
    kind: InnerKind,
}

impl<'de, D: Deserializer<'de>> Inner<'_, D> {
    fn skip(self) -> Result<(), D::Error> {
        self.ctx.hard(Skip.deserialize(self.de))
    }
}

impl<'de, D: Deserializer<'de>> Apply<'de> for Inner<'_, D> {
    type Error = D::Error;

    fn apply<V: Visitor<'de>>(self, hint: Hint, visitor: V) -> Result<V::Value, D::Error> {
        let ctx = self.ctx;
        let touched = Cell::new(false);
        let replay = |de| {
            De(Replay {
                de,
                ctx,
                touched: &touched,
            })
        };
        let result = match (hint, self.kind) {
            (Hint::Any | Hint::UnitStruct, InnerKind::Some) | (Hint::Option, InnerKind::Some) => {
                visitor.visit_some(replay(self.de))
            }
            (Hint::Any | Hint::UnitStruct, InnerKind::Newtype)
            | (Hint::NewtypeStruct, InnerKind::Newtype) => {
                visitor.visit_newtype_struct(replay(self.de))
            }
            (Hint::Option, InnerKind::Newtype) | (Hint::NewtypeStruct, InnerKind::Some) => {
                return hand_inner(self, hint, visitor, ctx);
            }
            (Hint::IgnoredAny, _) => {
                self.skip()?;
                return visitor.visit_unit();
            }
            (_, kind) => {
                self.skip()?;
                let unexpected = match kind {
                    InnerKind::Some => Unexpected::Option,
                    InnerKind::Newtype => Unexpected::NewtypeStruct,
                };
                return Err(de::Error::invalid_type(unexpected, &visitor));
            }
        };
        check_touched(&touched, ctx, result)
    }
}

/// A sequence the format is reading.
struct SeqDe<'a, 'f, A> {
    seq: &'a mut A,
    ctx: &'f Ctx,
}

impl<'de, A: SeqAccess<'de>> SeqDe<'_, '_, A> {
    /// Reads the rest of the sequence; returns how many elements were left.
    fn drain(&mut self) -> Result<usize, A::Error> {
        let mut drain = || {
            let mut left = 0;
            while self.seq.next_element_seed(Skip)?.is_some() {
                left += 1;
            }
            Ok(left)
        };
        self.ctx.hard(drain())
    }
}

impl<'de, A: SeqAccess<'de>> Apply<'de> for SeqDe<'_, '_, A> {
    type Error = A::Error;

    fn apply<V: Visitor<'de>>(mut self, hint: Hint, visitor: V) -> Result<V::Value, A::Error> {
        let ctx = self.ctx;
        match hint {
            Hint::Any | Hint::UnitStruct | Hint::Seq | Hint::Struct | Hint::Bytes => {
                let mut elements = Elements {
                    seq: &mut *self.seq,
                    ctx,
                    count: 0,
                };
                let result = visitor.visit_seq(&mut elements);
                let count = elements.count;
                finish(ctx, result, || self.drain(), Read(count, "sequence"))
            }
            Hint::Option | Hint::NewtypeStruct => hand_inner(self, hint, visitor, ctx),
            Hint::IgnoredAny => {
                self.drain()?;
                visitor.visit_unit()
            }
            Hint::Bool
            | Hint::Int
            | Hint::Float
            | Hint::Char
            | Hint::Str
            | Hint::Unit
            | Hint::Map
            | Hint::Enum
            | Hint::Identifier => {
                self.drain()?;
                Err(de::Error::invalid_type(Unexpected::Seq, &visitor))
            }
        }
    }
}

/// The elements of a sequence, each read through [`Kinded`].
struct Elements<'a, 'f, A> {
    seq: &'a mut A,
    ctx: &'f Ctx,
    count: usize,
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Elements<'_, '_, A> {
    type Error = A::Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, A::Error> {
        let ctx = self.ctx;
        match ctx.hard(self.seq.next_element_seed(Soft { seed, ctx }))? {
            Some(value) => {
                self.count += 1;
                ctx.soft(value).map(Some)
            }
            None => Ok(None),
        }
    }

    fn size_hint(&self) -> Option<usize> {
        self.seq.size_hint()
    }
}

/// A map the format is reading.
struct MapDe<'a, 'f, A> {
    map: &'a mut A,
    ctx: &'f Ctx,
}

impl<'f, 'de, A: MapAccess<'de>> MapDe<'_, 'f, A> {
    /// Reads the rest of the map (first the value of a key already read, if `pending`); returns
    /// how many entries were left.
    fn drain(&mut self, pending: bool) -> Result<usize, A::Error> {
        let mut drain = || {
            if pending {
                self.map.next_value_seed(Skip)?;
            }
            let mut left = 0;
            while self.map.next_key_seed(Skip)?.is_some() {
                self.map.next_value_seed(Skip)?;
                left += 1;
            }
            Ok(left)
        };
        self.ctx.hard(drain())
    }

    fn entries<'b>(&'b mut self, state: &'b EntriesState) -> Entries<'b, 'f, A> {
        Entries {
            map: &mut *self.map,
            ctx: self.ctx,
            state,
        }
    }
}

impl<'de, A: MapAccess<'de>> Apply<'de> for MapDe<'_, '_, A> {
    type Error = A::Error;

    fn apply<V: Visitor<'de>>(mut self, hint: Hint, visitor: V) -> Result<V::Value, A::Error> {
        let ctx = self.ctx;
        match hint {
            Hint::Any | Hint::UnitStruct | Hint::Map | Hint::Struct => {
                let state = EntriesState::default();
                let result = visitor.visit_map(self.entries(&state));
                let read = Read(state.count.get(), "map");
                finish(ctx, result, || self.drain(state.pending.get()), read)
            }
            Hint::Enum => {
                // `{"variant": value}`: exactly one entry.
                let state = EntriesState::default();
                let result = visitor.visit_enum(OneEntry {
                    entries: self.entries(&state),
                });
                if ctx.is_broken() {
                    return result.and_then(|_| Err(de::Error::custom(LEFT_UNREAD)));
                }
                let left = self.drain(state.pending.get())?;
                let value = result?;
                if left == 0 && state.count.get() == 1 {
                    Ok(value)
                } else {
                    Err(de::Error::invalid_value(
                        Unexpected::Map,
                        &"map with a single key",
                    ))
                }
            }
            Hint::Unit => {
                // `ContentDeserializer` reads `()` from an empty map as well.
                match self.drain(false)? {
                    0 => visitor.visit_unit(),
                    _ => Err(de::Error::invalid_type(Unexpected::Map, &visitor)),
                }
            }
            Hint::Option | Hint::NewtypeStruct => hand_inner(self, hint, visitor, ctx),
            Hint::IgnoredAny => {
                self.drain(false)?;
                visitor.visit_unit()
            }
            Hint::Bool
            | Hint::Int
            | Hint::Float
            | Hint::Char
            | Hint::Str
            | Hint::Bytes
            | Hint::Seq
            | Hint::Identifier => {
                self.drain(false)?;
                Err(de::Error::invalid_type(Unexpected::Map, &visitor))
            }
        }
    }
}

#[derive(Default)]
struct EntriesState {
    /// Keys read so far.
    count: Cell<usize>,
    /// A key was read and its value not yet.
    pending: Cell<bool>,
}

/// The entries of a map, keys and values each read through [`Kinded`].
struct Entries<'a, 'f, A> {
    map: &'a mut A,
    ctx: &'f Ctx,
    state: &'a EntriesState,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for Entries<'_, '_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, A::Error> {
        let ctx = self.ctx;
        match ctx.hard(self.map.next_key_seed(Soft { seed, ctx }))? {
            Some(key) => {
                self.state.count.set(self.state.count.get() + 1);
                self.state.pending.set(true);
                ctx.soft(key).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        let ctx = self.ctx;
        self.state.pending.set(false);
        let value = ctx.hard(self.map.next_value_seed(Soft { seed, ctx }))?;
        ctx.soft(value)
    }

    fn size_hint(&self) -> Option<usize> {
        self.map.size_hint()
    }
}

/// An enum written as a one-entry map `{"variant": value}`.
struct OneEntry<'a, 'f, A> {
    entries: Entries<'a, 'f, A>,
}

impl<'de, A: MapAccess<'de>> EnumAccess<'de> for OneEntry<'_, '_, A> {
    type Error = A::Error;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(
        mut self,
        seed: S,
    ) -> Result<(S::Value, Self), A::Error> {
        match self.entries.next_key_seed(seed)? {
            Some(variant) => Ok((variant, self)),
            None => Err(de::Error::invalid_value(
                Unexpected::Map,
                &"map with a single key",
            )),
        }
    }
}

impl<'de, A: MapAccess<'de>> VariantAccess<'de> for OneEntry<'_, '_, A> {
    type Error = A::Error;

    fn unit_variant(mut self) -> Result<(), A::Error> {
        self.entries.next_value()
    }
    fn newtype_variant_seed<S: DeserializeSeed<'de>>(
        mut self,
        seed: S,
    ) -> Result<S::Value, A::Error> {
        self.entries.next_value_seed(seed)
    }
    fn tuple_variant<V: Visitor<'de>>(
        mut self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.entries.next_value_seed(TupleSeed(len, visitor))
    }
    fn struct_variant<V: Visitor<'de>>(
        mut self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, A::Error> {
        self.entries.next_value_seed(StructSeed(fields, visitor))
    }
}

struct TupleSeed<V>(usize, V);

impl<'de, V: Visitor<'de>> DeserializeSeed<'de> for TupleSeed<V> {
    type Value = V::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        d.deserialize_tuple(self.0, self.1)
    }
}

struct StructSeed<V>(&'static [&'static str], V);

impl<'de, V: Visitor<'de>> DeserializeSeed<'de> for StructSeed<V> {
    type Value = V::Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
        d.deserialize_struct("", self.0, self.1)
    }
}

/// serde's wording for a sequence or map with elements left over: how many were read, of what.
struct Read(usize, &'static str);

impl Expected for Read {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.0 {
            1 => write!(f, "1 element in {}", self.1),
            n => write!(f, "{n} elements in {}", self.1),
        }
    }
}
