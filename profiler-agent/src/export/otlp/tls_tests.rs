//! TLS to OTLP receivers: an in-process tonic `ProfilesService` and a small
//! HTTPS responder on 127.0.0.1, with a CA, server and client certificates
//! generated per test by rcgen. Checked: system-roots-free verification
//! against the configured CA, a wrong CA failing with rustls's reason,
//! mutual TLS, and `insecure` meaning plaintext.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::profiles::v1development::profiles_service_server::{
    ProfilesService, ProfilesServiceServer,
};
use opentelemetry_proto::tonic::collector::profiles::v1development::ExportProfilesServiceResponse;
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use super::*;
use crate::export::testutil::on_cpu_profile;

/// A CA and what it signed, written as PEM files into a temporary directory.
pub(crate) struct Pki {
    /// Holds the files; removed on drop.
    _dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: String,
    pub server_key: String,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub ca_pem: String,
}

impl Pki {
    /// A fresh CA; the server certificate is for 127.0.0.1 and localhost.
    pub(crate) fn new() -> Pki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "profiler test CA");
        let ca = params.self_signed(&ca_key).expect("CA certificate");
        let leaf = |names: Vec<String>, usage| {
            let key = KeyPair::generate().expect("key");
            let mut params = CertificateParams::new(names).expect("params");
            params.extended_key_usages = vec![usage];
            (params.signed_by(&key, &ca, &ca_key).expect("sign").pem(), key.serialize_pem())
        };
        let (server_cert, server_key) =
            leaf(vec!["127.0.0.1".into(), "localhost".into()], ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert, client_key) = leaf(vec!["profiler-agent".into()], ExtendedKeyUsagePurpose::ClientAuth);
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write PEM");
            path
        };
        Pki {
            ca: write("ca.pem", &ca.pem()),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
            ca_pem: ca.pem(),
            server_cert,
            server_key,
            _dir: dir,
        }
    }

    /// Trust this CA (and, with `mtls`, present the client certificate).
    pub(crate) fn client_tls(&self, mtls: bool) -> TlsConfig {
        TlsConfig {
            insecure: false,
            ca_file: Some(self.ca.clone()),
            client_cert_file: mtls.then(|| self.client_cert.clone()),
            client_key_file: mtls.then(|| self.client_key.clone()),
        }
    }
}

#[derive(Default)]
pub(crate) struct Count(pub Mutex<usize>);

#[tonic::async_trait]
impl ProfilesService for Count {
    async fn export(
        &self,
        _request: tonic::Request<ExportProfilesServiceRequest>,
    ) -> Result<tonic::Response<ExportProfilesServiceResponse>, tonic::Status> {
        *self.0.lock().expect("lock") += 1;
        Ok(tonic::Response::new(ExportProfilesServiceResponse::default()))
    }
}

/// A gRPC receiver with the server certificate of `pki`; with `require_client`
/// it also demands a client certificate signed by the same CA.
pub(crate) async fn tls_grpc_receiver(pki: &Pki, require_client: bool) -> (SocketAddr, Arc<Count>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(&pki.server_cert, &pki.server_key));
    if require_client {
        tls = tls.client_ca_root(Certificate::from_pem(&pki.ca_pem));
    }
    let count = Arc::new(Count::default());
    let service = ProfilesServiceServer::from_arc(count.clone()).accept_compressed(CompressionEncoding::Gzip);
    let server = tonic::transport::Server::builder().tls_config(tls).expect("server TLS");
    tokio::spawn(async move { server.serve_with_incoming(service, TcpIncoming::from(listener)).await });
    (addr, count)
}

fn config(protocol: Protocol, addr: SocketAddr, tls: TlsConfig) -> ClientConfig {
    ClientConfig {
        endpoint: format!("https://{addr}"),
        protocol,
        headers: Vec::new(),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(5),
        tls,
    }
}

fn request() -> ExportProfilesServiceRequest {
    let (p, _) = on_cpu_profile();
    encode(&[&p], &Resource::default())
}

