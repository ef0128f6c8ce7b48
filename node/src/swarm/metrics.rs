//! Prometheus text metrics (`shoal node run --metrics ADDR`).

use super::Swarm;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Renders the node's counters in the Prometheus text format.
pub fn render(swarm: &Swarm) -> String {
    let c = &swarm.counters;
    let (peers, connected) = {
        let p = swarm.peers.lock().expect("poisoned");
        (
            p.len() as i64,
            p.values().filter(|p| p.connected).count() as i64,
        )
    };
    let mut reg = Registry::with_prefix("shoal");
    let counter = |reg: &mut Registry, name: &str, help: &str, v: u64| {
        reg.register(name, help, ConstCounter::new(v));
    };
    counter(
        &mut reg,
        "bytes_from_peers",
        "Chunk bytes received from peers, verified",
        c.bytes_from_peers.load(Ordering::Relaxed),
    );
    counter(
        &mut reg,
        "bytes_from_origin",
        "Chunk bytes read from origin stores",
        c.bytes_from_origin.load(Ordering::Relaxed),
    );
    counter(
        &mut reg,
        "bytes_served",
        "Chunk bytes served to peers",
        c.bytes_served.load(Ordering::Relaxed),
    );
    counter(
        &mut reg,
        "chunk_verify_failures",
        "Chunks from peers whose bytes did not match their id",
        c.verify_failures.load(Ordering::Relaxed),
    );
    reg.register(
        "active_pulls",
        "Pulls in progress",
        ConstGauge::new(c.active_pulls.load(Ordering::Relaxed) as i64),
    );
    reg.register(
        "peers_connected",
        "Peers connected now",
        ConstGauge::new(connected),
    );
    reg.register("peers_known", "Peers ever seen", ConstGauge::new(peers));
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

/// Serves `/metrics` on `addr` from a thread of its own.
pub fn serve(swarm: Arc<Swarm>, addr: SocketAddr) -> crate::Result<SocketAddr> {
    let server = tiny_http::Server::http(addr)
        .map_err(|e| crate::Error::Net(format!("metrics endpoint on {addr}: {e}")))?;
    let bound = server.server_addr().to_ip().ok_or_else(|| {
        crate::Error::Net(format!("metrics endpoint on {addr}: not an IP address"))
    })?;
    std::thread::Builder::new()
        .name("shoal-metrics".into())
        .spawn(move || {
            let header = tiny_http::Header::from_bytes(
                "Content-Type",
                "text/plain; version=0.0.4; charset=utf-8",
            )
            .expect("valid header");
            for req in server.incoming_requests() {
                let resp =
                    tiny_http::Response::from_string(render(&swarm)).with_header(header.clone());
                let _ = req.respond(resp);
            }
        })
        .map_err(|e| crate::Error::Net(format!("metrics thread: {e}")))?;
    Ok(bound)
}
