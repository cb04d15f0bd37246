//! TLS for the gRPC port (rustls): the server's certificate and key (`KABAR_TLS_CERT_FILE`,
//! `KABAR_TLS_KEY_FILE`), client certificates signed by `KABAR_TLS_CLIENT_CA_FILE` when set,
//! and the files read again when they change, so that a rotated certificate (cert-manager) is
//! served without a restart. Also the client side, for `kabar batch` and the tests.
//!
//! A TLS connection is admitted like a plain one (see [`crate::listen`]): the TLS handshake and
//! then the HTTP/2 client preface must arrive within the slow-client timeout, counted from the
//! TCP accept. Handshakes run beside the accept loop, so a slow one holds up no other.

use std::{
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, RwLock},
    task::{Context, Poll},
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};

use crate::{
    config::{ConfigError, read_small_file},
    listen::{Admission, Guarded, HTTP2_PREFACE_LEN},
};

/// Most bytes a certificate, key or CA file may hold.
const MAX_PEM_BYTES: u64 = 1024 * 1024;

/// Where the server's certificate, key and (optionally) the client CA are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Callers must present a certificate signed by this CA.
    pub client_ca: Option<PathBuf>,
}

impl TlsFiles {
    /// The files to watch for changes.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut paths = vec![self.cert.clone(), self.key.clone()];
        paths.extend(self.client_ca.clone());
        paths
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn error(var: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        var,
        message: message.into(),
    }
}

fn read_pem(var: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    read_small_file(path, MAX_PEM_BYTES).map_err(|e| error(var, format!("{}: {e}", path.display())))
}

/// The certificates of a PEM file (a chain: the leaf first).
fn read_certs(var: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = read_pem(var, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(var, format!("{}: not a PEM file: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(error(
            var,
            format!(
                "{}: holds no certificate (a PEM block `-----BEGIN CERTIFICATE-----`)",
                path.display()
            ),
        ));
    }
    Ok(certs)
}

/// The private key of a PEM file. Its errors never show the file's content.
fn read_key(var: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let pem = read_pem(var, path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| {
        error(
            var,
            format!(
                "{}: holds no private key (a PEM block `-----BEGIN PRIVATE KEY-----`, \
                 `RSA PRIVATE KEY` or `EC PRIVATE KEY`)",
                path.display()
            ),
        )
    })
}

/// Reads the files and builds the server's TLS settings (HTTP/2 only, TLS 1.2 and 1.3).
pub fn server_config(files: &TlsFiles) -> Result<Arc<ServerConfig>, ConfigError> {
    let certs = read_certs("KABAR_TLS_CERT_FILE", &files.cert)?;
    let key = read_key("KABAR_TLS_KEY_FILE", &files.key)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error("KABAR_TLS_CERT_FILE", e.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let var = "KABAR_TLS_CLIENT_CA_FILE";
            let mut roots = RootCertStore::empty();
            for cert in read_certs(var, ca)? {
                roots.add(cert).map_err(|e| {
                    error(
                        var,
                        format!("{}: not a usable CA certificate: {e}", ca.display()),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| error(var, format!("{}: {e}", ca.display())))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(certs, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => error(
            "KABAR_TLS_KEY_FILE",
            format!(
                "{}: this key does not belong to the certificate in {}",
                files.key.display(),
                files.cert.display()
            ),
        ),
        e => error(
            "KABAR_TLS_KEY_FILE",
            format!(
                "{}: not usable with the certificate in {}: {e}",
                files.key.display(),
                files.cert.display()
            ),
        ),
    })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS settings in force; replaced when the files change.
pub struct ServerTls {
    files: TlsFiles,
    config: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    pub fn new(files: TlsFiles, config: Arc<ServerConfig>) -> Arc<Self> {
        Arc::new(ServerTls {
            files,
            config: RwLock::new(config),
        })
    }

    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    /// Reads the files again; on an error the settings in force stay.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let fresh = server_config(&self.files)?;
        *self.config.write().expect("TLS settings lock") = fresh;
        Ok(())
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.read().expect("TLS settings lock").clone())
    }
}

/// An admitted TLS connection. The HTTP/2 preface, read to tell that the connection is
/// established, is handed on before anything else.
pub struct TlsConnection {
    inner: TlsStream<Guarded>,
    preface: [u8; HTTP2_PREFACE_LEN],
    preface_given: usize,
}

/// The TLS handshake and the HTTP/2 preface, both bounded by the connection's handshake
/// deadline (a read past it fails).
async fn handshake(acceptor: TlsAcceptor, conn: Guarded) -> io::Result<TlsConnection> {
    let mut inner = acceptor.accept(conn).await?;
    let mut preface = [0u8; HTTP2_PREFACE_LEN];
    inner.read_exact(&mut preface).await?;
    inner.get_mut().0.establish()?;
    Ok(TlsConnection {
        inner,
        preface,
        preface_given: 0,
    })
}

/// The TLS connections accepted on `listener`, as a stream for tonic's server. It ends (and the
/// listener closes) when the server drops it.
pub fn incoming(
    listener: TcpListener,
    admission: Arc<Admission>,
    tls: Arc<ServerTls>,
) -> impl futures_util::Stream<Item = io::Result<TlsConnection>> + Send + 'static {
    // Handshakes in progress are bounded by the admission (handshaking connections at most).
    let (ready, rx) = tokio::sync::mpsc::channel::<TlsConnection>(64);
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                (conn, _) = admission.accept(&listener) => conn,
                () = ready.closed() => return,
            };
            let (acceptor, ready) = (tls.acceptor(), ready.clone());
            tokio::spawn(async move {
                match handshake(acceptor, conn).await {
                    Ok(conn) => {
                        let _ = ready.send(conn).await;
                    }
                    Err(e) => tracing::debug!(error = %e, "TLS connection not established"),
                }
            });
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        let conn = rx.recv().await?;
        Some((Ok(conn), rx))
    })
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.preface_given < HTTP2_PREFACE_LEN {
            let rest = &this.preface[this.preface_given..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.preface_given += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.get_ref().0.connect_info()
    }
}

