//! The SMTP envelope: reverse-path, recipients and the DSN parameters
//! (RFC 3461) that the delivery side needs later.

use serde::{Deserialize, Serialize};

use crate::Address;

/// Which body the client declared with `BODY=` (RFC 6152, RFC 3030).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyType {
    #[default]
    #[serde(rename = "7bit")]
    SevenBit,
    #[serde(rename = "8bitmime")]
    EightBitMime,
    #[serde(rename = "binarymime")]
    BinaryMime,
}

impl BodyType {
    pub fn as_str(self) -> &'static str {
        match self {
            BodyType::SevenBit => "7bit",
            BodyType::EightBitMime => "8bitmime",
            BodyType::BinaryMime => "binarymime",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "7bit" => Some(BodyType::SevenBit),
            "8bitmime" => Some(BodyType::EightBitMime),
            "binarymime" => Some(BodyType::BinaryMime),
            _ => None,
        }
    }
}

/// `RET=` on MAIL FROM: how much of the message a bounce should carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ret {
    Full,
    Hdrs,
}

impl Ret {
    pub fn as_str(self) -> &'static str {
        match self {
            Ret::Full => "full",
            Ret::Hdrs => "hdrs",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "full" => Some(Ret::Full),
            "hdrs" => Some(Ret::Hdrs),
            _ => None,
        }
    }
}

/// `NOTIFY=` on RCPT TO, as a bit set. Empty means "not given", which
/// RFC 3461 §4.1 says to treat as `FAILURE` (and maybe `DELAY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Notify(u8);

impl Notify {
    pub const SUCCESS: Notify = Notify(1);
    pub const FAILURE: Notify = Notify(2);
    pub const DELAY: Notify = Notify(4);
    pub const NEVER: Notify = Notify(8);

    pub fn empty() -> Self {
        Notify(0)
    }

    pub fn from_bits(bits: u8) -> Self {
        Notify(bits & 0x0f)
    }

    pub fn bits(self) -> u8 {
        self.0
    }

    pub fn contains(self, other: Notify) -> bool {
        self.0 & other.0 == other.0 && other.0 != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    #[must_use]
    pub fn with(self, other: Notify) -> Notify {
        Notify(self.0 | other.0)
    }
}

/// One forward-path of the transaction with its DSN parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: Address,
    /// `ORCPT=` as `addr-type;address` (xtext already decoded), kept for the DSN.
    pub orcpt: Option<String>,
    pub notify: Notify,
}

/// Everything the SMTP transaction said about where a message goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// `None` is the null reverse-path `<>` (bounces must never be sent to it).
    pub reverse_path: Option<Address>,
    pub recipients: Vec<Recipient>,
    /// `ENVID=` from MAIL FROM (RFC 3461 §4.4).
    pub env_id: Option<String>,
    pub ret: Option<Ret>,
    pub body_type: BodyType,
    /// The client asked for SMTPUTF8 (RFC 6531) on MAIL FROM.
    pub smtputf8: bool,
    /// MT-PRIORITY (RFC 6710), -9..=9; 0 when not given.
    pub priority: i8,
}
