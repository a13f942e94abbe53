//! Password hashes of the users files: made by `tambo user-add`, checked by
//! queued (AUTH) and `tambo authenticate`, the same code for both.
//!
//! New hashes are scrypt at chasquid's parameters (N=2^14, r=8, p=1), as
//! PHC strings; scrypt and argon2 hashes from elsewhere verify with their
//! own parameters, within [`crate::users::check_cost`]'s bounds.

use password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

use crate::users::check_cost;

/// chasquid's scrypt cost: ~16 MiB and ~50 ms per check.
const LOG_N: u8 = 14;

/// A new PHC hash of `password`, with a random salt.
pub fn hash(password: &[u8]) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| format!("no randomness for the salt: {e}"))?;
    hash_with_salt(password, &salt, LOG_N)
}

/// A PHC scrypt hash with the given salt and cost (tests, the decoy).
pub fn hash_with_salt(password: &[u8], salt: &[u8], log_n: u8) -> Result<String, String> {
    let params = scrypt::Params::new(log_n, 8, 1, 32).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(salt).map_err(|e| e.to_string())?;
    scrypt::Scrypt
        .hash_password_customized(password, None, None, params, &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Whether `password` matches the PHC string `phc` (`$scrypt$…`,
/// `$argon2id$…`, `$argon2i$…`, `$argon2d$…`).
///
/// The hash's own parameters (cost, version, output length) are used, so
/// old and new hashes verify side by side, and the comparison is the
/// `password-hash` crate's constant-time one. `Err` for a string that is
/// not PHC, an unsupported algorithm, parameters out of bounds or
/// unusable, or a PHC with no salt or output (which would otherwise never
/// match, hiding the mistake).
pub fn verify(phc: &str, password: &[u8]) -> Result<bool, String> {
    let hash = PasswordHash::new(phc).map_err(|e| format!("not a PHC string: {e}"))?;
    let algorithm = hash.algorithm.as_str();
    if hash.salt.is_none() || hash.hash.is_none() {
        return Err(format!("the {algorithm} hash has no salt or no output"));
    }
    check_cost(&hash)?;
    let bad_params = |e: password_hash::Error| format!("the {algorithm} hash's parameters: {e}");
    let result = match algorithm {
        "scrypt" => {
            scrypt::Params::try_from(&hash).map_err(bad_params)?;
            scrypt::Scrypt.verify_password(password, &hash)
        }
        "argon2id" | "argon2i" | "argon2d" => {
            argon2::Params::try_from(&hash).map_err(bad_params)?;
            // Argon2's hasher takes the variant and version from the hash.
            argon2::Argon2::default().verify_password(password, &hash)
        }
        other => return Err(format!("unsupported password hash algorithm {other:?}")),
    };
    match result {
        Ok(()) => Ok(true),
        Err(password_hash::Error::Password) => Ok(false),
        Err(e) => Err(format!("cannot verify the {algorithm} hash: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_hash_verifies_its_password_only() {
        let h = hash_with_salt(b"s3cret", b"saltsaltsalt", 4).unwrap();
        assert!(h.starts_with("$scrypt$ln=4,r=8,p=1$"), "{h}");
        assert_eq!(verify(&h, b"s3cret"), Ok(true));
        assert_eq!(verify(&h, b"s3cre"), Ok(false));
    }

    #[test]
    fn new_hashes_have_chasquids_cost_and_their_own_salt() {
        let (a, b) = (hash(b"pw").unwrap(), hash(b"pw").unwrap());
        assert!(a.starts_with("$scrypt$ln=14,r=8,p=1$"), "{a}");
        assert_ne!(a, b);
    }
}
