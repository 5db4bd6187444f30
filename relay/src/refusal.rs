//! Why the relay refuses a connection. The `Display` text is what the side receives.

use np_identity::Name;
use np_relay_proto::Role;

/// A reason to refuse a connection before it is paired.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The Join frame was not a valid Join.
    #[error("malformed join: {0}")]
    Malformed(String),
    /// The side did not finish authenticating within the auth deadline.
    #[error("authentication timed out")]
    AuthTimeout,
    /// The operator's allow list does not name this identity.
    #[error("identity {0} is not allowed on this relay")]
    NotAllowed(Name),
    /// The key directory does not know this identity.
    #[error("unknown identity {0}")]
    UnknownIdentity(Name),
    /// The Join's signature does not verify with the identity's key for this nonce.
    #[error("bad signature")]
    BadSignature,
    /// The session already has a side of this role (waiting or paired).
    #[error("session already has a {0}")]
    Duplicate(Role),
    /// The first side of this session gave up waiting.
    #[error("pairing deadline passed")]
    DeadlinePassed,
    /// The identity takes part in as many sessions as the operator allows.
    #[error("too many sessions for {0}")]
    TooManyForIdentity(Name),
    /// The relay holds as many sessions as the operator allows.
    #[error("relay is full")]
    RelayFull,
    /// Too many connections are authenticating at once.
    #[error("too many unauthenticated connections")]
    TooManyUnauthenticated,
    /// The relay is shutting down.
    #[error("relay is shutting down")]
    ShuttingDown,
}

impl Refusal {
    /// Every [`Refusal::kind`], for metrics that show each reason before it first happens.
    pub const KINDS: &'static [&'static str] = &[
        "malformed",
        "auth_timeout",
        "not_allowed",
        "unknown_identity",
        "bad_signature",
        "duplicate",
        "deadline_passed",
        "too_many_for_identity",
        "relay_full",
        "too_many_unauthenticated",
        "shutting_down",
    ];

    /// The reason without its details (no identity, no parser text): a metrics label.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Malformed(_) => "malformed",
            Refusal::AuthTimeout => "auth_timeout",
            Refusal::NotAllowed(_) => "not_allowed",
            Refusal::UnknownIdentity(_) => "unknown_identity",
            Refusal::BadSignature => "bad_signature",
            Refusal::Duplicate(_) => "duplicate",
            Refusal::DeadlinePassed => "deadline_passed",
            Refusal::TooManyForIdentity(_) => "too_many_for_identity",
            Refusal::RelayFull => "relay_full",
            Refusal::TooManyUnauthenticated => "too_many_unauthenticated",
            Refusal::ShuttingDown => "shutting_down",
        }
    }
}
