//! Bearer tokens: how `kv token new` makes one and how a token is hashed for the tokens file.
//!
//! The tokens file will hold the SHA-256 of each token, never the token, so that reading it grants
//! nothing; kv keeps no token it hands out.

use sha2::{Digest, Sha256};

/// Bytes in a SHA-256 digest.
const DIGEST_BYTES: usize = 32;
/// Random bytes in a token from `kv token new`: 256 bits, twice the 128 that make guessing hopeless.
pub const NEW_TOKEN_RANDOM_BYTES: usize = 32;
/// Prefix of tokens from `kv token new`, so people and secret scanners can tell what the string is.
pub const NEW_TOKEN_PREFIX: &str = "kv_";

/// The hex SHA-256 of a token, as the tokens file's `"sha256"` holds it.
pub fn sha256_hex(token: &str) -> String {
    hex(&sha256(token))
}

/// A new random token: `kv_` and 64 hex digits from the operating system's random source.
pub fn new_token() -> Result<String, String> {
    let mut bytes = [0u8; NEW_TOKEN_RANDOM_BYTES];
    getrandom::fill(&mut bytes).map_err(|e| format!("cannot read the OS random source: {e}"))?;
    Ok(format!("{NEW_TOKEN_PREFIX}{}", hex(&bytes)))
}

/// Refuses a token that could not travel in an `Authorization: Bearer` header.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if !is_token(token) {
        return Err(
            "a token is printable ASCII without spaces, as an Authorization header needs".into(),
        );
    }
    Ok(())
}

/// Refuses a name that would be ambiguous in a log line.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("a token's name must not be empty".into());
    }
    if name.chars().any(char::is_control) {
        return Err(format!(
            "a token's name must not contain control characters: {name:?}"
        ));
    }
    Ok(())
}

/// Printable ASCII without spaces: what a bearer token can be (and tiny_http can carry).
fn is_token(token: &str) -> bool {
    !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic())
}

fn sha256(token: &str) -> [u8; DIGEST_BYTES] {
    Sha256::digest(token.as_bytes()).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_is_the_standard_one() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn new_tokens_are_random_and_valid() {
        let a = new_token().unwrap();
        let b = new_token().unwrap();
        assert_ne!(a, b);
        assert!(a.starts_with(NEW_TOKEN_PREFIX));
        assert_eq!(a.len(), NEW_TOKEN_PREFIX.len() + 2 * NEW_TOKEN_RANDOM_BYTES);
        assert_eq!(check_token(&a), Ok(()));
    }

    #[test]
    fn tokens_must_fit_a_header() {
        assert!(check_token("").is_err());
        assert!(check_token("a b").is_err());
        assert!(check_token("a\tb").is_err());
        assert!(check_token("caf\u{e9}").is_err());
        assert!(check_token("abc-._~+/=").is_ok());
    }
}
