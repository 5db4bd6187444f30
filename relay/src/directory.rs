//! Where the relay finds an identity's public keys.

use np_identity::{Name, PublicKeys};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

/// A boxed future, so directories can be used as trait objects.
pub type Lookup<'a> = Pin<Box<dyn Future<Output = Option<PublicKeys>> + Send + 'a>>;

/// Resolves an identity to its enrolled public keys. The production directory asks the control
/// plane (and caches); tests use [`StaticDirectory`].
pub trait KeyDirectory: Send + Sync + 'static {
    /// The keys of `name`, or `None` if no such identity is enrolled.
    fn lookup<'a>(&'a self, name: &'a Name) -> Lookup<'a>;
}

/// A fixed map of identities to keys.
#[derive(Clone, Debug, Default)]
pub struct StaticDirectory {
    keys: HashMap<Name, PublicKeys>,
}

impl StaticDirectory {
    /// An empty directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces an identity.
    pub fn insert(&mut self, name: Name, keys: PublicKeys) {
        self.keys.insert(name, keys);
    }

    /// Builder form of [`StaticDirectory::insert`].
    pub fn with(mut self, name: Name, keys: PublicKeys) -> Self {
        self.insert(name, keys);
        self
    }
}

impl KeyDirectory for StaticDirectory {
    fn lookup<'a>(&'a self, name: &'a Name) -> Lookup<'a> {
        let found = self.keys.get(name).copied();
        Box::pin(async move { found })
    }
}
