//! Which message bodies every client can read: a body is relayed to MessagePack and JSON clients
//! alike, so it must be something both encodings carry the same way.

use crate::protocol::Body;

/// Deepest nesting of maps and arrays in a body (the body itself is level 1). JSON decoders stop
/// far deeper (serde_json at 128), MessagePack ones deeper still; one bound for both keeps every
/// body readable by every client, and bounds the work of reading one.
pub const MAX_BODY_DEPTH: usize = 32;

/// Why a body cannot be relayed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("body nests deeper than {MAX_BODY_DEPTH} levels")]
    TooDeep,
    #[error("body map keys must be strings (JSON has no other keys)")]
    NonStringKey,
    #[error("body numbers must be finite (JSON has no NaN or infinity)")]
    NonFinite,
    #[error("MessagePack extension types cannot be relayed to JSON clients")]
    Extension,
}

/// Checks that `body` reads the same in both encodings: string map keys only, at most
/// [`MAX_BODY_DEPTH`] levels, finite numbers, no extension types. Binary values are allowed: JSON
/// clients get them as arrays of byte values.
pub fn check_body(body: &Body) -> Result<(), BodyError> {
    // Iterative: the depth bound is checked before descending, so a hostile body cannot
    // exhaust the stack of whoever checks it.
    let mut stack: Vec<(&Body, usize)> = vec![(body, 1)];
    while let Some((value, depth)) = stack.pop() {
        match value {
            Body::Array(items) => {
                if depth >= MAX_BODY_DEPTH && !items.is_empty() {
                    return Err(BodyError::TooDeep);
                }
                stack.extend(items.iter().map(|v| (v, depth + 1)));
            }
            Body::Map(entries) => {
                if depth >= MAX_BODY_DEPTH && !entries.is_empty() {
                    return Err(BodyError::TooDeep);
                }
                for (key, v) in entries {
                    if !key.is_str() {
                        return Err(BodyError::NonStringKey);
                    }
                    stack.push((v, depth + 1));
                }
            }
            // JSON clients get binary as an array of byte values: a level of its own there.
            Body::Binary(bytes) if depth >= MAX_BODY_DEPTH && !bytes.is_empty() => {
                return Err(BodyError::TooDeep);
            }
            Body::F32(f) if !f.is_finite() => return Err(BodyError::NonFinite),
            Body::F64(f) if !f.is_finite() => return Err(BodyError::NonFinite),
            Body::Ext(..) => return Err(BodyError::Extension),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nested(levels: usize) -> Body {
        let mut body = Body::from(1);
        for _ in 1..levels {
            body = Body::Array(vec![body]);
        }
        body
    }

    #[test]
    fn bodies_both_encodings_carry_pass() {
        let body = Body::Map(vec![
            (Body::from("text"), Body::from("hi")),
            (Body::from("bin"), Body::Binary(vec![1, 2])),
            (Body::from("n"), Body::F64(1.5)),
        ]);
        assert_eq!(check_body(&body), Ok(()));
        assert_eq!(check_body(&nested(MAX_BODY_DEPTH)), Ok(()));
    }

    #[test]
    fn poison_bodies_are_refused() {
        let key = |k: Body| Body::Map(vec![(k, Body::from(1))]);
        assert_eq!(
            check_body(&key(Body::Binary(b"k".to_vec()))),
            Err(BodyError::NonStringKey)
        );
        assert_eq!(check_body(&key(Body::Nil)), Err(BodyError::NonStringKey));
        assert_eq!(
            check_body(&key(Body::Array(vec![]))),
            Err(BodyError::NonStringKey)
        );
        assert_eq!(
            check_body(&nested(MAX_BODY_DEPTH + 1)),
            Err(BodyError::TooDeep)
        );
        assert_eq!(check_body(&nested(5_000)), Err(BodyError::TooDeep));
        // Found by the `body` fuzz target: binary at the deepest level is one level deeper still
        // for JSON clients, who get it as an array.
        let mut binary = Body::Binary(vec![1]);
        for _ in 1..MAX_BODY_DEPTH {
            binary = Body::Array(vec![binary]);
        }
        assert_eq!(check_body(&binary), Err(BodyError::TooDeep));
        assert_eq!(check_body(&Body::F64(f64::NAN)), Err(BodyError::NonFinite));
        assert_eq!(
            check_body(&Body::Ext(1, vec![0])),
            Err(BodyError::Extension)
        );
    }
}
