//! Messages on a control-plane connection.

use np_identity::{Envelope, Name, PublicKeys};
use serde::{Deserialize, Serialize};

/// First frame from the server on every connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerHello {
    /// [`crate::PROTOCOL_VERSION`] of the server.
    pub version: u16,
    /// Fresh random nonce that this connection's authentication signature must cover.
    pub nonce: [u8; 32],
}

/// A client's request with the id its reply will carry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    /// Chosen by the client; echoed in the reply.
    pub id: u32,
    /// What is asked.
    pub req: Request,
}

/// What a client can ask.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Enrol a new identity with a one-time code; on success the connection is authenticated.
    Enroll {
        /// The code's secret (the certificate pin part stays with the client).
        secret: [u8; 16],
        name: Name,
        keys: PublicKeys,
        /// Signature over [`crate::enroll_transcript`] with the new signing key.
        sig: Vec<u8>,
    },
    /// Authenticate as an enrolled identity.
    Auth {
        name: Name,
        /// Signature over [`crate::auth_transcript`].
        sig: Vec<u8>,
    },
    /// The public keys of an identity.
    Lookup { name: Name },
    /// Which control-plane node serves an identity.
    Resolve { name: Name },
    /// Store (or replace) one of the caller's signed records.
    Publish { record: Record },
    /// One record, if the caller may read it.
    Fetch { owner: Name, key: String },
    /// Records whose key starts with `key_prefix` that name the caller as a reader (or that the
    /// caller owns).
    List { key_prefix: String },
    /// Carry a sealed envelope to its recipient: at once if connected, else queued.
    Notify {
        envelope: Envelope,
        /// Seconds the server keeps it for an absent recipient.
        ttl_secs: u32,
    },
    /// A pushed notification was received and may be deleted.
    Ack { seq: u64 },
    /// Several pushed notifications were received and may be deleted (at most [`crate::MAX_ACK_BATCH`]):
    /// one round trip and one database commit for a whole batch, so a backlog of thousands
    /// drains at the speed of the connection.
    AckMany { seqs: Vec<u64> },
    /// Liveness check.
    Ping,
    /// The relays this control plane's operator lists (`np-control relay add`): the relays a
    /// device trusts when it names none itself.
    Relays,
    /// Mark the caller's record `key` present for as long as this connection lasts: when the
    /// last connection of the caller holding it closes, readers see it [`Presence::Disconnected`]
    /// at once (rather than when its heartbeat lapses). Only for servers of
    /// [`crate::PRESENCE_VERSION`] or later; a connection holds at most [`crate::MAX_HOLDS`] keys.
    Hold { key: String },
    /// Like `List`, each record with its [`Presence`].
    ListWithPresence { key_prefix: String },
    /// Like `Fetch`, with the record's [`Presence`].
    FetchWithPresence { owner: Name, key: String },
    /// How the node is: its store's kind and whether it answers (`np doctor`). Only for
    /// servers of [`crate::STATUS_VERSION`] or later.
    Status,
}

/// Whether a record's owner is connected and holding it (`Request::Hold`), as the server knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Presence {
    /// A connection of the owner holds it, since `since_ms` (server clock, ms since the Unix
    /// epoch).
    Connected { since_ms: u64 },
    /// It was held, and the last connection holding it closed at `at_ms` (server clock).
    Disconnected { at_ms: u64 },
    /// Not held since this server started (an owner that does not hold it, or a server restart):
    /// judge by the record's own timestamp.
    Unknown,
}

/// A record with its presence.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordState {
    pub record: Record,
    pub presence: Presence,
}

/// A record an identity publishes, signed by it. Public unless `readers` names who may read it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub owner: Name,
    /// Application-defined key, e.g. `device/pi4`.
    pub key: String,
    pub value: Vec<u8>,
    /// Identities allowed to read it; empty means anyone authenticated.
    pub readers: Vec<Name>,
    /// Owner's clock at publication, ms since the Unix epoch (heartbeats update it).
    pub updated_ms: u64,
    /// Ed25519 signature by `owner` over [`Record::signed_bytes`].
    pub sig: Vec<u8>,
}

