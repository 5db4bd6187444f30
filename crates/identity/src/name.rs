use crate::IdentityError;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// An identity name, always held with its leading `@` (e.g. `@alice_device`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(String);

const MAX_NAME: usize = 55;

impl Name {
    /// The name with its `@`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name without its `@`, safe to use as a file name.
    pub fn bare(&self) -> &str {
        &self.0[1..]
    }

    fn valid_bare(s: &str) -> bool {
        !s.is_empty()
            && s.len() <= MAX_NAME
            && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
    }
}

impl FromStr for Name {
    type Err = IdentityError;

    /// Accepts `@alice` or `alice`; names are case-insensitive and stored in lower case.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bare = s.strip_prefix('@').unwrap_or(s).to_ascii_lowercase();
        if Self::valid_bare(&bare) {
            Ok(Name(format!("@{bare}")))
        } else {
            Err(IdentityError::InvalidName(s.to_string()))
        }
    }
}

impl TryFrom<String> for Name {
    type Error = IdentityError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A device: one daemon of an identity, written `NAME@ID` (e.g. `pi4@alice_device`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct DeviceRef {
    /// The device's own name, unique within its identity.
    pub device: String,
    /// The identity the daemon runs as.
    pub identity: Name,
}

impl DeviceRef {
    /// Checks a bare device name (`pi4`).
    pub fn valid_device_name(s: &str) -> bool {
        Name::valid_bare(s)
    }
}

impl FromStr for DeviceRef {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (device, id) = s.split_once('@').ok_or_else(|| IdentityError::InvalidDevice(s.to_string()))?;
        let device = device.to_ascii_lowercase();
        if !Self::valid_device_name(&device) || id.starts_with('@') {
            return Err(IdentityError::InvalidDevice(s.to_string()));
        }
        let identity = id.parse().map_err(|_| IdentityError::InvalidDevice(s.to_string()))?;
        Ok(DeviceRef { device, identity })
    }
}

impl fmt::Display for DeviceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.device, self.identity.bare())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_normalise_and_validate() {
        assert_eq!("@Alice".parse::<Name>().map(|n| n.to_string()).ok(), Some("@alice".into()));
        assert_eq!("bob_2".parse::<Name>().map(|n| n.to_string()).ok(), Some("@bob_2".into()));
        for bad in ["", "@", "@a b", "@../x", "@a/b", "@é", &format!("@{}", "a".repeat(56))] {
            assert!(bad.parse::<Name>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn device_refs() {
        let d: DeviceRef = "pi4@alice_device".parse().expect("valid");
        assert_eq!(d.device, "pi4");
        assert_eq!(d.identity.as_str(), "@alice_device");
        assert_eq!(d.to_string(), "pi4@alice_device");
        for bad in ["pi4", "@alice", "pi4@@alice", "p i@alice", "pi4@"] {
            assert!(bad.parse::<DeviceRef>().is_err(), "{bad:?} accepted");
        }
    }
}
