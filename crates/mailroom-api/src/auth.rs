//! Who is calling: the operator's admin key, or one account's API key.
//!
//! API keys are 32 random bytes shown once as `mr_<64 hex>`; the store keeps
//! only their SHA-256 and a visible prefix. Checking a key is one hash and
//! one map lookup: the active keys and the accounts live in memory, loaded
//! at start and updated by the API's own writes (this node is the only
//! writer of tenant data on the embedded backend).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError, RwLock};

use axum::extract::FromRequestParts;
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use mailroom_core::time::now_unix_millis;
use mailroom_store::{Account, AccountStatus, ApiKey, SqliteStore, StoreError};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::state::AppState;

/// What every account key starts with, so leaked keys are easy to grep for.
pub const KEY_PREFIX: &str = "mr_";
/// Characters of a key shown in listings (`mr_` and 8 hex digits).
const VISIBLE: usize = KEY_PREFIX.len() + 8;

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// The operator: every account.
    Admin,
    /// One account's key: only that account's objects.
    Account(String),
}

impl Principal {
    /// The account a request acts for: the caller's own, or for the admin
    /// the one named (when any).
    pub fn account_id(&self) -> Option<&str> {
        match self {
            Principal::Admin => None,
            Principal::Account(id) => Some(id),
        }
    }

    /// True when this caller may see objects of `account`.
    pub fn can_see(&self, account: Option<&str>) -> bool {
        match self {
            Principal::Admin => true,
            Principal::Account(id) => account == Some(id.as_str()),
        }
    }

    /// The scope idempotency keys are kept in.
    pub fn scope(&self) -> &str {
        match self {
            Principal::Admin => "admin",
            Principal::Account(id) => id,
        }
    }

    pub fn require_admin(&self) -> Result<(), ApiError> {
        match self {
            Principal::Admin => Ok(()),
            Principal::Account(_) => Err(ApiError::forbidden(
                "admin_only",
                "this needs the admin key",
            )),
        }
    }
}

/// A new key: its value (shown once) and what is stored.
pub struct MintedKey {
    pub value: String,
    pub hash: String,
    pub prefix: String,
}

pub fn mint_key() -> MintedKey {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    let value = format!("{KEY_PREFIX}{}", hex::encode(bytes));
    MintedKey {
        hash: hash_key(&value),
        prefix: value[..VISIBLE].to_owned(),
        value,
    }
}

pub fn hash_key(value: &str) -> String {
    hex::encode(Sha256::digest(value.as_bytes()))
}

/// Accounts and active keys, mirrored from the store.
#[derive(Default)]
pub struct Tenants {
    /// By key hash: (key id, account id).
    keys: RwLock<HashMap<String, (String, String)>>,
    accounts: RwLock<HashMap<String, Account>>,
    /// Keys used since the last flush, with when: written to the store in
    /// one batch now and then instead of once per request.
    used: Mutex<HashMap<String, i64>>,
}

impl Tenants {
    pub fn load(store: &SqliteStore) -> Result<Self, StoreError> {
        let tenants = Tenants::default();
        for account in store.accounts()? {
            tenants.put_account(account);
        }
        for (hash, key) in store.active_api_keys()? {
            tenants.put_key(hash, &key);
        }
        Ok(tenants)
    }

    pub fn account(&self, id: &str) -> Option<Account> {
        self.accounts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    /// The account that lists `domain` among its sender domains.
    pub fn owner_of(&self, domain: &str) -> Option<String> {
        self.accounts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .find(|a| a.allowed_sender_domains.iter().any(|d| d == domain))
            .map(|a| a.id.clone())
    }

    /// Every account, in no particular order.
    pub fn all_accounts(&self) -> Vec<Account> {
        self.accounts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .cloned()
            .collect()
    }

    /// An account's status, without copying the account.
    pub fn status(&self, id: &str) -> Option<AccountStatus> {
        self.accounts
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .map(|a| a.status)
    }

    pub fn put_account(&self, account: Account) {
        self.accounts
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(account.id.clone(), account);
    }

    pub fn remove_account(&self, id: &str) {
        self.accounts
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, (_, account)| account != id);
    }

    pub fn put_key(&self, hash: String, key: &ApiKey) {
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(hash, (key.id.clone(), key.account_id.clone()));
    }

    pub fn remove_key(&self, key_id: &str) {
        self.keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, (id, _)| id != key_id);
    }

    /// The account a key belongs to, if the key is active.
    fn lookup(&self, value: &str) -> Option<(String, String)> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&hash_key(value))
            .cloned()
    }

    fn mark_used(&self, key_id: &str) {
        self.used
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key_id.to_owned(), now_unix_millis());
    }

    /// Takes the keys used since the last call.
    pub fn take_used(&self) -> Vec<(String, i64)> {
        std::mem::take(&mut *self.used.lock().unwrap_or_else(PoisonError::into_inner))
            .into_iter()
            .collect()
    }
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(AUTHORIZATION) else {
            return Err(ApiError::unauthorized());
        };
        let Some(token) = value
            .to_str()
            .ok()
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
        else {
            return Err(ApiError::unauthorized());
        };
        if let Some(admin) = &state.admin_key
            && bool::from(token.as_bytes().ct_eq(admin.as_bytes()))
        {
            return Ok(Principal::Admin);
        }
        let Some((key_id, account_id)) = state.tenants.lookup(token) else {
            return Err(ApiError::unauthorized());
        };
        match state.tenants.status(&account_id) {
            Some(AccountStatus::Active) => {}
            Some(AccountStatus::Suspended) => {
                return Err(ApiError::forbidden(
                    "account_suspended",
                    "the account is suspended",
                ));
            }
            None => return Err(ApiError::unauthorized()),
        }
        state.tenants.mark_used(&key_id);
        Ok(Principal::Account(account_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_hashed() {
        let a = mint_key();
        let b = mint_key();
        assert_ne!(a.value, b.value);
        assert_eq!(a.value.len(), 3 + 64);
        assert!(a.value.starts_with(&a.prefix));
        assert_eq!(a.hash, hash_key(&a.value));
        assert_eq!(a.hash.len(), 64);
        assert!(!a.hash.contains(&a.value[3..]));
    }

    #[test]
    fn accounts_see_only_their_own() {
        let p = Principal::Account("a".into());
        assert!(p.can_see(Some("a")));
        assert!(!p.can_see(Some("b")));
        assert!(!p.can_see(None));
        assert!(Principal::Admin.can_see(None));
    }
}
