//! TLS 1.3 for the bulk channel, authenticated by libp2p identities.
//!
//! The certificates are libp2p's (`libp2p_tls::certificate`: a self-signed X.509 certificate
//! whose extension carries the host's libp2p public key and its signature over the TLS key), so
//! a bulk connection proves the same peer id as the libp2p connection. What differs from
//! `libp2p_tls::make_{client,server}_config` is the cipher suite order: AES-GCM first, which
//! with AES-NI costs a fraction of ChaCha20-Poly1305 per byte (see docs/swarm.md), instead of
//! ChaCha20 first.

use libp2p::identity::Keypair;
use libp2p::PeerId;
use libp2p_tls::certificate;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::ring::cipher_suite;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::sync::Arc;

/// The bulk protocol: records of blobs as they are.
const ALPN: &[u8] = b"shoal-bulk/2";
/// The same, and a server may send a group of records as one compressed frame
/// (`super::bulk`). Offered by every client; chosen by servers that compress.
const ALPN_FRAMES: &[u8] = b"shoal-bulk/3";

/// Whether a connection that negotiated `alpn` may carry compressed frames.
pub fn frames(alpn: Option<&[u8]>) -> bool {
    alpn == Some(ALPN_FRAMES)
}

#[derive(Debug)]
struct Verifier {
    /// The peer the client expects; None on the server (any member, checked after).
    remote: Option<PeerId>,
}

fn general(e: impl std::fmt::Display) -> rustls::Error {
    rustls::Error::General(e.to_string())
}

impl Verifier {
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            return Err(general("expected exactly one certificate"));
        }
        // Checks the self-signature and the libp2p extension's signature.
        let cert = certificate::parse(end_entity).map_err(general)?;
        if let Some(r) = self.remote {
            if cert.peer_id() != r {
                return Err(general(format!(
                    "expected peer {r}, the certificate is {}'s",
                    cert.peer_id()
                )));
            }
        }
        Ok(())
    }

    fn tls13(
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        certificate::parse(cert)
            .map_err(general)?
            .verify_signature(dss.scheme, message, dss.signature())
            .map_err(general)?;
        Ok(HandshakeSignatureValid::assertion())
    }

    fn schemes() -> Vec<SignatureScheme> {
        vec![
            SignatureScheme::ECDSA_NISTP384_SHA384,
            SignatureScheme::ECDSA_NISTP256_SHA256,
            SignatureScheme::ED25519,
        ]
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(general("TLS 1.2 is not supported"))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

impl ClientCertVerifier for Verifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(general("TLS 1.2 is not supported"))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Self::tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        Self::schemes()
    }
}

/// Always presents the one libp2p certificate (rustls's own `with_single_cert` would reject its
/// critical libp2p extension).
#[derive(Debug)]
struct Always(Arc<rustls::sign::CertifiedKey>);

impl Always {
    fn new(keypair: &Keypair, provider: &rustls::crypto::CryptoProvider) -> Result<Always, String> {
        let (cert, key) = certificate::generate(keypair).map_err(|e| e.to_string())?;
        let key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| e.to_string())?;
        Ok(Always(Arc::new(rustls::sign::CertifiedKey::new(
            vec![cert],
            key,
        ))))
    }
}

impl rustls::server::ResolvesServerCert for Always {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl rustls::client::ResolvesClientCert for Always {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Client side: proves `keypair`'s identity and accepts only `remote`.
pub fn client(keypair: &Keypair, remote: PeerId) -> Result<rustls::ClientConfig, String> {
    let provider = provider();
    let cert = Always::new(keypair, &provider)?;
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Verifier {
            remote: Some(remote),
        }))
        .with_client_cert_resolver(Arc::new(cert));
    c.alpn_protocols = vec![ALPN_FRAMES.to_vec(), ALPN.to_vec()];
    Ok(c)
}

/// Server side: proves `keypair`'s identity and requires a libp2p certificate from clients;
/// with `compress`, chooses the protocol with compressed frames when a client offers it.
pub fn server(keypair: &Keypair, compress: bool) -> Result<rustls::ServerConfig, String> {
    let provider = provider();
    let cert = Always::new(keypair, &provider)?;
    let mut c = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(Arc::new(Verifier { remote: None }))
        .with_cert_resolver(Arc::new(cert));
    c.alpn_protocols = if compress {
        vec![ALPN_FRAMES.to_vec(), ALPN.to_vec()]
    } else {
        vec![ALPN.to_vec()]
    };
    Ok(c)
}