#[tokio::test]
async fn grpc_over_tls_verifies_the_receiver_against_the_configured_ca() {
    let pki = Pki::new();
    let (addr, count) = tls_grpc_receiver(&pki, false).await;
    let client = OtlpProfilesClient::new(config(Protocol::Grpc, addr, pki.client_tls(false))).expect("client");
    client.export(request()).await.expect("export over TLS");
    assert_eq!(*count.0.lock().unwrap(), 1);
}

#[tokio::test]
async fn a_wrong_ca_fails_the_handshake_with_rustls_reason() {
    let (server, other) = (Pki::new(), Pki::new());
    let (addr, count) = tls_grpc_receiver(&server, false).await;
    for protocol in [Protocol::Grpc, Protocol::HttpProtobuf] {
        let target = if protocol == Protocol::Grpc { addr } else { https_receiver(&server).await.0 };
        let client = OtlpProfilesClient::new(config(protocol, target, other.client_tls(false))).expect("client");
        let err = client.export(request()).await.expect_err("the server's CA is not trusted");
        let text = err.to_string();
        assert!(matches!(err, OtlpError::Tls { .. }), "{protocol:?}: {err:?}");
        assert!(text.contains("certificate") && text.contains("ca_file"), "{protocol:?}: {text}");
        assert!(err.retryable(), "a certificate fixed on the receiver's side must be picked up");
    }
    assert_eq!(*count.0.lock().unwrap(), 0);
}

#[tokio::test]
async fn mutual_tls_presents_the_client_certificate() {
    let pki = Pki::new();
    let (addr, count) = tls_grpc_receiver(&pki, true).await;
    let without = OtlpProfilesClient::new(config(Protocol::Grpc, addr, pki.client_tls(false))).expect("client");
    // Under TLS 1.3 the client learns of the refusal only as a broken
    // connection after its handshake, so the error kind varies.
    without.export(request()).await.expect_err("the receiver demands a client certificate");
    let with = OtlpProfilesClient::new(config(Protocol::Grpc, addr, pki.client_tls(true))).expect("client");
    with.export(request()).await.expect("export with mutual TLS");
    assert_eq!(*count.0.lock().unwrap(), 1);
}

/// One HTTPS exchange at a time answering 200 with an empty protobuf body;
/// returns the address and the number of requests read.
async fn https_receiver(pki: &Pki) -> (SocketAddr, Arc<Mutex<usize>>) {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(pki.server_cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(pki.server_key.as_bytes()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, counter) = (acceptor.clone(), counter.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = vec![0u8; 1 << 16];
                let mut got = Vec::new();
                // Read the head and a body of content-length bytes.
                loop {
                    let Ok(n) = tls.read(&mut buf).await else { return };
                    if n == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len: usize = text
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                *counter.lock().unwrap() += 1;
                let reply = "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, seen)
}

#[tokio::test]
async fn https_export_verifies_against_the_configured_ca() {
    let pki = Pki::new();
    let (addr, seen) = https_receiver(&pki).await;
    let client = OtlpProfilesClient::new(config(Protocol::HttpProtobuf, addr, pki.client_tls(false))).expect("client");
    client.export(request()).await.expect("export over HTTPS");
    assert_eq!(*seen.lock().unwrap(), 1);
}

#[tokio::test]
async fn insecure_means_plaintext_even_for_https() {
    // A plaintext gRPC receiver: only a client that does not attempt TLS gets through.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let count = Arc::new(Count::default());
    let service = ProfilesServiceServer::from_arc(count.clone()).accept_compressed(CompressionEncoding::Gzip);
    tokio::spawn(tonic::transport::Server::builder().serve_with_incoming(service, TcpIncoming::from(listener)));
    let tls = TlsConfig { insecure: true, ..Default::default() };
    let client = OtlpProfilesClient::new(config(Protocol::Grpc, addr, tls)).expect("client");
    client.export(request()).await.expect("plaintext export");
    assert_eq!(*count.0.lock().unwrap(), 1);
}
