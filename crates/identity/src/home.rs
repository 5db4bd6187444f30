//! The home directory (`--home DIR`, env `NP_HOME`, default `~/.np`): an identity's private keys,
//! the control plane it is enrolled with, and the public keys of peers pinned on first use.
//!
//! ```text
//! HOME/
//!   alice/                 0700, one folder per identity of this machine
//!     signing.key          0600, Ed25519 seed (hex)
//!     x25519.key           0600, X25519 private key (hex)
//!     identity.toml        public keys
//!     control.toml         control-plane address and certificate pin
//!   known/bob.toml         public keys of @bob as first seen (trust on first use)
//! ```

use crate::{IdentityError, Keys, Name, PublicKeys};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Where the control plane of an identity is, and the certificate it must present.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlConfig {
    /// `HOST:PORT` of the control plane.
    pub address: String,
    /// SHA-256 of the control plane's certificate (DER), hex.
    pub cert_sha256: String,
}

#[derive(Serialize, Deserialize)]
struct PublicFile {
    name: String,
    signing: String,
    x25519: String,
}

/// A home directory.
#[derive(Clone, Debug)]
pub struct Home {
    dir: PathBuf,
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> IdentityError + 'a {
    move |source| IdentityError::Io { what, path: path.to_path_buf(), source }
}

