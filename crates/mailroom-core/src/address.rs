//! Mailbox addresses as they appear in SMTP paths (RFC 5321 §4.1.2).

use std::fmt;

use serde::{Deserialize, Serialize};

/// A mailbox `local-part@domain`, as given in a reverse-path or forward-path.
///
/// The local part is kept as sent (it is case-sensitive per RFC 5321 §2.4);
/// the domain is compared case-insensitively.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Address {
    text: String,
    at: usize,
}

/// Why a string is not a usable mailbox address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address has no '@' separating local part and domain")]
    MissingAt,
    #[error("address has an empty local part")]
    EmptyLocalPart,
    #[error("address has an empty domain")]
    EmptyDomain,
    #[error("address is longer than 256 octets")]
    TooLong,
}

impl Address {
    /// Parses `local@domain`; the last `@` separates the two (a quoted local
    /// part may itself contain `@`).
    pub fn parse(text: &str) -> Result<Self, AddressError> {
        if text.len() > 256 {
            return Err(AddressError::TooLong);
        }
        let at = text.rfind('@').ok_or(AddressError::MissingAt)?;
        if at == 0 {
            return Err(AddressError::EmptyLocalPart);
        }
        if at + 1 == text.len() {
            return Err(AddressError::EmptyDomain);
        }
        Ok(Address {
            text: text.to_owned(),
            at,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn local_part(&self) -> &str {
        &self.text[..self.at]
    }

    pub fn domain(&self) -> &str {
        &self.text[self.at + 1..]
    }

    /// True when the address needs SMTPUTF8 (RFC 6531) to be carried.
    pub fn is_ascii(&self) -> bool {
        self.text.is_ascii()
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl TryFrom<String> for Address {
    type Error = AddressError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Address::parse(&value)
    }
}

impl From<Address> for String {
    fn from(value: Address) -> Self {
        value.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_last_at() {
        let a = Address::parse("\"a@b\"@example.test").unwrap();
        assert_eq!(a.local_part(), "\"a@b\"");
        assert_eq!(a.domain(), "example.test");
    }

    #[test]
    fn rejects_incomplete() {
        assert_eq!(Address::parse("nobody"), Err(AddressError::MissingAt));
        assert_eq!(Address::parse("@x"), Err(AddressError::EmptyLocalPart));
        assert_eq!(Address::parse("x@"), Err(AddressError::EmptyDomain));
    }

    #[test]
    fn detects_utf8() {
        assert!(!Address::parse("jörg@example.test").unwrap().is_ascii());
        assert!(Address::parse("j@example.test").unwrap().is_ascii());
    }
}
