//! Device secrets (OsmAnd token, EM/MQTT password): how they are generated, stored and checked.
//! The one place that knows the stored form.
//!
//! A device secret is high-entropy random (at least 16 random bytes; [`generate`] gives 24),
//! so the stored form is a plain SHA-256 digest, `sha256$<64 lower-case hex>`: a slow,
//! salted password hash (argon2) buys nothing against a guess space of 2^128 and would cost a
//! hash of tens of milliseconds on every device reconnect, at fleet scale. Comparison is in
//! constant time. The store writes only this form ([`stored_form`] on every write, and
//! [`crate::Store`] backends convert any older plaintext row when they open), so the
//! database never holds a device's plaintext secret.

use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Prefix of the stored form.
pub const PREFIX: &str = "sha256$";
/// Random bytes in a [`generate`]d secret.
pub const GENERATED_BYTES: usize = 24;
/// Shortest secret accepted from an operator (characters).
pub const MIN_LEN: usize = 16;
/// Longest secret accepted from an operator or a device (characters).
pub const MAX_LEN: usize = 256;

/// A new random secret for a device: 24 random bytes from the OS generator as 48 hex
/// characters (safe in a URL query, an HTTP header and an MQTT password).
pub fn generate() -> String {
    let mut bytes = [0u8; GENERATED_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// The stored form of a plaintext secret.
pub fn hash(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    format!("{PREFIX}{}", hex::encode(digest))
}

/// True when `value` is already in the stored form (`sha256$` + 64 lower-case hex digits).
pub fn is_hashed(value: &str) -> bool {
    value.strip_prefix(PREFIX).is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// What the store writes for `value`: unchanged when already hashed, otherwise its hash.
/// Idempotent, so writing a device read back from the store keeps its secret.
pub fn stored_form(value: &str) -> String {
    if is_hashed(value) {
        value.to_owned()
    } else {
        hash(value)
    }
}

/// True when `presented` is the secret whose stored form is `stored`, compared in constant
/// time. A `stored` value not yet in the stored form (a row written by an older version, not
/// converted yet) is hashed first, so it still verifies.
pub fn verify(stored: &str, presented: &str) -> bool {
    if presented.is_empty() || presented.len() > MAX_LEN {
        return false;
    }
    let expected = stored_form(stored);
    let given = hash(presented);
    expected.as_bytes().ct_eq(given.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_the_sha256_of_the_utf8_text() {
        // SHA-256("abc") from FIPS 180-2, appendix B.1.
        assert_eq!(
            hash("abc"),
            "sha256$ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(is_hashed(&hash("abc")));
        assert!(!is_hashed("abc"));
        assert!(!is_hashed("sha256$abc"));
        assert!(!is_hashed(&hash("abc").to_uppercase()));
    }

    #[test]
    fn stored_form_is_idempotent() {
        let once = stored_form("device-secret-1234");
        assert_eq!(stored_form(&once), once);
        assert_ne!(once, "device-secret-1234");
    }

    #[test]
    fn verify_accepts_only_the_secret() {
        let stored = hash("device-secret-1234");
        assert!(verify(&stored, "device-secret-1234"));
        assert!(!verify(&stored, "device-secret-1235"));
        assert!(!verify(&stored, ""));
        // The digest itself is not the secret.
        assert!(!verify(&stored, &stored));
        // A legacy plaintext row still verifies (until the store converts it).
        assert!(verify("legacy-plain-secret", "legacy-plain-secret"));
        assert!(!verify("legacy-plain-secret", "other"));
    }

    #[test]
    fn generated_secrets_are_long_and_distinct() {
        let (a, b) = (generate(), generate());
        assert_eq!(a.len(), 2 * GENERATED_BYTES);
        assert!(a.len() >= MIN_LEN);
        assert_ne!(a, b);
    }
}
