//! A libp2p behaviour that keeps the control listener's connection bounds: how many
//! connections (handshakes included) it holds in all and from one address, and, for a node
//! with neither cluster key nor members, that only this machine connects. It decides with
//! [`crate::limits::Gate`] and holds each admitted connection's ticket until it closes.

use crate::limits::{Gate, Ticket};
use libp2p::core::transport::PortUse;
use libp2p::core::Endpoint;
use libp2p::swarm::{
    dummy, ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, ListenFailure,
    NetworkBehaviour, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Refused by the gate, with the reason (reported in the swarm's incoming-connection error).
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

pub(crate) struct Gatekeeper {
    gate: Arc<Gate>,
    loopback_only: bool,
    tickets: HashMap<ConnectionId, Ticket>,
}

impl Gatekeeper {
    pub(crate) fn new(gate: Arc<Gate>, loopback_only: bool) -> Gatekeeper {
        Gatekeeper {
            gate,
            loopback_only,
            tickets: HashMap::new(),
        }
    }
}

pub(crate) fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    use libp2p::multiaddr::Protocol;
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

impl NetworkBehaviour for Gatekeeper {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _local: &Multiaddr,
        remote: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(ip) = ip_of(remote) else {
            return Err(ConnectionDenied::new(Refused(format!(
                "no IP address in {remote}"
            ))));
        };
        if self.loopback_only && !super::admission::is_loopback(ip) {
            return Err(ConnectionDenied::new(Refused(format!(
                "{ip} is not on this machine, and this node admits only loopback peers (no cluster key, no members, not --open)"
            ))));
        }
        let ticket = self
            .gate
            .admit(ip)
            .map_err(|r| ConnectionDenied::new(Refused(format!("{ip}: {r}"))))?;
        self.tickets.insert(connection_id, ticket);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. })
            | FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.tickets.remove(&connection_id);
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
