//! Who may talk to this node: the decision, kept pure so that every mode is pinned by tests.
//!
//! A node serves chunks, roots and have-maps only to peers it admits. Modes:
//! - **cluster key**: a secret file handed to every node (`shoal node keygen`); a peer proves
//!   it holds the key right after the encrypted handshake, on each channel;
//! - **members**: a list of allowed peer ids (with a key too, either admits);
//! - **open** (`--open`): anyone, for public data;
//! - **neither**: only peers on this machine (loopback addresses).
//!
//! The proof is a keyed BLAKE3 MAC over the channel, the prover's and the verifier's peer ids,
//! under a key derived from the cluster key. Peer ids are proven by the handshake (libp2p's
//! TLS or Noise, or the bulk channel's TLS with libp2p certificates), so a proof cannot be
//! replayed by another identity or to another node; it travels encrypted, so an observer
//! learns nothing of the key.

use crate::error::{Error, Result};
use libp2p::PeerId;
use std::collections::HashSet;
use std::net::IpAddr;
use std::path::Path;

/// A proof of holding the cluster key: 32 bytes.
pub type Proof = [u8; 32];

/// Where a proof is presented: each channel has its own, so one cannot stand for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    /// The libp2p control connection.
    Control,
    /// The bulk chunk channel.
    Bulk,
}

/// The shared secret of a private cluster.
#[derive(Clone)]
pub struct ClusterKey {
    mac_key: [u8; 32],
    fingerprint: String,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterKey({})", self.fingerprint)
    }
}

/// Bytes of secret a key file must hold at least (after trimming whitespace).
const MIN_KEY_CHARS: usize = 32;

impl ClusterKey {
    /// A key from the contents of a key file (any text of at least 32 characters: `shoal node
    /// keygen` writes 64 hex digits).
    pub fn from_secret(secret: &[u8]) -> std::result::Result<ClusterKey, String> {
        let trimmed = secret.trim_ascii();
        if trimmed.len() < MIN_KEY_CHARS {
            return Err(format!(
                "holds {} characters; a cluster key needs at least {MIN_KEY_CHARS} (make one with `shoal node keygen FILE`)",
                trimmed.len()
            ));
        }
        let mac_key = blake3::derive_key("shoal cluster key v1 mac", trimmed);
        let fp = blake3::derive_key("shoal cluster key v1 fingerprint", trimmed);
        Ok(ClusterKey {
            mac_key,
            fingerprint: hex::encode(&fp[..8]),
        })
    }

    /// Reads a key file; refuses one other users can read (a Kubernetes Secret is mounted
    /// with `defaultMode: 0400` for this reason).
    pub fn load(path: &Path) -> Result<ClusterKey> {
        use std::os::unix::fs::PermissionsExt;
        let bad = |reason: String| Error::Corrupt {
            what: format!("cluster key file {}", path.display()),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(crate::error::io("reading", path))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(bad(format!(
                "is readable by other users (mode {:o}); run `chmod 600 {}`",
                meta.permissions().mode() & 0o777,
                path.display()
            )));
        }
        let bytes = std::fs::read(path).map_err(crate::error::io("reading", path))?;
        ClusterKey::from_secret(&bytes).map_err(bad)
    }

    /// A short public name of the key, to check that nodes share it (`shoal status`).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The proof `prover` presents to `verifier` on `channel`.
    pub fn proof(&self, channel: Channel, prover: &PeerId, verifier: &PeerId) -> Proof {
        let mut h = blake3::Hasher::new_keyed(&self.mac_key);
        h.update(match channel {
            Channel::Control => b"ctl",
            Channel::Bulk => b"blk",
        });
        for id in [prover, verifier] {
            let b = id.to_bytes();
            h.update(&(b.len() as u32).to_be_bytes());
            h.update(&b);
        }
        *h.finalize().as_bytes()
    }