impl Record {
    /// The bytes the owner signs.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut b = b"np-record-v1".to_vec();
        let body = postcard::to_stdvec(&(&self.owner, &self.key, &self.value, &self.readers, self.updated_ms));
        b.extend_from_slice(&body.unwrap_or_default());
        b
    }

    /// Whether `who` may read this record.
    pub fn readable_by(&self, who: &Name) -> bool {
        &self.owner == who || self.readers.is_empty() || self.readers.contains(who)
    }
}

/// An identity's public record, as enrolled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityInfo {
    pub name: Name,
    pub keys: PublicKeys,
    /// Server clock at enrolment, ms since the Unix epoch.
    pub enrolled_ms: u64,
}

/// A frame from the server after the hello.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ServerFrame {
    /// The answer to request `id`.
    Reply { id: u32, result: Result<Reply, ErrorReply> },
    /// A notification for this identity; acknowledge it with `Ack { seq }` or `AckMany`. The
    /// server keeps at most [`crate::PUSH_WINDOW`] pushes unacknowledged on a connection, so a client
    /// whose push queue holds that many never has to stop reading (and its replies never wait
    /// behind pushes).
    Push(Delivery),
}

/// A notification as delivered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Server-assigned sequence number, for `Ack`.
    pub seq: u64,
    pub envelope: Envelope,
}

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Enrolled (and authenticated) as `name`.
    Enrolled {
        name: Name,
    },
    /// Authenticated as `name`.
    Authenticated {
        name: Name,
    },
    Identity(IdentityInfo),
    /// The address of the node that serves the identity.
    Node {
        address: String,
    },
    Published,
    Record(Record),
    Records(Vec<Record>),
    /// Accepted; `delivered` says whether a connection of the recipient got it at once.
    Accepted {
        seq: u64,
        delivered: bool,
    },
    Acked,
    Pong,
    /// The operator's relay list.
    Relays(Vec<Name>),
    /// The key is held for as long as this connection lasts.
    Held,
    /// Answer to `ListWithPresence`.
    RecordStates(Vec<RecordState>),
    /// Answer to `FetchWithPresence`.
    RecordState(RecordState),
    /// Answer to `Status`.
    Status(NodeStatus),
}

/// How a control-plane node is, as any authenticated client may see it: nothing of where its
/// store is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    /// `redb` (one node's file) or `PostgreSQL` (shared by several nodes).
    pub store: String,
    /// Whether the store answered a query just now.
    pub store_answers: bool,
}

/// A refused request, with a machine-readable code and a message for humans.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The enrolment code is not known.
    BadCode,
    /// The enrolment code was already used.
    CodeUsed,
    /// The enrolment code expired.
    CodeExpired,
    /// The enrolment code was issued for another name.
    CodeForOtherName,
    /// The name is already enrolled.
    NameTaken,
    /// No such identity.
    UnknownIdentity,
    /// A signature did not verify.
    BadSignature,
    /// The request needs an authenticated connection.
    NotAuthenticated,
    /// The caller may not do this.
    Forbidden,
    /// A field exceeds its limit.
    TooLarge,
    /// The request is malformed.
    BadRequest,
    /// The thing asked for does not exist or may not be read.
    NotFound,
    /// The server could not complete the request (storage failure).
    Internal,
    /// The recipient already holds as many queued notifications from this sender (or in all) as
    /// it may; others can still reach it. Try again once it has connected and caught up.
    Quota,
}

/// Requests the operator's tool sends over the control plane's local admin socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// Issue a one-time enrolment code for `name`, valid `ttl_secs`.
    IssueCode { name: Name, ttl_secs: u64 },
    /// Remove an identity: its key, records and queued notifications; its connections close
    /// and it can no longer authenticate.
    Revoke { name: Name },
    /// Add `name` (an enrolled identity) to the relays devices trust by default.
    RelayAdd { name: Name },
    /// Remove `name` from that list.
    RelayRemove { name: Name },
    /// The list.
    RelayList,
}

/// Answers on the admin socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminReply {
    /// The code, as the enrolling user types it.
    Code(String),
    /// Done.
    Revoked,
    /// The relay list, after the change if there was one.
    Relays(Vec<Name>),
    /// Refused, with why.
    Error(String),
}
