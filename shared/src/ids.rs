//! The rules for user ids, group ids, platforms and status texts, shared by server and clients.

/// Longest user or group id, in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Longest custom status text, in bytes.
pub const MAX_STATUS_TEXT_BYTES: usize = 128;
/// Longest `client_msg_id` of a `send`, in bytes.
pub const MAX_CLIENT_MSG_ID_BYTES: usize = 64;
/// Platform ids run from 1 (iOS) to 8 (admin console), as in OpenIM.
pub const PLATFORMS: std::ops::RangeInclusive<u8> = 1..=8;

/// True for a user or group id: 1 to 128 bytes of `[A-Za-z0-9_.:@-]`.
///
/// The alphabet excludes `{` and `}` so an id can never break the Redis hash tag around it.
/// The sender of the app backend's messages. No client may be this user, so no message from a
/// client can pass for one from the app.
pub const SYSTEM_USER: &str = "system";

pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'))
}

/// Why a `client_msg_id` was refused: any string of 1 to [`MAX_CLIENT_MSG_ID_BYTES`] bytes passes.
pub fn check_client_msg_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_CLIENT_MSG_ID_BYTES {
        Err(format!(
            "client_msg_id must be 1 to {MAX_CLIENT_MSG_ID_BYTES} bytes"
        ))
    } else {
        Ok(())
    }
}

/// True for a platform id the contract knows.
pub fn is_valid_platform(platform: u8) -> bool {
    PLATFORMS.contains(&platform)
}

/// Why an id was refused, phrased for the `message` of an `error` frame.
pub fn check_id(kind: &str, id: &str) -> Result<(), String> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(format!(
            "{kind} id must be 1 to {MAX_ID_BYTES} bytes of [A-Za-z0-9_.:@-]"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_alphabet_and_length() {
        assert!(is_valid_id("alice"));
        assert!(is_valid_id("a.b:c@d-e_f"));
        assert!(is_valid_id(&"x".repeat(128)));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id(&"x".repeat(129)));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("{tag}"));
        assert!(!is_valid_id("é"));
    }

    #[test]
    fn platforms_are_one_to_eight() {
        assert!(!is_valid_platform(0));
        assert!(is_valid_platform(1));
        assert!(is_valid_platform(8));
        assert!(!is_valid_platform(9));
    }
}