    /// Whether `proof` is the one `prover` owes `verifier` on `channel` (constant time).
    pub fn check(
        &self,
        channel: Channel,
        prover: &PeerId,
        verifier: &PeerId,
        proof: &Proof,
    ) -> bool {
        blake3::Hash::from(self.proof(channel, prover, verifier)) == blake3::Hash::from(*proof)
    }
}

/// How this node admits peers.
#[derive(Debug, Clone, Default)]
pub struct Admission {
    /// Anyone may connect and fetch.
    pub open: bool,
    /// Peer ids admitted without a proof.
    pub members: Option<HashSet<PeerId>>,
    /// Admits whoever proves it.
    pub key: Option<ClusterKey>,
}

/// What to do with a peer that connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Serve it.
    Admit,
    /// Wait for its proof of the cluster key (bounded by the handshake deadline).
    NeedProof,
    /// Drop it; the reason goes to the log.
    Refuse(&'static str),
}

impl Admission {
    /// The mode, for `shoal status` and the log.
    pub fn mode(&self) -> &'static str {
        match (self.open, &self.key, &self.members) {
            (true, _, _) => "open",
            (false, Some(_), Some(_)) => "cluster key or members",
            (false, Some(_), None) => "cluster key",
            (false, None, Some(_)) => "members",
            (false, None, None) => "loopback only",
        }
    }

    /// Whether only peers on this machine may connect (no key, no members, not open).
    pub fn loopback_only(&self) -> bool {
        !self.open && self.key.is_none() && self.members.is_none()
    }

    /// Whether a connection from `ip` is worth a handshake at all.
    pub fn admits_address(&self, ip: IpAddr) -> bool {
        !self.loopback_only() || is_loopback(ip)
    }

    /// What to do with `peer`, connected from `ip`, that presented `proof` (if it has yet).
    pub fn decide(
        &self,
        channel: Channel,
        me: &PeerId,
        peer: &PeerId,
        ip: Option<IpAddr>,
        proof: Option<&Proof>,
    ) -> Verdict {
        if self.open {
            return Verdict::Admit;
        }
        if self.loopback_only() {
            return match ip {
                Some(ip) if is_loopback(ip) => Verdict::Admit,
                _ => Verdict::Refuse("not on this machine, and this node has no cluster key or members list (start it with --cluster-key, --members or --open)"),
            };
        }
        if self.members.as_ref().is_some_and(|m| m.contains(peer)) {
            return Verdict::Admit;
        }
        match (&self.key, proof) {
            (None, _) => Verdict::Refuse("not in the members list"),
            (Some(_), None) => Verdict::NeedProof,
            (Some(k), Some(p)) if k.check(channel, peer, me, p) => Verdict::Admit,
            (Some(_), Some(_)) => Verdict::Refuse("wrong cluster key"),
        }
    }

    /// The proof this node presents to `peer` (zeros when it has no key: nothing to prove).
    pub fn my_proof(&self, channel: Channel, me: &PeerId, peer: &PeerId) -> Proof {
        self.key
            .as_ref()
            .map_or([0; 32], |k| k.proof(channel, me, peer))
    }
}

/// 127.0.0.0/8, ::1, and IPv4-mapped loopback.
pub fn is_loopback(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Writes a new random cluster key (64 hex digits) to `path`, mode 0600, refusing to
/// overwrite. Returns its fingerprint.
pub fn keygen(path: &Path) -> Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut secret = [0u8; 32];
    getrandom_fill(&mut secret)?;
    let text = format!("{}\n", hex::encode(secret));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(crate::error::io("creating", path))?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(crate::error::io("writing", path))?;
    Ok(ClusterKey::from_secret(text.as_bytes())
        .expect("64 hex digits are a valid key")
        .fingerprint()
        .to_string())
}

