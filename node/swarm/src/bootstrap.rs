//! Bootstrap addresses by name: `/dns4/shoal-peers.shoal.svc.cluster.local/tcp/4001` (a
//! Kubernetes headless Service, a podman network alias, a round-robin record) names every
//! node, this one included. libp2p's DNS transport dials the first address that connects,
//! and a resolver that lists the asking pod first (podman's does, every time) makes that
//! this node itself, forever. So names are resolved here, to every address they have, and
//! up to [`PICK`] of them, chosen at random (a fleet's newcomers spread over it instead of
//! all dialing the first answer), are dialed as plain IP addresses, this node's own left out.

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use rand::seq::SliceRandom;
use std::net::IpAddr;
use std::time::Duration;

/// Addresses of one name dialed at a time.
pub const PICK: usize = 8;

/// How long one name's lookup may take.
pub const LOOKUP_DEADLINE: Duration = Duration::from_secs(5);

/// How often names are looked up again (pods come and go).
pub const REFRESH: Duration = Duration::from_secs(30);

/// The name and port of a `/dns…/NAME/tcp/PORT…` address, or `None` for any other.
pub fn name_of(addr: &Multiaddr) -> Option<(String, u16)> {
    let mut it = addr.iter();
    let host = match it.next()? {
        Protocol::Dns(h) | Protocol::Dns4(h) | Protocol::Dns6(h) => h.to_string(),
        _ => return None,
    };
    match it.next()? {
        Protocol::Tcp(port) => Some((host, port)),
        _ => None,
    }
}

/// `addr` with its name replaced by each of `ips` the name's kind allows (`/dns4` only IPv4,
/// `/dns6` only IPv6), the rest (port, `/p2p/…`) kept; `addr` itself when it names no host.
pub fn expand(addr: &Multiaddr, ips: &[IpAddr]) -> Vec<Multiaddr> {
    let mut it = addr.iter();
    let Some(first) = it.next() else {
        return vec![];
    };
    let rest: Vec<Protocol<'_>> = it.collect();
    let allows = |ip: &IpAddr| match first {
        Protocol::Dns4(_) => ip.is_ipv4(),
        Protocol::Dns6(_) => ip.is_ipv6(),
        Protocol::Dns(_) => true,
        _ => false,
    };
    if !matches!(
        first,
        Protocol::Dns(_) | Protocol::Dns4(_) | Protocol::Dns6(_)
    ) {
        return vec![addr.clone()];
    }
    let mut out: Vec<Multiaddr> = Vec::new();
    for ip in ips.iter().filter(|ip| allows(ip)) {
        let mut m = Multiaddr::empty();
        m.push(match ip {
            IpAddr::V4(v4) => Protocol::Ip4(*v4),
            IpAddr::V6(v6) => Protocol::Ip6(*v6),
        });
        for p in &rest {
            m.push(p.clone());
        }
        if !out.contains(&m) {
            out.push(m);
        }
    }
    out
}

/// What to dial for `bootstrap`: IP addresses as they are, each name resolved and expanded,
/// up to [`PICK`] per name at random. A name that does not resolve is left out (logged at
/// `warn` when `loud`, at `debug` on later lookups, which are every [`REFRESH`]).
///
/// Cancel-safe: it only looks names up.
pub async fn resolve(bootstrap: &[Multiaddr], loud: bool) -> Vec<Multiaddr> {
    let mut out = Vec::new();
    for addr in bootstrap {
        let Some((host, port)) = name_of(addr) else {
            out.push(addr.clone());
            continue;
        };
        let ips: Vec<IpAddr> = match tokio::time::timeout(
            LOOKUP_DEADLINE,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        {
            Ok(Ok(found)) => found.map(|sa| sa.ip()).collect(),
            Ok(Err(e)) => {
                if loud {
                    tracing::warn!("bootstrap {addr}: cannot resolve {host}: {e}");
                } else {
                    tracing::debug!("bootstrap {addr}: cannot resolve {host}: {e}");
                }
                continue;
            }
            Err(_) => {
                if loud {
                    tracing::warn!(
                        "bootstrap {addr}: resolving {host} took over {LOOKUP_DEADLINE:?}"
                    );
                }
                continue;
            }
        };
        let mut all = expand(addr, &ips);
        all.shuffle(&mut rand::thread_rng());
        all.truncate(PICK);
        out.extend(all);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_name_expands_to_every_address_of_its_family_keeping_the_rest() {
        let ips: Vec<IpAddr> = ["10.0.0.1", "10.0.0.2", "fd00::1", "10.0.0.1"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            expand(&m("/dns4/peers.svc/tcp/4001"), &ips),
            vec![m("/ip4/10.0.0.1/tcp/4001"), m("/ip4/10.0.0.2/tcp/4001")]
        );
        assert_eq!(
            expand(&m("/dns6/peers.svc/tcp/4001"), &ips),
            vec![m("/ip6/fd00::1/tcp/4001")]
        );
        assert_eq!(expand(&m("/dns/peers.svc/tcp/4001"), &ips).len(), 3);
        let id = "12D3KooWRVbbHCUiogkcPQkrktniMroVUV6F2nuFJadJfvc6Hg2s";
        assert_eq!(
            expand(&m(&format!("/dns4/x/tcp/1/p2p/{id}")), &ips[..1]),
            vec![m(&format!("/ip4/10.0.0.1/tcp/1/p2p/{id}"))]
        );
        // Not a name: as it is.
        assert_eq!(
            expand(&m("/ip4/10.0.0.9/tcp/4001"), &ips),
            vec![m("/ip4/10.0.0.9/tcp/4001")]
        );
        assert_eq!(name_of(&m("/dns4/a.b/tcp/7")), Some(("a.b".into(), 7)));
        assert_eq!(name_of(&m("/ip4/1.2.3.4/tcp/7")), None);
    }

    #[tokio::test]
    async fn names_resolve_through_the_system_resolver_and_bad_ones_are_left_out() {
        let got = resolve(
            &[
                m("/dns4/localhost/tcp/4001"),
                m("/dns4/no-such-host.invalid/tcp/4001"),
                m("/ip4/10.1.2.3/tcp/9"),
            ],
            false,
        )
        .await;
        assert_eq!(
            got,
            vec![m("/ip4/127.0.0.1/tcp/4001"), m("/ip4/10.1.2.3/tcp/9")]
        );
    }
}
