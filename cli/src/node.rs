//! `shoal node run` and `shoal status`.

use crate::config::NodeConfig;
use crate::output::{self, Out};
use anyhow::{Context, Result};
use shoal_node::daemon::{self, Client, DaemonOptions, Request};
use shoal_node::swarm::rate::RateLimits;
use shoal_node::swarm::{self, Labels, Status, SwarmConfig};
use shoal_node::{Home, Node, Progress};
use std::collections::HashSet;

fn multiaddrs(list: &[String], what: &str) -> Result<Vec<swarm::Multiaddr>> {
    list.iter()
        .map(|a| {
            a.parse().with_context(|| {
                format!("{what} {a:?} is not a multiaddr (e.g. /ip4/10.0.0.5/tcp/4001)")
            })
        })
        .collect()
}

/// Reads a members file: one peer id per line, `#` comments.
fn members(path: &std::path::Path) -> Result<HashSet<swarm::PeerId>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading members file {}", path.display()))?;
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.parse()
                .with_context(|| format!("members file {}: {l:?} is not a peer id", path.display()))
        })
        .collect()
}

pub async fn run(
    node: Node,
    file: &NodeConfig,
    flags: NodeConfig,
    rates: RateLimits,
    out: &Out,
) -> Result<()> {
    let pick = |a: &Vec<String>, b: &Vec<String>| if a.is_empty() { b.clone() } else { a.clone() };
    let listen = multiaddrs(&pick(&flags.listen, &file.listen), "listen address")?;
    let bootstrap = multiaddrs(
        &pick(&flags.bootstrap, &file.bootstrap),
        "bootstrap address",
    )?;
    let members = flags
        .members
        .or(file.members.clone())
        .map(|p| members(&p))
        .transpose()?;
    let cluster_key = flags
        .cluster_key
        .or(file.cluster_key.clone())
        .map(|p| swarm::admission::ClusterKey::load(&p))
        .transpose()?;
    let open = flags.open.or(file.open).unwrap_or(false);
    if open && (members.is_some() || cluster_key.is_some()) {
        anyhow::bail!("an open node (--open, [node] open) admits anyone: drop the cluster key and members list, or drop open");
    }
    let admission = swarm::admission::Admission {
        open,
        members,
        key: cluster_key,
    };
    if admission.loopback_only() {
        tracing::warn!("no cluster key, members list or --open: only peers on this machine are admitted (see `shoal node keygen`)");
    }
    let metrics = flags
        .metrics
        .or(file.metrics.clone())
        .map(|m| {
            m.parse()
                .with_context(|| format!("--metrics {m:?}: expected HOST:PORT"))
        })
        .transpose()?;
    let opts = DaemonOptions {
        swarm: SwarmConfig {
            listen,
            bootstrap,
            labels: Labels {
                region: flags.region.or(file.region.clone()),
                zone: flags.zone.or(file.zone.clone()),
                rack: flags.rack.or(file.rack.clone()),
            },
            // mDNS finds peers on the LAN: pointless for a node that admits only this machine.
            mdns: flags
                .mdns
                .or(file.mdns)
                .unwrap_or(!admission.loopback_only()),
            admission,
            limits: file.limits.clone(),
            rates,
            wire_compression: flags
                .wire_compression
                .or(file.wire_compression)
                .unwrap_or(true),
        },
        metrics,
        limits: file.limits.clone(),
    };
    opts.limits
        .check()
        .map_err(|e| anyhow::anyhow!("[node.limits] in the config file: {e}"))?;
    daemon::run(node, opts, |s| {
        let _ = out.report(s, || {
            format!(
                "node {} listening on {} (bulk {}), admitting {}{}; Ctrl-C to stop",
                s.peer_id,
                s.listen.join(", "),
                s.bulk_addr.as_deref().unwrap_or("-"),
                s.admission,
                s.cluster_key
                    .as_ref()
                    .map(|f| format!(" (key {f})"))
                    .unwrap_or_default()
            )
        });
    })
    .await?;
    Ok(())
}

pub async fn status(home: &Home, out: &Out) -> Result<()> {
    let Some(daemon) = Client::connect(home).await else {
        anyhow::bail!(
            "no node daemon is running for {} (start one with `shoal node run`)",
            home.root().display()
        );
    };
    let s: Status =
        serde_json::from_value(daemon.call(&Request::Status, &Progress::default()).await?)?;
    out.report(&s, || {
        let mut lines = vec![
            format!("node {}", s.peer_id),
            format!("  listening on {}", s.listen.join(", ")),
            format!(
                "  admitting {}{}",
                s.admission,
                s.cluster_key
                    .as_ref()
                    .map(|f| format!(" (key {f})"))
                    .unwrap_or_default()
            ),
            format!(
                "  received {} from peers, {} from origin; served {}; {} verify failures; {} active pulls",
                output::bytes(s.bytes_from_peers),
                output::bytes(s.bytes_from_origin),
                output::bytes(s.bytes_served),
                s.verify_failures,
                s.active_pulls
            ),
        ];
        if let Some(l) = output::passed_over(s.readers_passed_over, s.readers_passed_over_by_lag) {
            lines.push(format!("  {l}"));
        }
        let r = &s.rates;
        if r.origin.or(r.upload).or(r.download).is_some() {
            let rate = |v: Option<u64>| {
                v.map(|b| format!("{:.1} MB/s", b as f64 / 1e6))
                    .unwrap_or_else(|| "unlimited".into())
            };
            lines.push(format!(
                "  rates: origin {}, upload {}, download {}",
                rate(r.origin),
                rate(r.upload),
                rate(r.download)
            ));
        }
        for v in &s.versions {
            lines.push(format!("  holds {} ({}, {:?})", v.name, v.root, v.holding));
        }
        for m in &s.mounts {
            lines.push(format!("  serves {} at {}", m.reference, m.mountpoint));
        }
        for p in &s.peers {
            lines.push(format!(
                "  peer {} {} distance {} rtt {} {:.0} MB/s",
                p.peer_id,
                if p.connected { "connected" } else { "gone" },
                p.distance,
                p.rtt_ms.map(|r| format!("{r:.2} ms")).unwrap_or_else(|| "-".into()),
                p.throughput_mbps
            ));
        }
        lines.join("\n")
    })
}
