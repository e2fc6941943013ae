//! Checking SMTP AUTH credentials against argon2 hashes.
//!
//! argon2 is deliberately slow and memory-hungry (19 MiB per check with the
//! default parameters), so checks run on the blocking pool behind a small
//! semaphore: a burst of AUTH attempts can neither stall the reactor nor
//! blow up memory.

use std::collections::HashMap;
use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use mailroom_core::config::SmtpUser;
use tokio::sync::Semaphore;

/// Checked against when the username is unknown, so that a wrong username
/// costs as long as a wrong password and does not reveal which logins exist.
/// It is the hash of a random string nobody knows.
const DECOY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$bWFpbHJvb20tZGVjb3k$Jk7UvG3bWzLq5e0m9nQpqE0Xl3C8w1m0rEw6pU8mJ9I";

/// The logins SMTP AUTH accepts.
#[derive(Clone)]
pub struct Credentials {
    users: Arc<HashMap<String, String>>,
    permits: Arc<Semaphore>,
}

impl Credentials {
    pub fn new(users: &[SmtpUser]) -> Self {
        Credentials {
            users: Arc::new(
                users
                    .iter()
                    .map(|u| (u.username.clone(), u.password_hash.clone()))
                    .collect(),
            ),
            permits: Arc::new(Semaphore::new(2)),
        }
    }

    /// True when `password` matches the stored hash for `username`.
    pub async fn verify(&self, username: String, password: String) -> bool {
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let (hash, known) = match self.users.get(&username) {
            Some(hash) => (hash.clone(), true),
            None => (DECOY_HASH.to_owned(), false),
        };
        let ok = tokio::task::spawn_blocking(move || verify_password(&hash, &password))
            .await
            .unwrap_or(false);
        ok && known
    }
}

/// Verifies a password against a PHC string; a malformed hash never matches.
pub fn verify_password(phc: &str, password: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(hash) => Argon2::default()
            .verify_password(password.as_bytes(), &hash)
            .is_ok(),
        Err(_) => false,
    }
}

/// Hashes a password with argon2id and a random salt, as a PHC string.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let mut salt = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut salt);
    let salt = SaltString::encode_b64(&salt)?;
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let phc = hash_password("s3cret").unwrap();
        assert!(phc.starts_with("$argon2id$"));
        assert!(verify_password(&phc, "s3cret"));
        assert!(!verify_password(&phc, "wrong"));
        assert!(!verify_password("not a hash", "s3cret"));
        assert!(PasswordHash::new(DECOY_HASH).is_ok());
    }

    #[tokio::test]
    async fn unknown_user_fails() {
        let phc = hash_password("pw").unwrap();
        let creds = Credentials::new(&[SmtpUser {
            username: "app".into(),
            password_hash: phc,
        }]);
        assert!(creds.verify("app".into(), "pw".into()).await);
        assert!(!creds.verify("app".into(), "nope".into()).await);
        assert!(!creds.verify("other".into(), "pw".into()).await);
    }
}
