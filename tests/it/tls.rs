//! TLS on the gRPC port: served with the configured certificate, client certificates checked
//! against `KABAR_TLS_CLIENT_CA_FILE`, a rotated certificate served without a restart (and a
//! broken one never), bad files refused at start-up, half-done handshakes closed, and
//! `kabar batch` reaching kabar over `https://`. Certificates are made here with rcgen.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use kabar::{config::Config, pb::notification_service_client::NotificationServiceClient, tls};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{process::work_dir, send_template::invoice_request};

/// A certificate authority made for one test.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A certificate for `localhost` and 127.0.0.1 (server) or a client named `name`: its PEM
    /// and its key's PEM.
    fn issue(&self, name: &str) -> (String, String) {
        let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress([127, 0, 0, 1].into()));
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(format!("{name}.pem"));
        std::fs::write(&path, self.pem()).unwrap();
        path
    }
}

/// Writes a certificate and key as `name.crt` and `name.key` in `dir`.
fn write_pair(dir: &Path, name: &str, (cert, key): &(String, String)) -> (PathBuf, PathBuf) {
    let (c, k) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    (c, k)
}

/// kabar in-process on a loopback port with `vars`.
struct Served {
    grpc_addr: SocketAddr,
    shutdown: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Served {
    async fn start(vars: &[(&str, &Path)], more: &[(&str, &str)]) -> Self {
        let mut map: HashMap<String, String> = HashMap::new();
        map.insert("KABAR_GRPC_ADDR".into(), "127.0.0.1:0".into());
        map.insert("KABAR_HTTP_ADDR".into(), "127.0.0.1:0".into());
        map.insert("KABAR_SHUTDOWN_GRACE_SECONDS".into(), "2".into());
        for (k, v) in vars {
            map.insert((*k).into(), v.display().to_string());
        }
        for (k, v) in more {
            map.insert((*k).into(), (*v).into());
        }
        let config = Config::from_source(&map).expect("valid test configuration");
        let listeners = kabar::Listeners::bind(&config).await.expect("bind");
        let grpc_addr = listeners.grpc.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(kabar::run(config, listeners, shutdown.clone()));
        Served {
            grpc_addr,
            shutdown,
            handle,
        }
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.unwrap().unwrap();
    }
}

fn client(ca: &Path, cert: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    tls::client_config(&tls::ClientTls {
        ca: Some(ca.to_owned()),
        cert: cert.map(|c| c.0.to_owned()),
        key: cert.map(|c| c.1.to_owned()),
    })
    .unwrap()
}

/// A health check over TLS; Err with the reason when the connection or the call fails.
async fn health(
    addr: SocketAddr,
    host: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<i32, String> {
    let channel = tls::connect(host, addr.port(), config, Duration::from_secs(3))
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    health_on(&channel).await
}

async fn health_on(channel: &Channel) -> Result<i32, String> {
    HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
}

const SERVING: i32 = 1;

#[tokio::test]
async fn the_grpc_port_speaks_tls_with_the_configured_certificate() {
    let dir = work_dir("tls-serve");
    let ca = Ca::new("kabar test CA");
    let ca_file = ca.write(&dir, "ca");
    let (cert, key) = write_pair(&dir, "server", &ca.issue("kabar"));
    let kabar = Served::start(
        &[("KABAR_TLS_CERT_FILE", &cert), ("KABAR_TLS_KEY_FILE", &key)],
        &[],
    )
    .await;
    let addr = kabar.grpc_addr;

    // By name and by address, and a real call through the whole chain.
    assert_eq!(
        health(addr, "localhost", client(&ca_file, None)).await,
        Ok(SERVING)
    );
    let channel = tls::connect(
        "127.0.0.1",
        addr.port(),
        client(&ca_file, None),
        Duration::from_secs(3),
    )
    .await
    .unwrap();
    assert_eq!(health_on(&channel).await, Ok(SERVING));
    let sent = NotificationServiceClient::new(channel)
        .send_template(invoice_request())
        .await
        .expect("SendTemplate over TLS");
    assert!(!sent.into_inner().message_id.is_empty());

    // A client that trusts another CA, or checks another name, is refused.
    let other = Ca::new("another CA");
    let other_file = other.write(&dir, "other");
    let refused = health(addr, "localhost", client(&other_file, None)).await;
    assert!(refused.is_err(), "{refused:?}");
    let refused = health(addr, "kabar.example", client(&ca_file, None)).await;
    assert!(refused.is_err(), "{refused:?}");

    // Plain HTTP/2 gets no answer.
    let plain = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(3))
        .connect()
        .await;
    if let Ok(plain) = plain {
        assert!(
            health_on(&plain).await.is_err(),
            "plain HTTP/2 was answered"
        );
    }
    kabar.stop().await;
}

#[tokio::test]
async fn client_certificates_are_required_from_the_client_ca() {
    let dir = work_dir("tls-mutual");
    let server_ca = Ca::new("server CA");
    let server_ca_file = server_ca.write(&dir, "server-ca");
    let (cert, key) = write_pair(&dir, "server", &server_ca.issue("kabar"));
    let client_ca = Ca::new("client CA");
    let client_ca_file = client_ca.write(&dir, "client-ca");
    let billing = write_pair(&dir, "billing", &client_ca.issue("billing"));
    let stranger_ca = Ca::new("stranger CA");
    let stranger = write_pair(&dir, "stranger", &stranger_ca.issue("billing"));
    let kabar = Served::start(
        &[
            ("KABAR_TLS_CERT_FILE", &cert),
            ("KABAR_TLS_KEY_FILE", &key),
            ("KABAR_TLS_CLIENT_CA_FILE", &client_ca_file),
        ],
        &[],
    )
    .await;
    let addr = kabar.grpc_addr;

    let with_cert = client(&server_ca_file, Some((&billing.0, &billing.1)));
    assert_eq!(health(addr, "localhost", with_cert).await, Ok(SERVING));

    let without = health(addr, "localhost", client(&server_ca_file, None)).await;
    assert!(without.is_err(), "no client certificate: {without:?}");
    let foreign = client(&server_ca_file, Some((&stranger.0, &stranger.1)));
    let foreign = health(addr, "localhost", foreign).await;
    assert!(
        foreign.is_err(),
        "a certificate from another CA: {foreign:?}"
    );
    kabar.stop().await;
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_a_restart_and_a_broken_one_never() {
    let dir = work_dir("tls-rotate");
    let first = Ca::new("first CA");
    let first_file = first.write(&dir, "first");
    let (cert, key) = write_pair(&dir, "server", &first.issue("kabar"));
    let kabar = Served::start(
        &[("KABAR_TLS_CERT_FILE", &cert), ("KABAR_TLS_KEY_FILE", &key)],
        &[],
    )
    .await;
    let addr = kabar.grpc_addr;
    assert_eq!(
        health(addr, "localhost", client(&first_file, None)).await,
        Ok(SERVING)
    );
    let kept = tls::connect(
        "localhost",
        addr.port(),
        client(&first_file, None),
        Duration::from_secs(3),
    )
    .await
    .unwrap();

    // Half-written files (a key that does not match, then no PEM at all) keep the old
    // certificate in force.
    let second = Ca::new("second CA");
    let second_file = second.write(&dir, "second");
    let (new_cert, new_key) = second.issue("kabar");
    std::fs::write(&cert, &new_cert).unwrap();
    tokio::time::sleep(kabar::reload::POLL_INTERVAL * 2).await;
    assert_eq!(
        health(addr, "localhost", client(&first_file, None)).await,
        Ok(SERVING),
        "a certificate without its key was put in force"
    );
    std::fs::write(&key, "not a key").unwrap();
    tokio::time::sleep(kabar::reload::POLL_INTERVAL * 2).await;
    assert_eq!(
        health(addr, "localhost", client(&first_file, None)).await,
        Ok(SERVING)
    );

    // The whole new pair: new connections get it within a few seconds.
    std::fs::write(&key, &new_key).unwrap();
    let rotated = crate::support::eventually(Duration::from_secs(10), || {
        let config = client(&second_file, None);
        async move { health(addr, "localhost", config).await == Ok(SERVING) }
    })
    .await;
    assert!(rotated, "the rotated certificate was not served");
    let old = health(addr, "localhost", client(&first_file, None)).await;
    assert!(old.is_err(), "the old certificate is still served: {old:?}");
    // A connection made before goes on.
    assert_eq!(health_on(&kept).await, Ok(SERVING));
    kabar.stop().await;
}

#[test]
fn bad_tls_files_stop_start_up_naming_the_variable() {
    let dir = work_dir("tls-bad");
    let ca = Ca::new("CA");
    let (cert_pem, key_pem) = ca.issue("kabar");
    let (other_cert_pem, _) = ca.issue("other");
    let (cert, key) = write_pair(&dir, "good", &(cert_pem.clone(), key_pem.clone()));
    let other_cert = dir.join("other.crt");
    std::fs::write(&other_cert, &other_cert_pem).unwrap();
    let garbage = dir.join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnot base64!\n").unwrap();
    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let missing = dir.join("missing.pem");
    // A named pipe would block a plain open until something writes to it.
    let fifo = dir.join("fifo.pem");
    assert!(
        std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let p = |p: &Path| p.display().to_string();

    // The variables set, the variable named and what the error says.
    type Case = (Vec<(&'static str, String)>, &'static str, &'static str);
    let cases: Vec<Case> = vec![
        (
            vec![("KABAR_TLS_KEY_FILE", p(&key))],
            "KABAR_TLS_CERT_FILE",
            "is required",
        ),
        (
            vec![("KABAR_TLS_CERT_FILE", p(&cert))],
            "KABAR_TLS_KEY_FILE",
            "is required",
        ),
        (
            vec![
                ("KABAR_TLS_CERT_FILE", p(&missing)),
                ("KABAR_TLS_KEY_FILE", p(&key)),
            ],
            "KABAR_TLS_CERT_FILE",
            "cannot read",
        ),
        (
            vec![
                ("KABAR_TLS_CERT_FILE", p(&garbage)),
                ("KABAR_TLS_KEY_FILE", p(&key)),
            ],
            "KABAR_TLS_CERT_FILE",
            "not a PEM file",
        ),
        (
            vec![
                ("KABAR_TLS_CERT_FILE", p(&empty)),
                ("KABAR_TLS_KEY_FILE", p(&key)),
            ],
            "KABAR_TLS_CERT_FILE",
            "holds no certificate",
        ),
        (
            vec![
                ("KABAR_TLS_CERT_FILE", p(&cert)),
                ("KABAR_TLS_KEY_FILE", p(&cert)),
            ],
            "KABAR_TLS_KEY_FILE",
            "holds no private key",
        ),
        (
            vec![
                ("KABAR_TLS_CERT_FILE", p(&other_cert)),
                ("KABAR_TLS_KEY_FILE", p(&key)),
            ],
            "KABAR_TLS_KEY_FILE",
            "does not belong to the certificate",
        ),
        (
            vec![
                ("KABAR_TLS_CERT_FILE", p(&cert)),
                ("KABAR_TLS_KEY_FILE", p(&key)),
                ("KABAR_TLS_CLIENT_CA_FILE", p(&empty)),
            ],
            "KABAR_TLS_CLIENT_CA_FILE",
            "holds no certificate",
        ),
        (
            vec![
                ("KABAR_TLS_CERT_FILE", p(&fifo)),
                ("KABAR_TLS_KEY_FILE", p(&key)),
            ],
            "KABAR_TLS_CERT_FILE",
            "not a regular file",
        ),
        (
            vec![("KABAR_API_KEYS_FILE", p(&fifo))],
            "KABAR_API_KEYS_FILE",
            "not a regular file",
        ),
        (
            vec![
                ("KABAR_TLS_CERT_FILE", "/dev/zero".into()),
                ("KABAR_TLS_KEY_FILE", p(&key)),
            ],
            "KABAR_TLS_CERT_FILE",
            "not a regular file",
        ),
    ];
    let key_body: String = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for (vars, var, says) in cases {
        let mut map: HashMap<String, String> = HashMap::new();
        map.insert("KABAR_GRPC_ADDR".into(), "127.0.0.1:0".into());
        for (k, v) in &vars {
            map.insert((*k).into(), v.clone());
        }
        let e = Config::from_source(&map).expect_err(&format!("{vars:?} was accepted"));
        assert_eq!(e.var, var, "{vars:?}: {e}");
        assert!(e.message.contains(says), "{vars:?}: {e}");
        assert!(
            !e.to_string().contains(&key_body[..40]),
            "the key shown: {e}"
        );
    }
}

#[tokio::test]
async fn half_done_tls_handshakes_are_closed_at_the_slow_client_timeout() {
    let dir = work_dir("tls-slow");
    let ca = Ca::new("CA");
    let ca_file = ca.write(&dir, "ca");
    let (cert, key) = write_pair(&dir, "server", &ca.issue("kabar"));
    let kabar = Served::start(
        &[("KABAR_TLS_CERT_FILE", &cert), ("KABAR_TLS_KEY_FILE", &key)],
        &[("KABAR_SLOW_CLIENT_TIMEOUT_SECONDS", "1")],
    )
    .await;
    let addr = kabar.grpc_addr;

    // Silent after the TCP handshake.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Half a ClientHello.
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    // The TLS handshake done, then no HTTP/2 preface.
    let connector = tokio_rustls::TlsConnector::from(client(&ca_file, None));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut no_preface = connector
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("TLS handshake");

    let closed = |r: std::io::Result<usize>| matches!(r, Ok(0) | Err(_));
    let mut buf = [0u8; 64];
    let within = Duration::from_secs(4);
    let r = tokio::time::timeout(within, silent.read(&mut buf)).await;
    assert!(r.is_ok_and(closed), "a silent connection stayed open");
    let r = tokio::time::timeout(within, half.read(&mut buf)).await;
    assert!(r.is_ok_and(closed), "a half ClientHello stayed open");
    let r = tokio::time::timeout(within, no_preface.read(&mut buf)).await;
    assert!(
        r.is_ok_and(closed),
        "a connection without the preface stayed open"
    );

    // Everyone else is still served.
    assert_eq!(
        health(addr, "localhost", client(&ca_file, None)).await,
        Ok(SERVING)
    );
    kabar.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kabar_batch_reaches_kabar_over_https() {
    let dir = work_dir("tls-cli");
    let ca = Ca::new("CA");
    let ca_file = ca.write(&dir, "ca");
    let (cert, key) = write_pair(&dir, "server", &ca.issue("kabar"));
    let kabar = Served::start(
        &[("KABAR_TLS_CERT_FILE", &cert), ("KABAR_TLS_KEY_FILE", &key)],
        &[],
    )
    .await;
    let addr = format!("https://localhost:{}", kabar.grpc_addr.port());
    let status = |ca: Option<&Path>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kabar"));
        command
            .args(["batch", "status", "no-such-batch", "--addr", &addr])
            .current_dir(&dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default());
        if let Some(ca) = ca {
            command.env("KABAR_TLS_CA_FILE", ca);
        }
        // kabar serves on this runtime's other worker meanwhile.
        tokio::task::block_in_place(|| command.output().unwrap())
    };
    let out = status(Some(&ca_file));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no-such-batch") && !stderr.contains("cannot reach"),
        "over https the call reached kabar: {stderr}"
    );
    let out = status(None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("KABAR_TLS_CA_FILE"), "{stderr}");
    kabar.stop().await;
}
