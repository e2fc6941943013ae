//! Checking SMTP AUTH credentials against argon2 hashes.
//!
//! argon2 is deliberately slow and memory-hungry (19 MiB per check with the
//! default parameters), so checks run on the blocking pool behind a small
//! semaphore: a burst of AUTH attempts can neither stall the reactor nor
//! blow up memory.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use mailroom_core::config::SmtpUser;
use tokio::sync::Semaphore;

/// Checked against when the username is unknown, so that a wrong username
/// costs as long as a wrong password and does not reveal which logins exist.
/// It is the hash of a random string nobody knows.
const DECOY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$bWFpbHJvb20tZGVjb3k$Jk7UvG3bWzLq5e0m9nQpqE0Xl3C8w1m0rEw6pU8mJ9I";

/// One SMTP login.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    /// argon2 PHC string.
    pub password_hash: String,
    /// The tenant the login belongs to; `None` for the operator's own
    /// logins from `[[smtp.users]]`.
    pub account: Option<String>,
}

/// Every login SMTP AUTH accepts, by username. Shared with the HTTP API,
/// which adds and removes tenants' logins while the server runs.
#[derive(Debug, Default)]
pub struct Logins {
    by_name: RwLock<HashMap<String, Login>>,
}

impl Logins {
    pub fn from_config(users: &[SmtpUser]) -> Self {
        let logins = Logins::default();
        for u in users {
            logins.insert(
                u.username.clone(),
                Login {
                    password_hash: u.password_hash.clone(),
                    account: None,
                },
            );
        }
        logins
    }

    pub fn insert(&self, username: String, login: Login) {
        self.write().insert(username, login);
    }

    pub fn remove(&self, username: &str) {
        self.write().remove(username);
    }

    /// Removes every login of an account.
    pub fn remove_account(&self, account: &str) {
        self.write()
            .retain(|_, l| l.account.as_deref() != Some(account));
    }

    /// The account a login belongs to, if it is a tenant's.
    pub fn account_of(&self, username: &str) -> Option<String> {
        self.read().get(username).and_then(|l| l.account.clone())
    }

    pub fn contains(&self, username: &str) -> bool {
        self.read().contains_key(username)
    }

    fn hash_of(&self, username: &str) -> Option<String> {
        self.read().get(username).map(|l| l.password_hash.clone())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Login>> {
        self.by_name.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Login>> {
        self.by_name.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Checks SMTP AUTH against the [`Logins`].
#[derive(Clone)]
pub struct Credentials {
    logins: Arc<Logins>,
    permits: Arc<Semaphore>,
}

impl Credentials {
    pub fn new(users: &[SmtpUser]) -> Self {
        Self::with_logins(Arc::new(Logins::from_config(users)))
    }

    pub fn with_logins(logins: Arc<Logins>) -> Self {
        Credentials {
            logins,
            permits: Arc::new(Semaphore::new(2)),
        }
    }

    pub fn logins(&self) -> &Arc<Logins> {
        &self.logins
    }

    /// True when `password` matches the stored hash for `username`.
    pub async fn verify(&self, username: String, password: String) -> bool {
        let Ok(_permit) = self.permits.acquire().await else {
            return false;
        };
        let (hash, known) = match self.logins.hash_of(&username) {
            Some(hash) => (hash, true),
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
