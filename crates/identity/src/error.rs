use std::path::PathBuf;

/// Why an identity operation failed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A name does not follow the rules for identity names.
    #[error("invalid identity name {0:?}: use @ followed by 1-55 of a-z, 0-9, _ and -")]
    InvalidName(String),
    /// A device reference is not `NAME@ID`.
    #[error("invalid device {0:?}: write it as NAME@ID, e.g. pi4@alice_device")]
    InvalidDevice(String),
    /// The keys for an identity are not in the home directory.
    #[error("no keys for {name} in {dir}: create them with `np keys new {name} --control HOST:PORT --code CODE`")]
    NoKeys { name: String, dir: PathBuf },
    /// Keys already exist and would be overwritten.
    #[error("keys for {name} already exist in {dir}; refusing to overwrite them")]
    KeysExist { name: String, dir: PathBuf },
    /// A key file is damaged or has the wrong size.
    #[error("key file {0} is damaged")]
    BadKeyFile(PathBuf),
    /// A private key file can be read by others.
    #[error("key file {path} has mode {mode:o}; private keys must be 0600 (chmod 600 {path})")]
    InsecureKeyFile { path: PathBuf, mode: u32 },
    /// Reading or writing the home directory failed.
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A signature did not verify.
    #[error("signature does not verify")]
    BadSignature,
    /// A sealed message could not be opened: wrong recipient, tampered, or not from the sender.
    /// Deliberately one opaque variant, so a failure is no oracle.
    #[error("sealed message could not be opened")]
    Unseal,
    /// Sealing failed (message too large for one envelope).
    #[error("message could not be sealed: {0}")]
    Seal(String),
    /// The operating system's random source failed.
    #[error("the system random source failed")]
    Random,
}