/// How a client reaches kabar over TLS: the CA that signed kabar's certificate and, for a port
/// that asks for client certificates, the client's own certificate and key.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// The client's TLS settings (HTTP/2), trusting only the given CA.
pub fn client_config(tls: &ClientTls) -> Result<Arc<ClientConfig>, ConfigError> {
    let Some(ca) = &tls.ca else {
        return Err(error(
            "KABAR_TLS_CA_FILE",
            "is required for https://: the CA certificate (PEM) that signed kabar's certificate",
        ));
    };
    let mut roots = RootCertStore::empty();
    for cert in read_certs("KABAR_TLS_CA_FILE", ca)? {
        roots.add(cert).map_err(|e| {
            error(
                "KABAR_TLS_CA_FILE",
                format!("{}: not a usable CA certificate: {e}", ca.display()),
            )
        })?;
    }
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| error("KABAR_TLS_CA_FILE", e.to_string()))?
        .with_root_certificates(roots);
    let mut config = match (&tls.cert, &tls.key) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                read_certs("KABAR_TLS_CLIENT_CERT_FILE", cert)?,
                read_key("KABAR_TLS_CLIENT_KEY_FILE", key)?,
            )
            .map_err(|e| {
                error(
                    "KABAR_TLS_CLIENT_KEY_FILE",
                    format!("{}: not usable with the certificate: {e}", key.display()),
                )
            })?,
        (Some(_), None) => {
            return Err(error(
                "KABAR_TLS_CLIENT_KEY_FILE",
                "is required with KABAR_TLS_CLIENT_CERT_FILE",
            ));
        }
        (None, Some(_)) => {
            return Err(error(
                "KABAR_TLS_CLIENT_CERT_FILE",
                "is required with KABAR_TLS_CLIENT_KEY_FILE",
            ));
        }
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// A gRPC channel to kabar at `host:port` over TLS, checking the certificate for `host`.
pub async fn connect(
    host: &str,
    port: u16,
    config: Arc<ClientConfig>,
    timeout: std::time::Duration,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    // An IPv6 host comes as `[::1]`; its certificate names the bare address.
    let name = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let server_name = ServerName::try_from(name)
        .unwrap_or_else(|_| ServerName::try_from("invalid.invalid").expect("a DNS name"));
    let connector = TlsConnector::from(config);
    let target = format!("{host}:{port}");
    // tonic sees a plain HTTP/2 URL; the connector adds TLS.
    tonic::transport::Endpoint::from_shared(format!("http://{target}"))?
        .connect_timeout(timeout)
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let (connector, server_name, target) =
                (connector.clone(), server_name.clone(), target.clone());
            async move {
                let tcp = TcpStream::connect(&target).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(server_name, tcp).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
}