impl Home {
    /// The home at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Home { dir: dir.into() }
    }

    /// `explicit`, else `$NP_HOME`, else `~/.np`.
    pub fn resolve(explicit: Option<&Path>) -> Self {
        if let Some(d) = explicit {
            return Home::new(d);
        }
        if let Some(d) = std::env::var_os("NP_HOME").filter(|d| !d.is_empty()) {
            return Home::new(d);
        }
        let base = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
        Home::new(base.join(".np"))
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn id_dir(&self, name: &Name) -> PathBuf {
        self.dir.join(name.bare())
    }

    /// Creates and stores new keys for `name`. Refuses to overwrite existing ones.
    pub fn create_keys(&self, name: &Name) -> Result<Keys, IdentityError> {
        let d = self.id_dir(name);
        if d.join("signing.key").exists() {
            return Err(IdentityError::KeysExist { name: name.to_string(), dir: self.dir.clone() });
        }
        make_private_dir(&self.dir)?;
        make_private_dir(&d)?;
        let keys = Keys::generate()?;
        write_new(&d.join("signing.key"), hex::encode(keys.signing_seed()).as_bytes(), 0o600)?;
        write_new(&d.join("x25519.key"), hex::encode(keys.x25519_private()).as_bytes(), 0o600)?;
        let public = PublicFile {
            name: name.to_string(),
            signing: hex::encode(keys.public().signing),
            x25519: hex::encode(keys.public().x25519),
        };
        write_new(&d.join("identity.toml"), toml_string(&public).as_bytes(), 0o644)?;
        Ok(keys)
    }

    /// Removes an identity's folder (used to roll back a failed enrolment).
    pub fn remove_identity(&self, name: &Name) -> Result<(), IdentityError> {
        let d = self.id_dir(name);
        fs::remove_dir_all(&d).map_err(io("removing", &d))
    }

    /// Loads `name`'s keys, refusing private key files readable by others.
    pub fn load_keys(&self, name: &Name) -> Result<Keys, IdentityError> {
        let d = self.id_dir(name);
        if !d.join("signing.key").exists() {
            return Err(IdentityError::NoKeys { name: name.to_string(), dir: self.dir.clone() });
        }
        let seed = read_secret(&d.join("signing.key"))?;
        let xpriv = read_secret(&d.join("x25519.key"))?;
        let pubfile = d.join("identity.toml");
        let text = fs::read_to_string(&pubfile).map_err(io("reading", &pubfile))?;
        let p: PublicFile = toml::from_str(&text).map_err(|_| IdentityError::BadKeyFile(pubfile.clone()))?;
        let xpub = decode32(&p.x25519).ok_or_else(|| IdentityError::BadKeyFile(pubfile.clone()))?;
        let keys = Keys::from_parts(seed, xpriv, xpub)?;
        if hex::encode(keys.public().signing) != p.signing {
            return Err(IdentityError::BadKeyFile(pubfile));
        }
        Ok(keys)
    }

    /// Identities with keys in this home.
    pub fn identities(&self) -> Vec<Name> {
        let mut out: Vec<Name> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("signing.key").exists())
            .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
            .collect();
        out.sort();
        out
    }

    /// `explicit`, or the only identity in this home.
    pub fn pick_identity(&self, explicit: Option<&Name>) -> Result<Name, IdentityError> {
        if let Some(n) = explicit {
            return Ok(n.clone());
        }
        let ids = self.identities();
        match ids.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(IdentityError::NoKeys { name: "(any identity)".into(), dir: self.dir.clone() }),
            _ => Err(IdentityError::InvalidName(format!(
                "several identities in {}: choose one with --as ({})",
                self.dir.display(),
                ids.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// Remembers `name`'s control plane.
    pub fn save_control(&self, name: &Name, cfg: &ControlConfig) -> Result<(), IdentityError> {
        let p = self.id_dir(name).join("control.toml");
        write_replace(&p, toml_string(cfg).as_bytes())
    }

    /// `name`'s control plane.
    pub fn load_control(&self, name: &Name) -> Result<ControlConfig, IdentityError> {
        let p = self.id_dir(name).join("control.toml");
        let text = fs::read_to_string(&p).map_err(io("reading", &p))?;
        toml::from_str(&text).map_err(|_| IdentityError::BadKeyFile(p))
    }

    /// Pins `peer`'s keys on first use; afterwards a different key is an error, never a silent
    /// update (the control plane could otherwise swap a key and read what follows).
    pub fn pin_peer(&self, peer: &Name, keys: &PublicKeys) -> Result<(), PinError> {
        let dir = self.dir.join("known");
        let p = dir.join(format!("{}.toml", peer.bare()));
        let file =
            PublicFile { name: peer.to_string(), signing: hex::encode(keys.signing), x25519: hex::encode(keys.x25519) };
        match fs::read_to_string(&p) {
            Ok(text) => {
                let old: PublicFile =
                    toml::from_str(&text).map_err(|_| PinError::Io(IdentityError::BadKeyFile(p.clone())))?;
                if old.signing == file.signing && old.x25519 == file.x25519 {
                    Ok(())
                } else {
                    Err(PinError::Changed { peer: peer.to_string(), file: p })
                }
            }
            // Only a pin that does not exist is written. One that cannot be read (damaged, not
            // text, unreadable) is an error: overwriting it would accept whatever keys the
            // control plane serves now, which is what the pin is there to prevent.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                make_private_dir(&self.dir).map_err(PinError::Io)?;
                make_private_dir(&dir).map_err(PinError::Io)?;
                write_replace(&p, toml_string(&file).as_bytes()).map_err(PinError::Io)
            }
            Err(_) => Err(PinError::Io(IdentityError::BadKeyFile(p.clone()))),
        }
    }
}

/// Why a peer's keys could not be pinned.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    /// The peer's keys differ from the ones pinned earlier.
    #[error("the keys of {peer} changed since first use: if that is expected (the peer re-enrolled), delete {file} and try again")]
    Changed { peer: String, file: PathBuf },
    /// The pin file could not be read or written.
    #[error(transparent)]
    Io(IdentityError),
}

fn toml_string<T: Serialize>(v: &T) -> String {
    toml::to_string(v).unwrap_or_default()
}

fn decode32(s: &str) -> Option<[u8; 32]> {
    let v = hex::decode(s.trim()).ok()?;
    v.try_into().ok()
}

fn make_private_dir(d: &Path) -> Result<(), IdentityError> {
    if !d.exists() {
        fs::create_dir_all(d).map_err(io("creating", d))?;
        fs::set_permissions(d, fs::Permissions::from_mode(0o700)).map_err(io("securing", d))?;
    }
    Ok(())
}

fn write_new(p: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(p).map_err(io("creating", p))?;
    f.write_all(bytes).and_then(|_| f.sync_all()).map_err(io("writing", p))
}

fn write_replace(p: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    // A name of its own per writer: two lookups of the same peer at once (threads or processes)
    // must not trip over one shared temporary file.
    let mut r = [0u8; 8];
    crate::random_bytes(&mut r)?;
    let tmp = p.with_extension(format!("tmp.{}", hex::encode(r)));
    write_new(&tmp, bytes, 0o644)?;
    fs::rename(&tmp, p).map_err(io("replacing", p))
}

fn read_secret(p: &Path) -> Result<[u8; 32], IdentityError> {
    let meta = fs::metadata(p).map_err(io("reading", p))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::InsecureKeyFile { path: p.to_path_buf(), mode });
    }
    let text = fs::read_to_string(p).map_err(io("reading", p))?;
    decode32(&text).ok_or_else(|| IdentityError::BadKeyFile(p.to_path_buf()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_roundtrip_with_private_modes() {
        let t = tempfile::tempdir().expect("tmp");
        let h = Home::new(t.path().join("h"));
        let n: Name = "@alice".parse().expect("n");
        let k = h.create_keys(&n).expect("create");
        assert!(matches!(h.create_keys(&n), Err(IdentityError::KeysExist { .. })));
        for f in ["signing.key", "x25519.key"] {
            let m = fs::metadata(t.path().join("h/alice").join(f)).expect("meta").permissions().mode();
            assert_eq!(m & 0o777, 0o600, "{f}");
        }
        let k2 = h.load_keys(&n).expect("load");
        assert_eq!(k.public(), k2.public());
        assert_eq!(h.identities(), vec![n.clone()]);
        assert_eq!(h.pick_identity(None).expect("pick"), n);
        fs::set_permissions(t.path().join("h/alice/signing.key"), fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(h.load_keys(&n), Err(IdentityError::InsecureKeyFile { .. })));
    }

    #[test]
    fn concurrent_first_pins_do_not_collide() {
        let t = tempfile::tempdir().expect("tmp");
        let k = Keys::generate().expect("k").public();
        let n: Name = "@bob".parse().expect("n");
        let hs: Vec<_> = (0..16)
            .map(|_| {
                let h = Home::new(t.path());
                let n = n.clone();
                std::thread::spawn(move || h.pin_peer(&n, &k).is_ok())
            })
            .collect();
        assert!(hs.into_iter().all(|h| h.join().unwrap_or(false)));
    }

    #[test]
    fn pins_refuse_changed_keys() {
        let t = tempfile::tempdir().expect("tmp");
        let h = Home::new(t.path());
        let n: Name = "@bob".parse().expect("n");
        let (a, b) = (Keys::generate().expect("k").public(), Keys::generate().expect("k").public());
        h.pin_peer(&n, &a).expect("first use");
        h.pin_peer(&n, &a).expect("same again");
        assert!(matches!(h.pin_peer(&n, &b), Err(PinError::Changed { .. })));
    }

    #[test]
    fn an_unreadable_pin_is_an_error_and_is_left_alone() {
        let t = tempfile::tempdir().expect("tmp");
        let h = Home::new(t.path());
        let n: Name = "@bob".parse().expect("n");
        let (a, b) = (Keys::generate().expect("k").public(), Keys::generate().expect("k").public());
        h.pin_peer(&n, &a).expect("first use");
        let pin = t.path().join("known").join("bob.toml");
        // Not text: it cannot be read as a pin. Before, it was overwritten with whatever keys came
        // next, so a damaged pin silently accepted changed keys.
        std::fs::write(&pin, [0xff, 0xfe, 0x00, 0x80]).expect("damage");
        assert!(matches!(h.pin_peer(&n, &b), Err(PinError::Io(IdentityError::BadKeyFile(_)))));
        assert_eq!(std::fs::read(&pin).expect("still there"), vec![0xff, 0xfe, 0x00, 0x80]);
    }
}