fn getrandom_fill(buf: &mut [u8]) -> Result<()> {
    use rand::RngCore;
    rand::rngs::OsRng
        .try_fill_bytes(buf)
        .map_err(|e| Error::Net(format!("generating a cluster key: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (PeerId, PeerId, PeerId) {
        (PeerId::random(), PeerId::random(), PeerId::random())
    }

    #[test]
    fn every_mode_decides_as_documented() {
        let (me, member, outsider) = ids();
        let key = ClusterKey::from_secret(&[b'k'; 40]).unwrap();
        let wrong = ClusterKey::from_secret(&[b'w'; 40]).unwrap();
        let lo: IpAddr = "127.0.0.2".parse().unwrap();
        let lan: IpAddr = "10.1.2.3".parse().unwrap();
        let ctl = Channel::Control;
        let good = key.proof(ctl, &outsider, &me);
        let bad = wrong.proof(ctl, &outsider, &me);

        let none = Admission::default();
        assert_eq!(none.mode(), "loopback only");
        assert_eq!(
            none.decide(ctl, &me, &outsider, Some(lo), None),
            Verdict::Admit
        );
        assert!(matches!(
            none.decide(ctl, &me, &outsider, Some(lan), Some(&good)),
            Verdict::Refuse(_)
        ));
        assert!(!none.admits_address(lan) && none.admits_address(lo));

        let open = Admission {
            open: true,
            ..Default::default()
        };
        assert_eq!(
            open.decide(ctl, &me, &outsider, Some(lan), None),
            Verdict::Admit
        );

        let keyed = Admission {
            key: Some(key.clone()),
            ..Default::default()
        };
        assert!(keyed.admits_address(lan));
        assert_eq!(
            keyed.decide(ctl, &me, &outsider, Some(lan), None),
            Verdict::NeedProof
        );
        assert_eq!(
            keyed.decide(ctl, &me, &outsider, Some(lan), Some(&good)),
            Verdict::Admit
        );
        assert!(matches!(
            keyed.decide(ctl, &me, &outsider, Some(lan), Some(&bad)),
            Verdict::Refuse(_)
        ));
        // A proof is bound to the channel, the prover and the verifier.
        assert!(matches!(
            keyed.decide(Channel::Bulk, &me, &outsider, Some(lan), Some(&good)),
            Verdict::Refuse(_)
        ));
        assert!(matches!(
            keyed.decide(ctl, &me, &member, Some(lan), Some(&good)),
            Verdict::Refuse(_)
        ));
        assert!(matches!(
            keyed.decide(ctl, &member, &outsider, Some(lan), Some(&good)),
            Verdict::Refuse(_)
        ));
        // Loopback is no exception once a key is set.
        assert_eq!(
            keyed.decide(ctl, &me, &outsider, Some(lo), None),
            Verdict::NeedProof
        );

        let members = Admission {
            members: Some([member].into_iter().collect()),
            ..Default::default()
        };
        assert_eq!(
            members.decide(ctl, &me, &member, Some(lan), None),
            Verdict::Admit
        );
        assert!(matches!(
            members.decide(ctl, &me, &outsider, Some(lan), Some(&good)),
            Verdict::Refuse(_)
        ));

        let both = Admission {
            key: Some(key),
            ..members
        };
        assert_eq!(
            both.decide(ctl, &me, &member, Some(lan), None),
            Verdict::Admit
        );
        assert_eq!(
            both.decide(ctl, &me, &outsider, Some(lan), Some(&good)),
            Verdict::Admit
        );
    }

    #[test]
    fn keys_need_enough_secret_and_keygen_writes_a_private_file() {
        assert!(ClusterKey::from_secret(b"short").is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let fp = keygen(&path).unwrap();
        let k = ClusterKey::load(&path).unwrap();
        assert_eq!(k.fingerprint(), fp);
        assert!(
            keygen(&path).is_err(),
            "an existing key is never overwritten"
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = ClusterKey::load(&path).unwrap_err().to_string();
        assert!(err.contains("readable by other users"), "{err}");
    }
}
